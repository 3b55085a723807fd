"""sparsewise.formats, issue 17: manifest validation, umask modes, save(dtype=...) and save()'s info."""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import build_tiny
from torch import nn

from sparsewise.errors import CheckpointError, ConfigError
from sparsewise.formats import (
    SAVE_DTYPES,
    SavedCheckpoint,
    SaveInfo,
    checkpoint_size,
    load,
    resolve_save_dtype,
    save,
)
from sparsewise.formats.checkpoint import MANIFEST_NAME, RECORDS_NAME, WEIGHTS_NAME
from sparsewise.patterns import nm_mask, unstructured_mask
from sparsewise.records import LayerRecord, get_records, set_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FP16_TINY = 2.0**-24  # smallest float16 subnormal
BF16_TINY = 2.0**-133  # smallest bfloat16 subnormal


class MLP(nn.Module):
    def __init__(self, width: int = 64, depth: int = 2) -> None:
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


def sparsify(model: nn.Module, pattern: str = "unstructured") -> dict[str, LayerRecord]:
    """Zero 50% of every linear weight except lm_head (by magnitude per row, or 2:4), attach records."""
    records = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lm_head" in name:
            continue
        weight = module.weight.data
        if pattern == "unstructured":
            keep = unstructured_mask(weight.abs(), 0.5, "row")
        else:
            keep = nm_mask(weight.abs(), 2, 4)
        weight[~keep] = 0.0
        records[name] = LayerRecord(name, pattern, 0.5, 0.5, "magnitude", tuple(weight.shape))
    set_records(model, records)
    return records


def expected_cast(tensor: torch.Tensor, dtype: torch.dtype, recorded: bool) -> torch.Tensor:
    """The documented rule, written independently: plain cast, and for recorded (pruned) tensors
    a nonzero that rounds to zero becomes the smallest subnormal of its sign."""
    cast = tensor.to(dtype)
    if recorded:
        tiny = {torch.float16: FP16_TINY, torch.bfloat16: BF16_TINY}[dtype]
        flushed = (cast == 0) & (tensor != 0)
        cast[flushed] = torch.where(tensor[flushed] > 0, tiny, -tiny).to(dtype)
    return cast


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def edit_manifest(directory: Path, edit) -> None:
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# 1. a corrupt or foreign manifest is a CheckpointError, never an AttributeError


def test_manifest_tensors_list_is_a_clear_checkpoint_error(tmp_path):
    model = make_mlp()
    sparsify(model)
    target = save(model, tmp_path / "ckpt")
    edit_manifest(target, lambda manifest: manifest.update(tensors=list(manifest["tensors"])))
    message = r"corrupt or foreign checkpoint: manifest field 'tensors' must be an object .*got a list"
    with pytest.raises(CheckpointError, match=message):
        load(target, model=make_mlp(1))
    with pytest.raises(CheckpointError, match=message):
        checkpoint_size(target)


def _set_first(key: str, field: str, value):
    def edit(manifest):
        first = next(iter(manifest[key]))
        manifest[key][first][field] = value

    return edit


def _drop_first(key: str, field: str):
    def edit(manifest):
        first = next(iter(manifest[key]))
        del manifest[key][first][field]

    return edit


CORRUPTIONS = {
    "tensors missing": (lambda manifest: manifest.pop("tensors"), "'tensors'"),
    "tensors a string": (lambda manifest: manifest.update(tensors="x"), "'tensors'"),
    "aliases a list": (lambda manifest: manifest.update(aliases=[]), "'aliases'"),
    "alias to a number": (lambda manifest: manifest.update(aliases={"x.weight": 3}), r"aliases\['x.weight'\]"),
    "records a list": (lambda manifest: manifest.update(records=[]), "'records'"),
    "record a string": (lambda manifest: manifest["records"].update({"layers.0": "x"}), r"records\['layers.0'\]"),
    "record sparsity a string": (_set_first("records", "sparsity", "half"), r"\.sparsity"),
    "record without shape": (_drop_first("records", "shape"), r"\.shape"),
    "tensor entry a list": (lambda manifest: manifest["tensors"].update({"norm.weight": [64]}), "norm.weight"),
    "tensor shape a string": (_set_first("tensors", "shape", "64x64"), r"\.shape"),
    "tensor shape negative": (_set_first("tensors", "shape", [-1, 64]), r"\.shape"),
    "tensor dtype unknown": (_set_first("tensors", "dtype", "float7"), r"\.dtype"),
    "tensor dtype a number": (_set_first("tensors", "dtype", 32), r"\.dtype"),
    "tensor storage unknown": (_set_first("tensors", "storage", "zip"), r"\.storage"),
    "tensor without storage": (_drop_first("tensors", "storage"), r"\.storage"),
    "tensor stored_bytes a string": (_set_first("tensors", "stored_bytes", "10"), r"\.stored_bytes"),
    "nm with n >= m": (lambda manifest: manifest["tensors"]["layers.0.weight"].update(storage="nm", n=4, m=4),
                       r"\.n"),
    "sha a number": (lambda manifest: manifest.update(weights_sha256=12), "'weights_sha256'"),
    "sha missing": (lambda manifest: manifest.pop("weights_sha256"), "'weights_sha256'"),
    "weights file outside": (lambda manifest: manifest.update(weights_file="../model.safetensors"),
                             "'weights_file'"),
    "weights bytes a string": (lambda manifest: manifest.update(weights_bytes="big"), "'weights_bytes'"),
    "config a list": (lambda manifest: manifest.update(config=[]), "'config'"),
    "modules a list": (lambda manifest: manifest.update(modules=[]), "'modules'"),
    "module without type": (lambda manifest: manifest.update(modules={"layers.0": {}}), r"modules\['layers.0'\]"),
    "extra a list": (lambda manifest: manifest.update(extra=[1]), "'extra'"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_manifest_fields_are_checkpoint_errors(tmp_path, case):
    edit, field = CORRUPTIONS[case]
    model = make_mlp()
    sparsify(model)
    target = save(model, tmp_path / "ckpt")
    edit_manifest(target, edit)
    with pytest.raises(CheckpointError, match=rf"corrupt or foreign checkpoint: manifest field .*{field}"):
        load(target, model=make_mlp(1))


def test_unusable_module_spec_is_a_checkpoint_error(tmp_path):
    model = make_mlp()
    target = save(model, tmp_path / "ckpt")
    edit_manifest(target, lambda manifest: manifest.update(modules={"layers.0": {"type": "armor"}}))
    with pytest.raises(CheckpointError, match="corrupt or foreign checkpoint: module 'layers.0'"):
        load(target, model=make_mlp(1))


def test_load_never_unpickles(tmp_path, monkeypatch):
    model = make_mlp()
    sparsify(model)
    target = save(model, tmp_path / "ckpt", dtype="fp16")

    def refuse(*args, **kwargs):
        raise AssertionError("load() unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = load(target, model=make_mlp(1))
    assert loaded.layers[0].weight.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# 2. folders and files follow the umask


def modes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]}


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("fmt", ["sparsewise", "hf-dense"])
def test_saved_modes_follow_umask(tmp_path, fmt, umask):
    model = build_tiny("llama")
    sparsify(model)
    previous = os.umask(umask)
    try:
        target = save(model, tmp_path / "out" / "ckpt", format=fmt)
        first = modes(target)
        save(model, target, format=fmt, overwrite=True)  # replacing keeps the same rule
        second = modes(target)
    finally:
        os.umask(previous)
    for found in (first, second):
        for name, mode in found.items():
            expected = 0o777 & ~umask if (target / name).is_dir() else 0o666 & ~umask
            assert mode == expected, (name, oct(mode), oct(expected))
    assert WEIGHTS_NAME in first
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask  # parents made on the way
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["ckpt"]  # no staging leftovers


# ---------------------------------------------------------------------------------------------
# 3. save(dtype=...)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sparsewise_dtype_round_trip(tmp_path, pattern, dtype):
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = build_tiny("llama")
    records = sparsify(model, pattern)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fp32 = save(model, tmp_path / "fp32")
    target = save(model, tmp_path / dtype, dtype=dtype)

    # the model in memory is untouched
    assert all(torch.equal(bits(before[name]), bits(tensor)) for name, tensor in model.state_dict().items())
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32

    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["dtype"] == str(torch_dtype).removeprefix("torch.") and manifest["source_dtype"] == "float32"
    assert {entry["dtype"] for entry in manifest["tensors"].values()} == {manifest["dtype"]}
    storage = "nm" if pattern == "2:4" else "bitmask"
    assert {manifest["tensors"][f"{name}.weight"]["storage"] for name in records} == {storage}
    assert target.info.weights_bytes < 0.55 * fp32.info.weights_bytes

    loaded = load(target)
    recorded = {f"{name}.weight" for name in records}
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch_dtype, name
        assert torch.equal(bits(tensor), bits(expected_cast(before[name], torch_dtype, name in recorded))), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for name, record in get_records(loaded).items():
        assert torch.equal(record.mask, before[f"{name}.weight"] != 0), name
        assert record.pattern == pattern
    # the model runs in the saved dtype
    with torch.no_grad():
        assert loaded(torch.randint(0, 256, (1, 8)))[0].dtype == torch_dtype


def test_underflowing_pruned_weights_keep_the_mask(tmp_path):
    model = make_mlp()
    sparsify(model)
    weight = model.layers[0].weight.data
    kept = weight.nonzero()[:4]
    for (row, col), value in zip(kept.tolist(), [1e-9, -1e-9, 3e-45, -3e-45], strict=True):
        weight[row, col] = value  # nonzero, but zero once rounded to fp16 (the last two in bf16 too)
    model.norm.weight.data[:2] = 1e-9  # not a pruned tensor: a plain cast (0), as model.half() would
    mask = weight != 0

    with pytest.warns(UserWarning, match=r"layers\.0\.weight: 4 nonzero weight\(s\) are below the smallest float16"):
        target = save(model, tmp_path / "fp16", dtype="fp16")
    loaded = load(target, model=make_mlp(1))
    assert torch.equal(get_records(loaded)["layers.0"].mask, mask)
    assert torch.equal(loaded.layers[0].weight != 0, mask)
    values = [float(loaded.layers[0].weight.detach()[row, col]) for row, col in kept.tolist()]
    assert values == [FP16_TINY, -FP16_TINY, FP16_TINY, -FP16_TINY]
    assert float(loaded.norm.weight.detach()[0]) == 0.0

    with pytest.warns(UserWarning, match=r"2 nonzero weight\(s\) are below the smallest bfloat16"):
        target = save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load(target, model=make_mlp(1))
    assert torch.equal(get_records(loaded)["layers.0"].mask, mask)
    values = [float(loaded.layers[0].weight.detach()[row, col]) for row, col in kept.tolist()]
    assert values[2:] == [BF16_TINY, -BF16_TINY] and values[0] == pytest.approx(1e-9, rel=1e-2)


def test_hf_dense_dtype(tmp_path):
    import transformers

    model = build_tiny("llama")
    sparsify(model)
    small = model.model.layers[0].mlp.up_proj.weight.data
    row, col = small.nonzero()[0].tolist()
    small[row, col] = 1e-9
    with pytest.warns(UserWarning, match=r"1 nonzero weight\(s\) are below the smallest float16"):
        target = save(model, tmp_path / "hf", format="hf-dense", dtype="fp16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert json.loads((target / "config.json").read_text())["dtype"] == "float16"
    assert json.loads((target / RECORDS_NAME).read_text())["dtype"] == "float16"
    stored = safetensors.torch.load_file(str(target / "model.safetensors"))
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    assert "lm_head.weight" not in stored  # still tied
    assert float(stored["model.layers.0.mlp.up_proj.weight"][row, col]) == FP16_TINY

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(target))
    assert reloaded.dtype == torch.float16
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, stored.get(name, stored["model.embed_tokens.weight"])), name
    assert target.info.format == "hf-dense" and target.info.dtype == "float16"
    assert re.fullmatch(rf"saved hf-dense fp16 to {re.escape(str(target))} \(\d+\.\d MB\)", target.summary())


def test_dtype_none_keeps_each_tensors_dtype(tmp_path):
    model = make_mlp().to(torch.bfloat16)
    sparsify(model)
    target = save(model, tmp_path / "keep")
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["dtype"] == manifest["source_dtype"] == "bfloat16"
    assert target.info.dtype == "bfloat16"
    loaded = load(target, model=make_mlp(1))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(model.state_dict().values(),
                                                               loaded.state_dict().values(), strict=True))
    # and an explicit fp32 upcasts on the way out only
    up = save(model, tmp_path / "up", dtype="fp32")
    assert json.loads((up / MANIFEST_NAME).read_text())["dtype"] == "float32"
    assert load(up, model=make_mlp(1)).layers[0].weight.dtype == torch.float32
    assert model.layers[0].weight.dtype == torch.bfloat16


def test_values_beyond_fp16_range_are_refused(tmp_path):
    model = make_mlp()
    sparsify(model)
    model.layers[1].weight.data[0, 0] = 1e6
    with pytest.raises(ConfigError, match=r"cannot save 'layers\.1\.weight' as float16.*dtype='bf16'"):
        save(model, tmp_path / "ckpt", dtype="fp16")
    assert list(tmp_path.iterdir()) == []  # atomic: nothing written
    target = save(model, tmp_path / "ckpt", dtype="bf16")
    assert float(load(target, model=make_mlp(1)).layers[1].weight.detach()[0, 0]) == pytest.approx(1e6, rel=1e-2)


@pytest.mark.parametrize("bad", ["int8", "fp8", "float7", torch.int8, torch.float8_e4m3fn, 16])
def test_bad_dtype_is_refused_before_any_work(tmp_path, bad):
    with pytest.raises(ConfigError, match="fp16, bf16, fp32"):
        save(make_mlp(), tmp_path / "ckpt", dtype=bad)
    assert not (tmp_path / "ckpt").exists()


def test_dtype_spellings():
    assert SAVE_DTYPES == ("fp16", "bf16", "fp32")
    assert resolve_save_dtype(None) is None
    for spelling in ("fp16", "FP16", "float16", "half", "torch.float16", torch.float16):
        assert resolve_save_dtype(spelling) is torch.float16
    for spelling in ("bf16", "bfloat16", torch.bfloat16):
        assert resolve_save_dtype(spelling) is torch.bfloat16
    assert resolve_save_dtype("fp32") is torch.float32


# ---------------------------------------------------------------------------------------------
# save()'s return value


@pytest.mark.parametrize("fmt", ["sparsewise", "hf-dense"])
def test_save_returns_path_with_info(tmp_path, fmt):
    model = build_tiny("llama") if fmt == "hf-dense" else make_mlp()
    sparsify(model)
    result = save(model, tmp_path / "ckpt", format=fmt, dtype="bf16")
    # backward compatible: a Path to the absolute directory
    assert isinstance(result, Path) and isinstance(result, SavedCheckpoint)
    assert result == (tmp_path / "ckpt").absolute() and str(result) == str((tmp_path / "ckpt").absolute())
    assert (result / ("config.json" if fmt == "hf-dense" else MANIFEST_NAME)).is_file()
    info = result.info
    assert isinstance(info, SaveInfo)
    files = [path for path in result.rglob("*") if path.is_file()]
    assert info.path == result and info.format == fmt and info.dtype == "bfloat16"
    assert info.bytes == sum(path.stat().st_size for path in files)
    assert info.weights_bytes == sum(path.stat().st_size for path in files if path.suffix == ".safetensors")
    assert info.to_dict() == {"path": str(result), "format": fmt, "dtype": "bfloat16", "bytes": info.bytes,
                              "weights_bytes": info.weights_bytes}
    assert re.fullmatch(rf"saved {fmt} bf16 to {re.escape(str(result))} \(\d+\.\d MB\)", result.summary())
    if fmt == "sparsewise":
        assert checkpoint_size(result)["weights_bytes"] == info.weights_bytes
        assert load(result, model=make_mlp(1)).layers[0].weight.dtype == torch.bfloat16
