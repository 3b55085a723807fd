"""Integration on the real SmolLM2-135M with a small C4 calibration set (runs in CI)."""

from __future__ import annotations

import pytest
import torch
from conftest import C4_SAMPLE, requires_data

import sparsewise as sw
from sparsewise.records import set_records


@pytest.fixture
def restorable(smollm2):
    model, tok = smollm2
    original = {key: value.clone() for key, value in model.state_dict().items()}
    yield model, tok, original
    model.load_state_dict(original)
    set_records(model, {})


@requires_data(C4_SAMPLE)
def test_calibrated_methods_beat_magnitude_on_real_model(restorable):
    model, tok, original = restorable
    calib = sw.data.calibration(C4_SAMPLE, tok, n=8, seqlen=128, seed=0)
    held_out = sw.data.calibration(C4_SAMPLE, tok, n=4, seqlen=128, seed=1)
    probe = sw.evaluate.FidelityProbe.capture(model, held_out.input_ids, dtype=torch.float32)
    kl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(original)
        result = sw.prune(model, method=method, pattern="2:4", sparsity=None, calibration=calib, progress=False)
        assert len(result.records) == 210
        assert result.achieved_sparsity == pytest.approx(0.5, abs=1e-4)
        assert torch.equal(model.lm_head.weight, original["lm_head.weight"])  # tied head never pruned
        kl[method] = probe.compare(model).kl
    assert kl["sparsegpt"] < kl["wanda"] < kl["magnitude"], kl


def test_self_calibration_is_deterministic(smollm2):
    model, tok = smollm2
    first = sw.data.calibration("self", tok, n=2, seqlen=16, seed=3, model=model, progress=False)
    second = sw.data.calibration("self", tok, n=2, seqlen=16, seed=3, model=model, progress=False)
    other = sw.data.calibration("self", tok, n=2, seqlen=16, seed=4, model=model, progress=False)
    assert torch.equal(first.input_ids, second.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
