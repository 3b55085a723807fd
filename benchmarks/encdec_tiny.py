"""Encoder-decoder models: every stack pruned (issue 18), on tiny random T5 / BART / Whisper (CPU).

Per family and method the table gives the zeros reached in each stack's block linears, the
stacks' share of the model's parameters, whether outputs stay finite, and the decoder's output
change against the dense model (relative L2 of the logits on held-out inputs). The models are the
tests' tiny configs (tests/test_encoder_decoder.py), random weights: this shows coverage and
exactness, not quality; no real encoder-decoder checkpoint is available offline here.

    python benchmarks/encdec_tiny.py
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import transformers  # noqa: E402
from test_encoder_decoder import STACKS, build, token_ids, whisper_batch  # noqa: E402

import sparsewise as sw  # noqa: E402
from sparsewise.calibration import model_inputs  # noqa: E402


def main() -> None:
    print(f"# {platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"sparsewise {sw.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| family | method | pattern | encoder zeros | decoder zeros | block linears / all params | finite | "
          "logit change vs dense |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: |")
    for family in ("t5", "bart", "whisper"):
        for method, pattern in (("magnitude", "unstructured"), ("wanda", "unstructured"), ("sparsegpt", "unstructured"),
                                ("sparsegpt", "2:4")):
            dense, model = build(family), build(family)
            if family == "whisper":
                calibration, held = whisper_batch(), whisper_batch(2, seed=7)
            else:
                calibration, held = token_ids(), {"input_ids": token_ids(2, 8, seed=5)}
            result = sw.prune(model, method, 0.5, pattern=pattern, calibration=calibration, progress=False)
            zeros = []
            for prefix in STACKS[family]:
                weights = [model.get_submodule(name).weight for name in result.records if name.startswith(prefix)]
                zeros.append(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
            covered = sum(record.shape[0] * record.shape[1] for record in result.records.values())
            total = sum(p.numel() for p in model.parameters())
            with torch.no_grad():
                inputs = model_inputs(dense, held)
                before, after = dense(**inputs).logits, model(**inputs).logits
            change = float((after - before).norm() / before.norm())
            print(f"| {family} | {method} | {pattern} | {zeros[0]:.4f} | {zeros[1]:.4f} | {covered / total:.3f} | "
                  f"{bool(torch.isfinite(after).all())} | {change:.3f} |", flush=True)


if __name__ == "__main__":
    main()
