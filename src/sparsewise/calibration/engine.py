"""Sequential block-by-block calibration (the scheme of SparseGPT, Wanda and llm-compressor).

Capture the inputs of block 0 with a pre-forward hook, then for each block: run it over the
calibration batches with statistics hooks on its layers, let the caller prune the block, run it
again to produce the *pruned* block's outputs, and feed those to the next block. Only one
block's activations live at a time; blocks may be onloaded to ``device`` one at a time while
the rest of the model stays where it is.

:class:`BlockWalk` is the one walk over the blocks (onload, inputs, offload, restore on
failure); :func:`sequential_calibration`, activation calibration and the allocation search
all run on it.

Models with several stacks of blocks (an encoder-decoder: ``ModelAdapter.stack_starts``) are
walked stack after stack: when the walk reaches a later stack's first block it captures that
block's inputs again with a forward of the model, whose earlier stacks are pruned in place by
then, so the decoder is calibrated on its own inputs and on the *pruned* encoder's outputs (the
sequential scheme of SparseGPT, carried across stacks). An encoder-decoder's calibration batches
get decoder tokens when they hold none (:func:`model_inputs`).

No per-family forward code: the block receives exactly the positional and keyword arguments
the model's own forward gave it (attention masks, rotary embeddings, position ids, ...).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, NumericalError, UnsupportedModelError
from ..models.adapters import stack_starts_of
from .distributed import all_reduce_stats, any_rank
from .stats import LayerStats


class _StopForward(Exception):
    """Raised inside the first block's pre-hook: everything after block 0 is not needed."""


# ----------------------------------------------------------------------------------------------
# Memory checks ahead of predictable passes
# ----------------------------------------------------------------------------------------------


class InsufficientMemoryError(ConfigError, MemoryError):
    """A pass would need clearly more memory than the device has available: refused before it starts."""


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device``: for a GPU the driver's free memory plus
    what PyTorch's cache holds unused; for the CPU ``MemAvailable`` (psutil when installed, else
    /proc/meminfo). None when unknown (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def format_bytes(count: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 2**10:.1f} KB"


def check_memory(need: int, device: torch.device | str, what: str, advice: str, *, all_ranks: bool = False) -> None:
    """Raise :class:`InsufficientMemoryError` when ``need`` bytes (a lower bound of what ``what``
    will allocate on ``device``) exceed the memory available there; silent when it may fit or the
    available memory is unknown. ``all_ranks``: under torch.distributed every rank must call it,
    and all raise when any rank lacks the memory (a collective; no rank is left waiting)."""
    available = available_memory(device)
    short = available is not None and need > available
    if all_ranks and any_rank(short) and not short:
        raise InsufficientMemoryError(f"{what}: another rank lacks the memory for it (see its error).")
    if not short:
        return
    device = torch.device(device)
    where = f"GPU memory on {device}" if device.type == "cuda" else "RAM"
    raise InsufficientMemoryError(f"{what} needs at least {format_bytes(need)} of {where}, but only "
                                  f"{format_bytes(available)} is available: {advice}.")


def batch_rows(batch: dict) -> int:
    """Samples in a model-input batch (the first dim of input_ids, else the largest first dim)."""
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim():
        return int(ids.shape[0])
    return max((int(value.shape[0]) for value in batch.values() if isinstance(value, torch.Tensor) and value.dim()),
               default=0)


def _first_sample(batch: dict) -> dict:
    rows = batch_rows(batch)
    return {key: value[:1] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows else value
            for key, value in batch.items()}


def check_block_memory(model: nn.Module, first_block: nn.Module, batches: list[dict], device: torch.device,
                       copies: int) -> None:
    """Refuse a calibration walk whose held block activations cannot fit on ``device``.

    The walk holds every sample's hidden states at a block's input and output (``copies`` of
    them: 2, or 4 with block-wise reconstruction's dense stream) for the whole block: measured
    on one sample (a forward up to the first block), times the number of samples.
    """
    samples = sum(batch_rows(batch) for batch in batches)
    need, what = 0, "calibration block by block"
    if batches and samples:
        home = _module_device(model)
        cuda = [home.index if home.index is not None else torch.cuda.current_device()] if home.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # a model in training mode (dropout) must not shift the RNG
            probe = _capture_calls(model, first_block, [_first_sample(batches[0])], device)[0].hidden_states
        per_sample = probe.numel() // max(int(probe.shape[0]), 1) * probe.element_size()
        shape = "x".join(str(size) for size in probe.shape[1:])
        need = per_sample * samples * copies
        what += (f" (hidden states of {samples} samples of [{shape}] {str(probe.dtype).replace('torch.', '')}, "
                 f"{copies} copies held per block)")
    check_memory(need, device, what, "lower the number of calibration samples (n) or their seqlen", all_ranks=True)


def move_to(obj, device: torch.device):
    """Move every tensor inside nested tuples/lists/dicts to ``device`` (other objects as is)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(item, device) for item in obj)
    if isinstance(obj, list):
        return [move_to(item, device) for item in obj]
    if isinstance(obj, dict):
        return {key: move_to(value, device) for key, value in obj.items()}
    return obj


@dataclass
class BlockCall:
    """One calibration batch as block 0 (and then every later block) receives it."""

    args: tuple
    kwargs: dict

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden_states(self, hidden: torch.Tensor | None) -> BlockCall:
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})

    def slots(self) -> dict[int | str, object]:
        """Every argument but the hidden states: {position or keyword: value}."""
        found: dict[int | str, object] = {index: value for index, value in enumerate(self.args) if index}
        found.update({key: value for key, value in self.kwargs.items() if self.args or key != "hidden_states"})
        return found

    def with_slots(self, values: dict[int | str, object]) -> BlockCall:
        """This call with the arguments in ``values`` ({position or keyword: value}) replaced."""
        args = list(self.args)
        for slot, value in values.items():
            if isinstance(slot, int):
                args += [None] * (slot + 1 - len(args))
                args[slot] = value
        kwargs = {**self.kwargs, **{slot: value for slot, value in values.items() if isinstance(slot, str)}}
        return BlockCall(tuple(args), kwargs)


def _same_value(first, second) -> bool:
    """True when two block arguments are the same object or hold equal values."""
    if first is second:
        return True
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return (first.shape == second.shape and first.dtype == second.dtype and first.device == second.device
                and bool(torch.equal(first, second)))
    if isinstance(first, (tuple, list)) and type(first) is type(second):
        return len(first) == len(second) and all(_same_value(a, b) for a, b in zip(first, second, strict=True))
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(_same_value(first[key], second[key]) for key in first)
    try:
        return bool(first == second)
    except Exception:  # objects whose == is not a truth value
        return False


def differing_slots(first: BlockCall, second: BlockCall) -> list[int | str]:
    """The arguments (besides the hidden states) that ``second`` got other than ``first``: what a
    forward hands its blocks after the first that the first did not get (T5's relative position
    bias, computed by the first block and passed on to every later one)."""
    first_slots, second_slots = first.slots(), second.slots()
    return [slot for slot, value in second_slots.items()
            if slot not in first_slots or not _same_value(first_slots[slot], value)]


_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for a model whose forward runs an encoder and a decoder (``config.is_encoder_decoder``
    and a ``decoder_input_ids`` argument: T5EncoderModel shares T5's config but has no decoder)."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    try:
        return "decoder_input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """``batch`` as the model's forward takes it: an encoder-decoder (``config.is_encoder_decoder``)
    whose batch holds no decoder inputs gets ``decoder_input_ids``, the encoder's tokens shifted
    right behind the decoder start token (teacher forcing on the same text, so calibration text
    needs no target side), and a ``decoder_attention_mask`` shifted alike. Other batches pass as is.
    """
    config = getattr(model, "config", None)
    if not is_encoder_decoder(model) or any(key in batch for key in _DECODER_INPUTS):
        return batch
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ConfigError(
            f"{type(model).__name__} is an encoder-decoder and its calibration batches hold neither input_ids "
            f"(keys: {sorted(batch)}) nor decoder inputs; give calibration dicts that also hold decoder_input_ids "
            "(e.g. Whisper: input_features and decoder_input_ids)."
        )
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder without config.decoder_start_token_id, "
                          "so the decoder's calibration tokens cannot be made from the encoder's: set it, or give "
                          "calibration dicts that hold decoder_input_ids.")
    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(shift):  # the model's own rule (T5's _shift_right, BART's shift_tokens_right)
        decoder_ids = shift(labels=ids)
    else:
        decoder_ids = torch.cat([torch.full_like(ids[:, :1], int(start)), ids[:, :-1]], dim=1)
    inputs = {**batch, "decoder_input_ids": decoder_ids}
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape and "decoder_attention_mask" not in batch:
        inputs["decoder_attention_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return inputs


def _forward_kwargs(model: nn.Module) -> dict:
    # Caches only cost memory during calibration; not every model's forward takes the flag.
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Iterable[dict], device: torch.device, *,
    later_blocks: Sequence[tuple[str, nn.Module]] = (), name: str = "its first block",
) -> list[BlockCall]:
    """Run the model up to ``first_block`` for each batch; return what the block received.

    ``later_blocks``: (name, block) of the first blocks of the stacks the walk visits after this
    one; the forward reaching one of them first means the stacks are out of execution order,
    refused with :class:`UnsupportedModelError`. ``name`` names ``first_block`` in errors.
    """
    captured = _capture_calls(model, first_block, batches, device, later_blocks=later_blocks, name=name)
    _check_finite(captured, name)
    return captured


def _check_finite(calls: list[BlockCall], name: str) -> None:
    # decided on every rank alike: one rank raising while the others wait in a collective would hang
    if any_rank(any(not torch.isfinite(call.hidden_states).all() for call in calls)):
        raise NumericalError(f"non-finite hidden states entering {name}: check the model weights.")


@dataclass
class StackInputs:
    """What the blocks of one stack receive, per calibration batch: ``calls`` are the first
    block's calls; ``later`` the arguments of every later block (hidden states None), None when
    they are the first block's. A forward may give its later blocks other arguments than its
    first (T5: the relative position bias the first block computes); the walk must hand them
    the same, or their statistics would be of a model without them."""

    calls: list[BlockCall]
    later: list[BlockCall] | None


@torch.no_grad()
def capture_stack_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], start: int, batches: list[dict],
                         device: torch.device, *, later_blocks: Sequence[tuple[str, nn.Module]] = (),
                         second: bool = True) -> StackInputs:
    """The inputs of the stack whose first block is ``blocks[start]``, from forwards of the model as it is.

    When the stack has a second block (``second``), one sample is run up to it first: if the
    forward gives it arguments other than the first block's, the capture runs on to the second
    block (the first one's forward, dense, over every batch) and keeps those arguments for all
    later blocks (the model's forward giving every later block the same ones, as T5's does).
    """
    name, first_block = blocks[start]
    name = f"block {name}"
    if not second or start + 1 >= len(blocks) or not batches:
        return StackInputs(capture_block_inputs(model, first_block, batches, device, later_blocks=later_blocks,
                                                name=name), None)
    second_block = blocks[start + 1][1]
    home = _module_device(model)
    cuda = [home.index if home.index is not None else torch.cuda.current_device()] if home.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # a model in training mode (dropout) must not shift the RNG
        probe = _capture(model, [first_block, second_block], [_first_sample(batches[0])], None,
                         later_blocks=later_blocks, name=name)
    slots = differing_slots(probe[0][0], probe[1][0])
    if not any_rank(bool(slots)):
        return StackInputs(capture_block_inputs(model, first_block, batches, device, later_blocks=later_blocks,
                                                name=name), None)
    firsts, seconds = _capture(model, [first_block, second_block], batches, device, later_blocks=later_blocks,
                               name=name, keep={1: set(slots)})
    _check_finite(firsts, name)
    later = [call.with_hidden_states(None).with_slots(own) for call, own in zip(firsts, seconds, strict=True)]
    return StackInputs(firsts, later)


@torch.no_grad()
def _capture_calls(model: nn.Module, first_block: nn.Module, batches: Iterable[dict], device: torch.device, *,
                   later_blocks: Sequence[tuple[str, nn.Module]] = (), name: str = "its first block") -> list[BlockCall]:
    return _capture(model, [first_block], batches, device, later_blocks=later_blocks, name=name)[0]


@torch.no_grad()
def _capture(model: nn.Module, targets: list[nn.Module], batches: Iterable[dict], device: torch.device | None, *,
             later_blocks: Sequence[tuple[str, nn.Module]] = (), name: str = "its first block",
             keep: dict[int, set] | None = None) -> list[list]:
    """The calls every block of ``targets`` receives (moved to ``device``; as they are when None),
    one list per target; each forward stops at the last target. ``keep={target: slots}``: that
    target's entries are {slot: value} of those arguments only (:meth:`BlockCall.slots`)."""
    captured: list[list] = [[] for _ in targets]

    def moved(value):
        return value if device is None else move_to(value, device)

    def make_grab(position: int):
        def grab(_module, args, kwargs):
            call = BlockCall(args, kwargs)
            if keep is not None and position in keep:
                captured[position].append(moved({slot: value for slot, value in call.slots().items()
                                                 if slot in keep[position]}))
            else:
                captured[position].append(BlockCall(moved(call.args), moved(call.kwargs)))
            if position == len(targets) - 1:
                raise _StopForward

        return grab

    def out_of_order(later_name: str):
        def hook(_module, _args):
            raise UnsupportedModelError(
                f"the model's forward runs block {later_name} before {name}, but the adapter's blocks list it "
                "later: the stacks are not in execution order; pass blocks=[...] to the adapter naming the "
                "blocks in the order the forward runs them."
            )

        return hook

    model_device = _module_device(model)
    extra = _forward_kwargs(model)
    handles = [block.register_forward_pre_hook(make_grab(position), with_kwargs=True)
               for position, block in enumerate(targets)]
    handles += [block.register_forward_pre_hook(out_of_order(later_name)) for later_name, block in later_blocks]
    try:
        for batch in batches:
            count = len(captured[-1])
            try:
                model(**move_to(model_inputs(model, batch), model_device), **extra)
            except _StopForward:
                pass
            if len(captured[-1]) != count + 1:
                raise UnsupportedModelError(
                    f"the model's forward never reached {name}; pass blocks=[...] to the adapter naming the "
                    "modules its forward actually runs (for a model of several stacks, only the stacks the "
                    "calibration inputs run, e.g. not a vision tower when calibrating on text)."
                )
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _module_device(module: nn.Module) -> torch.device:
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _block_output(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise UnsupportedModelError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


@torch.no_grad()
def run_block(block: nn.Module, calls: list[BlockCall]) -> list[torch.Tensor]:
    """The block's output hidden states for every call."""
    return [_block_output(block(*call.args, **call.kwargs)) for call in calls]


# ----------------------------------------------------------------------------------------------
# The walk over blocks
# ----------------------------------------------------------------------------------------------

# Hook tables of a module, and the side tables torch keys by the same hook ids (kwargs and
# always-called flags): a hook left behind by a failed walk is dropped from all of them.
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_HOOK_SIDE_TABLES = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _hook_ids(model: nn.Module) -> dict[int, dict[str, set[int]]]:
    """{id(module): {hook table: hook ids}} of every module of ``model``."""
    return {id(module): {table: set(getattr(module, table, ())) for table in _HOOK_TABLES}
            for module in model.modules()}


def _remove_hooks_since(model: nn.Module, before: dict[int, dict[str, set[int]]]) -> None:
    """Remove every hook registered on ``model``'s modules that ``before`` (:func:`_hook_ids`) lacks."""
    for module in model.modules():
        known = before.get(id(module), {})
        for table_name in _HOOK_TABLES:
            table = getattr(module, table_name, None)
            if not table:
                continue
            for hook_id in [hook_id for hook_id in table if hook_id not in known.get(table_name, ())]:
                del table[hook_id]
                for side_name in _HOOK_SIDE_TABLES:
                    getattr(module, side_name, {}).pop(hook_id, None)


@dataclass
class BlockStep:
    """One block of a :class:`BlockWalk`, on the compute device while its step lasts."""

    index: int
    name: str
    block: nn.Module
    calls: list[BlockCall]  # the block's inputs, one per calibration batch
    home: torch.device  # where the block goes back after its step
    outputs: list[torch.Tensor] | None = None  # set by the caller: the next block's hidden states, one per call


class BlockWalk:
    """The walk over a model's blocks in order, each onloaded to ``device`` for its step only.

        with BlockWalk(model, blocks, None, device, batches=batches, stack_starts=adapter.stack_starts) as walk:
            for step in walk:
                step.outputs = run_block(step.block, step.calls)

    Each step holds one block, moved to ``device``, with its inputs (``step.calls``: the first
    block's captured calls, then the previous block's outputs); the caller sets ``step.outputs``
    and the walk moves the block back to where it was and passes the outputs on as the next
    block's hidden states. After the walk ``calls`` holds the last block's outputs as calls.

    ``calls=None`` (with ``batches``): the walk captures the inputs itself when it is entered
    (:func:`capture_stack_inputs`). With ``later_arguments`` the blocks after a stack's first
    one get the arguments the model's forward gives them when these differ from the first
    block's (T5's relative position bias, computed by the first block); finding out costs a
    forward of the first block on one sample, so by default (None) it is done for encoder-decoders
    and models of several stacks only, and other models keep today's single capture. Given
    ``calls`` (e.g. from :func:`capture_block_inputs`) are the first block's, and every later
    block of that stack gets their other arguments.

    Several stacks (``stack_starts``: the index of each stack's first block, the adapter's
    ``stack_starts``; None: a new stack wherever a block's parent module changes): at a later
    stack's first block the walk captures that block's calls anew from ``batches`` with a
    forward of the model as it is then (earlier stacks already pruned by the caller, so a
    decoder sees the pruned encoder's outputs); the previous stack's outputs are dropped.

    Blocks before ``start_block`` are skipped (resuming): given ``calls`` are then the inputs of
    ``start_block``; with ``calls=None`` the inputs of its stack's first block are captured and
    ``hidden_states`` (one tensor per batch: block ``start_block - 1``'s outputs) put in, unless
    ``start_block`` begins a later stack (then they are ignored). ``before_onload(index)`` runs
    while the block is still at home.

    Leaving the ``with`` early (``break``) moves the open block back too. On failure (any
    exception inside the ``with``, KeyboardInterrupt included) the open block goes back to where
    it was and every hook registered on the model's modules since the walk began is removed: the
    model is left on the devices, and with the hooks, it had.
    """

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], calls: list[BlockCall] | None,
                 device: torch.device | str, *, start_block: int = 0,
                 before_onload: Callable[[int], None] | None = None, stack_starts: Sequence[int] | None = None,
                 batches: list[dict] | None = None, hidden_states: list[torch.Tensor] | None = None,
                 later_arguments: bool | None = None):
        self.model, self.blocks, self.device = model, blocks, torch.device(device)
        self.start_block, self.before_onload = start_block, before_onload
        if stack_starts is None:
            stack_starts = stack_starts_of(blocks)
        self.stack_starts, self.batches = sorted(set(stack_starts) | {0}), batches
        if later_arguments is None:
            later_arguments = len(self.stack_starts) > 1 or is_encoder_decoder(model)
        self.later_arguments = later_arguments
        if batches is None and (calls is None or any(start > start_block for start in self.stack_starts)):
            raise ConfigError("the walk captures block inputs itself (calls=None, or a model of several stacks of "
                              "blocks such as an encoder-decoder, whose later stacks are captured anew): pass "
                              "batches= to BlockWalk.")
        if calls is not None and hidden_states is not None:
            raise ValueError("give BlockWalk either calls (the inputs of start_block) or hidden_states, not both.")
        self.calls: list[BlockCall] = calls or []
        self._given = calls is not None
        self._hidden_states = hidden_states
        self._base: list[BlockCall] | None = None  # the stack's first block's arguments (hidden states None)
        self._later: list[BlockCall] | None = None  # the arguments of its later blocks, when they differ
        self._hooks_before: dict[int, dict[str, set[int]]] | None = None
        self._steps: Iterator[BlockStep] | None = None

    def __enter__(self) -> BlockWalk:
        self._hooks_before = _hook_ids(self.model)
        if not self._given:
            self._start()
        return self

    def __exit__(self, exc_type, _exc, _tb) -> bool:
        try:
            if self._steps is not None:
                self._steps.close()  # a step still open (an exception, a break): its block goes home
        finally:
            if exc_type is not None:
                _remove_hooks_since(self.model, self._hooks_before or {})
        return False

    def __iter__(self) -> Iterator[BlockStep]:
        if self._hooks_before is None:
            raise RuntimeError("iterate a BlockWalk inside `with BlockWalk(...) as walk:`, which restores the "
                               "model on failure.")
        if self._steps is not None:
            raise RuntimeError("a BlockWalk walks once; make a new one.")
        self._steps = self._walk()
        return self._steps

    def _capture_stack(self, start: int) -> list[BlockCall]:
        """The calls of ``blocks[start]`` (a stack's first block), from a forward of the model as it is."""
        inputs = capture_stack_inputs(self.model, self.blocks, start, self.batches or [], self.device,
                                      later_blocks=[self.blocks[s] for s in self.stack_starts if s > start],
                                      second=self.later_arguments and start + 1 not in self.stack_starts)
        self._base = [call.with_hidden_states(None) for call in inputs.calls]
        self._later = inputs.later
        return inputs.calls

    def _start(self) -> None:
        stack_start = max(start for start in self.stack_starts if start <= self.start_block)
        hidden = self._hidden_states
        if hidden is not None and len(hidden) != len(self.batches or []):
            raise ValueError(f"resume state holds {len(hidden)} batches, calibration gives {len(self.batches or [])}")
        if hidden is None and self.start_block != stack_start:
            raise ValueError(f"resuming at block {self.start_block}, inside a stack, needs hidden_states: the outputs "
                             f"of block {self.start_block - 1}, one tensor per batch.")
        first_calls = self._capture_stack(stack_start)
        if hidden is None or self.start_block == stack_start > 0:  # a later stack starts from its captured inputs
            self.calls = first_calls
        elif self.start_block == stack_start:
            self.calls = [call.with_hidden_states(state.to(self.device))
                          for call, state in zip(first_calls, hidden, strict=True)]
        else:
            self.calls = self.following([state.to(self.device) for state in hidden])

    def following(self, outputs: list[torch.Tensor]) -> list[BlockCall]:
        """The calls of a later block of the current stack, whose hidden states are ``outputs``."""
        base = self._later if self._later is not None else self._base if self._base is not None else self.calls
        return [call.with_hidden_states(out) for call, out in zip(base, outputs, strict=True)]

    def _walk(self) -> Iterator[BlockStep]:
        for index, (name, block) in enumerate(self.blocks):
            if index < self.start_block:
                continue
            if index > self.start_block and index in self.stack_starts:
                self.calls = []  # the previous stack's outputs are not this stack's inputs
                self.calls = self._capture_stack(index)
            home = _module_device(block)
            if self.before_onload is not None:
                self.before_onload(index)
            step = BlockStep(index, name, block, self.calls, home)
            try:
                block.to(self.device)
                yield step
            finally:
                block.to(home)  # also on failure (or a close by __exit__): the model ends where it started
            if step.outputs is None:
                raise ValueError(f"block {index} ({name}): set step.outputs, the hidden states for the next block.")
            self.calls = self.following(step.outputs)
            step.calls, step.outputs = [], None  # the walk holds the only reference to the next block's inputs


@torch.no_grad()
def collect_block_stats(
    block: nn.Module, layers: dict[str, nn.Module], in_features: dict[str, int], calls: list[BlockCall],
    wanted: frozenset[str], outputs: list[torch.Tensor] | None = None,
) -> dict[str, LayerStats]:
    """Input statistics of every layer of one block over all calibration calls (and, given a list
    as ``outputs``, the block's output of every call appended to it: the same forward).

    Layers that read the very same input tensor (q/k/v, gate/up) share one accumulator: X^T X
    is the costliest statistic and is identical for them.

    Under torch.distributed the sums are all-reduced across ranks (each distinct accumulator
    once, in ``layers`` order) before they are checked, so every rank returns the statistics of
    all ranks' samples and every rank raises, or none does.
    """
    stats: dict[str, LayerStats] = {}
    seen: list[tuple[str, torch.Tensor]] = []

    def make_hook(name: str):
        def hook(_module, args, _output):
            seen.append((name, args[0]))

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    try:
        for call in calls:
            seen.clear()
            output = block(*call.args, **call.kwargs)
            if outputs is not None:
                outputs.append(_block_output(output))
            leaders: dict[tuple, str] = {}
            for name, tensor in seen:
                key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
                if key in leaders and leaders[key] != name:
                    stats.setdefault(name, stats[leaders[key]])
                    continue
                leaders[key] = name
                if name not in stats:
                    stats[name] = LayerStats(in_features[name], wanted)
                stats[name].update(tensor)
    finally:
        for handle in handles:
            handle.remove()
    _reduce_block_stats(stats, layers, in_features, wanted, _module_device(block))
    for name, layer_stats in _distinct(stats).items():  # execution order: the first bad input is the cause
        if not layer_stats.is_finite():
            raise NumericalError(f"non-finite activations at the input of {name}: check the model weights.")
    missing = [name for name in layers if stats[name].tokens == 0]
    if missing:
        raise UnsupportedModelError(f"layers never ran during calibration: {missing}; exclude them.")
    return stats


def _distinct(stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Each accumulator once, under the first name that holds it."""
    seen: set[int] = set()
    out = {}
    for name, layer_stats in stats.items():
        if id(layer_stats) not in seen:
            seen.add(id(layer_stats))
            out[name] = layer_stats
    return out


def _reduce_block_stats(stats: dict[str, LayerStats], layers: dict[str, nn.Module], in_features: dict[str, int],
                        wanted: frozenset[str], device: torch.device) -> None:
    """All-reduce every accumulator of a block once (no-op on one process).

    Walks ``layers`` (the same on every rank) rather than ``stats`` (what ran here), so a layer
    that saw no tokens on this rank (e.g. an MoE expert its samples never routed to) still
    joins the collective with zero sums instead of leaving the other ranks waiting. Layers
    that never ran get empty accumulators (tokens 0), which the caller reports.
    """
    for name in layers:
        stats.setdefault(name, LayerStats(in_features[name], wanted))
    for layer_stats in _distinct({name: stats[name] for name in layers}).values():
        all_reduce_stats(layer_stats, device)


LayerPruner = Callable[[str, "LayerStats | None"], None]
SEQUENTIAL_MODES = ("layer", "block")
OBSERVE = "observe"  # the engine's third mode: a dense pass that only reads statistics
ENGINE_MODES = (*SEQUENTIAL_MODES, OBSERVE)


@torch.no_grad()
def prune_block_in_forward(
    block: nn.Module, layers: dict, call: BlockCall, wanted: frozenset[str], prune_layer: LayerPruner
) -> torch.Tensor:
    """One forward of the block over *all* calibration tokens, pruning each layer just before it runs.

    A pre-forward hook gathers the layer's input statistics and prunes it, so every later layer
    of the block is calibrated on inputs that already pass through the pruned earlier layers
    (the "true sequential" order of the SparseGPT/GPTQ code) and the block's output is the pruned
    block's output: one pass per block instead of two.
    """
    # Layers reading the very same tensor (q/k/v, gate/up) share one accumulator. The tensor is
    # matched by identity through a weak reference: a freed input's address is soon reused by
    # the allocator for a new tensor of the same shape, so an address alone would alias them.
    stats_by_input: dict[int, tuple[weakref.ref, LayerStats]] = {}

    def make_hook(name: str, in_features: int):
        def hook(_module, args):
            x = args[0]
            entry = stats_by_input.get(x.data_ptr())
            stats = entry[1] if entry is not None and entry[0]() is x else None
            if stats is None and wanted:
                stats = LayerStats(in_features, wanted)
                stats.update(x)
                all_reduce_stats(stats, x.device)  # once per shared input, before the check and the decision
                if not stats.is_finite():
                    raise NumericalError(f"non-finite activations at the input of {name}: check the model weights.")
                stats_by_input[x.data_ptr()] = (weakref.ref(x), stats)
            prune_layer(name, stats)

        return hook

    def follow_replacement(path: str):
        # A method may put a new module in the layer's place (LayerResult.module) from the pre-hook;
        # this forward already runs the original, so its output is taken from the replacement.
        def hook(module, args, output):
            current = block.get_submodule(path)
            return current(*args) if current is not module else output

        return hook

    paths = {id(module): path for path, module in block.named_modules()}
    handles = [
        layer.module.register_forward_pre_hook(make_hook(name, layer.in_features)) for name, layer in layers.items()
    ]
    handles += [layer.module.register_forward_hook(follow_replacement(paths[id(layer.module)]))
                for layer in layers.values() if id(layer.module) in paths]
    try:
        output = _block_output(block(*call.args, **call.kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return output


def _process_block(block, layers, calls, wanted, prune_layer, mode) -> list[torch.Tensor]:
    """Prune one block's layers (already on the compute device); return its pruned outputs."""
    if mode == "layer":
        return [prune_block_in_forward(block, layers, calls[0], wanted, prune_layer)]
    stats = None
    outputs: list[torch.Tensor] | None = [] if mode == OBSERVE else None
    if wanted and layers:
        stats = collect_block_stats(
            block,
            {layer_name: layer.module for layer_name, layer in layers.items()},
            {layer_name: layer.in_features for layer_name, layer in layers.items()},
            calls,
            wanted,
            outputs,
        )
    for layer_name in layers:
        prune_layer(layer_name, stats[layer_name] if stats else None)
    del stats
    return outputs if outputs else run_block(block, calls)


@torch.no_grad()
def sequential_calibration(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    block_layers: Callable[[int], dict],
    batches: list[dict],
    prune_layer: LayerPruner,
    *,
    wanted: frozenset[str],
    device: torch.device,
    mode: str = "layer",
    start_block: int = 0,
    hidden_states: list[torch.Tensor] | None = None,
    after_block: Callable[[int, str, list[torch.Tensor]], None] | None = None,
    before_block: Callable[[int], None] | None = None,
    reconstruct: Callable[[int, nn.Module, list[BlockCall], list[torch.Tensor]], None] | None = None,
    check_memory_ahead: bool = True,
    stack_starts: Sequence[int] | None = None,
) -> None:
    """Call ``prune_layer(name, stats)`` for every layer, block by block, propagating pruned outputs.

    mode "layer": all calibration samples go through each block in one batch (``batches`` must
    hold exactly one batch); layers are pruned in execution order inside that single pass.
    mode "block": the classic two passes per block over any number of batches: statistics of the
    dense block first, then every layer is pruned, then the pruned block's outputs are computed.
    mode "observe": as "block" for a callback that only reads the statistics (a dense pass, e.g.
    OWL's outlier ratios): the statistics forward's outputs are the block's outputs, one forward
    per block. ``prune_layer`` must then leave the block unchanged.
    ``block_layers(index)`` returns {name: PrunableLayer}; ``stats`` is None when ``wanted`` is empty.

    Resuming: ``start_block`` skips blocks already done, whose outputs are given as
    ``hidden_states`` (one tensor per batch); ``after_block(index, name, outputs)`` sees every
    finished block's outputs so a caller can checkpoint them (the block is still on ``device``
    then). ``before_block(index)`` runs while the block is still at home, before it is moved to
    ``device``. The blocks are walked by :class:`BlockWalk`: on failure every block is back
    where it was and no hook of the walk is left.

    ``reconstruct(index, block, calls, targets)``: after a block is pruned, refit it so its
    outputs on ``calls`` (the pruned model's inputs) approach ``targets``, the dense model's
    outputs of this block on the dense model's own inputs. The engine then carries a second,
    dense stream of hidden states beside the pruned one (one more block pass each) and the
    block's outputs are recomputed after the refit. With it, ``hidden_states`` and the
    ``outputs`` given to ``after_block`` hold both streams: pruned batches, then dense ones.

    ``check_memory_ahead``: before anything runs, the hidden states the walk will hold (every
    sample's block inputs and outputs, per stream) are measured on one sample and the walk is
    refused with :class:`InsufficientMemoryError` when they clearly exceed the memory available on
    ``device`` (:func:`check_block_memory`; measured at the first block walked).

    ``stack_starts`` (the adapter's; None: derived from the block names, a new stack wherever a
    block's parent module changes): models of several stacks are walked stack after stack, each
    stack's first block getting its inputs from a forward of the model pruned so far
    (:class:`BlockWalk`). Resuming inside a later stack captures that stack's first block's
    calls, then puts ``hidden_states`` in; resuming at a stack's first block ignores them (they
    are the previous stack's outputs). ``reconstruct`` is refused for several stacks: its dense
    stream would need the dense model's inputs of each later stack, which the walk does not keep.
    """
    if mode not in ENGINE_MODES:
        raise ValueError(f"mode must be one of {ENGINE_MODES}, got {mode!r}")
    if mode == "layer" and len(batches) != 1:
        raise ValueError("mode 'layer' runs all calibration samples as one batch; pass exactly one batch")
    starts = sorted(set(stack_starts_of(blocks) if stack_starts is None else stack_starts) | {0})
    if reconstruct is not None and len(starts) > 1:
        raise ConfigError("block-wise reconstruction (reconstruct=) supports models of one stack of blocks only; "
                          f"this one has {len(starts)} (an encoder-decoder): drop reconstruct, or pass blocks=[...] "
                          "naming the blocks of one stack.")
    stack_start = max(start for start in starts if start <= start_block)
    streams = 2 if reconstruct is not None else 1
    if hidden_states is not None and len(hidden_states) != streams * len(batches):
        raise ValueError(f"resume state holds {len(hidden_states)} batches, calibration gives "
                         f"{len(batches)}{' per stream (pruned, dense)' if streams == 2 else ''}")
    if check_memory_ahead:
        check_block_memory(model, blocks[stack_start][1], batches, device, copies=2 * streams)
    pruned_hidden = hidden_states[: len(batches)] if hidden_states is not None else None
    with BlockWalk(model, blocks, None, device, start_block=start_block, before_onload=before_block,
                   stack_starts=starts, batches=batches, hidden_states=pruned_hidden) as walk:
        dense_calls: list[BlockCall] = []  # only with reconstruct: block inputs must not outlive their block
        if reconstruct is not None:
            dense_calls = walk.calls if hidden_states is None else [
                call.with_hidden_states(state.to(device))
                for call, state in zip(walk.calls, hidden_states[len(batches):], strict=True)]
        for step in walk:
            targets = run_block(step.block, dense_calls) if reconstruct is not None else []
            outputs = _process_block(step.block, block_layers(step.index), step.calls, wanted, prune_layer, mode)
            if reconstruct is not None:
                del outputs
                reconstruct(step.index, step.block, step.calls, targets)
                outputs = run_block(step.block, step.calls)
                dense_calls = walk.following(targets)
            step.outputs = outputs
            if after_block is not None:
                after_block(step.index, step.name, outputs + targets)
