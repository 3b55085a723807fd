"""Save and load pruned models.

Two on-disk formats:

``"sparsewise"`` (default): a directory with

* ``model.safetensors``: dense tensors under their state_dict name; pruned tensors compressed
  as ``<name>::values`` + ``<name>::bitmask`` or ``<name>::nm_values`` + ``<name>::nm_indices``
  (see :mod:`.compressed`); each tensor shared by several state_dict names is stored once;
* ``sparsewise.json``: the manifest (format version, versions, model class and HF config, one
  entry per tensor, aliases, the pruning records, the sha256 of the weights file, extras);
* the tokenizer files, when a tokenizer is given.

``"hf-dense"``: a plain ``save_pretrained`` directory that transformers loads as is, plus a
``sparsewise_records.json`` with the records for reports.

Both take ``dtype=`` ("fp16", "bf16", "fp32" or a torch dtype; None keeps each tensor's dtype):
the floating-point tensors are cast on the way out, never the model in memory. A nonzero weight
of a pruned (recorded) tensor that would round to zero in that dtype is stored as the smallest
subnormal of its sign instead, so the sparsity mask (read back from the zeros) is kept; a value
beyond the dtype's range is refused (use bf16 or fp32).

Writes are atomic: everything goes into a temporary sibling directory that is renamed into
place, so a crash leaves either the old checkpoint or the new one, never a partial one. Folders
and files get the modes the user's umask gives any new file (0777/0666 & ~umask), not the
0700/0600 of temporary files. Loading never unpickles anything (safetensors + JSON only), and
the manifest is validated field by field before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, PatternError
from ..patterns import Pattern
from ..records import LayerRecord, get_records, set_records
from .compressed import (
    bitmask_nbytes,
    nm_nbytes,
    pack_bitmask,
    pack_nm,
    unpack_bitmask,
    unpack_nm,
)

FORMAT_NAME = "sparsewise"
FORMAT_VERSION = 1
MANIFEST_NAME = "sparsewise.json"
WEIGHTS_NAME = "model.safetensors"
RECORDS_NAME = "sparsewise_records.json"
FORMATS = ("sparsewise", "hf-dense")
_SEP = "::"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
)
# Files whose presence marks a directory as a saved model that overwrite=True may replace.
_MODEL_MARKERS = (MANIFEST_NAME, WEIGHTS_NAME, RECORDS_NAME, "config.json", "model.safetensors.index.json")
# dtype= of save(): the names the CLI offers, and every spelling accepted.
SAVE_DTYPES = ("fp16", "bf16", "fp32")
_SAVE_DTYPE_NAMES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
_SHORT_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_STORAGES = ("dense", "bitmask", "nm")


# ----------------------------------------------------------------------------------------------
# tensor planning: which tensors are stored how


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight [in, out]."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return type(module).__name__ == "Conv1D"
    return isinstance(module, Conv1D)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"manifest names an unknown dtype {name!r}: the checkpoint is corrupt; re-save it.")
    return dtype


def resolve_save_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype ``save(dtype=...)`` casts to: None keeps each tensor's own dtype.

    Accepts "fp16"/"bf16"/"fp32" (also "float16", "bfloat16", "float32", "half", "fp64", ...,
    with or without a "torch." prefix) or a floating-point torch dtype.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str):
        resolved = _SAVE_DTYPE_NAMES.get(dtype.strip().lower().removeprefix("torch."))
    else:
        resolved = None
    if resolved not in _SHORT_DTYPE_NAMES:
        raise ConfigError(
            f"cannot save in dtype {dtype!r}: use one of {', '.join(SAVE_DTYPES)} (or a torch floating dtype such "
            "as torch.float16), or None to keep the model's dtype."
        )
    return resolved


def _short_dtype_name(dtype: torch.dtype | None) -> str:
    if dtype is None:
        return "no-float"
    return _SHORT_DTYPE_NAMES.get(dtype, _dtype_name(dtype))


def _main_dtype(tensors: Any) -> torch.dtype | None:
    """The floating dtype holding most elements of ``tensors`` (None when none is floating)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else None


def _smallest_subnormal(dtype: torch.dtype) -> torch.Tensor:
    """The smallest positive value of ``dtype`` (bit pattern 0...01), as a 0-d tensor."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    return torch.ones((), dtype=int_dtype).view(dtype)


def _cast_tensor(
    name: str, tensor: torch.Tensor, dtype: torch.dtype | None, *, keep_nonzeros: bool, check_range: bool
) -> torch.Tensor:
    """``tensor`` in ``dtype`` for saving (a new tensor; the model's own is never touched).

    ``keep_nonzeros`` (pruned tensors, whose mask is read back from the zeros): a nonzero that
    would round to zero becomes the smallest subnormal of its sign, so the mask stays the same.
    ``check_range`` (parameters): finite values that would become infinite are refused.
    """
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    source = tensor.detach()
    cast = source.to(dtype)
    if check_range:
        overflow = torch.isinf(cast) & torch.isfinite(source)
        if bool(overflow.any()):
            largest = float(source[overflow].abs().max())
            raise ConfigError(
                f"cannot save {name!r} as {_dtype_name(dtype)}: {int(overflow.sum())} of its values exceed the "
                f"dtype's range (largest |value| {largest:.4g} > {torch.finfo(dtype).max:.4g}); save with "
                "dtype='bf16' or 'fp32'."
            )
    if keep_nonzeros:
        flushed = (cast == 0) & (source != 0)
        count = int(flushed.sum())
        if count:
            tiny = _smallest_subnormal(dtype).to(cast.device)
            cast = torch.where(flushed, torch.where(source > 0, tiny, -tiny), cast)
            warnings.warn(
                f"{name}: {count} nonzero weight(s) are below the smallest {_dtype_name(dtype)} value; stored as "
                f"+/-{float(tiny):.3g} so the sparsity mask is kept.",
                stacklevel=5,
            )
    return cast


def _view_key(tensor: torch.Tensor) -> tuple:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def _split_aliases(
    state: dict[str, torch.Tensor], preferred: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Unique tensors and ``{alias: canonical}`` for state_dict names that are the same view.

    The canonical name is the first in state_dict order, unless another alias is ``preferred``
    (a recorded layer weight), so compression follows the record. Names that overlap in memory
    without being the same view are stored as independent copies (safetensors refuses sharing).
    """
    groups: dict[tuple, list[str]] = {}
    storages: dict[tuple, list[tuple]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            groups[("empty", name)] = [name]
            continue
        key = _view_key(tensor)
        groups.setdefault(key, []).append(name)
        storages.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(key)
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, names in groups.items():
        canonical = next((name for name in names if name in preferred), names[0])
        tensor = state[canonical]
        if key[0] != "empty" and len(set(storages[(key[0], key[1])])) > 1:
            tensor = tensor.clone()  # partial overlap with another view: store an own copy
        unique[canonical] = tensor
        aliases.update({name: canonical for name in names if name != canonical})
    return unique, aliases


def _record_weights(model: nn.Module, records: dict[str, LayerRecord]) -> dict[str, tuple[LayerRecord, bool]]:
    """``{state_dict weight name: (record, stored transposed i.e. [in, out])}``."""
    out = {}
    for name, record in records.items():
        expert = _expert_slice(model, name)
        if expert is not None:  # one record per expert of a fused 3-D parameter: the tensor follows them
            parameter_name, module, _ = expert
            previous = out.get(parameter_name)
            if previous is not None and previous[0].pattern != record.pattern:
                record = replace(record, pattern="unstructured")  # mixed patterns: the bitmask fits them all
            # [experts, in, out] storage (is_transposed) has no N:M rows along its last dim: bitmask then
            if getattr(module, "is_transposed", False):
                record = replace(record, pattern="unstructured")
            out[parameter_name] = (record, False)
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            warnings.warn(
                f"record {name!r} names no module of the model; it is saved but its tensor is stored dense.",
                stacklevel=3,
            )
            continue
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            out[f"{name}.weight"] = (record, _is_conv1d(module))
    return out


def _expert_slice(model: nn.Module, name: str) -> tuple[str, nn.Module, int] | None:
    """(parameter name, owning module, expert index) of a record named ``<3-D parameter>.<expert>``."""
    head, _, tail = name.rpartition(".")
    if not tail.isdigit():
        return None
    module_name, _, attribute = head.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    param = module._parameters.get(attribute)
    if param is None or param.ndim != 3 or int(tail) >= param.shape[0]:
        return None
    return head, module, int(tail)


def _module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{name: spec} of the modules sparsewise put in place of a model's own (:mod:`sparsewise.modules`)."""
    return {name: module.checkpoint_spec() for name, module in model.named_modules()
            if callable(getattr(module, "checkpoint_spec", None))}


def _rebuild_modules(model: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    """Put empty replacement modules where the saved model had them, so its tensors fit."""
    from ..modules import module_builder, module_types

    for name, spec in specs.items():
        build = module_builder(str(spec.get("type")))
        if build is None:
            raise CheckpointError(f"module {name!r} has unknown type {spec.get('type')!r} (this sparsewise knows "
                                  f"{', '.join(module_types())}): upgrade sparsewise.")
        parent_name, _, attribute = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise CheckpointError(f"module {name!r} of the checkpoint has no parent in the model: wrong model class.") from None
        try:
            module = build(spec)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"corrupt or foreign checkpoint: module {name!r} has an unusable spec {spec!r} ({exc!r}); "
                "re-save the model."
            ) from None
        setattr(parent, attribute, module)


def _nm_of(record: LayerRecord) -> tuple[int, int] | None:
    try:
        pattern = Pattern.parse(record.pattern)
    except PatternError:
        return None
    return (pattern.n, pattern.m) if pattern.kind == "nm" else None


def _encode(
    name: str, tensor: torch.Tensor, record: LayerRecord | None, transposed: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest entry and safetensors items of one tensor, in the smallest fitting storage."""
    dense_bytes = tensor.numel() * tensor.element_size()
    entry: dict[str, Any] = {
        "storage": "dense",
        "shape": list(tensor.shape),
        "dtype": _dtype_name(tensor.dtype),
        "n": None,
        "m": None,
        "transposed": False,
        "stored_bytes": dense_bytes,
    }
    dense_items = {name: tensor.detach().contiguous().cpu()}
    if record is None or tensor.numel() == 0 or tensor.dtype == torch.bool:
        return entry, dense_items
    weight = tensor.detach()
    nm = _nm_of(record)
    if nm is not None and weight.dim() in (2, 3):
        n, m = nm
        # N:M groups run along the input dim; fused experts [experts, out, in] are rows of rows
        oriented = weight.t() if transposed else weight.reshape(-1, weight.shape[-1])
        if oriented.shape[1] % m == 0 and nm_nbytes(weight.numel(), n, m, weight.element_size()) < dense_bytes:
            try:
                values, indices = pack_nm(oriented, n, m)
            except PatternError:
                warnings.warn(
                    f"{name}: record says {n}:{m} but some groups hold more than {n} nonzeros; "
                    "stored with the bitmask format instead.",
                    stacklevel=4,
                )
            else:
                entry.update(storage="nm", n=n, m=m, transposed=transposed)
                entry["stored_bytes"] = values.numel() * values.element_size() + indices.numel()
                return entry, {f"{name}{_SEP}nm_values": values.cpu(), f"{name}{_SEP}nm_indices": indices.cpu()}
    nonzeros = int(torch.count_nonzero(weight))
    if bitmask_nbytes(weight.numel(), nonzeros, weight.element_size()) >= dense_bytes:
        return entry, dense_items  # too few zeros for the mask bits to pay off
    values, bitmask, _ = pack_bitmask(weight)
    entry["storage"] = "bitmask"
    entry["stored_bytes"] = values.numel() * values.element_size() + bitmask.numel()
    return entry, {f"{name}{_SEP}values": values.cpu(), f"{name}{_SEP}bitmask": bitmask.cpu()}


def _decode(name: str, entry: dict[str, Any], stored: dict[str, torch.Tensor]) -> torch.Tensor:
    def item(suffix: str) -> torch.Tensor:
        key = f"{name}{suffix}"
        if key not in stored:
            raise CheckpointError(f"tensor {key!r} listed in the manifest is missing from {WEIGHTS_NAME}; re-save it.")
        return stored[key]

    shape = [int(size) for size in entry["shape"]]
    dtype = _dtype_from_name(entry["dtype"])
    storage = entry.get("storage")
    if storage == "dense":
        tensor = item("")
    elif storage == "bitmask":
        tensor = unpack_bitmask(item(f"{_SEP}values"), item(f"{_SEP}bitmask"), shape, dtype)
    elif storage == "nm":
        n, m = int(entry["n"]), int(entry["m"])
        oriented = shape[::-1] if entry.get("transposed") else [math.prod(shape[:-1]), shape[-1]]
        tensor = unpack_nm(item(f"{_SEP}nm_values"), item(f"{_SEP}nm_indices"), n, m, oriented, dtype)
        tensor = tensor.t().contiguous() if entry.get("transposed") else tensor.reshape(shape)
    else:
        raise CheckpointError(f"tensor {name!r} has unknown storage {storage!r}: the checkpoint is corrupt; re-save it.")
    if list(tensor.shape) != shape or tensor.dtype != dtype:
        raise CheckpointError(
            f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the manifest says {tuple(shape)} {dtype}: "
            "the checkpoint is corrupt; re-save it."
        )
    return tensor


# ----------------------------------------------------------------------------------------------
# atomic directory writes


def _jsonable(value: Any) -> Any:
    """Fallback for json.dumps: scalars and tensors to numbers, anything else to its string."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        with contextlib.suppress(Exception):
            return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=_jsonable, allow_nan=True) + "\n", encoding="utf-8")


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            _fsync_path(Path(dirpath) / filename)
        _fsync_path(Path(dirpath))


def _check_target(target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise CheckpointError(
            f"{target} already exists: pass overwrite=True (CLI: --overwrite) to replace it, or choose another path."
        )
    if not target.is_dir() or target.is_symlink():
        raise CheckpointError(f"refusing to replace {target}: it is not a checkpoint directory; choose another path.")
    if any(target.iterdir()) and not any((target / marker).exists() for marker in _MODEL_MARKERS):
        raise CheckpointError(
            f"refusing to replace {target}: it is a non-empty directory that does not look like a saved model "
            f"(no {MANIFEST_NAME} or config.json); choose another path or remove it yourself."
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _make_staging(target: Path) -> Path:
    """A new empty sibling of ``target``, created 0777 & ~umask like any tool's new folder.

    (``tempfile.mkdtemp`` would make it 0700, and the rename would keep that.)
    """
    for _ in range(100):
        staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
        try:
            os.mkdir(staging, 0o777)  # the kernel applies the umask
        except FileExistsError:
            continue
        return staging
    raise CheckpointError(f"could not create a temporary folder beside {target}: too many leftovers; clean them up.")


def _apply_umask_modes(root: Path) -> None:
    """Give every folder/file under ``root`` the mode the umask gives new ones (0777/0666 & ~umask).

    Writers that go through temporary files (safetensors does) leave 0600 files behind. The
    umask is read off ``root`` itself (made with mode 0777), so no process-wide state is touched.
    """
    if os.name != "posix":
        return
    dir_mode = stat.S_IMODE(root.stat().st_mode) & 0o777
    file_mode = dir_mode & 0o666

    def chmod(path: str, mode: int) -> None:
        if os.path.islink(path):
            return  # never follow a link out of the checkpoint
        current = os.stat(path).st_mode
        wanted = (stat.S_IMODE(current) & ~0o777) | mode  # keep setgid etc. of the folder
        if stat.S_IMODE(current) != wanted:
            os.chmod(path, wanted)

    for dirpath, dirnames, filenames in os.walk(root):
        for dirname in dirnames:
            chmod(os.path.join(dirpath, dirname), dir_mode)
        for filename in filenames:
            chmod(os.path.join(dirpath, filename), file_mode)


@contextlib.contextmanager
def _atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``target``; on success swap it in, on failure delete it.

    With overwrite the old target is renamed aside, the new one renamed in, then the old one
    deleted: at every instant one complete checkpoint exists under ``target`` or aside.
    """
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_staging(target)
    try:
        yield staging
        _apply_umask_modes(staging)
        _fsync_tree(staging)
        _check_target(target, overwrite)  # it may have appeared while we were writing
        if os.path.lexists(target):
            aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, aside)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(aside, target)
                raise
            _fsync_path(target.parent)
            try:
                _remove(aside)
            except OSError as exc:
                warnings.warn(
                    f"saved {target}, but could not delete the previous version at {aside}: {exc}", stacklevel=3
                )
        else:
            os.replace(staging, target)
            _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# save


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _hf_config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    data = dict(config.to_dict())
    # Weights are stored dequantized; a quantization config would make transformers re-quantize.
    data.pop("quantization_config", None)
    return data


def _generation_config_dict(model: nn.Module) -> dict[str, Any] | None:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None or not hasattr(generation_config, "to_dict"):
        return None
    with contextlib.suppress(Exception):
        return dict(generation_config.to_dict())
    return None


def _cast_unique(
    model: nn.Module, unique: dict[str, torch.Tensor], recorded: dict[str, Any], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The unique tensors of the state_dict in the saved dtype (the same dict when dtype is None)."""
    if dtype is None:
        return unique
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    cast = {}
    for name, tensor in unique.items():  # a plain loop: _cast_tensor's warning stacklevel counts frames
        cast[name] = _cast_tensor(name, tensor, dtype, keep_nonzeros=name in recorded, check_range=name in parameters)
    return cast


def _write_sparsewise(
    model: nn.Module,
    directory: Path,
    records: dict[str, LayerRecord],
    manifest_extra: dict[str, Any] | None,
    dtype: torch.dtype | None,
) -> torch.dtype | None:
    """Write the weights and manifest; returns the main floating dtype written."""
    from .. import __version__

    state = model.state_dict()
    source_dtype = _main_dtype(state.values())
    recorded = _record_weights(model, records)
    unique, aliases = _split_aliases(state, preferred=set(recorded))
    del state
    unique = _cast_unique(model, unique, recorded, dtype)
    saved_dtype = _main_dtype(unique.values())
    entries: dict[str, dict[str, Any]] = {}
    items: dict[str, torch.Tensor] = {}
    for name, tensor in unique.items():
        if _SEP in name:
            raise CheckpointError(f"state_dict name {name!r} contains {_SEP!r}, which the sparsewise format reserves.")
        record, transposed = recorded.get(name, (None, False))
        entries[name], stored = _encode(name, tensor, record, transposed)
        items.update(stored)

    weights_path = directory / WEIGHTS_NAME
    # Looked up at call time (not imported by name) so the writer can be swapped in tests.
    safetensors.torch.save_file(items, str(weights_path), metadata={"format": "pt", "sparsewise_format": "1"})
    del items
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover
        transformers_version = None
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sparsewise_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers_version,
        "model_class": type(model).__name__,
        "model_module": type(model).__module__,
        "config": _hf_config_dict(model),
        "generation_config": _generation_config_dict(model),
        "weights_file": WEIGHTS_NAME,
        "weights_bytes": weights_path.stat().st_size,
        "weights_sha256": _sha256(weights_path),
        # Main floating dtype written (None: no floating tensor) and the one the model had in memory.
        "dtype": _dtype_name(saved_dtype) if saved_dtype is not None else None,
        "source_dtype": _dtype_name(source_dtype) if source_dtype is not None else None,
        "tensors": entries,
        "aliases": aliases,
        "records": {name: record.to_json() for name, record in records.items()},
        "modules": _module_specs(model),
        "extra": dict(manifest_extra or {}),
    }
    _write_json(directory / MANIFEST_NAME, manifest)
    return saved_dtype


def _write_hf_dense(
    model: nn.Module, directory: Path, records: dict[str, LayerRecord], dtype: torch.dtype | None
) -> torch.dtype | None:
    """Write a plain transformers directory plus the records; returns the main floating dtype written."""
    if _module_specs(model):
        raise ConfigError(
            "the model holds ARMOR's factorized linears, which transformers cannot load as its own layers: "
            "save with format='sparsewise'."
        )
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(
            f"format='hf-dense' needs a transformers model with save_pretrained; {type(model).__name__} has none: "
            "use format='sparsewise'."
        )
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    # A model read from GGUF holds dequantized weights: saving the gguf quantization_config would
    # make from_pretrained look for quantized tensors.
    drop = quantization is not None and "gguf" in str(method).lower()
    state = None
    if dtype is not None:
        # Cast copies (aliases kept shared, so transformers still sees the tied weights as one).
        full = model.state_dict()
        recorded = _record_weights(model, records)
        unique, aliases = _split_aliases(full, preferred=set(recorded))
        unique = _cast_unique(model, unique, recorded, dtype)
        state = {name: unique[aliases.get(name, name)] for name in full}
        del full, unique
    saved_dtype = _main_dtype((state or model.state_dict()).values())
    if drop:
        delattr(config, "quantization_config")
    try:
        model.save_pretrained(str(directory), state_dict=state)
    finally:
        if drop:
            config.quantization_config = quantization
    del state
    if dtype is not None:
        _set_config_dtype(directory / "config.json", dtype)
    _write_json(
        directory / RECORDS_NAME,
        {
            "format": "sparsewise-records",
            "format_version": FORMAT_VERSION,
            "dtype": _dtype_name(saved_dtype) if saved_dtype is not None else None,
            "records": {name: record.to_json() for name, record in records.items()},
        },
    )
    return saved_dtype


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """Make config.json name the dtype the weights were written in (save_pretrained writes the model's)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
    for key in keys:
        config[key] = _dtype_name(dtype)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class SaveInfo:
    """What :func:`save` wrote: ``path``, ``format``, ``dtype`` (main floating dtype written, torch
    name such as "float16"; None when no tensor is floating), ``bytes`` (all files) and
    ``weights_bytes`` (the safetensors files)."""

    path: Path
    format: str
    dtype: str | None
    bytes: int
    weights_bytes: int

    def summary(self) -> str:
        """One line for a CLI: ``saved sparsewise fp16 to /out (12.3 MB)``."""
        dtype = _short_dtype_name(_dtype_from_name(self.dtype)) if self.dtype else "no-float"
        return f"saved {self.format} {dtype} to {self.path} ({self.bytes / 1e6:.1f} MB)"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


class SavedCheckpoint(type(Path())):  # type: ignore[misc]
    """The directory :func:`save` wrote: a ``pathlib.Path`` (so ``load(save(...))``, ``str(...)`` and
    ``path / name`` work as before) that also carries ``.info``, a :class:`SaveInfo`.

    Paths derived from it (``saved / "x"``, ``saved.parent``) carry no info.
    """

    info: SaveInfo | None = None

    def with_segments(self, *pathsegments: Any) -> Path:  # Python >= 3.12: derived paths are plain
        return Path(*pathsegments)

    def summary(self) -> str:
        return self.info.summary() if self.info is not None else f"saved to {self}"


def _tree_bytes(root: Path) -> tuple[int, int]:
    """(bytes of all files, bytes of the *.safetensors files) under ``root``."""
    total = weights = 0
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if os.path.islink(path):
                continue
            size = os.path.getsize(path)
            total += size
            if filename.endswith(".safetensors"):
                weights += size
    return total, weights


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    format: str = "sparsewise",
    overwrite: bool = False,
    manifest_extra: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> SavedCheckpoint:
    """Save ``model`` (and ``tokenizer``) to the directory ``path``, atomically.

    ``format="sparsewise"`` compresses pruned tensors (N:M storage for N:M records, bitmask for
    the others, dense when compression would not shrink them); ``"hf-dense"`` writes a plain
    transformers directory. An existing ``path`` is replaced only with ``overwrite=True``.

    ``dtype``: None keeps every tensor's dtype (as before); "fp16", "bf16", "fp32" (or a torch
    floating dtype) casts the floating-point tensors as they are written; the model in memory is
    not changed. Nonzero pruned weights too small for the dtype are kept as its smallest value
    (the mask survives; a warning says how many); values beyond its range raise ConfigError.
    The manifest records the dtype and :func:`load` gives back exactly what was written.

    Returns the absolute directory as a :class:`SavedCheckpoint` (a ``Path``) whose ``.info``
    (:class:`SaveInfo`) holds the format, dtype, path and bytes written; ``.summary()`` is the
    one-line "saved <format> <dtype> to <path> (<MB>)".
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {format!r}: use one of {', '.join(FORMATS)}.")
    cast = resolve_save_dtype(dtype)
    target = Path(path).expanduser().absolute()
    _check_target(target, overwrite)  # fail before any work
    records = get_records(model)
    with _atomic_directory(target, overwrite) as staging:
        if format == "sparsewise":
            saved_dtype = _write_sparsewise(model, staging, records, manifest_extra, cast)
        else:
            saved_dtype = _write_hf_dense(model, staging, records, cast)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    total, weights = _tree_bytes(target)
    result = SavedCheckpoint(target)
    result.info = SaveInfo(
        path=target,
        format=format,
        dtype=_dtype_name(saved_dtype) if saved_dtype is not None else None,
        bytes=total,
        weights_bytes=weights,
    )
    return result


# ----------------------------------------------------------------------------------------------
# load


def _read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}: check the path.")
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(
            f"not a sparsewise checkpoint: no {MANIFEST_NAME} in {directory}; "
            "for a plain HF directory use sw.load_model."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable or corrupt ({exc}); re-save the model.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_path} is not a sparsewise manifest; re-save the model with sw.save.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} uses sparsewise checkpoint format version {version!r}, this sparsewise reads up to "
            f"{FORMAT_VERSION}: upgrade sparsewise (or re-save with this version)."
        )
    _validate_manifest(manifest, manifest_path)
    return manifest


_MISSING = object()


def _json_kind(value: Any) -> str:
    """How a JSON value reads in an error message."""
    if value is _MISSING:
        return "nothing (the field is missing)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(size) and size >= 0 for size in value)


def _validate_manifest(manifest: dict[str, Any], manifest_path: Path) -> None:
    """Check every field load() reads, so a corrupt or foreign manifest fails with one clear error."""

    def fail(field: str, expected: str, value: Any) -> None:
        raise CheckpointError(
            f"corrupt or foreign checkpoint: manifest field {field!r} must be {expected}, got {_json_kind(value)} "
            f"(in {manifest_path}); re-save the model with sw.save."
        )

    def field(container: dict[str, Any], key: str, label: str, check: Any, expected: str, *, required: bool) -> Any:
        value = container.get(key, _MISSING)
        if value is _MISSING and not required:
            return None
        if not check(value):
            fail(label, expected, value)
        return value

    def is_object(value: Any) -> bool:
        return isinstance(value, dict)

    def optional(check: Any) -> Any:
        return lambda value: value is None or check(value)

    tensors = field(manifest, "tensors", "tensors", is_object, "an object mapping tensor names to entries",
                    required=True)
    for name, entry in tensors.items():
        label = f"tensors[{name!r}]"
        if not isinstance(entry, dict):
            fail(label, "an object (storage, shape, dtype, ...)", entry)
        field(entry, "storage", f"{label}.storage", lambda value: value in _STORAGES,
              f"one of {', '.join(map(repr, _STORAGES))}", required=True)
        field(entry, "shape", f"{label}.shape", _is_shape, "a list of non-negative integers", required=True)
        dtype = field(entry, "dtype", f"{label}.dtype", lambda value: isinstance(value, str),
                      "a dtype name such as 'float32'", required=True)
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            fail(f"{label}.dtype", "a torch dtype name such as 'float32'", dtype)
        field(entry, "transposed", f"{label}.transposed", lambda value: isinstance(value, bool), "true or false",
              required=False)
        field(entry, "stored_bytes", f"{label}.stored_bytes", lambda value: _is_int(value) and value >= 0,
              "a non-negative integer", required=False)
        if entry["storage"] == "nm":
            m = field(entry, "m", f"{label}.m", lambda value: _is_int(value) and value >= 2, "an integer >= 2",
                      required=True)
            field(entry, "n", f"{label}.n", lambda value, m=m: _is_int(value) and 0 < value < m,
                  f"an integer in 1..{m - 1}", required=True)
            # 3-D: fused experts [experts, out, in], packed as [experts * out, in] rows
            if len(entry["shape"]) not in (2, 3) or (len(entry["shape"]) == 3 and entry.get("transposed")):
                fail(f"{label}.shape", "a 2-D shape [rows, cols] (or 3-D [experts, out, in]) for N:M storage",
                     entry["shape"])

    aliases = field(manifest, "aliases", "aliases", is_object, "an object mapping alias names to tensor names",
                    required=True)
    for alias, canonical in aliases.items():
        if not isinstance(canonical, str):
            fail(f"aliases[{alias!r}]", "a tensor name (string)", canonical)

    records = field(manifest, "records", "records", is_object, "an object mapping layer names to records",
                    required=True)
    for name, record in records.items():
        label = f"records[{name!r}]"
        if not isinstance(record, dict):
            fail(label, "an object (name, pattern, sparsity, ...)", record)
        for key in ("name", "pattern", "method"):
            field(record, key, f"{label}.{key}", lambda value: isinstance(value, str), "a string", required=True)
        for key in ("sparsity", "achieved"):
            field(record, key, f"{label}.{key}", _is_number, "a number", required=True)
        field(record, "shape", f"{label}.shape", _is_shape, "a list of non-negative integers", required=True)
        field(record, "info", f"{label}.info", is_object, "an object", required=False)

    field(manifest, "weights_sha256", "weights_sha256",
          lambda value: isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value),
          "a sha256 hex digest (64 characters)", required=True)
    field(manifest, "weights_file", "weights_file",
          lambda value: isinstance(value, str) and value not in ("", ".", "..") and "/" not in value
          and "\\" not in value and ":" not in value,
          "a file name inside the checkpoint folder", required=False)
    field(manifest, "weights_bytes", "weights_bytes", optional(lambda value: _is_int(value) and value >= 0),
          "a non-negative integer", required=False)
    for key in ("config", "generation_config"):
        field(manifest, key, key, optional(is_object), "an object or null", required=False)
    field(manifest, "extra", "extra", optional(is_object), "an object", required=False)
    field(manifest, "model_class", "model_class", lambda value: isinstance(value, str), "a class name (string)",
          required=False)
    for key in ("dtype", "source_dtype"):
        field(manifest, key, key, optional(lambda value: isinstance(value, str)), "a dtype name or null",
              required=False)
    modules = field(manifest, "modules", "modules", is_object, "an object mapping module names to specs",
                    required=False)
    for name, spec in (modules or {}).items():
        if not isinstance(spec, dict):
            fail(f"modules[{name!r}]", "an object with a 'type'", spec)
        field(spec, "type", f"modules[{name!r}].type", lambda value: isinstance(value, str), "a string",
              required=True)


def _verify_weights(directory: Path, manifest: dict[str, Any]) -> Path:
    weights_path = directory / manifest.get("weights_file", WEIGHTS_NAME)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing: the checkpoint is incomplete; re-save the model.")
    expected_bytes = manifest.get("weights_bytes")
    actual_bytes = weights_path.stat().st_size
    if expected_bytes is not None and actual_bytes != expected_bytes:
        state = "truncated" if actual_bytes < expected_bytes else "corrupt"
        raise CheckpointError(
            f"{weights_path} is {state}: {actual_bytes} bytes, the manifest expects {expected_bytes}; re-save the model."
        )
    if _sha256(weights_path) != manifest["weights_sha256"]:
        raise CheckpointError(
            f"{weights_path} is corrupt or truncated: its sha256 does not match the manifest; re-save the model."
        )
    return weights_path


def _main_float_dtype(manifest: dict[str, Any]) -> torch.dtype | None:
    """The floating dtype holding most saved elements (the dtype the model was used in)."""
    counts: dict[torch.dtype, int] = {}
    for entry in manifest["tensors"].values():
        dtype = _dtype_from_name(entry["dtype"])
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + math.prod(entry["shape"])
    return max(counts, key=counts.get) if counts else None


def _build_model(manifest: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    """An uninitialised module of the saved class, from its HF config (weights come next).

    Built in ``dtype`` so that unsaved buffers (e.g. rotary tables) get the dtype
    ``from_pretrained(..., dtype=dtype)`` would give them.
    """
    class_name = manifest.get("model_class", "?")
    config_dict = manifest.get("config")
    if not config_dict:
        raise CheckpointError(
            f"this checkpoint holds a plain nn.Module ({manifest.get('model_module', '?')}.{class_name}) without an "
            f"HF config: build one yourself and pass it as load(path, model={class_name}(...))."
        )
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x keeps it in modeling_utils
        from transformers.modeling_utils import no_init_weights

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"transformers {transformers.__version__} does not know model_type {model_type!r}: upgrade "
            f"transformers, or build the model yourself and pass it as load(path, model=...)."
        )
    config = CONFIG_MAPPING[model_type].from_dict(dict(config_dict))
    if dtype is not None:
        config.dtype = dtype
    builders = []
    model_class = getattr(transformers, class_name, None)
    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        builders.append(model_class._from_config)
    builders += [transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    errors = []
    # Weights are overwritten right after: skip the (slow) random initialisation.
    with no_init_weights():
        for build in builders:
            try:
                return build(config)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                errors.append(f"{getattr(build, '__qualname__', build)}: {exc}")
    raise CheckpointError(
        f"could not rebuild {class_name} from its config ({'; '.join(errors)}); pass load(path, model=...)."
    )


def _tie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias name refer to the very tensor object of its canonical name."""
    for alias, canonical in aliases.items():
        owner_name, _, attribute = alias.rpartition(".")
        source_name, _, source_attribute = canonical.rpartition(".")
        owner = model.get_submodule(owner_name)
        source = model.get_submodule(source_name)
        if source_attribute in source._parameters:
            owner._parameters[attribute] = source._parameters[source_attribute]
        elif source_attribute in source._buffers:
            owner._buffers[attribute] = source._buffers[source_attribute]


def _restore_records(model: nn.Module, saved: dict[str, dict[str, Any]]) -> None:
    records = {}
    for name, data in saved.items():
        record = LayerRecord.from_json(data)
        expert = _expert_slice(model, name)
        if expert is not None:
            parameter_name, module, index = expert
            matrix = model.get_parameter(parameter_name).detach()[index]
            record.mask = ((matrix.t() if getattr(module, "is_transposed", False) else matrix) != 0).contiguous()
            records[name] = record
            continue
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(name)
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                oriented = weight.detach().t() if _is_conv1d(module) else weight.detach()
                record.mask = (oriented != 0).contiguous()
        records[name] = record
    set_records(model, records)


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model: nn.Module | None = None,
    accelerate: bool | dict = False,
) -> nn.Module:
    """Load a sparsewise checkpoint: verified, decompressed, ties and records restored, eval mode.

    The module is rebuilt from the saved HF config, or the weights go into ``model`` when given
    (needed for plain nn.Modules). ``dtype`` casts the floating-point tensors after loading.
    ``accelerate=True`` swaps the pruned layers for the sparse runtime's where they measure
    faster (CUDA kernels on ``device="cuda"``, the CSR kernel on the CPU); a dict passes options
    to :func:`sparsewise.runtime.accelerate` (e.g. ``{"rows": (1, 8)}``).
    """
    directory = Path(path).expanduser()
    manifest = _read_manifest(directory)
    weights_path = _verify_weights(directory, manifest)
    target_device = torch.device(device)
    try:
        stored = safetensors.torch.load_file(str(weights_path), device=str(target_device))
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path} cannot be read ({exc}): the file is corrupt; re-save the model.") from exc

    state = {name: _decode(name, entry, stored) for name, entry in manifest["tensors"].items()}
    del stored
    for alias, canonical in manifest["aliases"].items():
        if canonical not in state:
            raise CheckpointError(f"alias {alias!r} points to unknown tensor {canonical!r}: re-save the model.")
        state[alias] = state[canonical]

    if model is None:
        model = _build_model(manifest, dtype or _main_float_dtype(manifest))
        where = f"the rebuilt {type(model).__name__}"
    else:
        where = f"the model passed as model= ({type(model).__name__})"
    _rebuild_modules(model, manifest.get("modules", {}))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {where}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; pass the model class it was saved from."
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        hint = ("; its shapes changed (a structured prune such as expert_drop removes experts): call load(path) "
                "without model= to rebuild it from the saved config" if "size mismatch" in str(exc) else "")
        raise CheckpointError(f"checkpoint does not fit {where}{hint}: {exc}") from exc
    _tie(model, manifest["aliases"])

    generation_config = manifest.get("generation_config")
    if generation_config and hasattr(model, "generation_config"):
        with contextlib.suppress(Exception):
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_dict(generation_config)
    model.eval()
    model.to(device=target_device)
    # Masks come from the saved values, before a dtype cast could flush tiny weights to zero.
    _restore_records(model, manifest["records"])
    if dtype is not None:
        model.to(dtype=dtype)
    if accelerate:
        from ..runtime import accelerate as accelerate_model  # runtime only when asked: loading stays light

        accelerate_model(model, **(accelerate if isinstance(accelerate, dict) else {}))
    return model


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved beside a checkpoint, or None when there are no tokenizer files."""
    directory = Path(path).expanduser()
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def checkpoint_size(path: str | os.PathLike) -> dict[str, Any]:
    """Bytes on disk of the weights vs. the dense equivalent (from the manifest), for reports.

    Keys: format, weights_bytes, dense_bytes, ratio, and for sparsewise checkpoints also
    pruned_dense_bytes / pruned_stored_bytes (the compressed tensors only) and storage counts.
    """
    directory = Path(path).expanduser()
    if (directory / MANIFEST_NAME).is_file():
        manifest = _read_manifest(directory)
        weights_bytes = (directory / manifest.get("weights_file", WEIGHTS_NAME)).stat().st_size
        dense_bytes = pruned_dense = pruned_stored = 0
        counts = {"dense": 0, "bitmask": 0, "nm": 0}
        for entry in manifest["tensors"].values():
            size = math.prod(entry["shape"]) * _dtype_from_name(entry["dtype"]).itemsize
            dense_bytes += size
            counts[entry["storage"]] = counts.get(entry["storage"], 0) + 1
            if entry["storage"] != "dense":
                pruned_dense += size
                pruned_stored += int(entry.get("stored_bytes", size))
        return {
            "format": FORMAT_NAME,
            "weights_bytes": weights_bytes,
            "dense_bytes": dense_bytes,
            "ratio": weights_bytes / dense_bytes if dense_bytes else 1.0,
            "pruned_dense_bytes": pruned_dense,
            "pruned_stored_bytes": pruned_stored,
            "pruned_ratio": pruned_stored / pruned_dense if pruned_dense else 1.0,
            "storage_counts": counts,
        }
    weight_files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not weight_files:
        raise CheckpointError(f"no checkpoint at {directory}: neither {MANIFEST_NAME} nor *.safetensors files found.")
    weights_bytes = sum(file.stat().st_size for file in weight_files)
    return {"format": "hf-dense", "weights_bytes": weights_bytes, "dense_bytes": weights_bytes, "ratio": 1.0}
