"""The one-shot pipeline on every model family: exact ratios, valid patterns, sequential propagation."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FAMILIES, VOCAB, build_tiny

import sparsewise as sw
from sparsewise.calibration.stats import STAT_NORMS
from sparsewise.methods import get_method, register
from sparsewise.methods.base import _METHODS
from sparsewise.models import ModelAdapter
from sparsewise.patterns import check_mask


def calibration_for(family: str, n: int = 4, seqlen: int = 32, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return [{"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)} for _ in range(n // 2)]
    return [{"input_ids": torch.randint(0, VOCAB, (2, seqlen), generator=generator)} for _ in range(n // 2)]


def forward(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize(("method", "pattern", "sparsity"), [
    ("wanda", "unstructured", 0.5), ("sparsegpt", "2:4", None), ("magnitude", "4:8", 0.5), ("random", "unstructured", 0.3),
])
def test_every_family_every_method(family, method, pattern, sparsity):
    model = build_tiny(family)
    calib = calibration_for(family)
    result = sw.prune(model, method=method, sparsity=sparsity, pattern=pattern, calibration=calib, progress=False)
    adapter = ModelAdapter(model)
    layers = adapter.prunable_layers()
    assert set(result.records) == set(layers)
    expected = 0.5 if sparsity is None else sparsity
    for name, layer in layers.items():
        weight = layer.get_weight()
        zeros = (weight == 0).float().mean().item()
        assert zeros == pytest.approx(expected, abs=0.02), name
        assert result.records[name].achieved == pytest.approx(zeros)
        assert check_mask(weight != 0, pattern)
    output = forward(model, calib[0])
    assert torch.isfinite(output).all()
    assert sw.get_records(model) == result.records


def test_lm_head_and_embeddings_untouched(tiny_llama):
    head_before = tiny_llama.lm_head.weight.detach().clone()
    sw.prune(tiny_llama, method="wanda", sparsity=0.5, calibration=calibration_for("llama"), progress=False)
    assert torch.equal(tiny_llama.lm_head.weight, head_before)
    assert (tiny_llama.lm_head.weight != 0).all()


class _Recorder:
    """A test method that keeps the channel norms it was given, and prunes like Wanda."""

    name = "test-recorder"
    needs = frozenset({STAT_NORMS})
    seen: dict = {}

    def prune_layer(self, task):
        _Recorder.seen[task.name] = task.stats.channel_norms.cpu()
        return get_method("wanda").prune_layer(task)


@pytest.fixture
def recorder():
    register(_Recorder)
    _Recorder.seen = {}
    yield _Recorder
    _METHODS.unregister(_Recorder.name)


def _input_norms(model, calib, names):
    sums = {name: 0 for name in names}

    def hook_for(name):
        def hook(_module, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums[name] + (x * x).sum(0)
        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in names]
    for batch in calib:
        forward(model, batch)
    for handle in handles:
        handle.remove()
    return {name: value.sqrt() for name, value in sums.items()}


@pytest.mark.parametrize("sequential", ["layer", "block"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_stats_come_from_pruned_earlier_blocks(family, sequential, recorder):
    """Block k is calibrated on the outputs of the *pruned* blocks before it (sequential scheme)."""
    model = build_tiny(family)
    calib = calibration_for(family)
    sw.prune(model, method=recorder.name, sparsity=0.5, calibration=calib, sequential=sequential,
             batch_size=1, progress=False)
    adapter = ModelAdapter(model)
    # The first layer of every block reads the block input (after its norm): after pruning, a
    # fresh forward of the final model must reproduce exactly the norms the method was given.
    first_layers = [next(iter(adapter.block_layers(i))) for i in range(len(adapter.blocks))]
    norms = _input_norms(model, calib, first_layers)
    for name in first_layers:
        torch.testing.assert_close(recorder.seen[name], norms[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("sequential", "matches_pruned"), [("layer", True), ("block", False)])
def test_layer_mode_calibrates_later_layers_on_pruned_earlier_layers(sequential, matches_pruned, recorder):
    """o_proj reads attention over pruned q/k/v only in the layer-sequential mode."""
    model = build_tiny("llama")
    calib = calibration_for("llama")
    sw.prune(model, method=recorder.name, sparsity=0.5, calibration=calib, sequential=sequential,
             batch_size=1, progress=False)
    name = "model.layers.0.self_attn.o_proj"
    final = _input_norms(model, calib, [name])[name]
    assert torch.allclose(recorder.seen[name], final, rtol=1e-4, atol=1e-5) == matches_pruned


def test_failure_leaves_model_untouched(tiny_llama):
    class Exploding:
        name = "test-exploding"
        needs = frozenset({STAT_NORMS})
        calls = 0

        def prune_layer(self, task):
            Exploding.calls += 1
            if Exploding.calls > 9:  # fail inside the second block
                raise RuntimeError("boom")
            return get_method("wanda").prune_layer(task)

    register(Exploding)
    try:
        before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
        with pytest.raises(RuntimeError, match="boom"):
            sw.prune(tiny_llama, method="test-exploding", sparsity=0.5, calibration=calibration_for("llama"),
                     progress=False)
        for key, value in tiny_llama.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert sw.get_records(tiny_llama) == {}
    finally:
        _METHODS.unregister("test-exploding")


def test_same_seed_same_masks():
    masks = []
    for seed in (3, 3, 4):
        model = build_tiny("llama")
        result = sw.prune(model, method="random", sparsity=0.6, seed=seed, progress=False)
        masks.append(torch.cat([rec.mask.flatten() for rec in result.records.values()]))
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_global_magnitude_ratio_exact_overall():
    model = build_tiny("llama")
    result = sw.prune(model, method="magnitude", sparsity=0.7, pattern="unstructured:global", progress=False)
    assert result.achieved_sparsity == pytest.approx(0.7, abs=1e-4)
    per_layer = [rec.achieved for rec in result.records.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # global ranking gives layers different ratios


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "wanda", "sparsity": 1.0}, "in \\[0, 1\\)"),
    ({"method": "wanda", "sparsity": 0.5, "pattern": "4:2"}, "0 < N < M"),
    ({"method": "wanda", "sparsity": 0.6, "pattern": "2:4"}, "fixes sparsity"),
    ({"method": "nope", "sparsity": 0.5}, "unknown pruning method"),
    ({"method": "wanda", "sparsity": 0.5, "include": ["no-such-layer"]}, "matches no"),
])
def test_bad_settings_raise_clear_errors(tiny_llama, kwargs, message):
    with pytest.raises(sw.ConfigError, match=message):
        sw.prune(tiny_llama, calibration=calibration_for("llama"), progress=False, **kwargs)


def test_data_aware_method_without_calibration(tiny_llama):
    with pytest.raises(sw.ConfigError, match="needs calibration data"):
        sw.prune(tiny_llama, method="sparsegpt", sparsity=0.5, progress=False)


def test_nm_not_dividing_names_layer():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 8)

        def forward(self, x):
            return self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.proj = nn.Linear(8, 6)

        def forward(self, x):
            for block in self.blocks:
                x = self.proj(block(x))
            return x

    with pytest.raises(sw.PatternError, match=r"blocks\.0\.fc.*divisible by M=4"):
        sw.prune(Net(), method="magnitude", pattern="2:4", progress=False)


def test_sparsegpt_reconstructs_best_on_output_error():
    """On the same calibration data, output error vs dense at 2:4: sparsegpt below wanda and magnitude."""
    dense = build_tiny("llama", seed=1)
    calib = calibration_for("llama", n=8, seqlen=64, seed=1)
    reference = [forward(dense, batch) for batch in calib]
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = build_tiny("llama", seed=1)
        sw.prune(model, method=method, pattern="2:4", sparsity=None, calibration=calib, progress=False)
        errors[method] = sum(((forward(model, b) - r) ** 2).mean().item() for b, r in zip(calib, reference, strict=True))
    assert errors["sparsegpt"] < min(errors["wanda"], errors["magnitude"]), errors


@pytest.mark.parametrize("sequential", ["layer", "block"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, sequential):
    class Flaky:
        name = "test-flaky"
        needs = frozenset({STAT_NORMS})
        fail_at: str | None = "model.layers.1.mlp.up_proj"
        pruned: list = []

        def prune_layer(self, task):
            if task.name == Flaky.fail_at:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C in block 1
            Flaky.pruned.append(task.name)
            return get_method("wanda").prune_layer(task)

    register(Flaky)
    try:
        calib = calibration_for("llama")
        reference = build_tiny("llama")
        Flaky.fail_at = None
        sw.prune(reference, method="test-flaky", sparsity=0.5, calibration=calib, sequential=sequential, progress=False)

        model = build_tiny("llama")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        Flaky.fail_at, Flaky.pruned = "model.layers.1.mlp.up_proj", []
        with pytest.raises(KeyboardInterrupt):
            sw.prune(model, method="test-flaky", sparsity=0.5, calibration=calib, sequential=sequential,
                     resume_dir=tmp_path / "run", progress=False)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # rolled back
        assert (tmp_path / "run" / "progress.json").exists()

        Flaky.fail_at, Flaky.pruned = None, []
        result = sw.prune(model, method="test-flaky", sparsity=0.5, calibration=calib, sequential=sequential,
                          resume_dir=tmp_path / "run", progress=False)
        assert all(name.startswith("model.layers.1.") for name in Flaky.pruned)  # block 0 was not redone
        assert len(result.records) == 14
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
        assert not (tmp_path / "run").exists()

        # other settings must not silently reuse a foreign resume state
        Flaky.fail_at = "model.layers.1.mlp.up_proj"
        with pytest.raises(KeyboardInterrupt):
            sw.prune(build_tiny("llama"), method="test-flaky", sparsity=0.5, calibration=calib,
                     sequential=sequential, resume_dir=tmp_path / "run2", progress=False)
        with pytest.raises(sw.CheckpointError, match="other settings"):
            sw.prune(build_tiny("llama"), method="test-flaky", sparsity=0.6, calibration=calib,
                     sequential=sequential, resume_dir=tmp_path / "run2", progress=False)
    finally:
        _METHODS.unregister("test-flaky")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_layer_mode_every_layer_saw_its_final_input(family, recorder):
    """In layer mode each layer is calibrated on exactly what it reads in the final pruned model.

    Guards the stats sharing between layers that read one tensor (q/k/v): a freed input's memory
    is reused for later activations of the same shape, which must not alias their statistics.
    """
    model = build_tiny(family)
    calib = calibration_for(family)
    sw.prune(model, method=recorder.name, sparsity=0.5, calibration=calib, sequential="layer", progress=False)
    names = list(ModelAdapter(model).prunable_layers())
    final = _input_norms(model, calib, names)
    for name in names:
        torch.testing.assert_close(recorder.seen[name], final[name], rtol=1e-4, atol=1e-5, msg=name)


def test_onloaded_blocks_keep_their_originals_without_a_copy(tiny_llama):
    """Weights onloaded from elsewhere are backed up by reference: module.to() leaves them behind untouched."""
    from sparsewise.oneshot import _LayerPruner
    from sparsewise.patterns import Pattern

    adapter = ModelAdapter(tiny_llama)
    layers = adapter.block_layers(0)
    run = _LayerPruner(tiny_llama, get_method("wanda"), Pattern.parse("unstructured"), 0.5, torch.device("cuda"),
                       torch.Generator(), {}, None, frozenset())
    originals = {name: layer.get_weight().clone() for name, layer in layers.items()}
    run.keep_originals(layers)
    for name, layer in layers.items():
        assert run.backup[name].data_ptr() == layer.get_weight().data_ptr()  # a reference, not a copy
        layer.module.weight.data = layer.module.weight.data.clone()  # what moving the module does
        layer.module.weight.data.zero_()  # pruning writes in place on the "device"
    run.restore(layers)
    for name, layer in layers.items():
        assert torch.equal(layer.get_weight(), originals[name])
    same_device = _LayerPruner(tiny_llama, get_method("wanda"), Pattern.parse("unstructured"), 0.5, torch.device("cpu"),
                               torch.Generator(), {}, None, frozenset())
    same_device.keep_originals(layers)
    assert same_device.backup == {}  # pruned in place where it lives: apply() copies instead
