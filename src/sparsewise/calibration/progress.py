"""Progress of long runs: bars (or plain log lines) and the resumable state of a pruning run.

:func:`progress_bar` shows a tqdm bar on a terminal and, when stderr is not a TTY (a log file, a
pipe, a batch job), plain lines instead (``"wanda 2:4: block 12/30, 41 s, ~62 s left"``) at every
tenth of the work and at least every 30 s, so a long job shows progress in logs too.

After every block the run writes (atomically, in this order) the block's new layer weights,
the hidden states entering the next block, and ``progress.json`` naming the last finished block
and a fingerprint of the run's settings. A restarted run with the same settings loads the
finished blocks and continues from the next one; other settings are refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

PROGRESS_FILE = "progress.json"
# Progress when stderr is not a terminal (a log file): plain lines instead of a bar (the same
# policy as sparsewise.data's calibration progress).
PLAIN_EVERY_S = 30.0  # a line at least this often ...
PLAIN_STEP = 0.1  # ... and at every further tenth of the work
PLAIN_QUIET_S = 5.0  # nothing for work that ends sooner than this


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, _exc, _tb) -> bool:
        if exc_type is None:
            self.close()
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class PlainProgress(_NoBar):
    """Progress for logs: ``"{label}: {body}, {elapsed} s[, ~{eta} s left]"`` lines on stderr.

    A line at every ``step`` of the total and at least every ``every_s`` seconds, none during the
    first ``quiet_s`` seconds (short work stays silent), and a last line at the end once any line
    was written. ``body(done, total)`` words the count (default ``"{unit} {done}/{total}"``).
    """

    def __init__(self, total: int | None, label: str, *, unit: str = "", body=None, every_s: float | None = None,
                 step: float | None = None, quiet_s: float | None = None, stream=None):
        self.total, self.label, self.done = max(int(total or 0), 0), label, 0
        self.body = body or (lambda done, total: f"{unit + ' ' if unit else ''}{done:,}/{total:,}")
        self.every_s = PLAIN_EVERY_S if every_s is None else float(every_s)
        self.step = PLAIN_STEP if step is None else float(step)
        self.quiet_s = PLAIN_QUIET_S if quiet_s is None else float(quiet_s)
        self.stream = stream
        self.start = self.last_line = time.monotonic()
        self.next_step, self.lines, self.last_done = self.step, 0, -1
        self.postfix = ""

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.start
        text = f"{self.label}: {self.body(self.done, self.total)}, {elapsed:.0f} s"
        if self.total and 0 < self.done < self.total:
            text += f", ~{elapsed * (self.total - self.done) / self.done:.0f} s left"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def _write(self, now: float) -> None:
        try:
            print(self.line(now), file=self.stream if self.stream is not None else sys.stderr, flush=True)
        except (OSError, ValueError):  # a closed log must not fail the run
            pass
        self.lines, self.last_line, self.last_done = self.lines + 1, now, self.done

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 0.0
        crossed = self.total > 0 and fraction + 1e-12 >= self.next_step
        while self.total and fraction + 1e-12 >= self.next_step:
            self.next_step += self.step
        if now - self.start < self.quiet_s:
            return
        if crossed or now - self.last_line >= self.every_s:
            self._write(now)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = str(text)

    def close(self) -> None:
        if self.lines and self.done != self.last_done:
            self._write(time.monotonic())


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "", *, label: str | None = None,
                 body=None, every_s: float | None = None, step: float | None = None, quiet_s: float | None = None):
    """A counter with ``update(n)``, ``close()`` and ``with``: a tqdm bar when stderr is a terminal;
    plain periodic lines (:class:`PlainProgress`, worded by ``label``/``unit``/``body``) when it
    is not (a log file, a pipe, a batch job); nothing when ``enabled`` is false."""
    if not enabled:
        return _NoBar()
    if _is_tty(sys.stderr):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit or "it", leave=False)
    return PlainProgress(total, label or desc, unit=unit, body=body, every_s=every_s, step=step, quiet_s=quiet_s)


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def fingerprint(settings: dict[str, Any], calibration_batches: list[dict], layer_shapes: dict[str, tuple]) -> str:
    """Digest of everything that must match for a resumed run to equal an uninterrupted one."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted((k, list(v)) for k, v in layer_shapes.items())).encode())
    for batch in calibration_batches:
        for key in sorted(batch):
            value = batch[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RunProgress:
    """A directory holding the resumable state of one run."""

    def __init__(self, directory: str | Path, run_fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = run_fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)

    def load(self) -> tuple[int, dict[str, torch.Tensor], list[torch.Tensor], list[dict]] | None:
        """(next block, layer weights of finished blocks, hidden states, record dicts) or None."""
        path = self.directory / PROGRESS_FILE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"resume state {path} is unreadable ({exc}); delete {self.directory} to start over.") from exc
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{self.directory} holds progress of a run with other settings, model or calibration data; "
                "use another resume directory or delete this one."
            )
        weights: dict[str, torch.Tensor] = {}
        try:
            for index in range(state["done"] + 1):
                weights.update(load_file(str(self.directory / f"block_{index:04d}.safetensors")))
            hidden = load_file(str(self.directory / "hidden.safetensors"))
        except Exception as exc:  # safetensors raises its own error types on truncation
            raise CheckpointError(f"resume state in {self.directory} is damaged ({exc}); delete it to start over.") from exc
        hidden_states = [hidden[f"batch_{i}"] for i in range(len(hidden))]
        return state["done"] + 1, weights, hidden_states, state["records"]

    def save(self, index: int, layer_weights: dict[str, torch.Tensor], hidden_states: list[torch.Tensor],
             records: list[dict]) -> None:
        _atomic_save_tensors(layer_weights, self.directory / f"block_{index:04d}.safetensors")
        _atomic_save_tensors({f"batch_{i}": h for i, h in enumerate(hidden_states)}, self.directory / "hidden.safetensors")
        _atomic_write_json(self.directory / PROGRESS_FILE,
                           {"fingerprint": self.fingerprint, "done": index, "records": records})

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
