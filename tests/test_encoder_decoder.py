"""Encoder-decoder models (issue 18, "every stack"): both stacks are pruned, the encoder and the
decoder are calibrated on their own inputs, and the decoder on the *pruned* encoder's outputs."""

from __future__ import annotations

import pytest
import torch

import sparsewise as sw
from sparsewise.calibration import BlockWalk, model_inputs, run_block
from sparsewise.calibration.engine import OBSERVE, sequential_calibration
from sparsewise.calibration.stats import STAT_NORMS
from sparsewise.errors import ConfigError
from sparsewise.models import ModelAdapter
from sparsewise.models.coverage import model_coverage
from sparsewise.records import get_records

tf = pytest.importorskip("transformers")

VOCAB, HIDDEN, FFN = 64, 32, 64  # multiples of 8: 2:4 applies to every linear


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random encoder-decoder, built offline (eager attention: hooks see every projection)."""
    torch.manual_seed(seed)
    if family == "t5":  # 2 encoder blocks, 3 decoder blocks: the stacks differ in length
        config = tf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=2, num_decoder_layers=3,
                             num_heads=4, decoder_start_token_id=0, pad_token_id=0)
        model = tf.T5ForConditionalGeneration(config)
    elif family == "bart":
        config = tf.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=FFN,
                               decoder_ffn_dim=FFN, max_position_embeddings=64)
        model = tf.BartForConditionalGeneration(config)
    else:
        config = tf.WhisperConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=FFN,
                                  decoder_ffn_dim=FFN, num_mel_bins=8, max_source_positions=16,
                                  max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  decoder_start_token_id=1)
        model = tf.WhisperForConditionalGeneration(config)
    model.config._attn_implementation = "eager"
    return model.eval()


def token_ids(n: int = 6, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def whisper_batch(n: int = 4, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(n, 8, 32, generator=generator),
            "decoder_input_ids": torch.randint(3, VOCAB, (n, 8), generator=generator)}


STACKS = {"t5": ("encoder.block.", "decoder.block."), "bart": ("model.encoder.layers.", "model.decoder.layers."),
          "whisper": ("model.encoder.layers.", "model.decoder.layers.")}


def test_adapter_finds_every_stack_in_execution_order():
    adapter = ModelAdapter(build("t5"))
    assert [name for name, _ in adapter.blocks] == ["encoder.block.0", "encoder.block.1", "decoder.block.0",
                                                    "decoder.block.1", "decoder.block.2"]
    assert adapter.stack_starts == [0, 2] and [len(stack) for stack in adapter.stacks] == [2, 3]
    for family in ("bart", "whisper"):
        adapter = ModelAdapter(build(family))
        encoder, decoder = STACKS[family]
        assert [name for name, _ in adapter.blocks] == [f"{encoder}0", f"{encoder}1", f"{decoder}0", f"{decoder}1"]
        assert adapter.stack_starts == [0, 2]
    # blocks=[...] of one parent are one stack; a change of parent starts a new one
    assert ModelAdapter(build("t5"), blocks=["decoder.block.0", "decoder.block.1"]).stack_starts == [0]
    assert ModelAdapter(build("t5"), blocks=["encoder.block.1", "decoder.block.0"]).stack_starts == [0, 1]


def test_decoder_tokens_are_made_from_the_encoder_tokens():
    model = build("t5")
    ids = token_ids(2, 5)
    inputs = model_inputs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], ids[:, :-1]) and (inputs["decoder_input_ids"][:, 0] == 0).all()
    assert inputs["decoder_attention_mask"].shape == ids.shape
    given = {"input_ids": ids, "decoder_input_ids": ids[:, :2]}
    assert model_inputs(model, given) is given  # decoder inputs given: left as they are
    encoder_only = tf.T5EncoderModel(model.config)
    assert "decoder_input_ids" not in model_inputs(encoder_only, {"input_ids": ids})


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_stack_is_pruned_exactly(tmp_path, family, method, pattern):
    model = build(family)
    result = sw.prune(model, method, 0.5, pattern=pattern, calibration=token_ids(), progress=False)
    adapter = ModelAdapter(model)
    expected = {name for index in range(len(adapter.blocks)) for name in adapter.block_layers(index)}
    assert set(result.records) == expected
    for prefix in STACKS[family]:
        layers = [name for name in expected if name.startswith(prefix)]
        assert len(layers) >= 8, prefix
        for name in layers:
            weight = model.get_submodule(name).weight
            assert (weight == 0).sum().item() == weight.numel() // 2, name
            if pattern == "2:4":
                assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) == 2).all(), name
    ids = token_ids(2, 8, seed=5)
    logits = model(**model_inputs(model, {"input_ids": ids})).logits
    assert torch.isfinite(logits).all()
    coverage = result.coverage
    assert coverage.kinds["attention"].fraction == 1.0 and coverage.kinds["mlp"].fraction == 1.0
    assert not any(item.kind in ("attention", "mlp") for item in coverage.left_out)
    if method == "wanda":  # one round trip per family and pattern is enough
        sw.save(model, tmp_path / "m")
        loaded = sw.load(tmp_path / "m")
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert set(get_records(loaded)) == expected


def test_whisper_prunes_both_stacks_with_its_own_inputs():
    model = build("whisper")
    sw.prune(model, "magnitude", 0.5, pattern="2:4", progress=False)
    model = build("whisper")
    result = sw.prune(model, "wanda", 0.5, calibration=whisper_batch(), progress=False)
    names = set(result.records)
    for prefix in STACKS["whisper"]:
        assert any(name.startswith(prefix) for name in names), prefix
    assert all(record.achieved == 0.5 for record in result.records.values())
    assert "encoder_attn" in " ".join(names)  # the decoder's cross-attention is pruned too
    coverage = model_coverage(model, get_records(model))
    assert coverage.kinds["attention"].fraction == 1.0 and coverage.kinds["mlp"].fraction == 1.0
    assert torch.isfinite(model(**whisper_batch(2, seed=3)).logits).all()


def test_coverage_summary_lists_both_stacks():
    model = build("t5")
    result = sw.prune(model, "wanda", 0.5, calibration=token_ids(), progress=False)
    summary = result.summary()
    assert "attention 100% pruned" in summary and "mlp 100% pruned" in summary
    assert "stack encoder.block 100% pruned, 50.0% zeros" in summary
    assert "stack decoder.block 100% pruned, 50.0% zeros" in summary
    stacks = result.coverage.to_json()["stacks"]
    assert set(stacks) == {"encoder.block", "decoder.block"} and stacks["encoder.block"]["fraction"] == 1.0
    half = sw.prune(build("t5"), "magnitude", 0.5, progress=False, blocks=[f"decoder.block.{i}" for i in range(3)])
    assert half.coverage.stacks["encoder.block"].fraction == 0 and half.coverage.stacks["decoder.block"].fraction == 1


def test_decoder_statistics_see_the_pruned_encoder():
    """The cross-attention's key projection reads the encoder's output: the norms the walk
    recorded for it are those of the pruned encoder's output (a forward by hand), not the dense one's."""
    model = build("t5")
    adapter = ModelAdapter(model)
    ids = token_ids(4, 12)
    batches = [{"input_ids": ids}]
    dense_encoder = model.encoder(input_ids=ids).last_hidden_state
    norms: dict[str, torch.Tensor] = {}

    def prune_by_magnitude(name: str, stats) -> None:
        norms[name] = stats.channel_norms.clone()
        weight = model.get_submodule(name).weight
        with torch.no_grad():
            weight[weight.abs() < weight.abs().median()] = 0.0

    sequential_calibration(model, adapter.blocks, adapter.block_layers, batches, prune_by_magnitude,
                           wanted=frozenset({STAT_NORMS}), device=torch.device("cpu"), mode="block",
                           stack_starts=adapter.stack_starts)
    pruned_encoder = model.encoder(input_ids=ids).last_hidden_state
    by_hand = pruned_encoder.reshape(-1, HIDDEN).float().norm(dim=0)
    recorded = norms["decoder.block.1.layer.1.EncDecAttention.k"]
    torch.testing.assert_close(recorded, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(recorded, dense_encoder.reshape(-1, HIDDEN).float().norm(dim=0), rtol=1e-3)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_walk_gives_each_block_what_the_models_forward_gives_it(family):
    """A dense walk (observe mode) reproduces every block's output of a real forward, in both
    stacks: T5's later blocks get the relative position bias its first block computes."""
    model = build(family)
    adapter = ModelAdapter(model)
    batch = model_inputs(model, {"input_ids": token_ids(3, 10)})
    real: dict[int, torch.Tensor] = {}
    def keep(index: int, output) -> None:
        real[index] = output if isinstance(output, torch.Tensor) else output[0]

    handles = [block.register_forward_hook(lambda _m, _a, out, index=index: keep(index, out))
               for index, (_name, block) in enumerate(adapter.blocks)]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    walked: dict[int, torch.Tensor] = {}
    with BlockWalk(model, adapter.blocks, None, torch.device("cpu"), stack_starts=adapter.stack_starts,
                   batches=[batch]) as walk:
        for step in walk:
            step.outputs = run_block(step.block, step.calls)
            walked[step.index] = step.outputs[0]
    assert sorted(walked) == list(range(len(adapter.blocks)))
    for index, output in real.items():
        torch.testing.assert_close(walked[index], output, rtol=1e-5, atol=1e-5, msg=f"block {index}")


@pytest.mark.parametrize("allocation", ["owl", "tyr"])
def test_allocation_walks_both_stacks(allocation):
    """OWL's dense observe pass and the Tyr search's block walk both cover encoder and decoder."""
    model = build("t5")
    result = sw.prune(model, "wanda", 0.5, calibration=token_ids(), allocation=allocation, progress=False)
    assert abs(result.achieved_sparsity - 0.5) < 0.02
    for stack in ("encoder", "decoder"):  # blocks of both stacks got their own ratios
        ratios = {record.sparsity for name, record in result.records.items() if name.startswith(stack)}
        assert ratios and ratios != {0.5}, stack


def test_resume_inside_the_decoder_gives_the_same_result(tmp_path):
    from sparsewise.methods import get_method, register
    from sparsewise.methods.base import _METHODS

    class Flaky:
        name = "test-flaky-encdec"
        needs = frozenset({STAT_NORMS})
        fail_at: str | None = None

        def prune_layer(self, task):
            if task.name == Flaky.fail_at:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the decoder's second block
            return get_method("wanda").prune_layer(task)

    register(Flaky)
    try:
        calib = token_ids()
        reference = build("t5")
        sw.prune(reference, "test-flaky-encdec", 0.5, calibration=calib, sequential="block", progress=False)
        for fail_at in ("decoder.block.1.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q"):
            model = build("t5")
            Flaky.fail_at = fail_at
            with pytest.raises(KeyboardInterrupt):
                sw.prune(model, "test-flaky-encdec", 0.5, calibration=calib, sequential="block",
                         resume_dir=tmp_path / "run", progress=False)
            Flaky.fail_at = None
            sw.prune(model, "test-flaky-encdec", 0.5, calibration=calib, sequential="block",
                     resume_dir=tmp_path / "run", progress=False)
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=f"{fail_at}: {key}")
    finally:
        _METHODS.unregister("test-flaky-encdec")


def test_reconstruction_is_refused_for_several_stacks():
    with pytest.raises(ConfigError, match="one stack"):
        sw.prune(build("t5"), "wanda", 0.5, calibration=token_ids(), reconstruct=True, progress=False)


def test_dense_activation_calibration_walks_both_stacks():
    model = build("bart")
    handle = sw.sparsify_activations(model, "teal", 0.5, calibration=token_ids(), progress=False)
    sites = {hook.site.name for hook in handle.hooks}
    assert any(name.startswith("model.encoder.") for name in sites)
    assert any(name.startswith("model.decoder.") for name in sites)
    measured = handle.measure([{"input_ids": token_ids(2, 8, seed=4)}])
    assert 0.3 < handle.weighted(measured) < 0.7
    sw.remove_activation_sparsity(model)


def test_observe_mode_sees_dense_encoder_outputs():
    """Observe mode (OWL's dense pass) leaves the model dense: the decoder's cross-attention reads
    the dense encoder's outputs. The stacks are found from the block names (no stack_starts given)."""
    model = build("bart")
    adapter = ModelAdapter(model)
    ids = token_ids(2, 8)
    norms: dict[str, torch.Tensor] = {}
    sequential_calibration(model, adapter.blocks, adapter.block_layers, [{"input_ids": ids}],
                           lambda name, stats: norms.__setitem__(name, stats.channel_norms.clone()),
                           wanted=frozenset({STAT_NORMS}), device=torch.device("cpu"), mode=OBSERVE)
    assert list(norms) == [name for index in range(len(adapter.blocks)) for name in adapter.block_layers(index)]
    encoder = model.model.encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(norms["model.decoder.layers.1.encoder_attn.k_proj"],
                               encoder.reshape(-1, HIDDEN).float().norm(dim=0), rtol=1e-5, atol=1e-5)


def test_hf_dir_of_an_encoder_decoder_loads_with_its_head(tmp_path):
    build("t5").save_pretrained(tmp_path / "t5")
    model, _tokenizer = sw.load_model(tmp_path / "t5")
    assert type(model).__name__ == "T5ForConditionalGeneration"  # not the bare T5Model, which drops lm_head
