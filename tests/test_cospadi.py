"""CoSpaDi: the sparse-dictionary factorization (math) and the method that swaps linears for D C."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

import sparsewise as sw
from sparsewise.errors import ConfigError, NumericalError
from sparsewise.modules import SparseDictionaryLinear
from sparsewise.solvers.cospadi import (
    cospadi_factorize,
    damped,
    data_error,
    dictionary_size,
    omp_supports,
    whitened_svd_error,
)


def _layer(out_features: int = 48, in_features: int = 64, tokens: int = 800, seed: int = 0):
    """A weight and the Gram X^T X of correlated inputs with unequal channel scales (as in LLMs)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / 8
    mixing = torch.eye(in_features) + 0.3 * torch.randn(in_features, in_features, generator=generator)
    inputs = torch.randn(tokens, in_features, generator=generator) @ mixing * torch.linspace(0.2, 3.0, in_features)
    return weight, inputs.T @ inputs


def test_all_atoms_per_column_is_the_whitened_truncated_svd():
    weight, hessian = _layer()
    atoms, nonzeros = dictionary_size(48, 64, 0.5, 1.0)
    assert nonzeros == atoms
    factors = cospadi_factorize(weight, hessian, atoms, nonzeros)
    assert factors.error == pytest.approx(whitened_svd_error(weight, hessian, atoms), rel=1e-6)


def test_omp_returns_exactly_the_requested_atoms_and_recovers_a_sparse_code():
    generator = torch.Generator().manual_seed(1)
    dictionary = torch.linalg.qr(torch.randn(40, 24, generator=generator))[0]  # orthonormal atoms
    codes = torch.zeros(24, 30)
    truth = torch.stack([torch.randperm(24, generator=generator)[:3] for _ in range(30)])
    codes.scatter_(0, truth.T, torch.randn(3, 30, generator=generator).abs() + 0.5)
    support = omp_supports(dictionary, dictionary @ codes, 3)
    assert support.shape == (30, 3)
    assert torch.equal(support.sort(dim=1).values, truth.sort(dim=1).values)


def test_calibrated_fit_beats_the_weight_only_fit_and_low_rank_on_the_data():
    weight, hessian = _layer()
    atoms, nonzeros = dictionary_size(48, 64, 0.6, 0.25)
    factors = cospadi_factorize(weight, hessian, atoms, nonzeros)
    weight_only = cospadi_factorize(weight, None, atoms, nonzeros)
    reference = damped(hessian.double(), 0.01)
    assert factors.error <= data_error(weight.double(), weight_only.product().double(), reference)
    assert factors.error <= factors.start_error  # the best iterate is kept
    rank = dictionary_size(48, 64, 0.6, 1.0)[0]  # the same number of values as a low-rank factorization
    assert factors.error < whitened_svd_error(weight, hessian, rank)
    per_column = (factors.codes != 0).sum(dim=0)
    assert int(per_column.max()) <= nonzeros and factors.support.shape == (64, nonzeros)
    assert atoms * 48 + nonzeros * 64 <= 0.6 * 48 * 64


def test_bad_inputs_say_what_to_do():
    weight, hessian = _layer()
    with pytest.raises(ConfigError, match="keep_ratio"):
        dictionary_size(48, 64, 1.2, 0.5)
    with pytest.raises(ConfigError, match="no dictionary atom"):
        dictionary_size(48, 64, 0.001, 0.5)
    with pytest.raises(ConfigError, match="nonzeros"):
        cospadi_factorize(weight, hessian, 4, 8)
    broken = weight.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        cospadi_factorize(broken, hessian, 8, 2)
    with pytest.raises(NumericalError, match="diagonal"):
        cospadi_factorize(weight, torch.zeros(64, 64), 8, 2)


def test_prune_swaps_linears_for_dictionaries_and_checkpoints_round_trip(tmp_path):
    model = build_tiny("llama")
    calibration = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    tokens = calibration[:2]
    with torch.no_grad():
        dense_logits = model(tokens).logits
    result = sw.prune(model, method="cospadi", sparsity=0.3, calibration=calibration,
                      method_options={"code_density": 0.5, "iterations": 2}, progress=False)
    swapped = {name: module for name, module in model.named_modules() if isinstance(module, SparseDictionaryLinear)}
    assert len(swapped) == 14 and sorted(result.records) == sorted(f"{name}.codes" for name in swapped)
    for name, module in swapped.items():
        info = result.records[f"{name}.codes"].info
        assert info["compression"] >= 0.3 and info["data_error"] <= info["lowrank_start_error"]
        kept = module.out_features * module.atoms + module.in_features * info["nonzeros_per_column"]
        assert kept == info["kept_values"]
        assert int((module.codes.weight != 0).sum(dim=0).max()) <= info["nonzeros_per_column"]
    with torch.no_grad():
        logits = model(tokens).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits)
    sw.save(model, tmp_path / "ckpt")
    loaded = sw.load(tmp_path / "ckpt")
    assert sum(isinstance(module, SparseDictionaryLinear) for module in loaded.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, logits)


def test_prune_refuses_patterns_it_cannot_make():
    with pytest.raises(ConfigError, match="cospadi"):
        sw.prune(build_tiny("llama"), method="cospadi", pattern="2:4",
                 calibration=torch.randint(0, 100, (2, 8)), progress=False)


def test_replacements_keep_the_layers_bias_and_the_models_dtype():
    model = build_tiny("opt").to(torch.bfloat16)  # OPT's linears have biases
    biases = {name: module.bias.detach().clone() for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in name}
    sw.prune(model, method="cospadi", sparsity=0.3, calibration=torch.randint(0, 100, (2, 16)),
             method_options={"iterations": 1}, progress=False)
    swapped = {name: module for name, module in model.named_modules() if isinstance(module, SparseDictionaryLinear)}
    assert swapped and set(swapped) <= set(biases)
    for name, module in swapped.items():
        assert module.codes.weight.dtype == torch.bfloat16 and module.dictionary.weight.dtype == torch.bfloat16
        assert torch.equal(module.dictionary.bias, biases[name])
