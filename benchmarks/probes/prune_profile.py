"""Where pruning time goes at 7B width: cProfile of a few blocks of prune_scale's model.

Run with CUDA_LAUNCH_BLOCKING=1 so each kernel's time lands on the Python call that launched it.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/probes/prune_profile.py --method sparsegpt --layers 2
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prune_scale import build  # noqa: E402

import sparsewise as sw  # noqa: E402
from sparsewise.data import CalibrationSet  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--method", default="sparsegpt")
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--samples", type=int, default=128)
parser.add_argument("--sequential", default="layer")
parser.add_argument("--top", type=int, default=25)
args = parser.parse_args()
model = build(args.layers)
calibration = CalibrationSet(input_ids=torch.randint(0, 32000, (args.samples, 2048),
                                                     generator=torch.Generator().manual_seed(0)), source="random")
profile = cProfile.Profile()
profile.enable()
result = sw.prune(model, method=args.method, sparsity=0.5, calibration=calibration, device="cuda",
                  sequential=args.sequential, progress=False)
profile.disable()
print(f"{args.method} {args.layers} blocks: {result.wall_s:.1f} s, peak {result.peak_gpu_mb:.0f} MB")
pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
