"""Which backend serves a sparse linear call: a table measured on the device, cached on disk.

Key: (device name, weight kind "24"/"bitmask", N, K, dtype) -> per M bucket (the next power of
two of the row count, capped at 8192) the fastest measured choice with its time and dense
cuBLAS's on the same shape, e.g. ``{"backend": "gemv", "config": [1, 4, 4, 0], "ms": 0.0068,
"dense_ms": 0.0129}``. :func:`sparsewise.runtime.tune` times every candidate per (shape,
bucket) as CUDA-graph replays over rotated weight copies (more bytes than the L2 holds, so the
weights stream from memory as in a real model), medians of repeats, random inputs, and writes
``$SPARSEWISE_CACHE/dispatch/<device>.json`` atomically. Without a measured entry
``sparse_linear.default_choice`` decides.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket(rows: int) -> int:
    for size in BUCKETS:
        if rows <= size:
            return size
    return BUCKETS[-1]


def cache_path(device_name: str) -> Path:
    root = Path(os.environ.get("SPARSEWISE_CACHE", Path.home() / ".cache" / "sparsewise")).expanduser()
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in device_name)
    return root / "dispatch" / f"{safe}.json"


def shape_key(kind: str, n: int, k: int, dtype: torch.dtype) -> str:
    return f"{kind}|{n}|{k}|{str(dtype).removeprefix('torch.')}"


class DispatchTable:
    """Measured choices for one device; loaded lazily, saved atomically."""

    def __init__(self, device_name: str, path: Path | None = None):
        self.device_name = device_name
        self.path = path or cache_path(device_name)
        self.entries: dict[str, dict[str, dict]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("device") == device_name:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache is re-measured, never trusted

    def get(self, key: str, rows: int) -> dict | None:
        return self.entries.get(key, {}).get(str(bucket(rows)))

    def put(self, key: str, rows_bucket: int, choice: dict) -> None:
        self.entries.setdefault(key, {})[str(rows_bucket)] = choice

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"device": self.device_name, "torch": torch.__version__, "entries": self.entries},
                             indent=1, sort_keys=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(payload)
        os.replace(handle.name, self.path)


_tables: dict[str, DispatchTable] = {}


def table_for(device: torch.device) -> DispatchTable:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if name not in _tables:
        _tables[name] = DispatchTable(name)
    return _tables[name]


def events_median(fn, repeats: int = 30, warmup: int = 0) -> float:
    """Median milliseconds of ``fn()`` between two CUDA events, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture(fn, calls: int = 1, warmup: int = 3):
    """Capture ``calls`` calls of ``fn`` in one CUDA graph (after ``warmup`` calls on a side stream,
    so kernels are compiled and plans built outside the capture).

    Returns (replay, output of the last captured call); raises RuntimeError if ``fn`` cannot be captured.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, out


def time_rotated(calls: list, repeats: int = 7) -> float:
    """Median milliseconds per call of a CUDA graph that runs every function of ``calls`` once
    (each on its own copy of the weights, so the timing streams them from device memory)."""

    def step():
        for call in calls:
            call()

    replay, _ = capture(step, calls=1, warmup=2)
    return events_median(replay, repeats, warmup=1) / len(calls)


def rotation_copies(nbytes: int, l2_bytes: int | None = None) -> int:
    """Copies of ``nbytes`` of weights that exceed 4x the L2 (at least 2)."""
    if l2_bytes is None:
        l2_bytes = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)
    return max(2, -(-4 * l2_bytes // max(nbytes, 1)))
