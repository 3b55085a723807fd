"""Layer-wise allocation: budgets exact, each allocator's defining property, wired into prune()."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

import sparsewise as sw
from sparsewise.allocation import LayerShape, allocate
from sparsewise.allocation.budget import scale_densities, shift_to_budget
from sparsewise.allocation.ecoflap import proportional_keep
from sparsewise.allocation.erk import erk_raw
from sparsewise.allocation.owl import outlier_ratio, owl_sparsities
from sparsewise.data import CalibrationSet
from sparsewise.errors import ConfigError
from sparsewise.patterns import check_mask

SHAPES = {"conv_like": LayerShape(32, 27, 0), "a": LayerShape(64, 128, 0), "b": LayerShape(256, 128, 1),
          "c": LayerShape(512, 512, 1), "fc": LayerShape(10, 512, 2)}


def _weighted(sparsities, shapes):
    total = sum(shape.params for shape in shapes.values())
    return sum(sparsities[name] * shapes[name].params for name in sparsities) / total


@pytest.mark.parametrize("method", ["uniform", "er", "erk"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95])
def test_data_free_allocations_hit_the_budget_to_one_row(method, target):
    plan = allocate(method, target=target, shapes=SHAPES)
    total = sum(shape.params for shape in SHAPES.values())
    largest_row = max(shape.in_features for shape in SHAPES.values())
    assert abs(_weighted(plan.sparsities, SHAPES) - target) * total <= largest_row
    assert all(0.0 <= value < 1.0 for value in plan.sparsities.values())
    for name, value in plan.sparsities.items():  # whole zeros per row
        assert value * SHAPES[name].in_features == pytest.approx(round(value * SHAPES[name].in_features))


def test_erk_densities_sum_to_target_cap_at_dense_and_follow_the_raw_ratio():
    raw = {name: erk_raw(shape.out_features, shape.in_features) for name, shape in SHAPES.items()}
    densities = scale_densities(raw, SHAPES, 0.1)
    total = sum(shape.params for shape in SHAPES.values())
    assert sum(densities[name] * SHAPES[name].params for name in SHAPES) == pytest.approx(0.1 * total, rel=1e-9)
    assert all(value <= 1.0 for value in densities.values())
    order = sorted(SHAPES, key=lambda name: raw[name])
    assert [densities[name] for name in order] == sorted(densities[name] for name in order)
    dense = scale_densities(raw, SHAPES, 0.9)  # high density: small layers hit the cap, eps re-solved
    assert max(dense.values()) == 1.0
    assert sum(dense[name] * SHAPES[name].params for name in SHAPES) == pytest.approx(0.9 * total, rel=1e-9)


def test_shift_keeps_differences_and_bounds():
    shifted = shift_to_budget({"a": 0.2, "b": 0.6, "c": 0.5}, SHAPES, 0.5, high=0.9)
    assert _weighted(shifted, {name: SHAPES[name] for name in shifted}) == pytest.approx(0.5, abs=1e-9)
    assert shifted["b"] - shifted["a"] == pytest.approx(0.4, abs=1e-9)
    with pytest.raises(ConfigError, match="outside"):
        shift_to_budget({"a": 0.5}, SHAPES, 0.95, high=0.9)


def test_owl_formula_outliers_keep_more_and_mean_is_the_target():
    scores = [torch.ones(100), torch.tensor([100.0] + [1.0] * 99)]
    assert outlier_ratio([scores[0]], 5.0) == 0.0
    assert outlier_ratio([scores[1]], 5.0) == pytest.approx(0.01)
    sparsities = owl_sparsities([0.01, 0.03, 0.02], 0.7, 0.08)
    assert sum(sparsities) / 3 == pytest.approx(0.7)
    assert sparsities[1] < sparsities[2] < sparsities[0]  # more outliers -> lower sparsity
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)  # the spread is 2 lambda


def test_ecoflap_proportional_allocation_with_floor():
    sizes = {0: 1000, 1: 1000, 2: 1000}
    keep = proportional_keep({0: 1.0, 1: 2.0, 2: 7.0}, sizes, 1500.0, 0.4)
    assert sum(keep.values()) == pytest.approx(1500.0)
    assert all(keep[block] / sizes[block] >= 0.4 - 1e-9 for block in sizes)  # sparsity <= max_sparsity 0.6
    assert keep[0] < keep[1] < keep[2] <= 1000
    with pytest.raises(ConfigError, match="floor"):
        proportional_keep({0: 1.0, 1: 1.0}, {0: 10, 1: 10}, 5.0, 0.5)


def test_zeroth_order_estimate_matches_the_directional_derivative():
    # the MeZO two-point estimate on a quadratic is exact for the sampled direction
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    direction = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    loss = lambda w: float((w**2).sum() / 2)  # noqa: E731
    eps = 1e-3
    estimate = (loss(weight + eps * direction) - loss(weight - eps * direction)) / (2 * eps)
    assert estimate == pytest.approx(float((weight * direction).sum()), rel=1e-3)


def _calibration(n=4, seqlen=16, seed=0):
    ids = torch.randint(0, 100, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(input_ids=ids, source="random")


@pytest.mark.parametrize("allocation", ["owl", "erk", "ecoflap"])
def test_prune_with_an_allocation_keeps_the_global_ratio(allocation):
    model = build_tiny("llama")
    options = {"max_batches": 1} if allocation == "ecoflap" else {}
    result = sw.prune(model, "wanda", 0.6, calibration=_calibration(), allocation=allocation,
                      allocation_options=options, progress=False)
    targets = {name: record.sparsity for name, record in result.records.items()}
    assert len(set(round(value, 6) for value in targets.values())) > 1  # not uniform
    largest_row = max(record.shape[1] for record in result.records.values())
    assert abs(result.achieved_sparsity - 0.6) * result.counted_params <= largest_row
    for record in result.records.values():
        assert record.achieved == pytest.approx(record.sparsity, abs=1e-6)
    assert allocation in result.summary()


def test_owl_gives_outlier_blocks_lower_sparsity():
    model = build_tiny("llama")
    with torch.no_grad():  # block 1's weights get heavy outliers
        for module in model.model.layers[1].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[:, :3] *= 50
    result = sw.prune(model, "wanda", 0.5, calibration=_calibration(), allocation="owl", progress=False)
    by_block = {int(name.split(".")[2]): record.sparsity for name, record in result.records.items()}
    assert by_block[1] < by_block[0]


def test_explicit_allocation_and_errors():
    model = build_tiny("llama")
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and "layers" in name]
    plan = {name: (0.25 if "mlp" in name else 0.75) for name in names}
    result = sw.prune(model, "magnitude", 0.5, allocation=plan, progress=False)
    assert {round(record.sparsity, 2) for record in result.records.values()} == {0.25, 0.75}
    with pytest.raises(ConfigError, match="N:M|2:4"):
        sw.prune(build_tiny("llama"), "magnitude", None, pattern="2:4", allocation="erk", progress=False)
    with pytest.raises(ConfigError, match="calibration"):
        sw.prune(build_tiny("llama"), "magnitude", 0.5, allocation="owl", progress=False)
    with pytest.raises(ConfigError, match="unknown allocation"):
        sw.prune(build_tiny("llama"), "magnitude", 0.5, allocation="nope", progress=False)
    with pytest.raises(ConfigError, match="missing"):
        sw.prune(build_tiny("llama"), "magnitude", 0.5, allocation={names[0]: 0.5}, progress=False)


def test_evolutionary_search_keeps_the_total_and_beats_uniform_on_its_proxy():
    from sparsewise.allocation.search import evolve_levels

    generator = torch.Generator().manual_seed(0)
    costs = torch.rand(4, 5, generator=generator, dtype=torch.float64).cumsum(1)  # error grows with sparsity
    costs[2] *= 10  # one fragile block
    sizes = torch.full((4,), 100.0, dtype=torch.float64)
    choice = evolve_levels(costs, sizes, generations=30, offspring=16, seed=1)
    assert int((choice - 2).sum()) == 0  # level offsets balance: the parameter total is unchanged
    fitness = lambda c: float((sizes * costs[torch.arange(4), c]).sum())  # noqa: E731
    assert fitness(choice) <= fitness(torch.full((4,), 2))
    assert choice[2] < 2  # the fragile block is pruned less
    assert torch.equal(choice, evolve_levels(costs, sizes, generations=30, offspring=16, seed=1))  # seeded


def test_prune_with_the_tyr_search_hits_the_budget():
    model = build_tiny("llama")
    result = sw.prune(model, "wanda", 0.5, calibration=_calibration(), allocation="tyr",
                      allocation_options={"levels": 1, "step": 0.1, "generations": 5, "offspring": 4},
                      progress=False)
    largest_row = max(record.shape[1] for record in result.records.values())
    assert abs(result.achieved_sparsity - 0.5) * result.counted_params <= largest_row
    assert "tyr" in result.allocation


def test_assign_levels_follows_preferences_and_lands_near_the_target():
    from sparsewise.allocation.budget import assign_levels

    shapes = {f"l{i}": LayerShape(64, 64, i) for i in range(8)}
    preferred = {f"l{i}": 0.5 + 0.03 * i for i in range(8)}  # later layers want more sparsity
    levels = assign_levels(preferred, shapes, [0.5, 0.75], 0.625)
    assert sorted(set(levels.values())) == [0.5, 0.75]
    assert [levels[f"l{i}"] for i in range(8)] == [0.5] * 4 + [0.75] * 4  # the eager half goes sparser
    assert sum(levels.values()) / 8 == pytest.approx(0.625)
    uneven = assign_levels(preferred, shapes, [0.5, 0.75], 0.6)  # not reachable exactly: nearest total
    assert abs(sum(uneven.values()) / 8 - 0.6) <= 0.25 / 8 / 2 + 1e-9
    with pytest.raises(ConfigError, match="outside"):
        assign_levels(preferred, shapes, [0.5, 0.75], 0.8)


def test_prune_with_mixed_nm_choices():
    from sparsewise.patterns import Pattern

    model = build_tiny("llama")
    result = sw.prune(model, "wanda", 0.6, pattern="2:4,1:4", calibration=_calibration(), allocation="owl",
                      progress=False)
    patterns = {record.pattern for record in result.records.values()}
    assert patterns == {"2:4", "1:4"} and result.pattern == "2:4,1:4"
    for name, record in result.records.items():
        assert check_mask(record.mask, Pattern.parse(record.pattern)), name
        assert record.achieved == pytest.approx(Pattern.parse(record.pattern).fixed_sparsity)
    step = max(record.shape[0] * record.shape[1] for record in result.records.values()) * 0.25
    assert abs(result.achieved_sparsity - 0.6) * result.counted_params <= step / 2 + 1
    assert "N:M choices" in result.summary()
    with pytest.raises(ConfigError, match="need an allocation"):
        sw.prune(build_tiny("llama"), "wanda", 0.6, pattern="2:4,1:4", calibration=_calibration(), progress=False)
    with pytest.raises(ConfigError, match="different sparsities"):
        sw.prune(build_tiny("llama"), "wanda", 0.5, pattern="2:4,4:8", calibration=_calibration(), allocation="owl",
                 progress=False)
    with pytest.raises(ConfigError, match="range"):
        sw.prune(build_tiny("llama"), "wanda", 0.9, pattern="2:4,1:4", calibration=_calibration(), allocation="owl",
                 progress=False)
