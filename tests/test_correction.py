"""DSnoT mask refinement on small hand-made layers (CPU, milliseconds)."""

from __future__ import annotations

import pytest
import torch

from sparsewise.calibration.stats import STAT_MOMENTS, STAT_NORMS, LayerStats
from sparsewise.correction import (
    DSNOT_REPO_SKIP,
    MaskRefiner,
    RefineTask,
    available_refiners,
    dsnot_masks,
    expected_output_error,
    get_refiner,
)
from sparsewise.errors import ConfigError, DataError, NumericalError
from sparsewise.patterns import Pattern, mask_from_scores
from sparsewise.scores import wanda_scores

LAYER = "model.layers.1.self_attn.q_proj"


def shifted_layer(seed: int = 0, rows: int = 32, cols: int = 64, tokens: int = 512):
    """A random layer and inputs whose channels have non-zero means and uneven spreads."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    spreads = torch.rand(cols, generator=generator) * 2 + 0.2
    means = torch.randn(cols, generator=generator)
    inputs = torch.randn(tokens, cols, generator=generator) * spreads + means
    return weight, inputs


def moment_stats(inputs: torch.Tensor) -> LayerStats:
    stats = LayerStats(inputs.shape[1], frozenset({STAT_NORMS, STAT_MOMENTS}))
    stats.update(inputs)
    return stats


def wanda_mask(weight: torch.Tensor, stats: LayerStats, pattern: str) -> torch.Tensor:
    return mask_from_scores(wanda_scores(weight, stats.channel_norms), 0.5, pattern)


def row_errors(weight: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """E[X] W^T - E[X] (W * M)^T per output row, straight from the inputs."""
    mean = inputs.double().mean(0)
    return (weight.double() * ~mask) @ mean


def refine(weight, mask, pattern, stats, name=LAYER, **options):
    return get_refiner("dsnot").refine(RefineTask(name, weight, mask, Pattern.parse(pattern), stats, options))


def test_registry_and_protocol():
    assert "dsnot" in available_refiners()
    refiner = get_refiner("dsnot", max_cycles=10)
    assert isinstance(refiner, MaskRefiner)
    assert refiner.needs == frozenset({STAT_NORMS, STAT_MOMENTS})
    with pytest.raises(ConfigError, match="unknown mask refiner"):
        get_refiner("dsnoot")


def test_wanda_unstructured_rows_improve_and_sparsity_holds():
    weight, inputs = shifted_layer()
    stats = moment_stats(inputs)
    mask = wanda_mask(weight, stats, "unstructured")
    result = refine(weight, mask, "unstructured", stats)

    assert result.mask.dtype == torch.bool and result.mask.shape == mask.shape
    assert torch.equal(result.mask.sum(1), mask.sum(1))  # one grown per one pruned
    assert torch.equal(result.weight, weight * result.mask)  # dense values, no update
    assert result.info["swaps"] > 0 and not torch.equal(result.mask, mask)

    before, after = row_errors(weight, mask, inputs), row_errors(weight, result.mask, inputs)
    assert bool((after.abs() <= before.abs() + 1e-5).all())
    assert after.norm() < 0.5 * before.norm()
    assert result.info["mean_abs_error_after"] == pytest.approx(float(after.abs().mean()), rel=1e-4)
    assert result.info["mean_abs_error_before"] == pytest.approx(float(before.abs().mean()), rel=1e-4)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_mask_stays_valid_and_rows_improve(pattern):
    n, m = map(int, pattern.split(":"))
    weight, inputs = shifted_layer(seed=1)
    stats = moment_stats(inputs)
    mask = wanda_mask(weight, stats, pattern)
    result = refine(weight, mask, pattern, stats)

    per_group = result.mask.reshape(weight.shape[0], -1, m).sum(-1)
    assert bool((per_group == n).all())
    assert result.info["swaps"] > 0
    before, after = row_errors(weight, mask, inputs), row_errors(weight, result.mask, inputs)
    assert bool((after.abs() <= before.abs() + 1e-5).all())
    assert after.norm() < 0.5 * before.norm()


def test_hand_worked_row_follows_grow_and_prune_rules():
    # c = W * E[x] = [0.4, 0.6, -0.2, 0.1]; columns 0, 1 pruned, so e = 1.0 > 0.
    weight = torch.ones(1, 4)
    mask = torch.tensor([[False, False, True, True]])
    mean = torch.tensor([0.4, 0.6, -0.2, 0.1])
    var = torch.tensor([0.1, 1.0, 1.0, 1.0])
    sq_norms = torch.ones(4)
    # p = 1: grow column 0 (0.4 / 0.1 beats 0.6 / 1); prune the only kept negative contribution,
    # column 2: e = 1.0 - 0.4 - 0.2 = 0.4. No negative kept weight is left, so the row stops.
    refined, info = dsnot_masks(weight, mask, mean, var, sq_norms, power=1.0)
    assert refined.tolist() == [[True, False, False, True]]
    assert info["swaps"] == 1 and info["mean_abs_error_after"] == pytest.approx(0.4)
    # p = 0: the largest contribution, column 1, is grown instead: e = 1.0 - 0.6 - 0.2 = 0.2.
    refined, info = dsnot_masks(weight, mask, mean, var, sq_norms, power=0.0)
    assert refined.tolist() == [[False, True, False, True]]
    # a threshold above |e| leaves the row alone
    refined, info = dsnot_masks(weight, mask, mean, var, sq_norms, threshold=1.5)
    assert torch.equal(refined, mask) and info["swaps"] == 0


def test_keep_best_never_ends_worse_than_the_raw_sequence():
    weight, inputs = shifted_layer(seed=2)
    stats = moment_stats(inputs)
    for pattern, m_block in (("unstructured", None), ("2:4", 4)):
        mask = wanda_mask(weight, stats, pattern)
        args = (weight, mask, stats.mean, stats.var, stats.sq_sum)
        best, _ = dsnot_masks(*args, m_block=m_block, keep_best=True)
        raw, _ = dsnot_masks(*args, m_block=m_block, keep_best=False)
        best_error = row_errors(weight, best, inputs).abs()
        assert bool((best_error <= row_errors(weight, raw, inputs).abs() + 1e-5).all())
        assert bool((best_error <= row_errors(weight, mask, inputs).abs() + 1e-5).all())


def test_sign_check_keeps_the_sign_of_every_row_error():
    weight, inputs = shifted_layer(seed=3)
    stats = moment_stats(inputs)
    mask = wanda_mask(weight, stats, "unstructured")
    refined, info = dsnot_masks(weight, mask, stats.mean, stats.var, stats.sq_sum, sign_check=True)
    before, after = row_errors(weight, mask, inputs), row_errors(weight, refined, inputs)
    changed = after != before
    assert info["swaps"] > 0
    assert torch.equal(torch.sign(after[changed]), torch.sign(before[changed]))


def test_deterministic_and_inputs_untouched():
    weight, inputs = shifted_layer(seed=4)
    stats = moment_stats(inputs)
    mask = wanda_mask(weight, stats, "unstructured")
    mask_copy, weight_copy = mask.clone(), weight.clone()
    first = refine(weight, mask, "unstructured", stats)
    second = refine(weight, mask, "unstructured", stats)
    assert torch.equal(first.mask, second.mask) and first.info == second.info
    assert torch.equal(mask, mask_copy) and torch.equal(weight, weight_copy)


def test_skip_modules_passes_mlp_layers_through():
    weight, inputs = shifted_layer()
    stats = moment_stats(inputs)
    mask = wanda_mask(weight, stats, "unstructured")
    refiner = get_refiner("dsnot", skip_modules=DSNOT_REPO_SKIP)
    task = RefineTask("model.layers.1.mlp.up_proj", weight, mask, Pattern.parse("unstructured"), stats)
    result = refiner.refine(task)
    assert result.info["skipped"] and torch.equal(result.mask, mask)
    assert refiner.refine(RefineTask(LAYER, weight, mask, Pattern(), stats)).info["swaps"] > 0


def test_bad_inputs_say_what_to_do():
    weight, inputs = shifted_layer()
    stats = moment_stats(inputs)
    mask = wanda_mask(weight, stats, "unstructured")
    with pytest.raises(ConfigError, match="bool keep-mask shaped like the weight"):
        refine(weight, mask[:, :32], "unstructured", stats)
    with pytest.raises(ConfigError, match="bool keep-mask"):
        refine(weight, mask.float(), "unstructured", stats)
    with pytest.raises(ConfigError, match="another layer"):
        refine(weight[:, :32], mask[:, :32], "unstructured", stats)
    with pytest.raises(ConfigError, match=r"does not take option\(s\) \['treshold'\]"):
        refine(weight, mask, "unstructured", stats, treshold=0.2)
    with pytest.raises(ConfigError, match="max_cycles"):
        get_refiner("dsnot", max_cycles=-1)
    with pytest.raises(ConfigError, match="block"):
        refine(weight, mask, "block:4x4", stats)
    with pytest.raises(ConfigError, match="does not obey pattern 2:4"):
        refine(weight, mask, "2:4", stats)  # an unstructured mask passed as 2:4
    norms_only = LayerStats(64, frozenset({STAT_NORMS}))
    norms_only.update(inputs)
    with pytest.raises(ConfigError, match="moments"):
        refine(weight, mask, "unstructured", norms_only)
    with pytest.raises(DataError, match="no calibration token"):
        refine(weight, mask, "unstructured", LayerStats(64, frozenset({STAT_NORMS, STAT_MOMENTS})))
    poisoned = inputs.clone()
    poisoned[0, 3] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        refine(weight, mask, "unstructured", moment_stats(poisoned))
    with pytest.raises(NumericalError, match="NaN"):
        dsnot_masks(weight, mask, stats.mean, stats.var.clone().fill_(float("inf")), stats.sq_sum)
    with pytest.raises(ConfigError, match="m_block"):
        dsnot_masks(weight, mask, stats.mean, stats.var, stats.sq_sum, m_block=5)


def test_expected_output_error_matches_direct_formula():
    weight, inputs = shifted_layer(seed=5)
    stats = moment_stats(inputs)
    mask = wanda_mask(weight, stats, "unstructured")
    assert torch.allclose(expected_output_error(weight, mask, stats.mean), row_errors(weight, mask, inputs), atol=1e-4)


def test_prune_with_dsnot_keeps_row_counts_and_lowers_the_mean_output_error():
    from conftest import build_tiny

    import sparsewise as sw
    from sparsewise.data import CalibrationSet

    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationSet(input_ids=ids, source="random")
    plain, refined = build_tiny("llama"), build_tiny("llama")
    base = sw.prune(plain, "wanda", 0.6, calibration=calibration, progress=False)
    result = sw.prune(refined, "wanda", 0.6, calibration=calibration, refine="dsnot",
                      refine_options={"threshold": 0.0}, progress=False)
    swaps = sum(record.info["refine"]["swaps"] for record in result.records.values())
    assert swaps > 0
    for name, record in result.records.items():
        assert torch.equal(record.mask.sum(1), base.records[name].mask.sum(1))  # per-row counts unchanged
    assert any(not torch.equal(record.mask, base.records[name].mask) for name, record in result.records.items())
    assert not any("reconstruction" in note for note in result.warnings)
    after_sparsegpt = sw.prune(build_tiny("llama"), "sparsegpt", 0.6, calibration=calibration, refine="dsnot",
                               progress=False)
    assert any("dropping its reconstruction" in note for note in after_sparsegpt.warnings)
    with pytest.raises(sw.ConfigError, match="refine"):
        sw.prune(build_tiny("llama"), "wanda", 0.5, calibration=calibration, refine_options={"x": 1}, progress=False)
    with pytest.raises(sw.ConfigError, match="calibration"):
        sw.prune(build_tiny("llama"), "magnitude", 0.5, refine="dsnot", progress=False)
