"""Masks from scores: hand-computed small cases for every pattern, parsing and its errors."""

from __future__ import annotations

import pytest
import torch

from sparsewise.errors import ConfigError, PatternError
from sparsewise.patterns import (
    Pattern,
    block_mask,
    check_mask,
    check_ratio,
    global_masks,
    mask_from_scores,
    nm_mask,
    prune_count,
    unstructured_mask,
)

T, F = True, False


def test_per_row_unstructured_mask_hand_case():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.7]])
    mask = unstructured_mask(scores, 0.5, "row")
    assert mask.tolist() == [[T, F, T, F], [F, F, T, T]]
    assert mask_from_scores(scores, 0.5, "unstructured").equal(mask)


def test_per_row_rounds_down_and_ties_break_by_position():
    assert unstructured_mask(torch.ones(1, 4), 0.5).tolist() == [[F, F, T, T]]
    # 0.74 * 4 = 2.96 -> 2 pruned per row
    assert unstructured_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 0.74).tolist() == [[T, T, F, F]]
    # 0.29 * 100 is 28.999... in floating point; 29 entries are meant
    assert int((~unstructured_mask(torch.rand(3, 100), 0.29)).sum()) == 3 * 29


def test_prune_count_is_floor_without_round_off():
    assert prune_count(100, 0.29) == 29
    assert prune_count(10, 0.7) == 7
    assert prune_count(7, 0.5) == 3
    assert prune_count(5, 0.0) == 0


def test_per_layer_unstructured_mask_hand_case():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [5.0, 6.0, 7.0, 8.0]])
    mask = unstructured_mask(scores, 0.5, "layer")
    assert mask.tolist() == [[F, F, F, F], [T, T, T, T]]
    assert mask_from_scores(scores, 0.5, "unstructured:layer").equal(mask)


def test_global_masks_rank_two_layers_together():
    scores = {"a": torch.tensor([[1.0, 8.0]]), "b": torch.tensor([[2.0, 3.0], [9.0, 4.0]])}
    masks = global_masks(scores, 0.5)
    assert masks["a"].tolist() == [[F, T]]
    assert masks["b"].tolist() == [[F, F], [T, T]]
    assert masks["b"].dtype == torch.bool


def test_global_scope_needs_global_masks_and_at_least_one_layer():
    with pytest.raises(ConfigError, match="global_masks"):
        mask_from_scores(torch.rand(2, 4), 0.5, "unstructured:global")
    with pytest.raises(ConfigError, match="at least one layer"):
        global_masks({}, 0.5)


def test_two_four_hand_case():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 7.0, 6.0, 5.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[F, T, F, T, T, T, F, F]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_keep_exactly_n_per_group(n, m):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 32, generator=generator)
    mask = mask_from_scores(scores, 1 - n / m, f"{n}:{m}")
    per_group = mask.reshape(6, 32 // m, m).sum(-1)
    assert bool((per_group == n).all())
    assert check_mask(mask, f"{n}:{m}")
    assert float(mask.float().mean()) == n / m
    # the kept entries are the top-n of each group
    groups = scores.reshape(6, -1, m)
    kept_min = torch.where(mask.reshape(6, -1, m), groups, torch.inf).amin(-1)
    pruned_max = torch.where(mask.reshape(6, -1, m), -torch.inf, groups).amax(-1)
    assert bool((kept_min > pruned_max).all())


def test_check_mask_rejects_overfull_groups():
    mask = torch.tensor([[T, T, T, F, T, F, F, F]])
    assert not check_mask(mask, "2:4")
    assert check_mask(mask, "3:4")
    assert not check_mask(torch.ones(2, 6, dtype=torch.bool), "2:4")  # 6 is not a multiple of 4
    assert check_mask(mask, "unstructured")


def test_nm_mask_refuses_indivisible_width():
    with pytest.raises(PatternError, match="divisible"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_block_mask_hand_case():
    # 2x2 tile sums: [[1+1+1+1, 5*4], [3*4, 0.5*4]] -> the two lowest tiles (sum 4 and 2) go
    scores = torch.tensor(
        [
            [1.0, 1.0, 5.0, 5.0],
            [1.0, 1.0, 5.0, 5.0],
            [3.0, 3.0, 0.5, 0.5],
            [3.0, 3.0, 0.5, 0.5],
        ]
    )
    mask = mask_from_scores(scores, 0.5, "block:2x2")
    assert mask.tolist() == [[F, F, T, T], [F, F, T, T], [T, T, F, F], [T, T, F, F]]
    with pytest.raises(PatternError, match="tile"):
        block_mask(torch.rand(3, 4), 0.5, (2, 2))
    with pytest.raises(ConfigError):
        block_mask(scores, 1.0, (2, 2))


@pytest.mark.parametrize(
    "spec,expected",
    [
        (None, Pattern()),
        ("", Pattern()),
        ("unstructured", Pattern()),
        ("UNSTRUCTURED", Pattern()),
        ("unstructured:row", Pattern()),
        ("row", Pattern()),
        ("unstructured:layer", Pattern(scope="layer")),
        ("layer", Pattern(scope="layer")),
        ("unstructured:global", Pattern(scope="global")),
        ("global", Pattern(scope="global")),
        ("2:4", Pattern(kind="nm", n=2, m=4)),
        (" 4 : 8 ", Pattern(kind="nm", n=4, m=8)),
        ("1:4", Pattern(kind="nm", n=1, m=4)),
        ("block:4x4", Pattern(kind="block", block=(4, 4))),
        ("block=2x8", Pattern(kind="block", block=(2, 8))),
        ("Block 1x16", Pattern(kind="block", block=(1, 16))),
        (Pattern(kind="nm", n=2, m=4), Pattern(kind="nm", n=2, m=4)),
    ],
)
def test_pattern_parse_accepts(spec, expected):
    parsed = Pattern.parse(spec)
    assert parsed == expected
    assert Pattern.parse(str(parsed)) == parsed  # str() round-trips


@pytest.mark.parametrize("spec", ["4:2", "0:4", "2:2", "1:1", "foo", "block:0x4", "2:4:8", "unstructured:rows"])
def test_pattern_parse_rejects(spec):
    with pytest.raises(PatternError) as raised:
        Pattern.parse(spec)
    assert repr(spec) in str(raised.value)
    assert isinstance(raised.value, ConfigError)


@pytest.mark.parametrize("bad", [1.0, -0.1, "abc", float("nan"), None])
def test_bad_sparsity_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        Pattern.parse("unstructured").resolve_sparsity(bad)


@pytest.mark.parametrize("bad", [1.0, -0.1, "abc"])
def test_masks_refuse_bad_sparsity(bad):
    with pytest.raises(ConfigError, match="sparsity must be"):
        unstructured_mask(torch.rand(2, 4), bad)
    with pytest.raises(ConfigError, match="sparsity must be"):
        check_ratio(bad)


def test_nm_fixes_the_sparsity():
    pattern = Pattern.parse("2:4")
    assert pattern.fixed_sparsity == 0.5
    assert pattern.resolve_sparsity(None) == 0.5
    assert pattern.resolve_sparsity(0.5) == 0.5
    with pytest.raises(ConfigError, match="fixes sparsity"):
        pattern.resolve_sparsity(0.7)
    assert Pattern.parse("unstructured").resolve_sparsity("0.25") == 0.25


def test_nm_shape_error_names_layer_and_fix():
    layer = "model.layers.0.mlp.down_proj"
    with pytest.raises(PatternError) as raised:
        Pattern.parse("2:4").check_shape((8, 6), layer)
    message = str(raised.value)
    assert layer in message and "exclude" in message and "6" in message
    Pattern.parse("2:4").check_shape((8, 12), layer)  # fits: no error
    with pytest.raises(PatternError, match=layer):
        Pattern.parse("block:4x4").check_shape((8, 6), layer)
    with pytest.raises(PatternError, match="2-D"):
        Pattern.parse("unstructured").check_shape((8, 6, 3), layer)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("count", [0, 1, 7, 50, 99, 100])
def test_lowest_mask_equals_stable_sort_with_ties(seed, count, device):
    from sparsewise.patterns import lowest_mask

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 10, (100,), generator=generator).float()  # many ties
    expected = torch.zeros(100, dtype=torch.bool)
    expected[torch.sort(scores, stable=True).indices[:count]] = True
    assert torch.equal(lowest_mask(scores.to(device), count).cpu(), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99])
def test_row_masks_equal_a_stable_sort_per_row_with_ties(sparsity, device):
    from sparsewise.patterns import prune_count, unstructured_mask

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    scores = torch.randint(0, 4, (16, 40), generator=torch.Generator().manual_seed(3)).float()  # many ties
    count = prune_count(40, sparsity)
    expected = torch.ones(16, 40, dtype=torch.bool)
    expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :count], False)
    assert torch.equal(unstructured_mask(scores.to(device), sparsity).cpu(), expected)
