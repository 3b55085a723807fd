"""Scores, the SparseGPT solver and the registered methods on small hand-made layers."""

from __future__ import annotations

import time

import pytest
import torch

from sparsewise.calibration.stats import STAT_HESSIAN, STAT_NORMS, LayerStats
from sparsewise.errors import ConfigError, DataError, NumericalError, PatternError
from sparsewise.methods import LayerResult, LayerTask, PruningMethod, available_methods, get_method
from sparsewise.patterns import Pattern, check_mask
from sparsewise.scores import magnitude_scores, random_scores, wanda_scores
from sparsewise.solvers import sparsegpt_prune

LAYER = "model.layers.3.mlp.up_proj"


def make_stats(inputs: torch.Tensor, *wanted: str) -> LayerStats:
    stats = LayerStats(inputs.shape[1], frozenset(wanted))
    stats.update(inputs)
    return stats


def make_task(weight, sparsity=0.5, pattern="unstructured", stats=None, seed=None, **options) -> LayerTask:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return LayerTask(LAYER, weight, sparsity, Pattern.parse(pattern), stats, generator, options)


def correlated_layer(seed: int = 0, rows: int = 32, cols: int = 64, tokens: int = 512):
    """A random layer and inputs X = Z @ A whose features are strongly correlated."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + 0.5 * torch.eye(cols)
    scales = torch.rand(cols, generator=generator) * 3 + 0.1  # uneven channel norms
    inputs = torch.randn(tokens, cols, generator=generator) @ mixing * scales
    return weight, inputs


def output_error(inputs: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(inputs @ weight.T - inputs @ pruned.T))


# ---------------------------------------------------------------- scores


def test_scores_hand_values():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.0, 4.0]])
    assert magnitude_scores(weight).tolist() == [[1.0, 2.0, 3.0], [0.5, 0.0, 4.0]]
    norms = torch.tensor([2.0, 1.0, 0.5])
    assert wanda_scores(weight, norms).tolist() == [[2.0, 2.0, 1.5], [1.0, 0.0, 2.0]]


def test_scores_validate_inputs():
    weight = torch.ones(2, 3)
    with pytest.raises(ConfigError, match="another layer"):
        wanda_scores(weight, torch.ones(4))
    with pytest.raises(NumericalError, match="NaN/Inf"):
        wanda_scores(weight, torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(ConfigError, match="2-D"):
        magnitude_scores(torch.ones(3))
    with pytest.raises(ConfigError, match="seed"):
        random_scores(weight, None)
    bad = weight.clone()
    bad[1, 2] = float("nan")
    for score in (magnitude_scores, lambda w: wanda_scores(w, torch.ones(3)), lambda w: random_scores(w, torch.Generator())):
        with pytest.raises(NumericalError, match="checkpoint"):
            score(bad)


def test_random_scores_are_seeded():
    weight = torch.zeros(4, 8)
    first = random_scores(weight, torch.Generator().manual_seed(7))
    again = random_scores(weight, torch.Generator().manual_seed(7))
    other = random_scores(weight, torch.Generator().manual_seed(8))
    assert first.equal(again) and not first.equal(other)
    assert first.shape == weight.shape and bool(((first >= 0) & (first < 1)).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_scores_same_on_cpu_and_cuda():
    cpu = random_scores(torch.zeros(4, 8), torch.Generator().manual_seed(3))
    cuda = random_scores(torch.zeros(4, 8, device="cuda"), torch.Generator().manual_seed(3))
    assert cuda.device.type == "cuda" and cuda.cpu().equal(cpu)


# ---------------------------------------------------------------- registry and data-free methods


def test_registry_lists_the_four_methods():
    assert {"magnitude", "random", "wanda", "sparsegpt"} <= set(available_methods())
    assert get_method("magnitude").needs == frozenset()
    assert get_method("random").needs == frozenset()
    assert get_method(" Wanda ").needs == frozenset({STAT_NORMS})
    assert get_method("sparsegpt").needs == frozenset({STAT_HESSIAN})
    assert all(isinstance(get_method(name), PruningMethod) for name in ("magnitude", "random", "wanda", "sparsegpt"))
    with pytest.raises(ConfigError, match="available"):
        get_method("obs-magic")


def test_magnitude_method_hand_case():
    weight = torch.tensor([[0.1, -4.0, 2.0, -0.3], [5.0, 0.2, -0.1, 1.0]])
    result = get_method("magnitude").prune_layer(make_task(weight))
    assert isinstance(result, LayerResult)
    assert result.mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert result.weight.tolist() == [[0.0, -4.0, 2.0, 0.0], [5.0, 0.0, 0.0, 1.0]]
    assert not bool(torch.signbit(result.weight[~result.mask]).any())  # +0.0, not -0.0


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.3), ("unstructured:layer", 0.6), ("2:4", 0.5), ("block:2x4", 0.5)])
def test_data_free_methods_hit_exact_sparsity(pattern, sparsity):
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    for name in ("magnitude", "random"):
        result = get_method(name).prune_layer(make_task(weight, sparsity, pattern, seed=0))
        expected = {"unstructured": 8 * 4, "unstructured:layer": 76, "2:4": 64, "block:2x4": 64}[pattern]
        assert int((~result.mask).sum()) == expected
        assert bool((result.weight[~result.mask] == 0).all()) and result.weight[result.mask].equal(weight[result.mask])
        assert check_mask(result.mask, pattern)


def test_random_method_is_deterministic_per_seed():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    method = get_method("random")
    first = method.prune_layer(make_task(weight, seed=5)).mask
    again = method.prune_layer(make_task(weight, seed=5)).mask
    other = method.prune_layer(make_task(weight, seed=6)).mask
    assert first.equal(again) and not first.equal(other)
    with pytest.raises(ConfigError, match="seed"):
        method.prune_layer(make_task(weight))


def test_methods_refuse_unknown_options_and_bad_shapes():
    weight = torch.randn(4, 6)
    with pytest.raises(ConfigError, match="block_sz"):
        get_method("magnitude").prune_layer(make_task(weight, block_sz=4))
    for name in ("magnitude", "random", "wanda", "sparsegpt"):
        stats = make_stats(torch.randn(10, 6), STAT_NORMS, STAT_HESSIAN)
        with pytest.raises(PatternError) as raised:
            get_method(name).prune_layer(make_task(weight, pattern="2:4", stats=stats, seed=0))
        assert LAYER in str(raised.value) and "exclude" in str(raised.value)


# ---------------------------------------------------------------- wanda


def test_wanda_equals_magnitude_when_norms_are_equal():
    weight, _ = correlated_layer()
    stats = make_stats(torch.ones(9, 64) * 1.5, STAT_NORMS)
    for pattern in ("unstructured", "2:4", "4:8"):
        wanda = get_method("wanda").prune_layer(make_task(weight, pattern=pattern, stats=stats))
        magnitude = get_method("magnitude").prune_layer(make_task(weight, pattern=pattern))
        assert wanda.mask.equal(magnitude.mask) and wanda.weight.equal(magnitude.weight)


def test_wanda_keeps_small_weights_on_loud_channels():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # channel 0 carries a norm of 10, the others 1: scores [10, 2, 3, 4]
    inputs = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    wanda = get_method("wanda").prune_layer(make_task(weight, stats=make_stats(inputs, STAT_NORMS)))
    magnitude = get_method("magnitude").prune_layer(make_task(weight))
    assert wanda.mask.tolist() == [[True, False, False, True]]
    assert magnitude.mask.tolist() == [[False, False, True, True]]
    assert wanda.weight.tolist() == [[1.0, 0.0, 0.0, 4.0]]
    assert wanda.info["tokens"] == 1


def test_wanda_needs_stats_and_refuses_global():
    weight = torch.randn(4, 8)
    with pytest.raises(ConfigError, match="'norms'"):
        get_method("wanda").prune_layer(make_task(weight))
    with pytest.raises(DataError, match="no calibration token"):
        get_method("wanda").prune_layer(make_task(weight, stats=LayerStats(8, frozenset({STAT_NORMS}))))
    stats = make_stats(torch.randn(5, 8), STAT_NORMS)
    for name in ("wanda", "sparsegpt"):
        with pytest.raises(ConfigError, match="does not rank with scope 'global'.*magnitude, random"):
            get_method(name).prune_layer(make_task(weight, pattern="unstructured:global", stats=stats))


# ---------------------------------------------------------------- sparsegpt


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    weight, inputs = correlated_layer()
    stats = make_stats(inputs, STAT_NORMS, STAT_HESSIAN)
    results = {
        name: get_method(name).prune_layer(make_task(weight, pattern=pattern, stats=stats))
        for name in ("magnitude", "wanda", "sparsegpt")
    }
    for result in results.values():
        assert float(result.mask.float().mean()) == 0.5  # same density for a fair comparison
        assert check_mask(result.mask, pattern)
    errors = {name: output_error(inputs, weight, result.weight) for name, result in results.items()}
    # seed 0: unstructured 257 < 284 < 472, 2:4 387 < 483 < 680
    assert errors["sparsegpt"] < 0.95 * errors["wanda"], errors
    assert errors["wanda"] < 0.9 * errors["magnitude"], errors
    assert results["sparsegpt"].info["damp_raised"] is False


@pytest.mark.parametrize("pattern,block_size", [("unstructured", 8), ("2:4", 8), ("unstructured", 128)])
def test_sparsegpt_matches_naive_sequential_obs(pattern, block_size):
    """Lazy blocks and the Cholesky factor give the same weights as textbook OBS with the same mask:
    prune column j, then update the columns j.. by -w_j / [H_R^-1]_00 * H_R^-1[:, 0], R = {j, ..}."""
    weight, inputs = correlated_layer(seed=7, rows=5, cols=24, tokens=200)
    hessian = make_stats(inputs, STAT_HESSIAN).hessian
    new_weight, mask, _ = sparsegpt_prune(weight, hessian, 0.5, pattern, block_size=block_size)
    damped = hessian.double() + 0.01 * hessian.diagonal().mean().double() * torch.eye(24, dtype=torch.float64)
    expected = weight.double().clone()
    for row in range(5):
        for col in range(24):
            if not mask[row, col]:
                inverse = torch.linalg.inv(damped[col:, col:])
                expected[row, col:] -= expected[row, col] / inverse[0, 0] * inverse[:, 0]
                expected[row, col] = 0.0
    torch.testing.assert_close(new_weight.double(), expected, atol=1e-4, rtol=1e-4)
    # the float64 reference mode: same masks, the textbook weights to float64 rounding
    exact, exact_mask, _ = sparsegpt_prune(weight.double(), hessian, 0.5, pattern, block_size=block_size,
                                           compute_dtype=torch.float64)
    assert torch.equal(exact_mask, mask) and exact.dtype == torch.float64
    torch.testing.assert_close(exact, expected, atol=1e-8, rtol=1e-8)  # fp32 loop: 1e-4


def test_sparsegpt_precision_option():
    weight, inputs = correlated_layer(seed=5)
    stats = make_stats(inputs, STAT_HESSIAN)
    single = get_method("sparsegpt").prune_layer(make_task(weight, stats=stats))
    double = get_method("sparsegpt").prune_layer(make_task(weight, stats=stats, precision="float64"))
    assert double.weight.dtype == weight.dtype  # computed in float64, stored as the layer's dtype
    assert torch.equal(double.mask, single.mask)
    torch.testing.assert_close(double.weight, single.weight, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="precision must be one of"):
        get_method("sparsegpt").prune_layer(make_task(weight, stats=stats, precision="float16"))


def test_sparsegpt_nm_passes_check_mask_and_prunes_in_place():
    weight, inputs = correlated_layer(seed=1)
    hessian = make_stats(inputs, STAT_HESSIAN).hessian
    for spec in ("2:4", "4:8", "1:4"):
        # block_size 6 is not a multiple of M: the solver aligns blocks to the groups
        new_weight, mask, info = sparsegpt_prune(weight, hessian, 0.0, spec, block_size=6)
        pattern = Pattern.parse(spec)
        assert check_mask(mask, pattern)
        assert bool((mask.reshape(32, -1, pattern.m).sum(-1) == pattern.n).all())
        assert bool((new_weight[~mask] == 0).all()) and bool((new_weight[mask] != 0).all())
        assert info["block_size"] == pattern.m


def test_sparsegpt_exact_sparsity_with_ragged_blocks():
    weight, inputs = correlated_layer(seed=2, rows=7, cols=40)
    hessian = make_stats(inputs, STAT_HESSIAN).hessian
    new_weight, mask, info = sparsegpt_prune(weight, hessian, 0.3, "unstructured", block_size=16)
    assert int((~mask).sum()) == 84  # floor(0.3 * 280), although 16 does not divide 40
    assert bool((new_weight[~mask] == 0).all())
    assert int((new_weight == 0).sum()) == 84
    assert new_weight.dtype == weight.dtype and mask.dtype == torch.bool
    assert info["damp_tries"] == 1 and info["damp_raised"] is False and info["damp_ratio"] == 0.01


def test_sparsegpt_recon_error_is_the_layer_objective():
    weight, inputs = correlated_layer(seed=3)
    stats = make_stats(inputs, STAT_HESSIAN)
    result = get_method("sparsegpt").prune_layer(make_task(weight, stats=stats, block_size=16))
    delta = weight - result.weight
    expected = 2.0 / inputs.shape[0] * float((inputs @ delta.T).square().sum())
    assert result.info["recon_error"] == pytest.approx(expected, rel=1e-3)
    assert result.info["block_size"] == 16 and result.info["tokens"] == 512


def test_sparsegpt_dead_inputs_are_dropped():
    weight, inputs = correlated_layer(seed=4, rows=8, cols=16, tokens=64)
    inputs[:, 3] = 0.0
    new_weight, mask, info = sparsegpt_prune(weight, make_stats(inputs, STAT_HESSIAN).hessian, 0.5, "unstructured")
    assert info["dead_inputs"] == 1
    assert bool((new_weight[:, 3] == 0).all()) and bool(torch.isfinite(new_weight).all())


def test_sparsegpt_raises_damping_for_an_indefinite_hessian():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, 32, generator=generator)  # fewer tokens than features: rank 16
    hessian = make_stats(inputs, STAT_HESSIAN).hessian
    null_direction = torch.linalg.svd(inputs).Vh[-1]  # X @ v = 0
    mean_diag = float(hessian.diagonal().mean())
    # an eigenvalue of -5% of the mean diagonal: 1% damping is not enough, 10% is
    indefinite = hessian - 0.05 * mean_diag * torch.outer(null_direction, null_direction)
    weight = torch.randn(8, 32, generator=generator)
    new_weight, mask, info = sparsegpt_prune(weight, indefinite, 0.5, "unstructured")
    assert info["damp_raised"] is True and info["damp_tries"] == 2
    assert info["damp_ratio"] == pytest.approx(0.1)
    assert bool(torch.isfinite(new_weight).all()) and int((~mask).sum()) == 128


def test_sparsegpt_refuses_an_unfixable_hessian_instead_of_using_identity():
    hessian = torch.eye(8)
    hessian[0, 1] = hessian[1, 0] = 1e5  # eigenvalue 1 - 1e5 while mean(diag H) = 1
    weight = torch.randn(4, 8)
    with pytest.raises(NumericalError, match="not positive definite even with damp_ratio 1000") as raised:
        sparsegpt_prune(weight, hessian, 0.5, "unstructured")
    assert "more tokens" in str(raised.value)
    stats = LayerStats(8, frozenset({STAT_HESSIAN}), tokens=2, xtx=hessian)
    with pytest.raises(NumericalError, match=LAYER):
        get_method("sparsegpt").prune_layer(make_task(weight, stats=stats, max_damp_tries=2))


def test_sparsegpt_refuses_non_finite_inputs_and_block_patterns():
    weight, inputs = correlated_layer(seed=5, rows=4, cols=8, tokens=32)
    hessian = make_stats(inputs, STAT_HESSIAN).hessian
    bad_weight = weight.clone()
    bad_weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="checkpoint"):
        sparsegpt_prune(bad_weight, hessian, 0.5, "unstructured")
    bad_hessian = hessian.clone()
    bad_hessian[2, 2] = float("inf")
    with pytest.raises(NumericalError, match="Hessian"):
        sparsegpt_prune(weight, bad_hessian, 0.5, "unstructured")
    with pytest.raises(ConfigError, match="unstructured and N:M"):
        sparsegpt_prune(weight, hessian, 0.5, "block:2x2")
    with pytest.raises(ConfigError, match="another layer"):
        sparsegpt_prune(weight, hessian[:4, :4], 0.5, "unstructured")
    with pytest.raises(ConfigError, match="'hessian'"):
        get_method("sparsegpt").prune_layer(make_task(weight, stats=make_stats(inputs, STAT_NORMS)))
    with pytest.raises(ConfigError, match="damp_ratio"):
        get_method("sparsegpt").prune_layer(make_task(weight, stats=make_stats(inputs, STAT_HESSIAN), damp=0.1))


def test_sparsegpt_is_fast_on_a_real_sized_layer():
    weight, inputs = correlated_layer(seed=6, rows=1536, cols=576, tokens=1024)
    hessian = make_stats(inputs, STAT_HESSIAN).hessian
    sparsegpt_prune(weight[:8, :64], hessian[:64, :64], 0.5, "unstructured")  # warm up kernels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: timing stays stable when other jobs share the cores
    try:
        start = time.perf_counter()
        sparsegpt_prune(weight, hessian, 0.5, "unstructured", block_size=128)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 5.0  # ~0.5 s on one core; a loose bound against accidental slow paths


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,pattern", [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "2:4")])
def test_methods_run_on_cuda_like_on_cpu(name, pattern):
    weight, inputs = correlated_layer(seed=8)
    cpu = get_method(name).prune_layer(make_task(weight, pattern=pattern, stats=make_stats(inputs, STAT_NORMS, STAT_HESSIAN)))
    gpu_stats = make_stats(inputs.cuda(), STAT_NORMS, STAT_HESSIAN)
    gpu = get_method(name).prune_layer(make_task(weight.cuda(), pattern=pattern, stats=gpu_stats))
    assert gpu.weight.device.type == "cuda" and gpu.mask.device.type == "cuda"
    assert check_mask(gpu.mask, pattern) and float(gpu.mask.float().mean()) == 0.5
    # float32 round-off may flip a near-tie, so compare the outcome rather than every entry
    assert float((gpu.mask.cpu() != cpu.mask).float().mean()) < 0.02
    cpu_error = output_error(inputs, weight, cpu.weight)
    assert output_error(inputs, weight, gpu.weight.cpu()) == pytest.approx(cpu_error, rel=0.02)
