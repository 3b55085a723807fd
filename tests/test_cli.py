"""End to end through the command line on the real SmolLM2 (small settings so CI stays fast)."""

from __future__ import annotations

import json

import pytest
from conftest import C4_SAMPLE, WIKITEXT_TEST, requires_data

from sparsewise.cli import main
from sparsewise.config import PruneConfig

SMALL = ["--fidelity-n", "2", "--fidelity-seqlen", "32", "--no-progress"]


@requires_data(C4_SAMPLE)
def test_prune_eval_report_round_trip(tmp_path, capsys, smollm2):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", "smollm2-135m", "--method", "sparsegpt", "--pattern", "2:4",
                 "--calib", str(C4_SAMPLE), "--calib-n", "4", "--calib-seqlen", "64",
                 "--eval", str(WIKITEXT_TEST), "--eval-seqlen", "128", "--max-windows", "2",
                 "--out", str(out), *SMALL])
    summary = capsys.readouterr().out
    assert code == 0
    assert "sparsegpt 2:4" in summary and "achieved sparsity 50.00%" in summary
    assert "perplexity" in summary and "top-1 agreement" in summary and "saved" in summary

    assert main(["eval", str(out), "--eval", str(WIKITEXT_TEST), "--seqlen", "128", "--max-windows", "2",
                 "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["windows"] == 2 and evaluated["ppl"] > 1

    # the same checkpoint through the sparse runtime (CPU: the CSR kernel where it measures faster)
    assert main(["eval", str(out), "--eval", str(WIKITEXT_TEST), "--seqlen", "128", "--max-windows", "2",
                 "--json", "--no-progress", "--accelerate", "--device", "cpu"]) == 0
    accelerated = json.loads(capsys.readouterr().out)
    assert "accelerated" in accelerated["runtime"] and "measured dense/sparse" in accelerated["runtime"]
    assert accelerated["ppl"] == pytest.approx(evaluated["ppl"], rel=1e-4)

    # activation sparsity on top, calibrated on C4 (never the eval text), measured sparsity reported
    assert main(["eval", str(out), "--eval", str(WIKITEXT_TEST), "--seqlen", "128", "--max-windows", "2",
                 "--json", "--no-progress", "--activation-method", "wina", "--activation-sparsity", "0.4",
                 "--calibration", str(C4_SAMPLE), "--calibration-n", "2"]) == 0
    sparse_act = json.loads(capsys.readouterr().out)
    assert sparse_act["activation"]["method"] == "wina"
    assert 0.3 < sparse_act["activation"]["measured_sparsity"] < 0.6
    assert sparse_act["ppl"] > evaluated["ppl"]

    assert main(["report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["sparsity"]["layers"]) == 210
    assert report["sparsity"]["all_patterns_ok"]
    assert report["size"]["weights_bytes"] < report["size"]["dense_bytes"]
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "every N:M group valid" in table


@pytest.mark.slow  # ~1-2 min on 2 cores; the save/load mechanics run in CI via tests/test_armor.py
@requires_data(C4_SAMPLE)
def test_armor_through_the_cli_saves_a_loadable_factorized_model(tmp_path, capsys, smollm2):
    out = tmp_path / "armor"
    assert main(["prune", "--model", "smollm2-135m", "--method", "armor", "--pattern", "2:4",
                 "--option", "iterations=2", "--include", r"layers\.0\.", "--calib", str(C4_SAMPLE),
                 "--calib-n", "2", "--calib-seqlen", "32", "--out", str(out), *SMALL]) == 0
    summary = capsys.readouterr().out
    assert "armor 2:4" in summary and "7 pruned" in summary and "saved" in summary
    assert main(["eval", str(out), "--eval", str(WIKITEXT_TEST), "--seqlen", "64", "--max-windows", "1",
                 "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1


def test_default_job_self_calibration_with_recipe(tmp_path, capsys, smollm2):
    """The embedded default (self-generated calibration, fidelity summary) driven by a YAML recipe."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magnitude\nsparsity: 0.3\nself-n: 2\nself_seqlen: 32\n")
    assert main(["prune", "--recipe", str(recipe), "--method", "wanda", *SMALL]) == 0
    summary = capsys.readouterr().out
    assert "wanda unstructured at 30%" in summary  # the flag won over the recipe's method
    assert "self-generated, 2 x 32 tokens" in summary
    assert "KL(dense || sparse)" in summary


@pytest.mark.parametrize(("argv", "message"), [
    (["prune", "--sparsity", "1.5", "--self-n", "1"], "sparsity must be in"),
    (["prune", "--pattern", "3:2"], "0 < N < M"),
    (["prune", "--option", "nonsense"], "KEY=VALUE"),
    (["prune", "--method", "armor"], "takes patterns 2:4, not unstructured: pass --pattern 2:4"),
    (["prune", "--allocation-option", "nonsense"], "--allocation-option expects KEY=VALUE"),
    (["prune", "--reconstruct-option", "lr=0.001"], "add --reconstruct"),
    (["prune", "--pattern", "2:4", "--allocation", "owl", "--self-n", "1", "--self-seqlen", "8",
      "--fidelity-n", "1", "--fidelity-seqlen", "8"], "fixes every layer's sparsity"),
])
def test_bad_input_exits_2_with_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_recipe_rejects_unknown_fields(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("methd: wanda\n")
    assert main(["prune", "--recipe", str(recipe)]) == 2
    assert "unknown recipe field" in capsys.readouterr().err


def test_every_config_field_has_a_flag():
    from sparsewise.cli import build_parser

    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    dests = {action.dest for action in prune._actions}
    missing = (set(PruneConfig.field_names()) - dests
               - {"method_options", "allocation_options", "refine_options", "reconstruct_options"})
    assert not missing


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["eval", "--help"], ["report", "--help"]])
def test_help_pages_render(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: sparsewise" in capsys.readouterr().out
