"""What a new user hit on the command line (issue 17): output checked before any work, N:M patterns
without --sparsity, windows beyond the model's positions, Ctrl-C, the saved dtype, grouped help,
progress in logs. Fast: a tiny Llama with SmolLM2's tokenizer, saved as a plain HF folder."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import sparsewise.formats
from sparsewise.cli import build_parser, main
from sparsewise.config import PruneConfig
from sparsewise.errors import ConfigError
from sparsewise.jobs import check_output

# hidden 80, ffn 160: every linear's input divides by 4 and by 5 (1:4, 2:4 and 2:5 all tile)
TINY = dict(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
SMALL = ["--self-n", "2", "--self-seqlen", "16", "--fidelity-n", "1", "--fidelity-seqlen", "16", "--no-progress"]
EVAL_TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 60


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    """A 2-block Llama (max 256 positions) beside SmolLM2's tokenizer, as a plain HF folder."""
    import transformers as tf

    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **TINY)
    model = tf.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(EVAL_TEXT)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the job gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("sparsewise.models.load_model", refuse)


# ---------------------------------------------------------------------------------------------- 1. --out


def _fake_checkpoint(folder, marker="sparsewise.json"):
    folder.mkdir()
    (folder / marker).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"old")
    return folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_unrelated_nonempty_out_is_refused_before_any_work_even_with_overwrite(tmp_path, capsys, no_model_load,
                                                                               overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    code = main(["prune", "--out", str(out), *(["--overwrite"] if overwrite else []), *SMALL])
    err = capsys.readouterr().err
    assert code == 2
    assert "not a sparsewise checkpoint" in err and "even with --overwrite" in err
    assert "pass --overwrite" not in err
    assert (out / "notes.txt").read_text() == "my thesis"  # never touched


def test_plain_hf_folder_is_not_replaced_even_with_overwrite(tmp_path, capsys, no_model_load):
    out = _fake_checkpoint(tmp_path / "hf", marker="config.json")  # e.g. the user's own downloaded model
    assert main(["prune", "--out", str(out), "--overwrite", *SMALL]) == 2
    assert "not a sparsewise checkpoint" in capsys.readouterr().err
    assert (out / "config.json").exists()


def test_previous_checkpoint_needs_overwrite_and_a_file_is_refused(tmp_path, capsys, no_model_load):
    out = _fake_checkpoint(tmp_path / "old")
    assert main(["prune", "--out", str(out), *SMALL]) == 2
    assert "already holds a sparsewise checkpoint: pass --overwrite" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["prune", "--out", str(a_file), "--overwrite", *SMALL]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["prune", "--out", str(a_file / "below"), *SMALL]) == 2
    assert "cannot be created" in capsys.readouterr().err


def test_output_precheck_never_accepts_what_save_refuses(tmp_path):
    """check_output is the CLI's early copy of save's own check: never looser."""
    from sparsewise.formats.checkpoint import _check_target

    cases = {"missing": None, "empty": "dir", "other": "notes.txt", "hf": "config.json", "sw": "sparsewise.json",
             "hf-dense": "sparsewise_records.json", "file": "file"}
    for name, content in cases.items():
        target = tmp_path / name
        if content == "file":
            target.write_text("x")
        elif content is not None:
            target.mkdir()
            if content != "dir":
                (target / content).write_text("{}")
        for overwrite in (False, True):
            try:
                replace = check_output(target, overwrite)
            except ConfigError:
                continue
            _check_target(target.absolute(), replace)  # must not raise: the save at the end would succeed


def test_out_empty_dir_then_overwrite_replaces_previous_checkpoint(tiny_dir, tmp_path, capsys, monkeypatch):
    import sparsewise.models

    loads = []
    real_load = sparsewise.models.load_model
    monkeypatch.setattr("sparsewise.models.load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "pruned"
    out.mkdir()  # an existing empty folder is fine
    base = ["prune", "--model", str(tiny_dir), "--method", "magnitude", "--out", str(out), *SMALL]
    assert main(base) == 0
    first = capsys.readouterr().out
    assert f"saved        {out.absolute()} (format sparsewise, fp32" in first
    assert len(loads) == 1
    assert main(base) == 2  # refused before loading anything
    assert "pass --overwrite" in capsys.readouterr().err
    assert len(loads) == 1
    assert main([*base, "--overwrite", "--sparsity", "0.3"]) == 0
    assert "at 30%" in capsys.readouterr().out
    job = json.loads((out / "sparsewise.json").read_text())["extra"]["job"]
    assert job["sparsity"] == 0.3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old copies left


# ---------------------------------------------------------------------------------------------- 2. N:M sparsity


@pytest.mark.parametrize(("pattern", "implied"), [("1:4", 0.75), ("2:5", 0.6), ("2:4", 0.5)])
def test_nm_pattern_without_sparsity_takes_its_implied_ratio(pattern, implied):
    config = PruneConfig(pattern=pattern).validate()
    assert config.sparsity is None and config.effective_sparsity() is None
    with pytest.raises(ConfigError, match="fixes sparsity"):
        PruneConfig(pattern=pattern, sparsity=0.3).validate()  # an explicit conflict still errors
    PruneConfig(pattern=pattern, sparsity=implied).validate()


def test_unstructured_and_mixed_keep_the_default_ratio():
    assert PruneConfig().effective_sparsity() == 0.5
    assert PruneConfig(pattern="block:4x4").effective_sparsity() == 0.5
    assert PruneConfig(pattern="2:4,1:4").effective_sparsity() == 0.5
    assert PruneConfig(sparsity=0.7).effective_sparsity() == 0.7
    assert build_parser().parse_args(["prune"]).sparsity is None


def test_cli_1_4_without_sparsity_prunes_at_75_percent(tiny_dir, capsys):
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--pattern", "1:4", *SMALL]) == 0
    summary = capsys.readouterr().out
    assert "magnitude 1:4 at 75%" in summary and "achieved sparsity 75.00%" in summary


def test_cli_2_5_with_conflicting_sparsity_errors(capsys, no_model_load):
    assert main(["prune", "--pattern", "2:5", "--sparsity", "0.5", *SMALL]) == 2
    assert "fixes sparsity at 0.6" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 3. seqlen


def test_perplexity_refuses_seqlen_beyond_the_models_positions():
    from conftest import build_tiny

    from sparsewise.metrics.perplexity import check_seqlen, max_positions, perplexity_from_ids

    assert max_positions(build_tiny("gpt2")) == 256  # n_positions
    model = build_tiny("llama")
    with pytest.raises(ConfigError, match=r"seqlen=512 exceeds the 256 positions.*max_position_embeddings=256"):
        perplexity_from_ids(model, torch.arange(2048) % 256, seqlen=512, progress=False)
    assert perplexity_from_ids(model, torch.arange(2048) % 256, seqlen=256, progress=False).n_windows == 8
    check_seqlen(torch.nn.Module(), 100_000)  # no config: nothing to check against


def test_cli_eval_and_prune_refuse_seqlen_beyond_positions(tiny_dir, eval_file, capsys, monkeypatch):
    assert main(["eval", str(tiny_dir), "--eval", str(eval_file), "--seqlen", "20000", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--seqlen=20000 exceeds the 256 positions" in err

    def no_prune(*args, **kwargs):
        raise AssertionError("pruned before the seqlen check")

    monkeypatch.setattr("sparsewise.oneshot.prune", no_prune)
    monkeypatch.setattr("sparsewise.data.calibration", no_prune)
    assert main(["prune", "--model", str(tiny_dir), "--eval", str(eval_file), "--eval-seqlen", "512", *SMALL]) == 2
    assert "--eval-seqlen=512 exceeds the 256 positions" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 4. Ctrl-C


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sparsewise.models.load_model", interrupt)
    assert main(["prune", *SMALL]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "sparsewise: interrupted; nothing written"
    assert "Traceback" not in err
    assert main(["eval", "smollm2-135m", "--eval", "x.txt"]) == 130
    assert "interrupted; nothing written" in capsys.readouterr().err


def test_ctrl_c_during_the_save_leaves_nothing_behind(tiny_dir, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupt)  # the checkpoint writer, mid-save
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--out", str(out), *SMALL]) == 130
    err = capsys.readouterr().err
    assert "interrupted while saving; nothing written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial copy


# ---------------------------------------------------------------------------------------------- 5. --dtype


def test_dtype_is_passed_to_save_and_the_summary_names_format_dtype_and_path(tiny_dir, tmp_path, capsys,
                                                                             monkeypatch):
    real_save = sparsewise.formats.save
    calls = []

    def recording_save(*args, **kwargs):
        calls.append(kwargs)
        if "dtype" not in inspect.signature(real_save).parameters:  # sw.save without dtype= yet
            kwargs.pop("dtype", None)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(sparsewise.formats, "save", recording_save)
    out = tmp_path / "half"
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--out", str(out),
                 "--dtype", "FP16", *SMALL]) == 0
    assert calls[-1]["dtype"] == "fp16"
    assert f"saved        {out.absolute()} (format sparsewise, fp16, " in capsys.readouterr().out

    dense = tmp_path / "dense"
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--out", str(dense),
                 "--save-format", "hf-dense", *SMALL]) == 0
    assert "dtype" not in calls[-1]  # not asked: the model's own dtype, said in the summary
    summary = capsys.readouterr().out
    assert f"saved        {dense.absolute()} (format hf-dense, fp32, " in summary and "MiB weights" in summary


def test_dtype_choices_and_recipe_validation(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--dtype", "int8"])
    with pytest.raises(ConfigError, match="dtype must be one of fp32, fp16, bf16"):
        PruneConfig(dtype="fp8").validate()


@pytest.mark.skipif("dtype" not in inspect.signature(sparsewise.formats.save).parameters,
                    reason="sparsewise.save has no dtype= yet")
def test_bf16_checkpoint_loads_in_bf16(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", "--out", str(out),
                 "--dtype", "bf16", *SMALL]) == 0
    assert "(format sparsewise, bf16," in capsys.readouterr().out
    model = sparsewise.formats.load(out)
    assert next(model.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- 6. help


def _prune_parser():
    return build_parser()._subparsers._group_actions[0].choices["prune"]


def test_prune_help_is_grouped_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for title in ("model:", "method:", "pattern:", "calibration:", "allocation:", "correction:", "output:", "run:"):
        assert f"\n{title}\n" in text, title
    assert text.count("  sparsewise prune ") >= 2 and "examples:" in text
    titles = {group.title for group in _prune_parser()._action_groups if group._group_actions}
    assert titles >= {"model", "method", "pattern", "calibration", "allocation", "correction", "output", "run"}


def test_prune_flags_and_defaults_unchanged():
    flags = {option for action in _prune_parser()._actions for option in action.option_strings} - {"-h", "--help"}
    before = {"--recipe", "--model", "--method", "--sparsity", "--pattern", "--calib", "--calib-n", "--calib-seqlen",
              "--self-n", "--self-seqlen", "--seed", "--eval", "--eval-seqlen", "--seqlen", "--max-windows",
              "--fidelity-n", "--fidelity-seqlen", "--sequential", "--resume-dir", "--option", "--allocation",
              "--allocation-option", "--refine", "--refine-option", "--reconstruct", "--reconstruct-option",
              "--include", "--exclude", "--device", "--batch-size", "--out", "--save-format", "--overwrite",
              "--no-progress"}
    assert flags == before | {"--dtype", "--all-experts"}
    defaults = vars(build_parser().parse_args(["prune"]))
    assert defaults.pop("command") == "prune" and defaults.pop("no_progress") is False
    assert all(value is None for value in defaults.values()), defaults  # the config's defaults apply


def test_name_choices_come_from_the_registries():
    from sparsewise.allocation import available_allocators
    from sparsewise.correction import available_refiners
    from sparsewise.methods import available_methods

    actions = {action.dest: action for action in _prune_parser()._actions}
    assert "tyr" in actions["allocation"].choices
    assert list(actions["allocation"].choices) == available_allocators()
    assert set(actions["method"].choices) == {*available_methods(), "armor"}
    assert list(actions["refine"].choices) == available_refiners()
    assert build_parser().parse_args(["prune", "--allocation", "TYR", "--method", "Wanda"]).allocation == "tyr"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--allocation", "nonsense"])


# ---------------------------------------------------------------------------------------------- 7. progress


def test_progress_without_a_terminal_prints_plain_lines(capsys, monkeypatch):
    from sparsewise.calibration import progress as progress_module
    from sparsewise.calibration.progress import PlainProgress, progress_bar

    with progress_bar(3, "wanda 2:4", unit="block", quiet_s=0) as bar:
        assert isinstance(bar, PlainProgress)  # capsys' stderr is not a TTY
        for _ in range(3):
            bar.update(1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "\r" not in "".join(lines)
    assert lines[0].startswith("wanda 2:4: block 1/3, ") and lines[0].endswith(" s left")
    assert lines[-1] == "wanda 2:4: block 3/3, 0 s"

    with progress_bar(100, "wanda 2:4", unit="block") as bar:  # work shorter than the quiet period: silent
        bar.update(100)
    assert capsys.readouterr().err == ""

    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    with progress_bar(1000, "self-generation", unit="token") as bar:  # a line per tenth, or per 30 s
        for _ in range(1000):
            clock[0] += 0.5
            bar.update(1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "self-generation: token 60/1,000, 30 s, ~470 s left"  # 30 s before the first tenth
    assert lines[-1] == "self-generation: token 1,000/1,000, 500 s"
    assert 10 <= len(lines) <= 30

    with progress_bar(3, "block", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_bar(capsys, monkeypatch):
    import sys

    from sparsewise.calibration.progress import PlainProgress, progress_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress_bar(2, "block")
    assert not isinstance(bar, PlainProgress) and hasattr(bar, "update")
    bar.close()


def test_perplexity_progress_shows_in_logs(capsys, monkeypatch):
    from conftest import build_tiny

    from sparsewise.calibration import progress as progress_module
    from sparsewise.metrics.perplexity import perplexity_from_ids

    monkeypatch.setattr(progress_module, "PLAIN_QUIET_S", 0.0)
    perplexity_from_ids(build_tiny("llama"), torch.arange(64) % 256, seqlen=16, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("perplexity (seqlen 16): window 1/4, ")
    assert lines[-1].startswith("perplexity (seqlen 16): window 4/4, ")


def test_job_prints_its_phases(tiny_dir, capsys):
    assert main(["prune", "--model", str(tiny_dir), "--method", "magnitude", *SMALL]) == 0
    out = capsys.readouterr().out
    for phase in ("loading ", "generating calibration text: 2 x 16 tokens", "measuring the dense model",
                  "pruning ", "measuring the pruned model"):
        assert phase in out, phase
