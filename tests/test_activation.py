"""Activation sparsity: the defining property of every method, and the attach/measure/remove cycle."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import VOCAB, build_tiny

import sparsewise as sw
from sparsewise.activation.thresholds import (
    cett,
    cett_threshold,
    column_norms,
    quantile_threshold,
    rsparse_budget,
    topk_keep_mask,
)
from sparsewise.errors import ConfigError


def _ids(n: int, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.65])
def test_calibrated_threshold_hits_the_sparsity_on_held_out_activations(sparsity):
    generator = torch.Generator().manual_seed(0)
    channel_scale = torch.rand(512, generator=generator)

    def laplacian(rows):  # heavy-tailed, like LLM projection inputs (TEAL), channel scales shared
        magnitude = torch.empty(rows, 512).exponential_(generator=generator)
        sign = torch.randint(0, 2, (rows, 512), generator=generator) * 2 - 1
        return magnitude * sign * channel_scale

    calibration, held_out = laplacian(64), laplacian(64)
    threshold = quantile_threshold(calibration.abs(), sparsity)
    assert abs(float((held_out.abs() <= threshold).float().mean()) - sparsity) < 0.01
    assert quantile_threshold(calibration.abs(), 0.0) == float("-inf")
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        quantile_threshold(calibration, 1.0)


def test_topk_is_identity_at_full_width_and_keeps_exactly_k_per_token():
    scores = torch.rand(5, 7, 16)
    assert topk_keep_mask(scores, 1.0).all()
    single = topk_keep_mask(scores, 1 / 16)
    assert torch.equal(single.sum(-1), torch.ones(5, 7, dtype=torch.long))
    assert torch.equal(single, scores == scores.max(-1, keepdim=True).values)
    assert torch.equal(topk_keep_mask(scores, 0.5).sum(-1), torch.full((5, 7), 8))


def test_wina_topk_is_the_best_subset_for_orthogonal_columns_and_beats_teal_on_random_weights():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator))
    weight = q * torch.tensor([3.0, 0.2, 1.5, 0.7, 2.0, 0.1])  # orthogonal columns, different norms
    norms = column_norms(weight)
    for _ in range(20):
        x = torch.randn(6, generator=generator)
        keep = 3
        chosen = topk_keep_mask(x.abs() * norms, keep / 6)
        error = (weight @ (x - x * chosen)).norm()
        best = min((weight @ (x - x * torch.isin(torch.arange(6), torch.tensor(subset)))).norm()
                   for subset in itertools.combinations(range(6), keep))
        assert error <= best + 1e-5
    weight = torch.randn(32, 64, generator=generator) * torch.rand(64, generator=generator)
    norms = column_norms(weight)
    x = torch.randn(1000, 64, generator=generator)
    wina = topk_keep_mask(x.abs() * norms, 0.5)
    teal = topk_keep_mask(x.abs(), 0.5)
    wina_error = ((x * ~wina) @ weight.t()).norm(dim=-1).mean()
    teal_error = ((x * ~teal) @ weight.t()).norm(dim=-1).mean()
    assert wina_error < teal_error


def test_chess_channel_thresholds_favour_large_up_outputs_and_lose_less_than_one_threshold():
    from sparsewise.activation.base import Site
    from sparsewise.activation.chess import Chess

    generator = torch.Generator().manual_seed(0)
    width = 64
    gate = torch.randn(4096, width, generator=generator)
    up_scale = torch.linspace(0.1, 3.0, width)
    up = torch.randn(4096, width, generator=generator) * up_scale
    site = Site("mlp.act", torch.nn.SiLU(), "gate", 0, torch.randn(16, width), 16 * width)
    method = Chess()
    method.observe(site, up[:2048])
    method.finish_observing(site)
    scores = method.score(site, gate[:2048])
    threshold = quantile_threshold(scores, 0.5)
    held_gate, held_up = gate[2048:], up[2048:]
    keep = method.score(site, held_gate) > threshold
    assert abs(1 - float(keep.float().mean()) - 0.5) < 0.01
    # per-channel threshold on |g| = sqrt(T / E[u^2]): smaller where the up output is larger
    per_channel = (threshold / site.constants["up_mean_square"]).sqrt()
    assert per_channel[-1] < per_channel[0]
    single = held_gate.abs() > quantile_threshold(gate[:2048].abs(), 0.5)
    chess_error = ((held_gate * ~keep) * held_up).square().sum()
    cats_error = ((held_gate * ~single) * held_up).square().sum()
    assert chess_error < cats_error


def test_rsparse_budget_alpha_one_and_full_rank():
    from sparsewise.activation.thresholds import low_rank_factors

    generator = torch.Generator().manual_seed(0)
    out_features, in_features = 64, 128
    kept, rank = rsparse_budget(in_features, out_features, 0.5, alpha=0.6)
    params = kept * in_features * out_features + rank * (in_features + out_features)
    assert abs(params - 0.5 * in_features * out_features) <= in_features + out_features  # within one rank step
    assert rsparse_budget(in_features, out_features, 0.5, alpha=1.0) == (0.5, 0)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(10, in_features, generator=generator)
    mask = torch.rand(10, in_features, generator=generator) > 0.5
    errors = []
    for r in (0, 8, 32, 64):
        left, right = low_rank_factors(weight, r)
        y = (x * mask) @ weight.t() + ((x * ~mask) @ right.t()) @ left.t()
        errors.append(float((y - x @ weight.t()).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]


def test_cett_is_monotone_and_its_threshold_search_hits_the_target():
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(64, 96, generator=generator) * torch.rand(96, generator=generator)
    down = torch.randn(32, 96, generator=generator)
    magnitudes = activations.abs() * column_norms(down)
    values = [cett(activations, down, t) for t in torch.linspace(0, float(magnitudes.max()), 12).tolist()]
    assert values == sorted(values)
    assert cett(activations, down, float(magnitudes.min()) - 1e-6) == 0.0
    assert abs(cett(activations, down, float(magnitudes.max())) - 1.0) < 1e-6
    threshold = cett_threshold(activations, down, 0.2)
    assert abs(cett(activations, down, threshold) - 0.2) < 2e-3


@pytest.mark.parametrize("method", ["teal", "wina", "r-sparse"])
def test_llama_sites_measured_sparsity_and_removal(method):
    model = build_tiny("llama")
    calibration, held_out = _ids(16, seed=0), _ids(8, seed=1)
    with torch.no_grad():
        dense = model(held_out).logits
    handle = sw.sparsify_activations(model, method=method, sparsity=0.5, calibration=calibration, seed=0)
    assert len(handle.hooks) == 14  # q/k/v/o/gate/up/down x 2 blocks
    measured = handle.measure([{"input_ids": held_out}])
    # R-Sparse zeroes more on the full-weight path (the rest goes through the low-rank side path)
    nominal = {hook.site.name: hook.zeroed for hook in handle.hooks}
    assert method != "r-sparse" or min(nominal.values()) > 0.5
    # block 0's q/k/v read the embeddings: same distribution as calibration, held-out tokens
    first = "model.layers.0.self_attn.q_proj"
    assert abs(measured[first] - nominal[first]) < 0.01
    # later sites read inputs already changed by upstream sparsity (thresholds come from the dense
    # model, as in TEAL): measured drifts from nominal, which is why it is measured
    assert all(abs(measured[name] - nominal[name]) < 0.1 for name in measured), measured
    with torch.no_grad():
        sparse = model(held_out).logits
    assert not torch.allclose(sparse, dense)
    text = handle.summary(measured)
    assert f"{method}, uniform allocation, target 50%, 14 sites (input)" in text and "measured per site" in text
    assert sw.remove_activation_sparsity(model) == 14
    with torch.no_grad():
        assert torch.equal(model(held_out).logits, dense)


def test_same_seed_same_thresholds_and_set_sparsity_rethresholds():
    calibration = _ids(8)
    thresholds = []
    for _ in range(2):
        model = build_tiny("llama")
        handle = sw.sparsify_activations(model, "teal", 0.4, calibration, seed=3)
        thresholds.append([hook.threshold for hook in handle.hooks])
        sw.remove_activation_sparsity(model)
    assert thresholds[0] == thresholds[1]
    handle = sw.sparsify_activations(model, "teal", 0.4, calibration, seed=3)
    handle.set_sparsity(0.65)
    assert all(hook.threshold > old for hook, old in zip(handle.hooks, thresholds[0], strict=True))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("method", ["teal", "wina", "cats", "chess"])
def test_methods_work_on_other_families(family, method):
    model = build_tiny(family)
    calibration = _ids(8)
    handle = sw.sparsify_activations(model, method, 0.5, calibration)
    per_block = {"gpt2": {"cats": 1, "chess": 3}, "bert": {"cats": 1, "chess": 5}}[family].get(
        method, 4 if family == "gpt2" else 6)  # chess = its MLP gate + the attention projections' inputs
    expected_sites = 2 * per_block
    assert len(handle.hooks) == expected_sites
    measured = handle.weighted(handle.measure([{"input_ids": _ids(4, seed=2)}]))
    assert abs(measured - 0.5) < 0.05


def test_cats_and_chess_zero_the_mlp_activation_and_chess_uses_the_up_projection():
    model = build_tiny("llama")
    handle = sw.sparsify_activations(model, "chess", 0.5, _ids(8))
    assert [hook.site.name.rsplit(".", 1)[-1] for hook in handle.hooks[:5]] == [
        "act_fn", "q_proj", "k_proj", "v_proj", "o_proj"]  # CHESS w/: FFN gate + attention inputs
    assert len(sw.sparsify_activations(build_tiny("llama"), "chess", 0.5, _ids(8), attention=False).hooks) == 2
    site = handle.hooks[0].site
    assert site.kind == "gate" and site.up is model.model.layers[0].mlp.up_proj
    assert site.weight.shape == model.model.layers[0].mlp.down_proj.weight.shape
    assert not torch.allclose(site.constants["up_mean_square"], torch.ones_like(site.constants["up_mean_square"]))


def test_greedy_allocation_meets_the_target_and_differs_across_projections():
    model = build_tiny("llama")
    handle = sw.sparsify_activations(model, "teal", 0.5, _ids(8), allocation="greedy", greedy_step=0.1,
                                     greedy_limit=0.6)
    levels = handle.site_sparsity()
    for block in range(2):
        hooks = [hook for hook in handle.hooks if hook.site.block == block]
        weighted = sum(hook.sparsity * hook.site.params for hook in hooks) / sum(hook.site.params for hook in hooks)
        assert 0.5 <= weighted < 0.5 + 0.1
    assert len(set(round(value, 3) for value in levels.values())) > 1
    with pytest.raises(ConfigError, match="greedy_limit"):
        handle.set_sparsity(0.65)


def test_topk_needs_no_calibration_and_keeps_k_per_token():
    model = build_tiny("llama")
    handle = sw.sparsify_activations(model, "topk", 0.75)
    measured = handle.measure([{"input_ids": _ids(2)}])
    assert all(abs(value - 0.75) < 1e-6 for value in measured.values())


def test_bad_requests_say_what_to_do():
    model = build_tiny("llama")
    with pytest.raises(ConfigError, match="\\[0, 1\\)"):
        sw.sparsify_activations(model, "teal", 1.0, _ids(4))
    with pytest.raises(ConfigError, match="calibration data"):
        sw.sparsify_activations(model, "teal", 0.5)
    with pytest.raises(ConfigError, match="unknown activation method"):
        sw.sparsify_activations(model, "nope", 0.5, _ids(4))
    sw.sparsify_activations(model, "topk", 0.5)
    with pytest.raises(ConfigError, match="remove_activation_sparsity"):
        sw.sparsify_activations(model, "topk", 0.5)


@pytest.mark.parametrize("method", ["teal", "wina", "topk", "cats"])
def test_accelerated_activation_linears_compute_what_the_hooks_did(method):
    from sparsewise.runtime import ActivationSparseLinear, accelerate_activations

    model = build_tiny("llama")
    held_out = _ids(2, seed=5)
    handle = sw.sparsify_activations(model, method, 0.5, None if method == "topk" else _ids(8))
    with torch.no_grad():
        expected = model(held_out).logits
    how = accelerate_activations(model)
    swapped = [module for module in model.modules() if isinstance(module, ActivationSparseLinear)]
    assert len(swapped) == (2 if method == "cats" else 14) == len(how)
    assert set(how.values()) == {"kernel threshold"} if method in ("teal", "wina") else {"hook + skip zeros"}
    with torch.no_grad():
        got = model(held_out).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert handle.hooks  # the handle still describes the sites


def _pruned_tiny_llama():
    from sparsewise.patterns import unstructured_mask

    model = build_tiny("llama")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.weight.mul_(unstructured_mask(module.weight.abs(), 0.5))
    return model


def test_activation_sparse_linears_over_pruned_weights_store_only_survivors():
    from sparsewise.kernels.layouts import PLANE_PAD
    from sparsewise.runtime import ActivationSparseLinear, accelerate_activations

    model = _pruned_tiny_llama()
    held_out = _ids(2, seed=5)
    sw.sparsify_activations(model, "teal", 0.5, _ids(8))
    with torch.no_grad():
        expected = model(held_out).logits
    accelerate_activations(model, weight_layout="bitmask")
    swapped = [module for module in model.modules() if isinstance(module, ActivationSparseLinear)]
    assert swapped and all(module.packed for module in swapped)
    for module in swapped:  # only the surviving weights are stored (+ the kernel's read-window padding)
        assert module.values.numel() - PLANE_PAD == int((module.dense_weight_t() != 0).sum())
    from sparsewise.patterns import nm_mask

    dense24 = torch.randn(64, 128)
    dense24 = dense24 * nm_mask(dense24.abs(), 2, 4)
    fused = ActivationSparseLinear(dense24, None, torch.full((128,), 0.6))  # auto: the 2:4 kernel's layout
    assert fused.layout_name == "2:4" and fused.weight_nbytes < 0.6 * dense24.numel() * 4
    x = torch.randn(3, 128)
    torch.testing.assert_close(fused(x), torch.where(x.abs() > 0.6, x, torch.zeros(())) @ dense24.t())
    big = torch.randn(512, 1024) * (torch.rand(512, 1024) > 0.5)
    packed = ActivationSparseLinear(big.half(), None, torch.tensor(0.5), weight_layout="bitmask")
    assert packed.weight_nbytes < 0.58 * big.numel() * 2  # fp16 values of half the weights + 1 bit each
    with torch.no_grad():
        got = model(held_out).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="weight_layout"):
        ActivationSparseLinear(torch.zeros(4, 4), None, torch.tensor(0.0), weight_layout="csr")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accelerated_activations_on_gpu_match_the_hooks_and_graph_capture():
    from sparsewise.runtime import accelerate_activations
    from sparsewise.runtime.dispatch import capture

    model = build_tiny("llama").to("cuda", torch.float16)
    handle = sw.sparsify_activations(model, "wina", 0.5, _ids(8).cuda())
    step = _ids(1, seqlen=1, seed=7).cuda()
    with torch.no_grad():
        expected = model(step).logits.float()
        accelerate_activations(model)
        got = model(step).logits.float()
        assert ((got - expected).norm() / expected.norm()).item() < 5e-3
        replay, out = capture(lambda: model(step).logits)
        replay()
        torch.testing.assert_close(out.float(), got, rtol=2e-3, atol=2e-3)
    assert handle.sparsity == 0.5


def test_ppl_p_sparsity_grows_with_the_allowed_loss_and_is_near_zero_without():
    from sparsewise.activation.sparsing_law import ppl_p_sparsity

    model = build_tiny("llama")
    eval_ids = _ids(4, seed=9)
    with torch.no_grad():
        dense_logits = model(eval_ids).logits

    def perplexity_of(m):
        # a random model's real perplexity ignores its FFNs (it is ~uniform already): a stand-in
        # that grows with the output error keeps the search meaningful
        with torch.no_grad():
            logits = m(eval_ids).logits
        return 100.0 * (1.0 + float((logits - dense_logits).norm() / dense_logits.norm()))

    calibration = [{"input_ids": _ids(4, seed=1)}]
    strict = ppl_p_sparsity(model, perplexity_of, calibration, p=0.0, steps=6)
    loose = ppl_p_sparsity(model, perplexity_of, calibration, p=5.0, steps=6)
    assert strict.ppl <= strict.dense_ppl * (1 + 1e-9) and loose.ppl <= loose.dense_ppl * 1.05
    assert strict.sparsity < 0.1 < loose.sparsity < 1.0
    assert loose.activation_ratio == pytest.approx(1 - loose.sparsity)
    assert len(loose.per_layer) == 2 and len(loose.steps) == 6
    assert all(len(list(m._forward_pre_hooks)) == 0 for m in model.modules())  # nothing left attached


def _poison_inputs(planes, dead: torch.Tensor):
    """A copy of a W^T bit-plane layout (rows = inputs) whose ``dead`` rows are garbage: every keep
    bit set and their stored values NaN. A kernel that reads any of those rows returns NaN or a wrong sum."""
    from sparsewise.kernels.layouts import PLANE_PAD, BitPlanes

    values, words = planes.values.clone(), planes.words.clone()
    starts = planes.offsets[:, 0].tolist() + [values.numel() - PLANE_PAD]
    for row in dead.nonzero().flatten().tolist():
        values[starts[row]:starts[row + 1]] = float("nan")
        words[row] = -1
    return BitPlanes(values, words, planes.offsets, planes.shape)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("weight_layout", ["dense", "bitmask"])
def test_activation_sparse_kernels_on_gpu_match_float64_and_read_only_kept_inputs(dtype, m, weight_layout):
    """decode.act_gemv (dense W^T) and act_gemv_bitplanes (50% pruned W^T as bit planes), TEAL-like
    and WINA-like thresholds, against float64; the W^T rows of inputs no row of x keeps are
    poisoned and the result must not change."""
    from sparsewise.kernels import decode
    from sparsewise.kernels.layouts import pack_bitplanes
    from sparsewise.patterns import unstructured_mask

    generator = torch.Generator(device="cuda").manual_seed(m)
    n, k = 1000, 4096
    weight = torch.randn(n, k, device="cuda", dtype=dtype, generator=generator) / k**0.5
    if weight_layout == "bitmask":
        weight = weight * unstructured_mask(weight.abs().float(), 0.5).to(dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=generator)
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=generator)
    norms = weight.float().norm(dim=0)
    for thresholds in (torch.full((k,), 0.8, device="cuda"), 0.8 * norms.mean() / norms):
        kept = torch.where(x.abs().float() > thresholds, x, torch.zeros((), dtype=dtype, device="cuda"))
        ref = torch.nn.functional.linear(kept.double(), weight.double(), bias.double())
        dead = (kept == 0).all(0)
        assert dead.any()
        weight_t = weight.t().contiguous()
        if weight_layout == "dense":
            poisoned = weight_t.clone()
            poisoned[dead] = float("nan")
            layouts = (weight_t, poisoned)
        else:
            planes = pack_bitplanes(weight_t)
            layouts = (planes, _poison_inputs(planes, dead))
        for splits in (0, 1, 4):
            for stored in layouts:
                if weight_layout == "dense":
                    out = decode.act_gemv(x, thresholds, stored, bias, splits)
                else:
                    out = decode.act_gemv_bitplanes(x, thresholds, stored.values, stored.words,
                                                    stored.offsets.t().contiguous(), bias, n, splits)
                error = ((out.double() - ref).norm() / ref.norm()).item()
                assert error < (1.5e-2 if dtype == torch.bfloat16 else 2e-3), (splits, error)
