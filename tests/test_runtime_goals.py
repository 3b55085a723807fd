"""benchmarks/runtime_goals.py: the goal table follows the measured JSON, met / not met / not measured."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime_goals.py"


def _load():
    spec = importlib.util.spec_from_file_location("runtime_goals", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["runtime_goals"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _write(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload))
    return path


def _status(rows, name_start: str) -> tuple[str, str]:
    row = next(row for row in rows if row[0].startswith(name_start))
    return row[3], row[2]


def test_goal_rows_follow_the_measured_files(tmp_path):
    goals = _load()
    kernels = _write(tmp_path / "kernels.json", {"header": "# test", "rows": [
        {"shape": shape, "mode": "2:4", "m": 1, "ratio": ratio} for shape, ratio in
        (("q", 1.9), ("gate", 1.8), ("down", 1.69))] + [
        {"shape": "q", "mode": "2:4 cuSPARSELt", "m": 1, "ratio": 1.75},  # the best backend per cell counts
        {"shape": "down", "mode": "2:4 cuSPARSELt", "m": 1, "ratio": 1.71},
        {"shape": "q", "mode": "act 90%", "m": 1, "ratio": 3.2}]})
    accelerate_table = ("layers   shape (out x in)  weights  runs as  measured dense/sparse\n"
                        "    64      4096 x 4096        2:4   sparse  M=8: 1.25x   (e.g. q)\n"
                        "    64     14336 x 4096        2:4   sparse  M=8: 1.40x   (e.g. gate)\n")
    decode = _write(tmp_path / "decode.json", {"header": "test", "rows": [
        {"mode": "dense", "batch": 8, "tok_s": 100.0, "ratio_vs_dense": 1.0, "block_weight_mib": 100.0},
        {"mode": "2:4", "batch": 8, "tok_s": 130.0, "ratio_vs_dense": 1.3, "block_weight_mib": 56.25,
         "accelerate": accelerate_table}]})
    smol = _write(tmp_path / "smol.json", {"rows": [{"pattern": "2:4", "ppl_masked": 100.0,
                                                      "ppl_accelerated": 100.05}]})
    rows = goals.goal_rows(goals.load([kernels, decode, smol]))

    status, text = _status(rows, "2:4 per layer, M=1")
    assert status == "met" and "down 1.71x" in text  # cuSPARSELt's 1.71 beats the GEMV's 1.69
    status, text = _status(rows, "2:4 per layer, M=2..16")
    assert status == "NOT met" and "q/o M=8 1.25x" in text and "not measured" in text  # dispatch table parsed
    assert _status(rows, "2:4 prefill")[0] == "-"
    assert _status(rows, "activation-sparse 90%")[0] == "NOT met"  # only q measured: incomplete is not met
    assert _status(rows, "decode tok/s, batch 8")[0] == "met"
    assert _status(rows, "decode tok/s, batch 1")[0] == "-"
    assert _status(rows, "weight memory")[0] == "met"
    assert _status(rows, "SmolLM2")[0] == "met"
    assert _status(rows, "never below dense")[0] == "met"


def test_a_slower_accelerated_model_fails_its_goals(tmp_path):
    goals = _load()
    decode = _write(tmp_path / "decode.json", {"rows": [
        {"mode": "dense", "batch": 8, "tok_s": 100.0, "ratio_vs_dense": 1.0, "block_weight_mib": 100.0},
        {"mode": "2:4", "batch": 8, "tok_s": 90.0, "ratio_vs_dense": 0.9, "block_weight_mib": 110.0}]})
    smol = _write(tmp_path / "smol.json", {"rows": [{"pattern": "2:4", "ppl_masked": 100.0,
                                                      "ppl_accelerated": 101.0}]})
    rows = goals.goal_rows(goals.load([decode, smol]))
    for name in ("decode tok/s, batch 8", "never below dense", "weight memory", "SmolLM2"):
        assert _status(rows, name)[0] == "NOT met", name
