"""Structured pruning of CNNs (issue 19 point 5): channel graph, surgery, slimming, CWD, PreCropping, WGSEF."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from sparsewise.errors import ConfigError, UnsupportedModelError
from sparsewise.scores import snip_scores
from sparsewise.structured import (
    BNScaleL1,
    BudgetLayer,
    ChannelBudgetSolver,
    ChannelWiseDistillLoss,
    GroupSpec,
    ProxRegularizer,
    channel_group_specs,
    channel_wise_kl,
    count_params,
    fold_removed_into_bias,
    nonzero_channels,
    precrop,
    prune_channels,
    remove_channels,
    trace_channels,
    wgsef_scales,
    zero_channels,
)
from sparsewise.structured.surgery import keep_all


class Block(nn.Module):
    def __init__(self, channels: int, out: int | None = None, stride: int = 1):
        super().__init__()
        out = out or channels
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.short = (nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                      if stride != 1 or out != channels else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = Block(8)
        self.b2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.b2(self.b1(self.stem(x)))), 1))


def randomize_bn(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(generator=generator)
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def cnn28() -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(12 * 7 * 7, 20), nn.ReLU(), nn.Linear(20, 10)))


def resnet() -> TinyResNet:
    torch.manual_seed(0)
    return randomize_bn(TinyResNet())


X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------- graph
def test_graph_groups_residual_writers_and_fixes_the_output():
    graph = trace_channels(resnet(), X)
    by_writer = {group.producers[0]: group for group in graph.groups}
    residual = graph.group_of("b1.conv2")
    assert set(residual.producers) == {"stem.0", "b1.conv2"}
    assert set(residual.norms) == {"stem.1", "b1.bn2"}
    assert {c.name for c in residual.consumers} == {"b1.conv1", "b2.conv1", "b2.short.0"}
    assert set(graph.group_of("b2.short.0").producers) == {"b2.conv2", "b2.short.0"}
    assert by_writer["fc"].fixed and not residual.fixed
    assert len(graph.prunable()) == 4


def test_graph_flatten_expands_channels_to_spatial_features():
    graph = trace_channels(cnn28(), X)
    second = graph.group_of("4")
    assert [(c.name, c.expand) for c in second.consumers] == [("9", 49)]
    assert graph.macs() == 28 * 28 * 8 * 9 + 14 * 14 * 12 * 8 * 9 + 588 * 20 + 20 * 10


# ---------------------------------------------------------------- surgery
@pytest.mark.parametrize("build", [cnn28, resnet])
def test_nothing_removed_keeps_outputs_and_params(build):
    model = build()
    reference = model(X)
    params = count_params(model)
    remove_channels(model, trace_channels(model, X), keep_all(trace_channels(model, X)))
    assert count_params(model) == params
    assert torch.equal(model(X), reference)


@pytest.mark.parametrize("build", [cnn28, resnet])
def test_rebuilt_model_equals_masked_original(build):
    model = build()
    graph = trace_channels(model, X)
    generator = torch.Generator().manual_seed(3)
    keep = {g.index: torch.randperm(g.size, generator=generator)[: g.size // 2 + 1] for g in graph.prunable()}
    masked = copy.deepcopy(model)
    zero_channels(masked, graph, keep)
    remove_channels(model, graph, keep)
    torch.testing.assert_close(model(X), masked(X), atol=1e-5, rtol=1e-5)
    widths = {name: module.out_channels for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    for group in graph.prunable():
        assert all(widths.get(name, len(keep[group.index])) == len(keep[group.index]) for name in group.producers)


def test_exact_parameter_count_after_removal():
    model = cnn28()
    graph = trace_channels(model, X)
    keep = {graph.group_of("0").index: torch.arange(4), graph.group_of("4").index: torch.tensor([0, 5, 11]),
            graph.group_of("9").index: torch.arange(20)}
    remove_channels(model, graph, keep)
    expected = (1 * 4 * 9 + 4) + 2 * 4 + (4 * 3 * 9 + 3) + 2 * 3 + (3 * 49 * 20 + 20) + (20 * 10 + 10)
    assert count_params(model) == expected
    assert model[9].in_features == 3 * 49 and model(X).shape == (3, 10)


def test_bias_compensation_matches_slimmed_original():
    """gamma = 0 leaves a constant act(beta): folded into the next layer's bias, removal is exact for
    a Linear consumer and an unpadded conv."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                                       nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 24 * 24, 10)))
    graph = trace_channels(model, X)
    keep = {graph.group_of("0").index: torch.tensor([1, 2, 6]), graph.group_of("3").index: torch.tensor([0, 4])}
    slimmed = copy.deepcopy(model)
    zero_channels(slimmed, graph, keep, keep_norm_bias=True)
    result = prune_channels(model, X, keep_ratio=1.0)  # a no-op run must not change anything
    assert result.macs_after == result.macs_before
    fold_removed_into_bias(model, graph, keep, X)
    remove_channels(model, graph, keep)
    torch.testing.assert_close(model(X), slimmed(X), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- prune_channels
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_channels_keep_ratio(scope):
    model = resnet()
    result = prune_channels(model, X, keep_ratio=0.5, scope=scope)
    assert sum(result.widths.values()) == pytest.approx(0.5 * sum(result.widths_before.values()), abs=2)
    assert model(X).shape == (3, 10)
    assert result.params_after == count_params(model) < result.params_before
    assert result.macs_after == trace_channels(model, X).macs()


def test_prune_channels_flops_ratio_stays_under_budget():
    model = cnn28()
    result = prune_channels(model, X, flops_ratio=0.5, importance="l1", scope="layer")
    assert 0.4 < result.macs_after / result.macs_before <= 0.5
    assert result.macs_after == trace_channels(model, X).macs()


def test_bad_ratios_raise_clear_errors():
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        prune_channels(cnn28(), X, keep_ratio=0.0)
    with pytest.raises(ConfigError, match="leaves no channel of 0"):
        prune_channels(cnn28(), X, keep_ratio=0.05, scope="layer", importance="l1")
    with pytest.raises(ConfigError, match="exactly one"):
        prune_channels(cnn28(), X, keep_ratio=0.5, flops_ratio=0.5)
    with pytest.raises(ConfigError, match="ranks none"):
        prune_channels(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)), X, keep_ratio=0.5)
    graph = trace_channels(cnn28(), X)
    with pytest.raises(ConfigError, match="keeping no channel"):
        remove_channels(cnn28(), graph, {graph.group_of("0").index: torch.tensor([], dtype=torch.long)})
    with pytest.raises(ConfigError, match="fixed"):
        remove_channels(cnn28(), graph, {graph.group_of("11").index: torch.arange(5)})


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class LiteralView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 28 * 28, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 4 * 28 * 28))


def test_unsupported_models_raise_naming_the_layer():
    with pytest.raises(UnsupportedModelError, match="cannot trace Untraceable"):
        trace_channels(Untraceable(), X)
    with pytest.raises(UnsupportedModelError, match="'1'.*grouped/depthwise"):
        trace_channels(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1)), X)
    with pytest.raises(UnsupportedModelError, match="cat.*written by a, b|cat.*written by a"):
        trace_channels(Concat(), X)
    with pytest.raises(UnsupportedModelError, match="literal 3136"):
        trace_channels(LiteralView(), X)


# ---------------------------------------------------------------- slimming and CWD
def test_bn_scale_l1_term_and_decay():
    model = resnet()
    l1 = BNScaleL1(model, strength=1e-2, total_steps=10)
    total = sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(l1.loss_term(), 1e-2 * total)
    for _ in range(10):
        l1.step()
    assert l1.current_strength() == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="no affine BatchNorm"):
        BNScaleL1(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_cwd_zero_for_identical_and_shift_invariant():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 6, 6, generator=generator)
    student = torch.randn(2, 5, 6, 6, generator=generator)
    assert float(channel_wise_kl(teacher, teacher, tau=2.0)) == pytest.approx(0.0, abs=1e-6)
    shift = torch.randn(2, 5, 1, 1, generator=generator) * 10
    torch.testing.assert_close(channel_wise_kl(student + shift, teacher - shift, 4.0), channel_wise_kl(student, teacher, 4.0),
                               atol=1e-5, rtol=1e-4)
    assert float(channel_wise_kl(student, teacher)) > 0
    aligned = ChannelWiseDistillLoss(tau=1.0, student_channels=3, teacher_channels=5)
    loss = aligned(student[:, :3], teacher)
    loss.backward()
    assert aligned.align.weight.grad is not None
    with pytest.raises(ConfigError, match="equal shape"):
        channel_wise_kl(student[:, :3], teacher)


# ---------------------------------------------------------------- WGSEF
def test_wgsef_prox_strong_shrinkage_keeps_at_most_k_groups():
    norms = torch.rand(50, generator=torch.Generator().manual_seed(0)) + 0.1
    scales = wgsef_scales(norms, torch.ones(50), k=7, strength=10.0)
    assert int((scales * norms > 0).sum()) == 7
    assert torch.equal(scales.topk(7).indices.sort().values, norms.topk(7).indices.sort().values)


def test_wgsef_prox_leaves_k_sparse_input_unchanged():
    norms = torch.zeros(40)
    norms[[3, 9, 30]] = torch.tensor([0.5, 2.0, 0.01])
    for shrinkage in ("group_lasso", "ridge"):
        scales = wgsef_scales(norms, torch.rand(40) + 0.5, k=3, strength=5.0, shrinkage=shrinkage)
        assert torch.equal(scales[[3, 9, 30]], torch.ones(3))
    ridge = wgsef_scales(torch.rand(10) + 1, torch.ones(10), k=2, strength=1.0, shrinkage="ridge")
    assert int((ridge == 1).sum()) == 2 and bool((ridge[ridge < 1] == 0.5).all())


def test_wgsef_prox_time_is_linear_in_groups():
    def timed(n: int) -> float:
        norms, weights = torch.rand(n), torch.ones(n)
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            wgsef_scales(norms, weights, k=n // 3, strength=0.3)
            runs.append(time.perf_counter() - start)
        return sorted(runs)[2]

    timed(1000)
    assert timed(1_000_000) / timed(100_000) < 25  # 10x the groups: ~10x the time, far from n log n blow-ups


def test_prox_regularizer_zeroes_channels_that_then_remove_exactly():
    model = resnet()
    graph = trace_channels(model, X)
    specs = channel_group_specs(model, graph)
    assert len(specs) == sum(g.size for g in graph.prunable())
    prox = ProxRegularizer(model, specs, keep=0.5, strength=100.0)
    prox.step(lr=1.0)
    keep = nonzero_channels(model, graph)
    assert {g: len(k) for g, k in keep.items()} == {g.index: g.size // 2 for g in graph.prunable()}
    reference = model(X)
    remove_channels(model, graph, keep)
    torch.testing.assert_close(model(X), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="does not have"):
        ProxRegularizer(model, [GroupSpec("g", (("nope.weight", 0, 0),))], keep=1, strength=1.0)


def test_prox_regularizer_runs_as_optimizer_post_hook():
    model = cnn28()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    graph = trace_channels(model, X)
    prox = ProxRegularizer(model, channel_group_specs(model, graph), keep=2, strength=1e4).attach(optimizer)
    model(X).sum().backward()
    optimizer.step()
    assert all(int(alive.sum()) == 2 for alive in prox.nonzero().values())
    prox.detach()


# ---------------------------------------------------------------- PreCropping
def vgg_like() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def test_budget_solver_matches_layer_densities_within_one_channel():
    model = vgg_like()
    example = torch.randn(2, 3, 8, 8)
    graph = trace_channels(model, example)
    params_of = {name: model.get_submodule(name).weight.numel() for name in graph.layers}
    solver = ChannelBudgetSolver.from_graph(graph, params_of)
    target_ratio = {"0": 0.6, "3": 0.45, "7": 0.5, "9": 0.7}  # densities a PAI scorer could give (consistent)
    ratio = {graph.group_of(name).index: value for name, value in target_ratio.items()}
    densities = {}
    for name, layer in graph.layers.items():
        densities[name] = ratio.get(layer.in_group, 1.0) * ratio.get(layer.out_group, 1.0)
    widths = solver.solve(densities)
    achieved = solver.layer_params(widths)
    for name, layer in graph.layers.items():
        per_channel = [params_of[name] / graph.groups[g].size for g in (layer.in_group, layer.out_group)
                       if g is not None and not graph.groups[g].fixed]
        assert abs(achieved[name] - densities[name] * params_of[name]) <= max(per_channel) + 1, name
    total = sum(params_of.values())
    assert sum(achieved.values()) == pytest.approx(sum(densities[n] * params_of[n] for n in params_of), rel=0.05)
    assert sum(achieved.values()) < total
    with pytest.raises(ConfigError, match="no density for layer"):
        solver.solve({"0": 0.5})


def test_budget_solver_couples_residual_groups():
    layers = [BudgetLayer("a", None, 0, 100), BudgetLayer("b", 0, 1, 400), BudgetLayer("c", 1, 0, 400)]
    widths = ChannelBudgetSolver(layers, {0: 10, 1: 20}, set()).solve({"a": 0.5, "b": 0.25, "c": 0.25})
    assert widths == {0: 5, 1: 10}


def test_precrop_rebuilds_untrained_net_at_flops_ratio():
    model = vgg_like()
    example = torch.randn(8, 3, 8, 8)
    batch = (example, torch.randint(0, 10, (8,)))
    result = precrop(model, example, batch, flops_ratio=0.5)
    assert 0.35 < result.macs_after / result.macs_before <= 0.5
    assert model(example).shape == (8, 10)
    assert result.params_after == count_params(model) < result.params_before
    assert trace_channels(model, example).macs() == result.macs_after


def test_snip_scores_checks_shapes():
    weight, grad = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(snip_scores(weight, grad), (weight * grad).abs())
    with pytest.raises(ConfigError, match="gradient shaped like the weight"):
        snip_scores(weight, grad[:, :3])
