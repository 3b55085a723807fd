"""sparsewise.formats: compressed tensor formats and atomic sparse checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from conftest import build_tiny
from torch import nn

from sparsewise.errors import CheckpointError, ConfigError, PatternError
from sparsewise.formats import (
    checkpoint_size,
    load,
    load_tokenizer,
    pack_bitmask,
    pack_bits,
    pack_nm,
    save,
    unpack_bitmask,
    unpack_bits,
    unpack_nm,
)
from sparsewise.formats.checkpoint import MANIFEST_NAME, RECORDS_NAME, WEIGHTS_NAME
from sparsewise.patterns import nm_mask, unstructured_mask
from sparsewise.records import LayerRecord, get_records, set_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so comparisons are bit-exact (NaN and signed zeros included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype, name
        assert first[name].shape == second[name].shape, name
        assert torch.equal(bits_of(first[name]), bits_of(second[name])), name


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def sparsify(model: nn.Module, pattern: str, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, LayerRecord]:
    """Zero 50% of every linear weight (per row by magnitude, or 2:4 along the input dim), attach records."""
    records = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or any(part in name for part in skip):
            continue
        weight = module.weight.data.t() if is_conv1d(module) else module.weight.data  # [out, in] view
        if pattern == "unstructured":
            keep = unstructured_mask(weight.abs(), 0.5, "row")
        else:
            n, m = (int(part) for part in pattern.split(":"))
            keep = nm_mask(weight.abs(), n, m)
        weight[~keep] = 0.0  # a plain +0.0, so bit-exact comparisons hold
        records[name] = LayerRecord(name, pattern, 0.5, 0.5, "magnitude", tuple(weight.shape))
    set_records(model, records)
    return records


class MLP(nn.Module):
    """A plain nn.Module where the prunable linears dominate the bytes."""

    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            inputs = torch.relu(layer(inputs))
        return self.norm(inputs)


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def word_tokenizer():
    """A small offline tokenizer (no hub access)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "sparse": 2, "world": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


# ---------------------------------------------------------------------------------------------
# pure tensor formats


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 13, 32])
def test_pack_bits_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(0, min(2**bits, 2**62), (1003,), generator=generator)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1003 * bits // 8)
    restored = unpack_bits(packed, bits, 1003)
    assert restored.dtype == (torch.uint8 if bits <= 8 else torch.int64)
    assert torch.equal(restored.long(), values)


def test_pack_bits_layout_and_range():
    # LSB first: 1 | 0<<2 | 3<<4 | 2<<6 = 177
    assert pack_bits(torch.tensor([1, 0, 3, 2]), 2).tolist() == [177]
    with pytest.raises(ConfigError):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(CheckpointError, match="truncated"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_round_trip(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 40, generator=generator).to(dtype)
    weight[weight.abs() < 0.6] = 0
    values, bitmask, shape = pack_bitmask(weight)
    assert values.dtype == dtype and values.numel() == int((weight != 0).sum())
    assert bitmask.dtype == torch.uint8 and bitmask.numel() == 16 * 40 // 8
    assert torch.equal(values, weight[weight != 0])  # row-major order
    restored = unpack_bitmask(values, bitmask, shape, dtype)
    assert torch.equal(bits_of(restored), bits_of(weight))


def test_bitmask_any_shape_and_negative_zero():
    weight = torch.tensor([[[1.5, -0.0], [0.0, -2.0]], [[0.0, 0.0], [3.0, 0.0]]])
    values, bitmask, shape = pack_bitmask(weight)
    assert values.tolist() == [1.5, -2.0, 3.0]
    restored = unpack_bitmask(values, bitmask, shape, weight.dtype)
    assert torch.equal(restored, weight)
    assert not torch.signbit(restored[0, 0, 1])  # -0.0 is zero, comes back as +0.0


def test_bitmask_bytes_half_sparse_fp32():
    weight = torch.randn(64, 64)
    weight[unstructured_mask(weight.abs(), 0.5, "row").logical_not()] = 0
    values, bitmask, _ = pack_bitmask(weight)
    per_element = (values.numel() * 4 + bitmask.numel()) / weight.numel()
    assert per_element == pytest.approx(2.125)


@pytest.mark.parametrize(
    ("n", "m", "bits"), [(2, 4, 2), (4, 8, 3), (1, 4, 2), (1, 2, 1), (3, 8, 3), (16, 32, 5), (2, 320, 9)]
)
def test_nm_round_trip(n, m, bits):
    generator = torch.Generator().manual_seed(n * 10 + m)
    cols = 64 if 64 % m == 0 else m * 2
    weight = torch.randn(12, cols, generator=generator)
    weight[~nm_mask(weight.abs(), n, m)] = 0
    weight[0, :m] = 0  # an empty group
    weight[1, 1:m] = 0  # a group with a single nonzero: padded with zeros
    weight[2, m - 1] = -0.0  # stays a zero
    values, indices = pack_nm(weight, n, m)
    assert values.shape == (12, cols // m * n) and values.dtype == weight.dtype
    assert indices.dtype == torch.uint8 and indices.numel() == -(-values.numel() * bits // 8)
    restored = unpack_nm(values, indices, n, m, weight.shape, weight.dtype)
    assert torch.equal(restored, weight)
    weight[2, m - 1] = 0.0
    assert torch.equal(bits_of(restored), bits_of(weight))


def test_nm_bytes_two_four_fp32():
    weight = torch.randn(32, 64)
    weight[~nm_mask(weight.abs(), 2, 4)] = 0
    values, indices = pack_nm(weight, 2, 4)
    assert (values.numel() * 4 + indices.numel()) / weight.numel() == pytest.approx(2.125)


def test_pack_nm_rejects_dense_groups():
    weight = torch.randn(4, 16)
    weight[~nm_mask(weight.abs(), 2, 4)] = 0
    weight[2, 5] = weight[2, 6] = weight[2, 7] = weight[2, 4] = 1.0
    with pytest.raises(PatternError, match="row 2, group 1"):
        pack_nm(weight, 2, 4)
    with pytest.raises(PatternError, match="divisible"):
        pack_nm(torch.zeros(2, 6), 2, 4)


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_round_trip_bit_exact(tmp_path, family, pattern):
    model = build_tiny(family)
    records = sparsify(model, pattern)
    target = save(model, tmp_path / "ckpt", manifest_extra={"method": "magnitude", "sparsity": 0.5})
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    storages = {manifest["tensors"][f"{name}.weight"]["storage"] for name in records}
    assert storages == {"nm" if pattern == "2:4" else "bitmask"}
    if family == "gpt2" and pattern == "2:4":
        assert manifest["tensors"]["transformer.h.0.attn.c_attn.weight"]["transposed"] is True
    assert manifest["model_class"] == type(model).__name__
    assert manifest["extra"]["method"] == "magnitude"
    assert "quantization_config" not in manifest["config"]

    loaded = load(target)
    assert type(loaded) is type(model) and not loaded.training
    assert_bit_equal(model.state_dict(), loaded.state_dict())
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], loaded(tokens)[0])
    restored = get_records(loaded)
    assert restored.keys() == records.keys()
    for name, record in restored.items():
        assert record.pattern == pattern and tuple(record.shape) == tuple(records[name].shape)
        module = loaded.get_submodule(name)
        weight = module.weight.t() if is_conv1d(module) else module.weight
        assert record.mask.shape == weight.shape and torch.equal(record.mask, weight != 0)


def test_tied_embeddings_survive(tmp_path):
    model = build_tiny("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sparsify(model, "unstructured")
    manifest_path = save(model, tmp_path / "ckpt") / MANIFEST_NAME
    aliases = json.loads(manifest_path.read_text())["aliases"]
    assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    stored = safetensors.torch.load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME))
    assert "lm_head.weight" not in stored
    loaded = load(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparse_checkpoint_is_smaller(tmp_path, pattern):
    dense = make_mlp()
    save(dense, tmp_path / "dense")
    sparse = make_mlp()
    sparsify(sparse, pattern)
    save(sparse, tmp_path / "sparse")
    dense_bytes = (tmp_path / "dense" / WEIGHTS_NAME).stat().st_size
    sparse_bytes = (tmp_path / "sparse" / WEIGHTS_NAME).stat().st_size
    assert 0.53 <= sparse_bytes / dense_bytes <= 0.6
    size = checkpoint_size(tmp_path / "sparse")
    assert size["weights_bytes"] == sparse_bytes
    assert size["dense_bytes"] == sum(t.numel() * 4 for t in sparse.state_dict().values())
    assert size["pruned_ratio"] == pytest.approx(2.125 / 4)
    assert size["storage_counts"]["nm" if pattern == "2:4" else "bitmask"] == 4


def test_barely_pruned_tensor_stays_dense(tmp_path):
    model = make_mlp()
    weight = model.layers[0].weight.data
    weight[:, :2] = 0  # 2/256 < 1/32: a bitmask would not pay off
    set_records(model, {"layers.0": LayerRecord("layers.0", "unstructured", 0.01, 2 / 256, "magnitude", (256, 256))})
    save(model, tmp_path / "ckpt")
    entry = json.loads((tmp_path / "ckpt" / MANIFEST_NAME).read_text())["tensors"]["layers.0.weight"]
    assert entry["storage"] == "dense"
    assert torch.equal(load(tmp_path / "ckpt", model=make_mlp(1)).layers[0].weight, weight)


def test_nm_record_with_dense_groups_falls_back_to_bitmask(tmp_path):
    model = make_mlp()
    sparsify(model, "2:4")
    model.layers[1].weight.data[0, :4] = 1.0  # breaks 2:4 in one group
    with pytest.warns(UserWarning, match="bitmask"):
        save(model, tmp_path / "ckpt")
    tensors = json.loads((tmp_path / "ckpt" / MANIFEST_NAME).read_text())["tensors"]
    assert tensors["layers.1.weight"]["storage"] == "bitmask" and tensors["layers.0.weight"]["storage"] == "nm"
    assert_bit_equal(model.state_dict(), load(tmp_path / "ckpt", model=make_mlp(1)).state_dict())


def test_load_into_user_module(tmp_path):
    model = make_mlp()
    sparsify(model, "unstructured")
    save(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="model="):
        load(tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", model=make_mlp(seed=7))
    assert_bit_equal(model.state_dict(), loaded.state_dict())
    inputs = torch.randn(3, 256)
    assert torch.equal(model(inputs), loaded(inputs))
    assert get_records(loaded).keys() == get_records(model).keys()
    with pytest.raises(CheckpointError, match="does not match"):
        load(tmp_path / "ckpt", model=MLP(depth=3))


def test_load_dtype(tmp_path):
    model = build_tiny("llama")
    sparsify(model, "2:4")
    loaded = load(save(model, tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    mask = get_records(loaded)["model.layers.0.mlp.up_proj"].mask
    assert torch.equal(mask, model.model.layers[0].mlp.up_proj.weight != 0)


def test_bf16_model_round_trip(tmp_path):
    model = build_tiny("opt").to(torch.bfloat16)
    sparsify(model, "unstructured")
    loaded = load(save(model, tmp_path / "ckpt"))
    assert loaded.model.decoder.layers[0].fc1.weight.dtype == torch.bfloat16
    assert_bit_equal(model.state_dict(), loaded.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip(tmp_path):
    model = build_tiny("gpt2").cuda()
    sparsify(model, "2:4")
    weight = model.transformer.h[0].mlp.c_fc.weight.detach()
    values, indices = pack_nm(weight.t(), 2, 4)
    assert values.is_cuda and torch.equal(unpack_nm(values, indices, 2, 4, weight.t().shape, weight.dtype), weight.t())
    loaded = load(save(model, tmp_path / "ckpt"), device="cuda")
    assert loaded.transformer.h[0].mlp.c_fc.weight.is_cuda
    assert_bit_equal(model.state_dict(), loaded.state_dict())
    assert get_records(loaded)["transformer.h.0.mlp.c_fc"].mask.is_cuda


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_weights_are_detected(tmp_path, damage):
    model = make_mlp()
    sparsify(model, "unstructured")
    weights = save(model, tmp_path / "ckpt") / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        middle = len(data) // 2
        data[middle : middle + 4] = bytes(byte ^ 0xFF for byte in data[middle : middle + 4])
        expected = "corrupt"
    else:
        data = data[: len(data) - 100]
        expected = "truncated"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=expected):
        load(tmp_path / "ckpt", model=make_mlp())


def test_missing_manifest_and_unknown_version(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no sparsewise.json.*sw.load_model"):
        load(tmp_path / "plain")
    model = make_mlp()
    manifest_path = save(model, tmp_path / "ckpt") / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="version 99.*upgrade"):
        load(tmp_path / "ckpt", model=make_mlp())


def test_overwrite(tmp_path):
    first, second = make_mlp(0), make_mlp(1)
    target = save(first, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save(second, target)
    assert_bit_equal(first.state_dict(), load(target, model=make_mlp()).state_dict())
    save(second, target, overwrite=True)
    assert_bit_equal(second.state_dict(), load(target, model=make_mlp()).state_dict())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt"]  # no temp or old dirs left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="does not look like a saved model"):
        save(second, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_save_leaves_nothing_partial(tmp_path, monkeypatch, existing):
    old = make_mlp(0)
    target = tmp_path / "ckpt"
    if existing:
        save(old, target)

    def failing_save_file(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        save(make_mlp(1), target, overwrite=True)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == (["ckpt"] if existing else [])
    if existing:
        assert_bit_equal(old.state_dict(), load(target, model=make_mlp(2)).state_dict())


def test_hf_dense_export_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny("llama")
    records = sparsify(model, "2:4")
    tokenizer = word_tokenizer()
    target = save(model, tmp_path / "hf", format="hf-dense", tokenizer=tokenizer)
    assert not (target / MANIFEST_NAME).exists()
    saved_records = json.loads((target / RECORDS_NAME).read_text())["records"]
    assert saved_records.keys() == records.keys()
    reloaded = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reloaded(tokens).logits)
    assert checkpoint_size(target)["format"] == "hf-dense"
    assert load_tokenizer(target)("hello sparse world")["input_ids"] == [1, 2, 3]
    with pytest.raises(CheckpointError, match="sw.load_model"):
        load(target)


def test_tokenizer_saved_with_sparsewise_format(tmp_path):
    model = make_mlp()
    save(model, tmp_path / "ckpt", tokenizer=word_tokenizer())
    assert load_tokenizer(tmp_path / "ckpt")("world hello")["input_ids"] == [3, 1]
    save(model, tmp_path / "bare")
    assert load_tokenizer(tmp_path / "bare") is None


def test_bad_format_name(tmp_path):
    with pytest.raises(ConfigError, match="hf-dense"):
        save(make_mlp(), tmp_path / "x", format="gguf")
    with pytest.raises(ConfigError, match="save_pretrained"):
        save(make_mlp(), tmp_path / "x", format="hf-dense")
    assert not (tmp_path / "x").exists()
