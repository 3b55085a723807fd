"""Typed configuration of a pruning run; the CLI flags and YAML recipes map onto it 1:1."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, PatternError

DEFAULT_SPARSITY = 0.5
SAVE_DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class PruneConfig:
    """One pruning run, end to end (load -> calibrate -> prune -> evaluate -> save).

    ``calib`` is a path (.txt/.raw/.jsonl/.parquet), a dataset name, or "self" (text sampled
    from the model with ``seed``; then ``self_n``/``self_seqlen`` apply, sized for a CPU).

    ``sparsity`` None means "not given": an N:M pattern then prunes at its implied ratio 1 - N/M,
    every other pattern at ``DEFAULT_SPARSITY`` (see :meth:`effective_sparsity`). ``dtype`` is the
    float type of the saved checkpoint (fp32, fp16, bf16; None keeps the model's own).
    """

    model: str = "smollm2-135m"
    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    calib: str = "self"
    calib_n: int = 128
    calib_seqlen: int = 512
    self_n: int = 32
    self_seqlen: int = 256
    seed: int = 0
    eval: str | None = None
    eval_seqlen: int = 512
    max_windows: int | None = 32
    fidelity_n: int = 8
    fidelity_seqlen: int = 256
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    device: str = "auto"
    sequential: str = "layer"
    batch_size: int = 8
    resume_dir: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    allocation: str = "uniform"
    allocation_options: dict[str, Any] = field(default_factory=dict)
    refine: str | None = None
    refine_options: dict[str, Any] = field(default_factory=dict)
    reconstruct: bool = False
    reconstruct_options: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    save_format: str = "sparsewise"
    overwrite: bool = False
    dtype: str | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [item.name for item in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        names = set(cls.field_names())
        normalized = {str(key).replace("-", "_"): value for key, value in data.items()}
        unknown = sorted(set(normalized) - names)
        if unknown:
            raise ConfigError(f"unknown recipe field(s) {unknown}; known fields: {sorted(names)}.")
        return cls(**normalized)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PruneConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of field: value, got {type(data).__name__}.")
        return cls.from_dict(data)

    def validate(self) -> PruneConfig:
        """Fail fast (before any model is loaded) on settings that cannot work."""
        from .methods import check_pattern, get_method
        from .patterns import Pattern

        method = get_method(self.method)
        if "," in str(self.pattern):  # mixed N:M choices, allocated per layer (checked fully by prune)
            for part in str(self.pattern).split(","):
                check_pattern(method, Pattern.parse(part))
        else:
            pattern = Pattern.parse(self.pattern)
            check_pattern(method, pattern)
            pattern.resolve_sparsity(self.effective_sparsity())
        if self.reconstruct_options and not self.reconstruct:
            raise ConfigError("reconstruct_options given but reconstruct is off: add --reconstruct (recipe: "
                              "reconstruct: true).")
        if self.sequential not in ("layer", "block"):
            raise ConfigError(f"sequential must be 'layer' or 'block', got {self.sequential!r}.")
        if self.save_format not in ("sparsewise", "hf-dense"):
            raise ConfigError(f"save_format must be 'sparsewise' or 'hf-dense', got {self.save_format!r}.")
        if self.dtype is not None and str(self.dtype).lower() not in SAVE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(SAVE_DTYPES)} (or unset), got {self.dtype!r}.")
        for name in ("calib_n", "calib_seqlen", "self_n", "self_seqlen", "eval_seqlen", "fidelity_n",
                     "fidelity_seqlen", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        return self

    def effective_sparsity(self) -> float | None:
        """The ratio to prune at: the one given; else None for a single N:M pattern (its implied
        1 - N/M), ``DEFAULT_SPARSITY`` for every other pattern (mixed N:M choices included)."""
        from .patterns import Pattern

        if self.sparsity is not None:
            return self.sparsity
        if "," not in str(self.pattern):
            try:
                if Pattern.parse(self.pattern).kind == "nm":
                    return None  # the pattern fixes the ratio
            except PatternError:
                pass  # validate() reports it
        return DEFAULT_SPARSITY

    def merged(self, overrides: dict[str, Any]) -> PruneConfig:
        """A copy with every non-None override applied (flags given on the command line win)."""
        return dataclasses.replace(self, **{key: value for key, value in overrides.items() if value is not None})
