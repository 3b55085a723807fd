"""Typed configuration of a pruning run: the one list of its settings.

Each :class:`PruneConfig` field declares its command-line form with :func:`option` (flag, help,
argument group, parser, where its choices come from, whether only a job uses it); the CLI builds
``sparsewise prune`` from these declarations and YAML recipes use the field names, so adding a
setting is adding one field. :meth:`PruneConfig.parse` checks everything that can be checked
without a model, once, and returns the typed values (:class:`ValidConfig`) that ``sw.prune`` and
the job run on.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .correction import MaskRefiner
    from .correction.reconstruct import ReconstructConfig
    from .methods import PruningMethod
    from .patterns import Pattern

DEFAULT_SPARSITY = 0.5
SAVE_DTYPES = ("fp32", "fp16", "bf16")
# The argument groups of ``sparsewise prune --help``, in this order.
GROUPS = ("model", "method", "pattern", "calibration", "allocation", "correction", "evaluation", "output", "run")
_SPEC = "sparsewise.option"  # the metadata key of an OptionSpec


def registry_name(text: str) -> str:
    """A registry name as typed by a person: case and surrounding blanks do not matter."""
    return str(text).strip().lower()


def _names(module: str, attribute: str) -> Callable[[], list[str]]:
    """Choices read from ``sparsewise.<module>.<attribute>`` (a tuple or a function returning names)
    each time they are asked for, so a method registered after import is offered too."""
    def read() -> list[str]:
        value = getattr(importlib.import_module(f"sparsewise.{module}"), attribute)
        return list(value() if callable(value) else value)

    return read


@dataclass(frozen=True)
class OptionSpec:
    """How a :class:`PruneConfig` field appears on the command line, and what it must hold.

    ``help`` may name ``{choices}`` and ``{default}``; where it does not name the default, the
    CLI appends it (``shown_default`` words it when the value alone would mislead, e.g. None).
    ``flags`` default to ``--field-name``. ``parse`` reads a flag's text, and any string a recipe
    or caller gives (int, float, :func:`registry_name`). ``choices`` is called when the parser is built.
    ``positive`` fields take integers >= 1. ``job`` fields belong to the whole job (model, data,
    evaluation, output) and are no keyword of ``sw.prune``.
    """

    group: str
    help: str
    flags: tuple[str, ...] = ()
    parse: Callable[[str], Any] = str
    choices: Callable[[], Sequence[str]] | None = None
    metavar: str | None = None
    shown_default: str | None = None
    positive: bool = False
    job: bool = False

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"option group {self.group!r} is not one of {GROUPS}")


def option(default: Any, *, group: str, help: str, **spec: Any) -> Any:
    """A :class:`PruneConfig` field with its :class:`OptionSpec`.

    The form on the command line follows the default: a bool is a switch (``--overwrite``), a list
    takes words (``--include a b``), a dict takes repeated KEY=VALUE pairs (``--option k=v``), and
    anything else takes one value."""
    metadata = {_SPEC: OptionSpec(group=group, help=help, **spec)}
    if isinstance(default, (list, dict)):
        if default:
            raise ValueError("list and dict options start empty")
        return field(default_factory=type(default), metadata=metadata)  # a fresh one per config
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One :class:`PruneConfig` field with its default and command-line form (see :func:`option`)."""

    name: str
    default: Any
    spec: OptionSpec

    @property
    def flags(self) -> tuple[str, ...]:
        return self.spec.flags or (f"--{self.name.replace('_', '-')}",)

    @property
    def form(self) -> str:
        """"switch", "words", "pairs" (KEY=VALUE) or "value"."""
        if isinstance(self.default, bool):
            return "switch"
        if isinstance(self.default, list):
            return "words"
        return "pairs" if isinstance(self.default, dict) else "value"

    def choices(self) -> list[str] | None:
        return list(self.spec.choices()) if self.spec.choices is not None else None


@dataclass
class PruneConfig:
    """One pruning run, end to end (load -> calibrate -> prune -> evaluate -> save).

    ``calib`` is a path (.txt/.raw/.jsonl/.parquet), a dataset name, or "self" (text sampled
    from the model with ``seed``; then ``self_n``/``self_seqlen`` apply, sized for a CPU).

    ``sparsity`` None means "not given": an N:M pattern then prunes at its implied ratio 1 - N/M,
    every other pattern at ``DEFAULT_SPARSITY`` (see :meth:`effective_sparsity`). ``dtype`` is the
    float type of the saved checkpoint (fp32, fp16, bf16; None keeps the model's own).
    """

    # model
    model: str = option("smollm2-135m", group="model", job=True,
                        help="short name (smollm2-135m, minilm-l6), HF dir, .gguf file, hub id or sparsewise dir")
    include: list[str] = option([], group="model", help="regexes of module names to prune (default: {default})",
                                shown_default="every linear in the blocks")
    exclude: list[str] = option([], group="model", help="regexes of module names to skip")
    # method
    method: str = option("wanda", group="method", parse=registry_name, choices=_names("methods", "available_methods"),
                         metavar="NAME", help="{choices} (default {default}); armor needs --pattern 2:4 "
                                              "(--option iterations=N, block_size=32)")
    method_options: dict[str, Any] = option({}, group="method", flags=("--option",),
                                            help="method option, e.g. --option damp_ratio=0.1 --option block_size=64")
    # pattern
    sparsity: float | None = option(None, group="pattern", parse=float,
                                    shown_default=f"{DEFAULT_SPARSITY}; N:M patterns imply 1 - N/M",
                                    help="fraction of zeros per layer, e.g. 0.5")
    pattern: str = option("unstructured", group="pattern",
                          help="unstructured (per row) | unstructured:layer | unstructured:global | N:M | block:RxC "
                               "| mixed N:M choices such as 2:4,1:4 (with --sparsity and --allocation)")
    # calibration
    calib: str = option("self", group="calibration", job=True,
                        help="calibration: .txt/.raw/.jsonl/.parquet path, dataset name, or 'self'")
    calib_n: int = option(128, group="calibration", parse=int, positive=True, job=True,
                          help="calibration windows (default {default}; 'self' uses --self-n)")
    calib_seqlen: int = option(512, group="calibration", parse=int, positive=True, job=True,
                               help="tokens per calibration window")
    self_n: int = option(32, group="calibration", parse=int, positive=True, job=True,
                         help="self-generated calibration sequences")
    self_seqlen: int = option(256, group="calibration", parse=int, positive=True, job=True,
                              help="tokens per self-generated sequence")
    batch_size: int = option(8, group="calibration", parse=int, positive=True, help="calibration batch size")
    all_experts: bool = option(False, group="calibration",
                               help="mixture-of-experts: statistics of every expert from every calibration token "
                                    "(llm-compressor's calibrate-all-experts), not only the tokens routed to it")
    sequential: str = option("layer", group="calibration", parse=registry_name,
                             choices=_names("calibration.engine", "SEQUENTIAL_MODES"),
                             help="layer: one pass per block, layers pruned in order; block: classic two-pass "
                                  "scheme")
    # allocation
    allocation: str | dict[str, float] = option(
        "uniform", group="allocation", parse=registry_name, choices=_names("allocation", "available_allocators"),
        metavar="NAME", help="per-layer ratios under the global sparsity: {choices}")
    allocation_options: dict[str, Any] = option(
        {}, group="allocation", flags=("--allocation-option",),
        help="allocator option, e.g. --allocation-option m=5 --allocation-option lam=0.08")
    # correction
    refine: str | None = option(None, group="correction", parse=registry_name, choices=_names("correction", "available_refiners"),
                                metavar="NAME", help="mask refiner run after the method on every layer: {choices}")
    refine_options: dict[str, Any] = option({}, group="correction", flags=("--refine-option",),
                                            help="refiner option, e.g. --refine-option skip_modules=[mlp]")
    reconstruct: bool = option(False, group="correction",
                               help="after each block is pruned, refit its kept weights to the dense model's block "
                                    "outputs on the calibration samples (masks fixed; EBFT-style block-wise "
                                    "reconstruction)")
    reconstruct_options: dict[str, Any] = option(
        {}, group="correction", flags=("--reconstruct-option",),
        help="reconstruction option: epochs, lr, micro_batch, holdout, patience, seed")
    # evaluation
    eval: str | None = option(None, group="evaluation", job=True,
                              help="perplexity text: path or dataset name (optional)")
    eval_seqlen: int = option(512, group="evaluation", flags=("--eval-seqlen", "--seqlen"), parse=int, positive=True,
                              job=True, help="perplexity window (default {default}; at most the model's positions)")
    max_windows: int | None = option(32, group="evaluation", parse=int, job=True,
                                     help="evenly spaced subset of eval windows (default {default}; 0 = all)")
    fidelity_n: int = option(8, group="evaluation", parse=int, positive=True, job=True,
                             help="held-out self-generated sequences for KL/top-1")
    fidelity_seqlen: int = option(256, group="evaluation", parse=int, positive=True, job=True,
                                  help="tokens per held-out sequence")
    # output
    out: str | None = option(None, group="output", job=True,
                             help="directory to save the pruned model to (checked before any work: it must not "
                                  "exist, be empty, or hold a sparsewise checkpoint and --overwrite)")
    save_format: str = option("sparsewise", group="output", choices=_names("formats.checkpoint", "FORMATS"), job=True,
                              help="compressed sparsewise or plain HF")
    dtype: str | None = option(None, group="output", parse=registry_name, choices=lambda: SAVE_DTYPES, job=True,
                               shown_default="the model's own", help="float type of the saved checkpoint (default: {default})")
    overwrite: bool = option(False, group="output", job=True,
                             help="replace an existing --out directory holding a sparsewise checkpoint (never "
                                  "other files)")
    # run
    device: str = option("auto", group="run", help="auto | cpu | cuda")
    seed: int = option(0, group="run", parse=int, help="seed of every random choice")
    resume_dir: str | None = option(None, group="run",
                                    help="checkpoint progress after every block here; rerun the same command to "
                                         "resume")

    @classmethod
    def field_names(cls) -> list[str]:
        return [item.name for item in dataclasses.fields(cls)]

    @classmethod
    def options(cls) -> list[Option]:
        """Every field with its default and command-line form, in declaration order."""
        defaults = cls()
        return [Option(item.name, getattr(defaults, item.name), item.metadata[_SPEC])
                for item in dataclasses.fields(cls)]

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
        """Fail fast (before any model is loaded) on settings that cannot work; see :meth:`parse`."""
        self.parse()
        return self

    def parse(self, default_sparsity: float | None = DEFAULT_SPARSITY) -> ValidConfig:
        """Check every setting that does not depend on the model, once, and return the typed values.

        ``default_sparsity`` is the ratio of a pattern that implies none when ``sparsity`` is not
        given; ``sw.prune`` passes None (only an N:M pattern may then go without one).
        """
        from .correction import get_refiner
        from .correction.reconstruct import ReconstructConfig
        from .methods import check_pattern, get_method
        from .patterns import Pattern, check_ratio

        config = self._read_strings()
        if config.reconstruct_options and config.reconstruct is not True:
            raise ConfigError("reconstruct_options given but reconstruct is off: add --reconstruct (recipe: "
                              "reconstruct: true).")
        reconstruct = ReconstructConfig.parse(
            (config.reconstruct_options or True) if config.reconstruct is True else config.reconstruct)
        method = get_method(config.method)
        uniform = _is_uniform(config.allocation)
        if method.capabilities.whole_model and (not uniform or config.allocation_options or config.refine is not None
                                                or config.resume_dir is not None or reconstruct is not None):
            raise ConfigError(whole_model_refusal(method.name))

        choices = mixed_choices(config.pattern)
        pattern = choices[0] if choices else Pattern.parse(config.pattern)  # shapes are checked against every choice
        wanted = config.effective_sparsity(default_sparsity)
        if choices:
            if wanted is None:
                raise ConfigError(f"mixed N:M choices {config.pattern!r} need the global sparsity to reach, e.g. "
                                  "sparsity=0.6.")
            sparsity = check_ratio(wanted)
        else:
            sparsity = pattern.resolve_sparsity(wanted)
        for choice in choices or (pattern,):
            check_pattern(method, choice)
        if method.capabilities.replaces_modules and config.resume_dir is not None:
            raise ConfigError(f"{method.name} replaces modules, which a resume state cannot hold yet: drop resume_dir.")

        refiner = None
        if config.refine is not None:
            refiner = get_refiner(config.refine, **dict(config.refine_options))
        elif config.refine_options:
            raise ConfigError("refine_options given without refine: pass refine='dsnot'.")
        if reconstruct is not None and not _needs(method, refiner):
            raise ConfigError(f"reconstruct refits blocks on calibration data; {method.name} runs without it: use "
                              "wanda or sparsegpt, or drop reconstruct.")
        if uniform and choices:
            raise ConfigError("mixed N:M choices need an allocation to decide which layer takes which pattern: "
                              "pass allocation='owl' (or er, erk, ecoflap, tyr, or an explicit map).")
        if uniform and config.allocation_options:
            raise ConfigError("allocation_options given without an allocation: pass allocation='owl' (or another).")
        allocation = None if uniform else _check_allocation(config, pattern, sparsity, choices)

        for item in self.options():
            value = getattr(config, item.name)
            choices_of = item.choices()
            if choices_of is not None and isinstance(value, str) and value not in choices_of:
                raise ConfigError(f"{item.name} must be one of {', '.join(choices_of)}"
                                  f"{' (or unset)' if item.default is None else ''}, got {value!r}.")
            if item.spec.positive and value is not None and int(value) < 1:
                raise ConfigError(f"{item.name} must be a positive integer, got {value!r}.")
        return ValidConfig(config=config, method=method, pattern=pattern, choices=tuple(choices), sparsity=sparsity,
                           refiner=refiner, reconstruct=reconstruct, allocation=allocation)

    def _read_strings(self) -> PruneConfig:
        """A copy with every string read by its option's parser ("8" -> 8, " Wanda" -> "wanda"), as
        the command line reads it; ``max_windows`` 0 means all windows (None)."""
        read = {}
        for item in self.options():
            value = getattr(self, item.name)
            if isinstance(value, str) and item.spec.parse is not str:
                try:
                    read[item.name] = item.spec.parse(value)
                except ValueError:
                    kind = {int: "an integer", float: "a number"}.get(item.spec.parse, item.spec.parse.__name__)
                    raise ConfigError(f"{item.name} must be {kind}, got {value!r}.") from None
        config = dataclasses.replace(self, **read)
        if config.max_windows == 0:
            config.max_windows = None
        return config

    def effective_sparsity(self, default: float | None = DEFAULT_SPARSITY) -> float | None:
        """The ratio to prune at: the one given; else None for a single N:M pattern (its implied
        1 - N/M), ``default`` for every other pattern (mixed N:M choices included)."""
        from .patterns import Pattern

        if self.sparsity is not None:
            return self.sparsity
        try:
            if not mixed_choices(self.pattern) and Pattern.parse(self.pattern).kind == "nm":
                return None  # the pattern fixes the ratio
        except ConfigError:
            pass  # parse() reports it
        return default

    def merged(self, overrides: dict[str, Any]) -> PruneConfig:
        """A copy with every non-None override applied (flags given on the command line win)."""
        return dataclasses.replace(self, **{key: value for key, value in overrides.items() if value is not None})


@dataclass(frozen=True)
class ValidConfig:
    """A :class:`PruneConfig` that passed :meth:`PruneConfig.parse`, with its values parsed.

    ``config`` holds the settings as read (strings through their parsers; what a saved job
    records); the rest is what ``sw.prune`` runs on. It holds the instantiated method, refiner and
    allocator of one run: parse the config again for another.
    """

    config: PruneConfig
    method: PruningMethod  # instantiated; ``pattern`` and every choice checked against its capabilities
    pattern: Pattern  # the pattern; with mixed choices, the densest of them
    choices: tuple[Pattern, ...]  # mixed N:M choices, densest first (empty for one pattern)
    sparsity: float  # the global ratio (an N:M pattern's implied one, or the one given)
    refiner: MaskRefiner | None
    reconstruct: ReconstructConfig | None
    allocation: Any  # None (uniform), an explicit {layer: sparsity} map, or the allocator instance

    @property
    def needs(self) -> frozenset[str]:
        """The calibration statistics of the method and the refiner, collected once for both."""
        return _needs(self.method, self.refiner)


def _needs(method: PruningMethod, refiner: MaskRefiner | None) -> frozenset[str]:
    return method.needs | (refiner.needs if refiner is not None else frozenset())


def whole_model_refusal(method: str) -> str:
    return (f"method {method!r} walks the whole model itself: it takes no allocation, refine, reconstruct, "
            "resume_dir or blocks.")


def _is_uniform(allocation: Any) -> bool:
    return allocation is None or (isinstance(allocation, str) and registry_name(allocation) == "uniform")


def mixed_choices(pattern: Any) -> list[Pattern]:
    """'2:4,1:4' or ['2:4', '1:4']: N:M choices to mix across layers, densest first ([] for one pattern)."""
    from .patterns import Pattern

    if isinstance(pattern, str) and "," in pattern:
        pattern = [part for part in pattern.split(",") if part.strip()]
    if not isinstance(pattern, (list, tuple)):
        return []
    choices = [Pattern.parse(part) for part in pattern]
    if len(choices) < 2 or any(choice.kind != "nm" for choice in choices):
        raise ConfigError(f"mixed patterns are N:M choices, at least two, e.g. '2:4,1:4'; got {pattern!r}.")
    ratios = [choice.fixed_sparsity for choice in choices]
    if len(set(ratios)) != len(ratios):
        raise ConfigError(f"mixed N:M choices need different sparsities (2:4 and 4:8 are both 0.5): {pattern!r}.")
    return sorted(choices, key=lambda choice: choice.fixed_sparsity)


def _check_allocation(config: PruneConfig, pattern: Pattern, sparsity: float, choices: list[Pattern]) -> Any:
    """A layer-wise allocation that can work with the pattern: the explicit map, or the allocator
    (instantiated with its options, so a typo fails before any work)."""
    if choices:
        levels = [choice.fixed_sparsity for choice in choices]
        if not levels[0] <= sparsity <= levels[-1]:
            raise ConfigError(f"sparsity {sparsity} lies outside the mixed choices' range [{levels[0]}, {levels[-1]}].")
    elif pattern.kind == "nm":
        raise ConfigError(f"{pattern} fixes every layer's sparsity at {sparsity:.3f}: a layer-wise allocation needs "
                          "an unstructured (or block) pattern, or mixed N:M choices such as pattern='2:4,1:4'.")
    elif pattern.scope == "global":
        raise ConfigError("a global ranking already decides each layer's share: drop the allocation or use scope "
                          "row/layer.")
    if isinstance(config.allocation, dict):
        return config.allocation  # its layer names are checked against the model
    from .allocation import get_allocator

    return get_allocator(config.allocation, **dict(config.allocation_options))
