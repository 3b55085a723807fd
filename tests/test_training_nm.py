"""N:M sparse training: SR-STE, PGF, BDWP and CAST (the catalog's defining properties)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsewise import training
from sparsewise.errors import ConfigError
from sparsewise.patterns import check_mask, nm_mask
from sparsewise.records import get_records
from sparsewise.training import MASK_BUFFER
from sparsewise.training.bdwp import bidirectional_masks
from sparsewise.training.masks import nm_stages


def linear_8x16(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 8)).to(dtype)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def group_counts(rows: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros of every group of m consecutive inputs of [out, in] rows."""
    return (rows != 0).reshape(rows.shape[0], -1, m).sum(-1)


def fit_steps(model, optimizer, sparsity, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=generator)
        y = torch.randn(32, 8, generator=generator)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsity.step()


def check_finalized(model, layers, names_before: list[str], method: str, pattern: str) -> None:
    """The state every method must leave: N:M zeros, records, no buffer, wrapper or new keys."""
    records = get_records(model)
    assert set(records) == set(layers)
    n, m = map(int, pattern.split(":"))
    for name, layer in layers.items():
        rows = layer.get_weight()
        assert check_mask(rows != 0, pattern), name
        assert records[name].pattern == pattern and records[name].method == f"training:{method}"
        assert records[name].achieved == pytest.approx(1 - n / m)
        assert torch.equal(records[name].mask, rows != 0)  # random weights: kept entries are nonzero
        assert MASK_BUFFER not in layer.module._buffers
        assert not parametrize.is_parametrized(layer.module)
        assert "forward" not in layer.module.__dict__
    assert list(model.state_dict()) == names_before  # same keys, same order


# ---------------------------------------------------------------------------------------- SR-STE
def test_srste_forward_keeps_two_largest_per_group_and_refines_gradient():
    model = linear_8x16()
    dense = model[0].weight.detach().clone()
    run = training.attach(model, None, method="srste", pattern="2:4", total_steps=10)
    effective = model[0].weight
    assert torch.equal(group_counts(effective.detach(), 4), torch.full((8, 4), 2))
    mask = nm_mask(dense.abs(), 2, 4)
    assert torch.equal(effective.detach(), dense * mask)
    # the kept two are the largest |w| of their group
    groups = dense.abs().reshape(8, 4, 4)
    kept_min = groups.masked_fill(~mask.reshape(8, 4, 4), math.inf).min(-1).values
    dropped_max = groups.masked_fill(mask.reshape(8, 4, 4), -math.inf).max(-1).values
    assert (kept_min >= dropped_max).all()
    assert torch.equal(model[0].sparsity_mask, mask)

    upstream = torch.randn(8, 16)
    (effective * upstream).sum().backward()
    expected = upstream + 2e-4 * (1 - mask.float()) * dense
    torch.testing.assert_close(run.layers["0"].parameter.grad, expected, rtol=0, atol=1e-7)
    assert not torch.equal(run.layers["0"].parameter.grad, upstream)


def test_plain_ste_passes_the_gradient_exactly():
    model = linear_8x16()
    run = training.attach(model, None, method="srste", pattern="2:4", total_steps=10, decay=0.0)
    upstream = torch.randn(8, 16)
    (model[0].weight * upstream).sum().backward()
    assert torch.equal(run.layers["0"].parameter.grad, upstream)


def test_srste_mask_follows_the_dense_weights_and_optimizer_keeps_its_parameter():
    model = linear_8x16()
    original = model[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = training.attach(model, optimizer, method="srste", pattern="2:4", total_steps=10)
    assert run.layers["0"].parameter is original
    assert any(p is original for p in optimizer.param_groups[0]["params"])
    with torch.no_grad():  # swap two entries' magnitudes: the next forward's mask must follow
        dense = original.detach()
        dense[0, :4] = torch.tensor([0.0, 0.1, 5.0, 6.0])
    _ = model[0].weight
    assert model[0].sparsity_mask[0, :4].tolist() == [False, False, True, True]
    names = ["0.weight", "0.bias"]
    fit_steps(model, optimizer, run, 3)
    run.finalize()
    assert model[0].weight is original
    check_finalized(model, {"0": run.layers["0"].layer}, names, "srste", "2:4")


def test_srste_on_gpt2_conv1d_groups_run_along_input_features(tiny_gpt2):
    model = tiny_gpt2.train()
    names = list(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = training.attach(model, optimizer, method="srste", pattern="2:4", total_steps=3)
    layers = {name: item.layer for name, item in run.layers.items()}
    assert any(layer.transposed for layer in layers.values())
    for layer in layers.values():  # the forward weight, stored [in, out], is 2:4 along in
        rows = layer.to_rows(layer.module.weight.detach())
        assert torch.equal(group_counts(rows, 4), torch.full_like(group_counts(rows, 4), 2))
        assert torch.equal(layer.to_rows(layer.module.sparsity_mask), rows != 0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        run.step()
    run.finalize()
    check_finalized(model, layers, names, "srste", "2:4")
    # groups along the stored layout's last dim (the out-features) would not be 2:4
    assert not all(check_mask(layer.module.weight != 0, "2:4") for layer in layers.values())


def test_srste_conv2d_groups_run_along_input_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    names = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    run = training.attach(model, optimizer, method="srste", pattern="2:4", total_steps=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(2, 8, 6, 6, generator=generator)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        run.step()
    layers = {name: item.layer for name, item in run.layers.items()}
    run.finalize()
    check_finalized(model, layers, names, "srste", "2:4")
    for conv in (model[0], model[2]):
        out_c, in_c, kh, kw = conv.weight.shape
        per_group = (conv.weight != 0).permute(0, 2, 3, 1).reshape(out_c, kh, kw, in_c // 4, 4).sum(-1)
        assert (per_group == 2).all()  # every (out, h, w): 2 of each 4 consecutive input channels


def test_nm_methods_reject_unstructured_patterns():
    for method in ("srste", "pgf", "cast", "bdwp"):
        model = linear_8x16()
        with pytest.raises(ConfigError, match="N:M"):
            training.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                            sparsity=0.5, total_steps=10)
        assert MASK_BUFFER not in model[0]._buffers and not parametrize.is_parametrized(model[0])


# ---------------------------------------------------------------------------------------- PGF
def test_pgf_exponential_decay_and_unchanged_gradient():
    model = linear_8x16()
    dense = model[0].weight.detach().clone()
    run = training.attach(model, None, method="pgf", pattern="2:4", total_steps=200_000, decay_rate=1e-4)
    assert torch.equal(model[0].weight.detach(), dense)  # t = 0: alpha = 1
    mask = nm_mask(dense.abs(), 2, 4)
    assert torch.equal(model[0].sparsity_mask, mask)

    run.method.update(run, 100_000)
    effective = model[0].weight
    torch.testing.assert_close(effective.detach(), torch.where(mask, dense, dense * math.exp(-10)))
    torch.testing.assert_close(effective.detach()[~mask] / dense[~mask], torch.full(((~mask).sum(),), math.exp(-10)))
    upstream = torch.randn(8, 16)
    (effective * upstream).sum().backward()
    assert torch.equal(run.layers["0"].parameter.grad, upstream)

    run.method.update(run, 160_000)  # stage_until = 0.8: hard mask
    assert torch.equal(model[0].weight.detach(), dense * mask)


def test_pgf_stage_lists():
    assert nm_stages(1, 8) == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert nm_stages(2, 4) == [(3, 4), (2, 4)]
    assert nm_stages(2, 4, "geometric") == [(16, 32), (8, 16), (4, 8), (2, 4)]


def test_pgf_stepwise_structure_decay_and_dense_warmup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8))
    dense = model[0].weight.detach().clone()
    run = training.attach(model, None, method="pgf", pattern="1:8", total_steps=110, stages="stepwise",
                          decay_schedule=None, dense_until=10 / 110, stage_until=90 / 110)
    assert torch.equal(model[0].weight.detach(), dense) and model[0].sparsity_mask.all()
    for step, kept in ((10, 7), (30, 4), (50, 2), (70, 1), (95, 1)):
        run.method.update(run, step)
        counts = group_counts(model[0].weight.detach(), 8)
        assert torch.equal(counts, torch.full_like(counts, kept)), step


def test_pgf_linear_default_rate_reaches_zero_at_stage_until():
    model = linear_8x16()
    run = training.attach(model, None, method="pgf", pattern="2:4", total_steps=100, decay_schedule="linear")
    assert run.method.alpha(0) == 1.0
    assert run.method.alpha(40) == pytest.approx(0.5)
    assert run.method.alpha(80) == 0.0


# ---------------------------------------------------------------------------------------- BDWP
def test_bdwp_bidirectional_masks_and_gradients():
    model = linear_8x16(dtype=torch.float64)
    weight, bias = model[0].weight, model[0].bias
    run = training.attach(model, None, method="bdwp", pattern="2:4", total_steps=10)
    forward_mask, backward_mask = bidirectional_masks(weight, 2, 4)
    assert torch.equal(forward_mask.reshape(8, 4, 4).sum(-1), torch.full((8, 4), 2))  # along in-features
    assert torch.equal(backward_mask.T.reshape(16, 2, 4).sum(-1), torch.full((16, 2), 2))  # along out-features
    assert not torch.equal(forward_mask, backward_mask)

    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    y = model(x)
    torch.testing.assert_close(y, x @ (weight * forward_mask).T + bias)
    assert torch.equal(model[0].sparsity_mask, forward_mask)
    grad_y = torch.randn(5, 8, dtype=torch.float64)
    y.backward(grad_y)
    assert torch.equal(x.grad, grad_y @ (weight.detach() * backward_mask))
    torch.testing.assert_close(weight.grad, grad_y.T @ x.detach(), rtol=0, atol=1e-12)  # dense dW
    torch.testing.assert_close(bias.grad, grad_y.sum(0))
    assert run.layers["0"].parameter is weight


def test_bdwp_rejects_non_linear_layers_and_bad_out_features(tiny_gpt2):
    with pytest.raises(ConfigError, match="nn.Linear"):
        training.attach(tiny_gpt2, None, method="bdwp", pattern="2:4", total_steps=10)
    model = nn.Sequential(nn.Linear(16, 6))
    with pytest.raises(ConfigError, match="out-features"):
        training.attach(model, None, method="bdwp", pattern="2:4", total_steps=10)
    assert "forward" not in model[0].__dict__


# ---------------------------------------------------------------------------------------- CAST
def test_cast_decays_only_dropped_entries_and_projects_continuously():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    start = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # zero task gradient: only the decay moves W
    run = training.attach(model, optimizer, method="cast", pattern="2:4", total_steps=100, decay=1.0)
    keep = nm_mask(start.abs(), 2, 4)
    # s_g (mean kept |w| of the group) over its layer mean: constant, since kept entries do not move
    strength = (start.abs() * keep).reshape(16, 4, 4).sum(-1, keepdim=True).expand(-1, -1, 4).reshape(16, 16) / 2
    strength = strength / strength.mean()
    x = torch.randn(4, 16)

    def one_step():
        (0.0 * model(x).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        run.step()

    for _ in range(10):
        one_step()
    weight = model[0].weight.detach()
    assert torch.equal(weight[keep], start[keep])  # the kept entries are untouched by the decay
    total = 0.1 * sum(run.method.lambda_at(t, 100) for t in range(1, 11))  # sum of eta lambda_t
    expected = torch.sign(start) * torch.clamp(start.abs() - total * strength, min=0)
    torch.testing.assert_close(weight[~keep], expected[~keep])
    assert (weight[~keep].abs() < start[~keep].abs()).all() and not run.method.masks_gradients

    while not run.method.masks_gradients:
        one_step()
    assert run.method.hard_step < 90  # converged before hard_at: every dropped weight reached 0
    assert run.method.projection_change < 1e-6
    weight = model[0].weight.detach().clone()
    assert torch.equal(weight[keep], start[keep]) and (weight[~keep] == 0).all()
    one_step()
    run.finalize()
    assert (model[0].weight.detach() - weight).abs().max() < 1e-6
    assert check_mask(model[0].weight != 0, "2:4")


def test_cast_hard_at_with_row_rescale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    start = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = training.attach(model, optimizer, method="cast", pattern="2:4", total_steps=10, decay=0.0, hard_at=0.5)
    for step in range(1, 6):
        (0.0 * model(torch.randn(2, 16)).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 5:
            with pytest.warns(UserWarning, match="projection"):
                run.step()
        else:
            run.step()
    assert run.method.masks_gradients and run.method.hard_step == 5
    weight = model[0].weight.detach()
    keep = nm_mask(start.abs(), 2, 4)
    assert torch.equal(weight != 0, keep)
    torch.testing.assert_close(weight.norm(dim=1), start.norm(dim=1))  # row norms preserved
    ratio = weight[keep].reshape(16, 8) / start[keep].reshape(16, 8)
    torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, 8))  # one factor per row


# ---------------------------------------------------------------------------------------- all four
@pytest.mark.filterwarnings("ignore:cast. the hard")
@pytest.mark.parametrize(("method", "options", "pattern"), [
    ("srste", {}, "2:4"),
    ("pgf", {}, "2:4"),
    ("pgf", {"stages": "stepwise", "decay_schedule": "linear"}, "1:8"),
    ("pgf", {"stages": "geometric"}, "2:8"),
    ("bdwp", {}, "2:8"),
    ("cast", {}, "2:4"),
])
def test_attach_train_finalize(method, options, pattern):
    model = mlp()
    names = list(model.state_dict())
    params = list(model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = training.attach(model, optimizer, method=method, pattern=pattern, total_steps=8, **options)
    layers = {name: item.layer for name, item in run.layers.items()}
    for item in run.layers.values():
        assert any(item.parameter is p for p in params)
    fit_steps(model, optimizer, run, 6)
    state = run.state_dict()
    assert state["method"] == method
    records = run.finalize()
    assert set(records) == set(layers)
    check_finalized(model, layers, names, method, pattern)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params, strict=True))
    # the pruned model still trains with the optimizer it had (same Parameter objects)
    loss = nn.functional.mse_loss(model(torch.randn(4, 16)), torch.randn(4, 8))
    loss.backward()
    optimizer.step()
