"""Statistics accumulators and engine guards."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny

import sparsewise as sw
from sparsewise.calibration.stats import STAT_HESSIAN, STAT_MOMENTS, STAT_NORMS, LayerStats, add_gram_


@pytest.mark.parametrize("width", [100, 384, 1000])
def test_symmetric_gram_equals_plain_product(width):
    x = torch.randn(300, width, dtype=torch.float64)
    acc = torch.zeros(width, width, dtype=torch.float64)
    add_gram_(acc, x, tile=128)
    add_gram_(acc, x, tile=128)
    torch.testing.assert_close(acc, 2 * x.T @ x)


def test_stats_split_across_batches_equal_one_pass():
    x = torch.randn(4, 50, 24)
    wanted = frozenset({STAT_NORMS, STAT_HESSIAN, STAT_MOMENTS})
    whole, parts = LayerStats(24, wanted), LayerStats(24, wanted)
    whole.update(x)
    for chunk in x.split(1):
        parts.update(chunk)
    flat = x.reshape(-1, 24)
    assert whole.tokens == parts.tokens == 200
    for name, value in whole.tensors().items():
        torch.testing.assert_close(value, parts.tensors()[name], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(whole.channel_norms, flat.norm(dim=0))
    torch.testing.assert_close(whole.mean, flat.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.var, flat.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole.hessian, 2 * flat.T @ flat / 200, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sequential", ["layer", "block"])
def test_non_finite_activations_name_the_layer(sequential):
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("inf")
    calib = [{"input_ids": torch.randint(0, VOCAB, (2, 16))}]
    with pytest.raises(sw.NumericalError, match=r"layers\.1\.self_attn\.q_proj"):
        sw.prune(model, method="wanda", sparsity=0.5, calibration=calib, sequential=sequential, progress=False)


def test_stats_in_token_chunks_equal_one_pass(monkeypatch):
    from sparsewise.calibration import stats as stats_module
    from sparsewise.calibration.stats import KNOWN_STATS, LayerStats

    x = torch.randn(3, 50, 24, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = LayerStats(24, KNOWN_STATS)
    whole.update(x)
    monkeypatch.setattr(stats_module, "CHUNK_ROWS", 7)  # 150 tokens in 22 chunks
    chunked = LayerStats(24, KNOWN_STATS)
    chunked.update(x)
    assert chunked.tokens == whole.tokens == 150
    for name, value in whole.tensors().items():
        torch.testing.assert_close(chunked.tensors()[name], value, rtol=1e-5, atol=1e-4)


def _dense_pass(model, adapter, calib, mode):
    """(channel norms per layer, block outputs per block, block forwards) of one engine pass."""
    from sparsewise.calibration.engine import sequential_calibration
    from sparsewise.calibration.run import calibration_batches

    norms, outputs, forwards = {}, {}, [0]

    def count(*_):
        forwards[0] += 1

    handles = [block.register_forward_hook(count) for _, block in adapter.blocks]
    try:
        sequential_calibration(model, adapter.blocks, adapter.block_layers, calibration_batches(calib, 2),
                               lambda name, stats: norms.__setitem__(name, stats.channel_norms.clone()),
                               wanted=frozenset({STAT_NORMS}), device=torch.device("cpu"), mode=mode,
                               after_block=lambda index, _name, outs: outputs.__setitem__(index, outs))
    finally:
        for handle in handles:
            handle.remove()
    return norms, outputs, forwards[0]


def test_observe_mode_is_a_block_pass_with_one_forward_per_block():
    """A dense pass that only reads statistics (OWL's): same statistics and block outputs as the
    two-pass block mode, with half the block forwards."""
    from sparsewise.calibration.engine import OBSERVE
    from sparsewise.models.adapters import ModelAdapter

    model = build_tiny("llama")
    adapter = ModelAdapter(model)
    calib = sw.data.calibration(torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(0)))
    block_norms, block_outputs, block_forwards = _dense_pass(model, adapter, calib, "block")
    obs_norms, obs_outputs, obs_forwards = _dense_pass(model, adapter, calib, OBSERVE)
    assert block_norms.keys() == obs_norms.keys() and len(block_norms) > 0
    for name, value in block_norms.items():
        assert torch.equal(value, obs_norms[name]), name
    for index, outs in block_outputs.items():
        assert all(torch.equal(a, b) for a, b in zip(outs, obs_outputs[index], strict=True)), index
    n_batches, n_blocks = 3, len(adapter.blocks)
    assert block_forwards == 2 * n_batches * n_blocks and obs_forwards == n_batches * n_blocks
