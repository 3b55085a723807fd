"""Depth pruning (issue 19 point 2): Block Influence, removal loss, generic block removal."""

from __future__ import annotations

import conftest
import pytest
import torch
from conftest import VOCAB, build_tiny

import sparsewise as sw
from sparsewise.errors import ConfigError
from sparsewise.models import ModelAdapter
from sparsewise.structured.depth import (
    block_influence,
    block_influence_scores,
    blocks_to_remove,
    depth_count,
    removal_loss_scores,
    remove_blocks,
)

FAMILIES = ["llama", "gpt2", "opt", "qwen2"]
IDS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def build4(family: str, monkeypatch) -> torch.nn.Module:
    """A tiny model of ``family`` with 4 blocks (the conftest default is 2)."""
    monkeypatch.setattr(conftest, "LAYERS", 4)
    return build_tiny(family)


def n_params(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def test_block_influence_equals_a_hand_computation():
    x_in = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    x_out = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [-1.0, -1.0]]])
    # cos: 1, 0, -1 -> mean 0 -> BI 1; with the last token masked: mean 0.5 -> BI 0.5
    assert block_influence(x_in, x_out).item() == pytest.approx(1.0)
    mask = torch.tensor([[True, True, False]])
    assert block_influence(x_in, x_out, mask).item() == pytest.approx(0.5)
    assert block_influence(x_in, x_in).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="one shape"):
        block_influence(x_in, x_out[..., :1])


def test_selection_and_rounding():
    assert blocks_to_remove([0.3, 0.1, 0.1, 0.9], 2) == [1, 2]
    assert depth_count(30, 0.1) == 3 and depth_count(30, 0.2) == 6 and depth_count(30, 0.25) == 8
    with pytest.raises(ConfigError, match="rounds to 0 whole blocks"):
        depth_count(4, 0.1)
    with pytest.raises(ConfigError, match="removes all of them"):
        depth_count(2, 0.9)


def test_removing_no_block_leaves_outputs_equal(monkeypatch):
    model = build4("llama", monkeypatch)
    before = model(IDS).logits
    info = remove_blocks(model, [])
    assert info["removed"] == [] and len(ModelAdapter(model).blocks) == 4
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_blocks_keeps_the_model_whole(family, monkeypatch, tmp_path):
    import transformers as tf

    model = build4(family, monkeypatch)
    blocks = ModelAdapter(model).blocks
    expected = n_params(model) - sum(n_params(blocks[i][1]) for i in (0, 2))
    kept = [blocks[1][1], blocks[3][1]]
    info = remove_blocks(model, [0, 2])
    after = ModelAdapter(model).blocks
    assert [block for _, block in after] == kept and len(after) == 2
    assert n_params(model) == expected and info["params_removed"] == n_params(blocks[0][1]) * 2
    config = model.config
    assert config.num_hidden_layers == 2  # n_layer for gpt2, through its attribute map
    if isinstance(getattr(config, "layer_types", None), list):
        assert len(config.layer_types) == 2
    indices = [module.layer_idx for _, block in after for module in block.modules()
               if isinstance(getattr(module, "layer_idx", None), int)]
    assert indices and sorted(set(indices)) == [0, 1]
    out = model.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False, use_cache=True,
                         pad_token_id=0)
    nocache = model.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out, nocache)
    logits = model(IDS).logits
    model.save_pretrained(tmp_path / "hf")
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert len(ModelAdapter(again).blocks) == 2
    torch.testing.assert_close(again(IDS).logits, logits, rtol=0, atol=0)


def test_sw_prune_depth_reports_and_round_trips_through_sw_save(monkeypatch, tmp_path):
    model = build4("llama", monkeypatch)
    before = n_params(model)
    result = sw.prune(model, "depth", 0.25, calibration=IDS)
    assert len(ModelAdapter(model).blocks) == 3 and model.config.num_hidden_layers == 3
    assert result.removed["params_removed"] == before - n_params(model) > 0
    assert len(result.removed["scores"]) == 4 and "1 whole blocks removed" in result.notes[0]
    logits = model(IDS).logits
    sw.save(model, tmp_path / "sw")
    again = sw.load(tmp_path / "sw")
    torch.testing.assert_close(again(IDS).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("importance", ["bi", "removal_loss"])
def test_an_identity_block_is_removed_first(importance, monkeypatch):
    model = build4("llama", monkeypatch)
    block = ModelAdapter(model).blocks[2][1]
    with torch.no_grad():  # x_out == x_in: both residual branches write zeros
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    if importance == "bi":
        scores = block_influence_scores(model, IDS)
        assert scores[2] == pytest.approx(0.0, abs=1e-6) and min(scores) == scores[2]
    else:
        scores = removal_loss_scores(model, IDS)["kl"]
        assert scores[2] == pytest.approx(0.0, abs=1e-9)
    result = sw.prune(model, "depth", 0.25, calibration=IDS, method_options={"importance": importance})
    assert result.removed["removed"] == ["model.layers.2"]


def test_bad_inputs_are_refused(monkeypatch):
    model = build4("llama", monkeypatch)
    with pytest.raises(ConfigError, match="all 4 blocks"):
        remove_blocks(model, [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="out of range"):
        remove_blocks(model, [7])
    with pytest.raises(ConfigError, match="repeated"):
        remove_blocks(model, [1, 1])
    with pytest.raises(ConfigError, match="rounds to 0 whole blocks"):
        sw.prune(model, "depth", 0.1, calibration=IDS)
    with pytest.raises(ConfigError, match="importance"):
        sw.prune(model, "depth", 0.25, calibration=IDS, method_options={"importance": "magnitude"})
    with pytest.raises(ConfigError, match="calibration"):
        sw.prune(model, "depth", 0.25)
    assert len(ModelAdapter(model).blocks) == 4  # nothing changed by a refused request
