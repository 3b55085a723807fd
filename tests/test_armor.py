"""ARMOR (2:4 core between block-diagonal factors) on small layers and a tiny LLaMA (CPU, seconds)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny
from torch import nn

from sparsewise.data import CalibrationSet
from sparsewise.errors import ConfigError, NumericalError, PatternError
from sparsewise.methods.armor import armor
from sparsewise.modules import ARMORLinear
from sparsewise.patterns import nm_mask
from sparsewise.solvers.armor import (
    armor_factorize,
    block_diag_apply,
    nowag_mask,
    nowag_normalize,
    proxy_loss,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Hundreds of tiny matmuls: thread start-up costs more than it saves on a shared 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer(rows: int = 64, cols: int = 128, tokens: int = 256, seed: int = 0):
    """A random weight and the energy diag(X^T X) of inputs with uneven channel scales."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    inputs = torch.randn(tokens, cols, generator=generator) * (torch.rand(cols, generator=generator) * 3 + 0.1)
    return weight, inputs.square().sum(0), inputs


def is_24(mask: torch.Tensor) -> bool:
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def test_loss_monotone_and_below_initial_pruning():
    weight, energy, _ = layer()
    factors = armor_factorize(weight, energy, block_size=32, iterations=200, seed=0)
    normalized, _, _ = nowag_normalize(weight)
    initial_mask = nowag_mask(normalized, energy)
    baseline = proxy_loss(weight, energy, weight * initial_mask)
    losses = factors.losses
    assert losses[0] == pytest.approx(baseline, rel=1e-5)  # A = B = I start: the baseline's loss
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:], strict=False))
    assert factors.final_loss < 0.8 * baseline  # the factors do help on this layer
    assert proxy_loss(weight, energy, factors.reconstruct()) == pytest.approx(factors.final_loss, rel=1e-4)
    assert is_24(factors.mask) and is_24(factors.core() != 0) and factors.groups_changed > 0
    assert factors.a_blocks.shape == (2, 32, 32) and factors.b_blocks.shape == (4, 32, 32)


@pytest.mark.parametrize("block_size", [(16, 8), 2])
def test_mask_stays_24_every_iteration_random_select(block_size):
    weight, energy, _ = layer(32, 64)
    for iterations in (1, 7, 30):
        factors = armor_factorize(weight, energy, block_size=block_size, iterations=iterations, select="random")
        assert is_24(factors.mask)
        assert bool((factors.values[~factors.mask] == 0).all())
        assert all(b <= a for a, b in zip(factors.losses, factors.losses[1:], strict=False))


def test_block_size_one_frozen_is_the_optimal_mask_search():
    """A = B = I fixed, diagonal tiles: one sweep finds the proxy-optimal 2:4 mask (Wanda's)."""
    weight, energy, _ = layer()
    factors = armor_factorize(weight, energy, block_size=1, iterations=30, patience=5, freeze_factors=True)
    optimal = nm_mask(weight.abs() * energy.sqrt(), 2, 4)  # keeps the 2 largest W_ij^2 h_j per group
    assert torch.equal(factors.mask, optimal)
    assert factors.final_loss == pytest.approx(proxy_loss(weight, energy, weight * optimal), rel=1e-5)
    assert factors.losses[1] == factors.final_loss  # everything happens in the first discrete step
    assert torch.equal(factors.a_blocks, torch.ones(64, 1, 1)) and torch.equal(factors.b_blocks, torch.ones(128, 1, 1))


def test_init_mask_and_zero_iterations():
    weight, energy, _ = layer(32, 64)
    magnitude = nm_mask(weight.abs(), 2, 4)
    factors = armor_factorize(weight, energy, block_size=16, iterations=0, init_mask=magnitude)
    assert torch.equal(factors.mask, magnitude)
    assert torch.allclose(factors.reconstruct(), weight * magnitude, atol=1e-5)
    improved = armor_factorize(weight, energy, block_size=16, iterations=50, init_mask=magnitude)
    assert improved.final_loss < factors.final_loss


def test_deterministic_per_seed():
    weight, energy, _ = layer(32, 64)
    first = armor_factorize(weight, energy, block_size=16, iterations=40, seed=3)
    second = armor_factorize(weight, energy, block_size=16, iterations=40, seed=3)
    other = armor_factorize(weight, energy, block_size=16, iterations=40, seed=4)
    assert first.losses == second.losses
    for name in ("a_blocks", "b_blocks", "values", "mask", "row_norms", "col_norms"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.mask, other.mask) or first.losses != other.losses


def test_armor_linear_forward_matches_dense_reconstruction():
    weight, energy, inputs = layer(64, 128)
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight.copy_(weight)
    module, factors = ARMORLinear.from_linear(linear, energy, block_size=(16, 32), iterations=30)
    dense = torch.block_diag(*factors.a_blocks) @ factors.core() @ torch.block_diag(*factors.b_blocks)
    assert torch.allclose(module.dense_weight(), dense, atol=1e-5)
    assert torch.allclose(factors.reconstruct(), dense, atol=1e-5)
    x = inputs[:10].reshape(2, 5, 128)
    assert torch.allclose(module(x), x @ dense.T + linear.bias, atol=1e-4)
    assert is_24(module.sparse.weight != 0) and module.sparse.bias is None
    assert module.block_size == (16, 32)
    blocks = torch.randn(4, 8, 8)
    vector = torch.randn(3, 32)
    assert torch.allclose(block_diag_apply(blocks, vector), vector @ torch.block_diag(*blocks).T, atol=1e-5)


def test_errors_say_what_to_do():
    weight, energy, _ = layer(48, 64)
    with pytest.raises(ConfigError, match=r"out_features = 48 is not divisible.*block_size=16"):
        armor_factorize(weight, energy, block_size=32)
    with pytest.raises(PatternError, match="divisible by 4"):
        armor_factorize(torch.randn(8, 10), torch.ones(10), block_size=2)
    bad = weight.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN/Inf"):
        armor_factorize(bad, energy, block_size=16)
    with pytest.raises(NumericalError, match="energy"):
        armor_factorize(weight, torch.full((64,), float("inf")), block_size=16)
    with pytest.raises(ConfigError, match="one input-channel energy"):
        armor_factorize(weight, energy[:32], block_size=16)
    with pytest.raises(PatternError, match="exactly 2 entries"):
        armor_factorize(weight, energy, block_size=16, init_mask=torch.ones(48, 64, dtype=torch.bool))
    with pytest.raises(ConfigError, match="select"):
        armor_factorize(weight, energy, block_size=16, select="greedy")


def magnitude_24(model: nn.Module) -> None:
    for module in model.model.layers.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))


def test_armor_on_tiny_llama():
    model = build_tiny("llama")
    dims = {d for m in model.model.layers.modules() if isinstance(m, nn.Linear) for d in m.weight.shape}
    assert all(d % 16 == 0 for d in dims)
    calibration = CalibrationSet(input_ids=torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)))
    tokens = calibration.input_ids
    with torch.no_grad():
        dense_logits = model(tokens).logits
    baseline = copy.deepcopy(model)
    magnitude_24(baseline)

    infos = armor(model, calibration, block_size=16, iterations=25, progress=False)
    names = [name for name, module in baseline.named_modules() if isinstance(module, nn.Linear) and ".layers." in name]
    assert sorted(infos) == sorted(names) and len(names) == 14
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, ARMORLinear)
        assert is_24(module.sparse.weight != 0)
        assert infos[name]["final_loss"] < infos[name]["initial_loss"]  # every layer improved on its NoWag-P start
    with torch.no_grad():
        logits = model(tokens).logits
        magnitude_logits = baseline(tokens).logits
    assert torch.isfinite(logits).all()
    assert (logits - dense_logits).square().mean() < (magnitude_logits - dense_logits).square().mean()


def test_armor_restores_modules_on_failure(monkeypatch):
    model = build_tiny("llama")
    originals = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    calls = {"count": 0}
    real = armor_factorize

    def failing(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr("sparsewise.modules.armor.armor_factorize", failing)
    calibration = CalibrationSet(input_ids=torch.randint(0, 100, (2, 8)))
    with pytest.raises(RuntimeError, match="boom"):
        armor(model, calibration, block_size=16, iterations=2, progress=False)
    assert {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)} == originals
    assert not any(isinstance(m, ARMORLinear) for m in model.modules())
    with pytest.raises(ConfigError, match="block_size"):
        armor(model, calibration, block_size=48, iterations=2, progress=False)


def test_prune_armor_records_saves_and_loads(tmp_path):
    """prune(method="armor") records each 2:4 core; save stores it N:M, load rebuilds the factorized modules."""
    import sparsewise as sw
    from sparsewise.formats import checkpoint_size

    model = build_tiny("llama")
    calibration = CalibrationSet(input_ids=torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)))
    result = sw.prune(model, method="armor", pattern="2:4", calibration=calibration,
                      method_options={"block_size": 16, "iterations": 3}, progress=False)
    assert len(result.records) == 14 and result.achieved_sparsity == pytest.approx(0.5)
    assert all(name.endswith(".sparse") and rec.method == "armor" for name, rec in result.records.items())
    tokens = calibration.input_ids
    with torch.no_grad():
        expected = model(tokens).logits
    sw.save(model, tmp_path / "ckpt")
    assert checkpoint_size(tmp_path / "ckpt")["storage_counts"]["nm"] == 14  # every core stored as 2:4 values + indices
    loaded = sw.load(tmp_path / "ckpt")
    assert sum(isinstance(module, ARMORLinear) for module in loaded.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, expected)
    assert sorted(sw.get_records(loaded)) == sorted(result.records)
    with pytest.raises(ConfigError, match="format='sparsewise'"):
        sw.save(model, tmp_path / "dense", format="hf-dense")
    with pytest.raises(ConfigError, match="2:4"):
        sw.prune(build_tiny("llama"), method="armor", pattern="4:8", calibration=calibration, progress=False)
    with pytest.raises(ConfigError, match="unknown ARMOR option"):
        sw.prune(build_tiny("llama"), method="armor", pattern="2:4", calibration=calibration,
                 method_options={"damp_ratio": 0.1}, progress=False)
