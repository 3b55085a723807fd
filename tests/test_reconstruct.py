"""Block-wise reconstruction (correction/reconstruct.py): masks kept, held-out loss never rises,
output error vs the dense model lowered, deterministic, undone on failure, resumable."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FAMILIES, build_tiny
from test_oneshot import calibration_for, forward

import sparsewise as sw
from sparsewise.calibration.stats import STAT_HESSIAN
from sparsewise.correction.reconstruct import ReconstructConfig, split_batch
from sparsewise.methods import get_method, register
from sparsewise.methods.base import _METHODS
from sparsewise.models.adapters import PrunableLayer
from sparsewise.patterns import Pattern, check_mask

FAST = {"epochs": 4, "lr": 1e-4, "micro_batch": 2}


def _prune(model, calib, **kwargs):
    return sw.prune(model, method="sparsegpt", pattern="2:4", sparsity=None, calibration=calib, progress=False,
                    **kwargs)


def test_split_batch_cuts_only_batch_sized_tensors():
    hidden, rotary, ids = torch.randn(4, 3, 2), torch.randn(1, 3, 2), torch.arange(3)
    piece = split_batch(((hidden,), {"position_embeddings": (rotary, rotary), "ids": ids, "flag": True}), 4, 1, 3)
    (cut,), kwargs = piece
    assert torch.equal(cut, hidden[1:3])
    assert kwargs["position_embeddings"][0] is rotary and kwargs["ids"] is ids and kwargs["flag"] is True


@pytest.mark.parametrize("sequential", ["layer", "block"])
def test_reconstruction_keeps_masks_and_lowers_error_vs_dense(sequential):
    dense = build_tiny("llama", seed=1)
    calib = calibration_for("llama", n=8, seqlen=32, seed=1)
    held_out = calibration_for("llama", n=4, seqlen=32, seed=7)  # never seen by pruning or refit
    reference = [forward(dense, batch) for batch in held_out]

    def error(model) -> float:
        return sum(((forward(model, b) - r) ** 2).mean().item() for b, r in zip(held_out, reference, strict=True))

    plain = build_tiny("llama", seed=1)
    _prune(plain, calib, sequential=sequential, batch_size=2)
    refit = build_tiny("llama", seed=1)
    result = _prune(refit, calib, sequential=sequential, batch_size=2, reconstruct=FAST)

    assert error(refit) < error(plain)
    assert len(result.reconstruction) == 2  # one entry per block
    for entry in result.reconstruction:
        assert entry["loss_after"] <= entry["loss_before"]  # the kept epoch is never worse on held-out samples
        assert entry["held_out"] >= 1
    modules = dict(refit.named_modules())
    plain_modules = dict(plain.named_modules())
    for name, record in result.records.items():
        weight = modules[name].weight.detach()
        assert torch.equal(weight != 0, record.mask)  # the pruner's mask, untouched by the refit
        if name.startswith("model.layers.0."):  # later blocks see refitted inputs, so their masks may differ
            assert torch.equal(weight != 0, plain_modules[name].weight != 0)
        check_mask(record.mask, Pattern.parse("2:4"))
        assert record.info["reconstruct"]["steps"] > 0
    assert "block reconstruction: 2 blocks" in result.summary()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_reconstruction_runs_on_every_family(family):
    """Block calls of every family (rotary tables, 4-D masks, encoder masks, pixel inputs) split into
    micro-batches and refit; the pruner's zeros stay zeros."""
    model = build_tiny(family)
    result = sw.prune(model, method="wanda", sparsity=0.5, calibration=calibration_for(family, n=4, seqlen=16),
                      progress=False, reconstruct={"epochs": 2, "micro_batch": 1})
    assert result.reconstruction and all(e["loss_after"] <= e["loss_before"] for e in result.reconstruction)
    modules = dict(model.named_modules())
    for name, record in result.records.items():
        rows = PrunableLayer(name=name, module=modules[name]).get_weight()  # [out, in] also for GPT-2's Conv1D
        assert torch.equal(rows != 0, record.mask), name


def test_reconstruction_is_deterministic_and_keeps_half_precision():
    calib = calibration_for("llama", n=4, seqlen=16)
    states = []
    for frozen in (False, True):  # a model frozen for inference refits the same and stays frozen
        model = build_tiny("llama").to(torch.bfloat16).requires_grad_(not frozen)
        _prune(model, calib, reconstruct=FAST)
        states.append(model.state_dict())
        assert all(param.dtype == torch.bfloat16 for param in model.parameters())
        assert all(param.requires_grad != frozen and param.grad is None for param in model.parameters())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_a_failed_run_restores_every_parameter_the_refit_changed():
    class FailInBlock1:
        name = "test-fail-block1"
        needs = frozenset({STAT_HESSIAN})

        def prune_layer(self, task):
            if task.name.startswith("model.layers.1."):
                raise RuntimeError("boom")
            return get_method("sparsegpt").prune_layer(task)

    register(FailInBlock1)
    try:
        model = build_tiny("llama")
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(RuntimeError, match="boom"):
            sw.prune(model, method="test-fail-block1", sparsity=0.5, calibration=calibration_for("llama"),
                     progress=False, reconstruct=FAST)
        for key, value in model.state_dict().items():  # norms of the refitted block 0 included
            assert torch.equal(value, before[key]), key
    finally:
        _METHODS.unregister("test-fail-block1")


def test_an_interrupted_run_with_reconstruction_resumes_to_the_same_result(tmp_path):
    class Interrupt:
        name = "test-interrupt"
        needs = frozenset({STAT_HESSIAN})
        armed = False

        def prune_layer(self, task):
            if Interrupt.armed and task.name == "model.layers.1.mlp.up_proj":
                raise KeyboardInterrupt
            return get_method("sparsegpt").prune_layer(task)

    register(Interrupt)
    try:
        calib = calibration_for("llama")
        reference = build_tiny("llama")
        sw.prune(reference, method="test-interrupt", sparsity=0.5, calibration=calib, progress=False, reconstruct=FAST)
        model = build_tiny("llama")
        Interrupt.armed = True
        with pytest.raises(KeyboardInterrupt):
            sw.prune(model, method="test-interrupt", sparsity=0.5, calibration=calib, progress=False,
                     reconstruct=FAST, resume_dir=tmp_path / "run")
        Interrupt.armed = False
        result = sw.prune(model, method="test-interrupt", sparsity=0.5, calibration=calib, progress=False,
                          reconstruct=FAST, resume_dir=tmp_path / "run")
        assert len(result.reconstruction) == 2  # block 0's entry comes back from the resume state
        for key, value in reference.state_dict().items():  # refitted norms of block 0 restored too
            assert torch.equal(model.state_dict()[key], value), key
    finally:
        _METHODS.unregister("test-interrupt")


def test_reconstruction_refuses_what_it_cannot_do():
    model = build_tiny("llama")
    calib = calibration_for("llama")
    with pytest.raises(sw.ConfigError, match="magnitude runs without"):
        sw.prune(model, method="magnitude", sparsity=0.5, progress=False, reconstruct=True)
    with pytest.raises(sw.ConfigError, match="unknown reconstruct option"):
        _prune(model, calib, reconstruct={"epoch": 3})
    with pytest.raises(sw.ConfigError, match="lr must be a positive"):
        ReconstructConfig(lr=0.0)
    with pytest.raises(sw.ConfigError, match="holdout"):
        ReconstructConfig(holdout=1.0)
    with pytest.raises(sw.ConfigError, match="takes no allocation, refine, reconstruct"):
        sw.prune(model, method="armor", pattern="2:4", sparsity=None, calibration=calib, progress=False,
                 reconstruct=True)
    assert all(torch.count_nonzero(param) == param.numel() or param.dim() == 1 for param in model.parameters())
