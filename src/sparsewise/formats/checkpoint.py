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

Writes are atomic: everything goes into a temporary sibling directory that is renamed into
place, so a crash leaves either the old checkpoint or the new one, never a partial one.
Loading never unpickles anything (safetensors + JSON only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
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


def _module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{name: spec} of the modules sparsewise put in place of a model's own (ARMOR's factorized linears)."""
    return {name: module.checkpoint_spec() for name, module in model.named_modules()
            if callable(getattr(module, "checkpoint_spec", None))}


def _rebuild_modules(model: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    """Put empty replacement modules where the saved model had them, so its tensors fit."""
    builders = {}
    if any(spec.get("type") == "armor" for spec in specs.values()):
        from ..correction.armor import ARMORLinear

        builders["armor"] = ARMORLinear.from_checkpoint_spec
    for name, spec in specs.items():
        build = builders.get(spec.get("type"))
        if build is None:
            raise CheckpointError(f"module {name!r} has unknown type {spec.get('type')!r}: upgrade sparsewise.")
        parent_name, _, attribute = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise CheckpointError(f"module {name!r} of the checkpoint has no parent in the model: wrong model class.") from None
        setattr(parent, attribute, build(spec))


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
    if nm is not None and weight.dim() == 2:
        n, m = nm
        oriented = weight.t() if transposed else weight  # N:M groups run along the input dim
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
        oriented = shape[::-1] if entry.get("transposed") else shape
        tensor = unpack_nm(item(f"{_SEP}nm_values"), item(f"{_SEP}nm_indices"), n, m, oriented, dtype)
        if entry.get("transposed"):
            tensor = tensor.t().contiguous()
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


@contextlib.contextmanager
def _atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``target``; on success swap it in, on failure delete it.

    With overwrite the old target is renamed aside, the new one renamed in, then the old one
    deleted: at every instant one complete checkpoint exists under ``target`` or aside.
    """
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
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


def _write_sparsewise(
    model: nn.Module, directory: Path, records: dict[str, LayerRecord], manifest_extra: dict[str, Any] | None
) -> None:
    from .. import __version__

    state = model.state_dict()
    recorded = _record_weights(model, records)
    unique, aliases = _split_aliases(state, preferred=set(recorded))
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
        "tensors": entries,
        "aliases": aliases,
        "records": {name: record.to_json() for name, record in records.items()},
        "modules": _module_specs(model),
        "extra": dict(manifest_extra or {}),
    }
    _write_json(directory / MANIFEST_NAME, manifest)


def _write_hf_dense(model: nn.Module, directory: Path, records: dict[str, LayerRecord]) -> None:
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
    if drop:
        delattr(config, "quantization_config")
    try:
        model.save_pretrained(str(directory))
    finally:
        if drop:
            config.quantization_config = quantization
    _write_json(
        directory / RECORDS_NAME,
        {
            "format": "sparsewise-records",
            "format_version": FORMAT_VERSION,
            "records": {name: record.to_json() for name, record in records.items()},
        },
    )


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    format: str = "sparsewise",
    overwrite: bool = False,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and ``tokenizer``) to the directory ``path``, atomically; returns the path.

    ``format="sparsewise"`` compresses pruned tensors (N:M storage for N:M records, bitmask for
    the others, dense when compression would not shrink them); ``"hf-dense"`` writes a plain
    transformers directory. An existing ``path`` is replaced only with ``overwrite=True``.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {format!r}: use one of {', '.join(FORMATS)}.")
    target = Path(path).expanduser().absolute()
    _check_target(target, overwrite)  # fail before any work
    records = get_records(model)
    with _atomic_directory(target, overwrite) as staging:
        if format == "sparsewise":
            _write_sparsewise(model, staging, records, manifest_extra)
        else:
            _write_hf_dense(model, staging, records)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return target


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
    for key in ("tensors", "aliases", "records", "weights_sha256"):
        if key not in manifest:
            raise CheckpointError(f"{manifest_path} lacks {key!r}: the checkpoint is corrupt; re-save the model.")
    return manifest


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
        raise CheckpointError(f"checkpoint does not fit {where}: {exc}") from exc
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
                pruned_stored += int(entry["stored_bytes"])
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
