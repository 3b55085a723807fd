"""Resumable progress of a long sequential pruning run.

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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

PROGRESS_FILE = "progress.json"


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
