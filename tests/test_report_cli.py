"""``sparsewise report DIR``: how the model was made (manifest / job / records), a one-screen summary,
the per-layer table with --layers, the per-layer plot (--plot) and a self-contained page (--html)."""

from __future__ import annotations

import base64
import csv
import json
import re
import struct
from dataclasses import asdict

import pytest
import torch
from conftest import VOCAB, build_tiny

import sparsewise as sw
from sparsewise.cli import main
from sparsewise.config import PruneConfig
from sparsewise.records import get_records
from sparsewise.training.metrics import GLOBAL_ROW, LOG_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A SparseGPT 50% job checkpoint (manifest holds the job settings) and a 2:4 magnitude model
    saved from Python (no job)."""
    root = tmp_path_factory.mktemp("report")
    generator = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, VOCAB, (2, 32), generator=generator)} for _ in range(2)]
    model = build_tiny("llama")
    sw.prune(model, method="sparsegpt", sparsity=0.5, calibration=calibration, progress=False)
    names = list(get_records(model))
    job = asdict(PruneConfig(model="tiny-llama", method="sparsegpt", sparsity=0.5, calib="c4-sample.jsonl",
                             calib_n=4, calib_seqlen=32, seed=7, method_options={"damp_ratio": 0.01}))
    job_dir = sw.save(model, root / "job", manifest_extra={"job": job})

    plain = build_tiny("llama", seed=1)
    sw.prune(plain, method="magnitude", sparsity=None, pattern="2:4", progress=False)
    plain_dir = sw.save(plain, root / "python")
    return {"job": job_dir, "python": plain_dir, "names": names, "root": root}


def report(capsys, *argv) -> tuple[int, str, str]:
    code = main(["report", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_default_report_says_how_the_model_was_made_on_one_screen(checkpoints, capsys):
    code, out, _ = report(capsys, checkpoints["job"])
    assert code == 0
    facts = dict(re.findall(r"^(\w[\w: ]*?) {2,}(.+)$", out, re.M))
    assert facts["model"].startswith("tiny-llama (LlamaForCausalLM, 2 blocks, hidden 64)")
    assert facts["method"] == "sparsegpt (damp_ratio=0.01)"
    assert facts["pattern"] == "unstructured"
    assert facts["sparsity"] == "target 50.00%; achieved 50.00% (exact zeros, 14 layers)"
    assert facts["allocation"] == "uniform" and facts["refine"] == "none" and facts["reconstruct"] == "no"
    # the job's calibration settings, and what the records say the method really saw (2 x 2 x 32 tokens)
    assert facts["calibration"] == "c4-sample.jsonl, 4 x 32 tokens, seed 7; 128 tokens seen per layer"
    assert facts["date"].startswith("not recorded")  # the manifest keeps no date (yet)
    assert facts["versions"].startswith(f"sparsewise {sw.__version__}, torch ")
    assert facts["format"] == "sparsewise, float32"
    assert facts["layers"] == "14 layers, 73,728 weights, 36,864 zeros (50.00%)"
    assert "q_proj 50.0%" in facts["by kind"] and "down_proj 50.0%" in out
    assert re.match(r"[\d.]+ [KM]iB on disk vs [\d.]+ [KM]iB dense \(0\.\d{3}x\)", facts["size"])
    assert "14 bitmask" in out
    assert facts["N:M check"] == "no N:M pattern recorded: nothing to check"
    assert facts["spread"] == "every layer at 50.00%"
    assert "SparseGPT reconstruction error" in out and "14 layers hold one" in out
    # short: no per-layer table, at most the three largest-error layers named
    assert not any(line.startswith("layer ") for line in out.splitlines()) and "shape" not in out
    assert sum(name in out for name in checkpoints["names"]) == 3
    assert len(out.splitlines()) <= 35


def test_layers_flag_adds_the_full_per_layer_table(checkpoints, capsys):
    code, out, _ = report(capsys, checkpoints["job"], "--layers")
    assert code == 0
    assert all(name in out for name in checkpoints["names"])
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    assert header.split() == ["layer", "shape", "params", "zeros", "sparsity", "target", "pattern", "ok", "error"]
    row = next(line for line in out.splitlines() if line.startswith("model.layers.1.mlp.down_proj "))
    assert row.split()[1:8] == ["64x128", "8,192", "4,096", "50.00%", "50.00%", "unstructured", "yes"]
    assert float(row.split()[8]) > 0  # the recorded SparseGPT error
    assert "sparsewise report |" in out  # the summary follows the table

    code, out, _ = report(capsys, checkpoints["job"], "--max-rows", "2")  # a row limit implies --layers
    assert code == 0 and "... 12 more layers" in out
    assert sum(name in out.split("sparsewise report |")[0] for name in checkpoints["names"]) == 2


def test_report_of_a_model_saved_from_python_says_not_recorded(checkpoints, capsys):
    code, out, _ = report(capsys, checkpoints["python"])
    assert code == 0
    facts = dict(re.findall(r"^(\w[\w: ]*?) {2,}(.+)$", out, re.M))
    assert facts["model"] == ("not recorded (LlamaForCausalLM, 2 blocks, hidden 64); saved from Python, "
                              "no prune job recorded")
    assert facts["method"] == "magnitude (from the records)" and facts["pattern"] == "2:4 (from the records)"
    assert facts["sparsity"] == "target 50.00% (records); achieved 50.00% (exact zeros, 14 layers)"
    assert facts["calibration"] == "not recorded"
    assert facts["allocation"].startswith("not recorded;")
    assert facts["N:M check"] == "every N:M group valid (14 layers checked against 2:4)"
    assert "14 N:M, 0 bitmask" in out
    assert "top error" not in out  # magnitude records hold no error


def test_json_keeps_the_old_keys_and_adds_the_provenance(checkpoints, capsys):
    code, out, _ = report(capsys, checkpoints["job"], "--json")
    assert code == 0
    data = json.loads(out)
    assert len(data["sparsity"]["layers"]) == 14 and data["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert data["size"]["weights_bytes"] < data["size"]["dense_bytes"]
    assert data["provenance"]["job"]["method"] == "sparsegpt" and data["provenance"]["target_sparsity"] == 0.5
    assert data["provenance"]["sparsewise_version"] == sw.__version__
    assert set(data["errors"]) == set(checkpoints["names"])


def test_plot_draws_a_pruned_model(checkpoints, capsys, tmp_path):
    with_error = tmp_path / "plots" / "job.png"
    code, out, _ = report(capsys, checkpoints["job"], "--plot", with_error)
    assert code == 0 and f"plot written to {with_error}" in out
    data = with_error.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    # sparsity panel + per-layer error panel: taller than the single panel of a model without errors
    plain = tmp_path / "python.png"
    assert report(capsys, checkpoints["python"], "--plot", plain)[0] == 0
    assert png_size(data)[1] > png_size(plain.read_bytes())[1] * 1.5


def test_html_is_one_self_contained_page(checkpoints, capsys, tmp_path):
    page_path = tmp_path / "site" / "report.html"
    code, out, _ = report(capsys, checkpoints["job"], "--html", page_path)
    assert code == 0 and f"html report written to {page_path}" in out
    page = page_path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<td>method</td><td>sparsegpt (damp_ratio=0.01)</td>" in page
    assert "achieved 50.00%" in page
    assert '<table class="layers">' in page and all(f"<td>{name}</td>" in page for name in checkpoints["names"])
    assert "<details>" in page  # the per-layer table folded unless --layers
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1 and base64.b64decode(images[0])[:8] == PNG_MAGIC
    assert not re.search(r"https?://|<script|<link|src=\"(?!data:)", page)  # no external assets

    code, _, _ = report(capsys, checkpoints["job"], "--html", page_path, "--layers")
    assert code == 0 and "<details open>" in page_path.read_text(encoding="utf-8")


def test_training_log_and_model_together(checkpoints, capsys, tmp_path):
    log = tmp_path / "train.csv"
    with open(log, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LOG_COLUMNS)
        for step, sparsity, flips in ((0, 0.0, 0), (10, 0.5, 40), (20, 0.8, 12)):
            writer.writerow((step, "fc1", 0.8, sparsity, flips, 0.9 - sparsity / 2, 1000))
            writer.writerow((step, GLOBAL_ROW, 0.8, sparsity, flips, 0.9 - sparsity / 2, 1000))
    png, page_path = tmp_path / "both.png", tmp_path / "both.html"
    code, out, _ = report(capsys, checkpoints["job"], "--training-log", log, "--plot", png, "--html", page_path)
    assert code == 0
    assert "training log:" in out and "sparsewise report |" in out
    training_png = tmp_path / "both-training.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and training_png.read_bytes()[:8] == PNG_MAGIC
    page = page_path.read_text(encoding="utf-8")
    assert "Training log: train.csv" in page and page.count("data:image/png;base64,") == 2

    # a training log alone still plots (and now also makes a page)
    alone = tmp_path / "alone.html"
    assert report(capsys, "--training-log", log, "--html", alone)[0] == 0
    assert "data:image/png;base64," in alone.read_text(encoding="utf-8")


def test_report_refuses_without_a_model_or_a_log(capsys, tmp_path):
    code, _, err = report(capsys, "--plot", tmp_path / "x.png")
    assert code == 2 and "--training-log" in err and "model directory" in err
