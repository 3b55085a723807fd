"""One typed config (issue 17, structure 3): the PruneConfig fields are the `sparsewise prune` flags,
the recipe keys and (the non-job ones) the keywords of sw.prune; name choices come from the
registries; every setting is checked once, before any work, with the messages users know."""

from __future__ import annotations

import inspect
import re
from typing import ClassVar

import pytest
import torch
import yaml
from conftest import VOCAB, build_tiny

import sparsewise as sw
import sparsewise.config
from sparsewise.cli import build_parser, config_from_args, main
from sparsewise.config import GROUPS, PruneConfig, ValidConfig
from sparsewise.errors import ConfigError
from sparsewise.methods import Capabilities, Method, get_method, register
from sparsewise.methods.base import _METHODS

CLI_ONLY = {"recipe", "no_progress", "help"}  # flags of the command itself, not settings


def _prune_parser():
    return build_parser()._subparsers._group_actions[0].choices["prune"]


def _actions() -> dict:
    return {action.dest: action for action in _prune_parser()._actions if action.dest not in CLI_ONLY}


def _calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- fields = flags


def test_every_field_is_a_flag_and_every_flag_a_field():
    actions, options = _actions(), {option.name: option for option in PruneConfig.options()}
    assert set(actions) == set(options) == set(PruneConfig.field_names())
    group_of = {action.dest: group.title for group in _prune_parser()._action_groups for action in group._group_actions}
    for name, option in options.items():
        action = actions[name]
        assert tuple(action.option_strings) == option.flags, name
        assert group_of[name] == option.spec.group, name
        assert action.default is None, name  # only flags given override a recipe
        if option.form == "value" and option.spec.shown_default is None and option.default is not None:
            assert f"(default {option.default}" in action.help, name  # the config's default, shown
        if option.spec.shown_default is not None:
            assert option.spec.shown_default in action.help, name
    titles = [group.title for group in _prune_parser()._action_groups if group._group_actions]
    assert titles == ["options", *GROUPS]  # --help lists the groups in the declared order


def test_no_flags_give_the_configs_defaults():
    assert config_from_args(build_parser().parse_args(["prune"])) == PruneConfig()


def test_prune_keywords_are_the_configs_non_job_fields():
    keywords = set(inspect.signature(sw.prune).parameters) - {"model", "calibration", "blocks", "progress", "config"}
    fields = {option.name for option in PruneConfig.options() if not option.spec.job}
    assert keywords == fields - {"reconstruct_options"}  # prune(reconstruct=...) takes True or the options dict
    # a job field is no prune keyword and vice versa
    assert not keywords & {option.name for option in PruneConfig.options() if option.spec.job}


def test_name_choices_are_the_registries_names():
    from sparsewise.allocation import available_allocators
    from sparsewise.calibration.engine import SEQUENTIAL_MODES
    from sparsewise.correction import available_refiners
    from sparsewise.formats.checkpoint import FORMATS
    from sparsewise.methods import available_methods

    actions = _actions()
    expected = {"method": available_methods(), "allocation": available_allocators(), "refine": available_refiners(),
                "sequential": list(SEQUENTIAL_MODES), "save_format": list(FORMATS),
                "dtype": list(sparsewise.config.SAVE_DTYPES)}
    assert {name for name, action in actions.items() if action.choices is not None} == set(expected)
    for name, names in expected.items():
        assert list(actions[name].choices) == names, name


class _Halving(Method):
    """A throwaway method: keeps every other weight of each row."""

    name: ClassVar[str] = "halving-test"
    capabilities: ClassVar[Capabilities] = Capabilities(patterns=frozenset({"unstructured"}))

    def prune_layer(self, task):
        raise AssertionError("not run here")


def test_a_registered_method_shows_up_in_the_help_and_goes_with_it(capsys):
    register(_Halving)
    try:
        with pytest.raises(SystemExit):
            main(["prune", "--help"])
        method_help = capsys.readouterr().out.split("\n  --method NAME", 1)[1].split("\n  --option", 1)[0]
        assert "halving-test" in method_help
        assert "halving-test" in _actions()["method"].choices
        assert build_parser().parse_args(["prune", "--method", "Halving-Test"]).method == "halving-test"
        assert isinstance(PruneConfig(method="halving-test").parse().method, _Halving)
    finally:
        _METHODS.unregister(_Halving.name)
    assert "halving-test" not in _actions()["method"].choices
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--method", "halving-test"])
    with pytest.raises(ConfigError, match="unknown pruning method 'halving-test'"):
        PruneConfig(method="halving-test").validate()


# ---------------------------------------------------------------------------------------------- recipe = flags

# one non-default value for every field: a new field must be added here, as a recipe key and a flag
RECIPE = {
    "model": "tiny-dir", "include": ["self_attn", "mlp"], "exclude": ["down_proj"],
    "method": "sparsegpt", "method_options": {"damp_ratio": 0.1, "block_size": 64},
    "sparsity": 0.6, "pattern": "unstructured:layer",
    "calib": "c4.jsonl", "calib_n": 16, "calib_seqlen": 64, "self_n": 4, "self_seqlen": 32, "batch_size": 2, "all_experts": True,
    "sequential": "block",
    "allocation": "owl", "allocation_options": {"lam": 0.08, "m": 5},
    "refine": "dsnot", "refine_options": {"skip_modules": ["mlp"]},
    "reconstruct": True, "reconstruct_options": {"epochs": 2, "lr": 0.0003},
    "eval": "wiki.test.raw", "eval_seqlen": 128, "max_windows": 0, "fidelity_n": 2, "fidelity_seqlen": 16,
    "out": "pruned", "save_format": "hf-dense", "dtype": "bf16", "overwrite": True,
    "device": "cpu", "seed": 3, "resume_dir": "progress",
}
FLAGS = [
    "--model", "tiny-dir", "--include", "self_attn", "mlp", "--exclude", "down_proj",
    "--method", "SparseGPT", "--option", "damp_ratio=0.1", "--option", "block_size=64",
    "--sparsity", "0.6", "--pattern", "unstructured:layer",
    "--calib", "c4.jsonl", "--calib-n", "16", "--calib-seqlen", "64", "--self-n", "4", "--self-seqlen", "32",
    "--batch-size", "2", "--all-experts", "--sequential", "block",
    "--allocation", "owl", "--allocation-option", "lam=0.08", "--allocation-option", "m=5",
    "--refine", "dsnot", "--refine-option", "skip_modules=[mlp]",
    "--reconstruct", "--reconstruct-option", "epochs=2", "--reconstruct-option", "lr=0.0003",
    "--eval", "wiki.test.raw", "--seqlen", "128", "--max-windows", "0", "--fidelity-n", "2", "--fidelity-seqlen", "16",
    "--out", "pruned", "--save-format", "hf-dense", "--dtype", "BF16", "--overwrite",
    "--device", "cpu", "--seed", "3", "--resume-dir", "progress",
]


def test_a_recipe_and_the_same_flags_make_equal_configs(tmp_path):
    assert set(RECIPE) == set(PruneConfig.field_names())
    defaults = PruneConfig()
    assert all(getattr(defaults, name) != value for name, value in RECIPE.items()), "every value differs"
    recipe = tmp_path / "recipe.yaml"
    # dashes or underscores in the keys
    recipe.write_text(yaml.safe_dump({key.replace("_", "-") if index % 2 else key: value
                                      for index, (key, value) in enumerate(RECIPE.items())}))
    from_recipe = PruneConfig.from_yaml(recipe)
    from_flags = config_from_args(build_parser().parse_args(["prune", *FLAGS]))
    assert from_recipe == PruneConfig(**RECIPE)
    assert from_flags.method == "sparsegpt" and from_flags.dtype == "bf16"  # names read as the registries spell them
    assert from_flags == from_recipe
    assert config_from_args(build_parser().parse_args(["prune", "--recipe", str(recipe)])) == from_recipe
    parsed_recipe, parsed_flags = from_recipe.parse(), from_flags.parse()
    assert parsed_recipe.config == parsed_flags.config and parsed_recipe.config.max_windows is None  # 0 = all
    assert parsed_recipe.sparsity == parsed_flags.sparsity == 0.6


def test_flags_on_top_of_a_recipe_add_to_its_option_dicts(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: sparsegpt\nmethod_options: {damp_ratio: 0.1}\nsparsity: 0.6\n")
    config = config_from_args(build_parser().parse_args(
        ["prune", "--recipe", str(recipe), "--option", "block_size=64", "--sparsity", "0.7"]))
    assert config.method_options == {"damp_ratio": 0.1, "block_size": 64} and config.sparsity == 0.7


def test_strings_are_read_as_the_command_line_reads_them():
    valid = PruneConfig(method=" Wanda", sequential="BLOCK", batch_size="4", sparsity="0.25", dtype="FP16").parse()
    config = valid.config
    assert (config.method, config.sequential, config.batch_size, config.sparsity, config.dtype) == (
        "wanda", "block", 4, 0.25, "fp16")
    assert valid.sparsity == 0.25 and valid.method.name == "wanda"
    with pytest.raises(ConfigError, match="batch_size must be an integer, got 'four'"):
        PruneConfig(batch_size="four").validate()


# ---------------------------------------------------------------------------------------------- checked once

# (settings, the message users already know); each refused by the config, the CLI and sw.prune alike
REFUSED = [
    ({"sparsity": 1.5}, "sparsity must be in [0, 1)"),
    ({"pattern": "3:2"}, "0 < N < M"),
    ({"method": "armor"}, "takes patterns 2:4, not unstructured: pass --pattern 2:4"),
    ({"method": "armor", "pattern": "2:4", "allocation": "owl"}, "walks the whole model itself"),
    ({"method": "sparsegpt", "pattern": "unstructured:global"}, "does not rank with scope 'global'"),
    ({"pattern": "2:5", "sparsity": 0.5}, "fixes sparsity at 0.6"),
    ({"pattern": "2:4", "allocation": "owl"}, "fixes every layer's sparsity"),
    ({"pattern": "unstructured:global", "method": "magnitude", "allocation": "er"}, "a global ranking already"),
    ({"pattern": "2:4,1:4"}, "need an allocation"),
    ({"pattern": "2:4,4:8", "allocation": "owl"}, "different sparsities"),
    ({"pattern": "2:4,1:4", "sparsity": 0.9, "allocation": "owl"}, "outside the mixed choices' range"),
    ({"allocation_options": {"lam": 0.1}}, "allocation_options given without an allocation"),
    ({"refine_options": {"threshold": 0.1}}, "refine_options given without refine"),
    ({"refine": "dsnot", "refine_options": {"max_cycles": -1}}, "dsnot max_cycles must be an integer >= 0"),
    ({"method": "magnitude", "reconstruct": True}, "reconstruct refits blocks on calibration data"),
    ({"reconstruct": True, "reconstruct_options": {"epochz": 2}}, "unknown reconstruct option"),
    ({"sequential": "both"}, "sequential must be one of layer, block, got 'both'"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
]


def _argv(settings: dict) -> list[str]:
    """The flags of ``settings``, written the way a person would (from the fields' declared flags)."""
    options = {option.name: option for option in PruneConfig.options()}
    argv = ["prune"]
    for name, value in settings.items():
        flag = options[name].flags[0]
        if options[name].form == "switch":
            argv += [flag] if value else []
        elif options[name].form == "pairs":
            for key, item in value.items():
                argv += [flag, f"{key}={item}"]
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize(("settings", "message"), REFUSED, ids=[message[:30] for _, message in REFUSED])
def test_invalid_settings_are_refused_once_before_any_work(settings, message, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=re.escape(message)):
        PruneConfig(**settings).validate()

    parses = []
    real_parse = PruneConfig.parse
    monkeypatch.setattr(PruneConfig, "parse", lambda self, *args, **kwargs: parses.append(1) or
                        real_parse(self, *args, **kwargs))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("sparsewise.models.load_model", refuse)
    if settings.get("sequential") == "both":  # a name outside the flag's choices: argparse refuses it first
        with pytest.raises(SystemExit, match="2"):
            main(_argv(settings))
        assert "invalid choice: 'both'" in capsys.readouterr().err and not parses
    else:
        assert main(_argv(settings)) == 2
        err = capsys.readouterr().err
        assert err.startswith("sparsewise: error: ") and message in err and len(parses) == 1

    model = build_tiny("llama")
    before = {name: param.clone() for name, param in model.named_parameters()}
    keywords = dict(settings)
    if "reconstruct_options" in keywords:  # sw.prune takes the options as reconstruct=
        keywords["reconstruct"] = keywords.pop("reconstruct_options")
    parses.clear()
    with pytest.raises(ConfigError, match=re.escape(message)):
        sw.prune(model, calibration=_calibration(), progress=False, **keywords)
    assert len(parses) == 1
    assert all(torch.equal(before[name], param) for name, param in model.named_parameters())


def test_the_model_dependent_checks_stay_in_prune():
    model = build_tiny("llama")
    with pytest.raises(ConfigError, match="divisible by M=3"):  # hidden 64: 1:3 does not tile
        sw.prune(model, "magnitude", None, pattern="1:3", progress=False)
    with pytest.raises(ConfigError, match="needs calibration data"):
        sw.prune(model, "wanda", 0.5, progress=False)
    with pytest.raises(ConfigError, match="walks the whole model itself"):  # blocks is no config field
        sw.prune(model, method="armor", pattern="2:4", calibration=_calibration(), blocks=["model.layers"])


def test_keywords_and_a_config_prune_the_same_masks():
    calib = _calibration()
    by_keywords = sw.prune(build_tiny("llama"), "sparsegpt", 0.6, pattern="unstructured", calibration=calib,
                           allocation="erk", method_options={"block_size": 32}, seed=1, progress=False)
    config = PruneConfig(method="sparsegpt", sparsity=0.6, allocation="erk", method_options={"block_size": 32}, seed=1)
    by_config = sw.prune(build_tiny("llama"), calibration=calib, config=config, progress=False)
    by_valid = sw.prune(build_tiny("llama"), calibration=calib, config=config.parse(), progress=False)
    for result in (by_config, by_valid):
        assert result.allocation == by_keywords.allocation and result.sparsity == by_keywords.sparsity
        for name, record in by_keywords.records.items():
            assert torch.equal(result.records[name].mask, record.mask), name
            assert result.records[name].sparsity == record.sparsity


def test_prune_runs_on_a_parsed_config_without_parsing_again(monkeypatch):
    valid = PruneConfig(method="wanda", pattern="2:4").parse()
    assert isinstance(valid, ValidConfig) and valid.sparsity == 0.5 and str(valid.pattern) == "2:4"
    assert valid.method.name == "wanda" and valid.needs == get_method("wanda").needs
    monkeypatch.setattr(PruneConfig, "parse", lambda *args, **kwargs: pytest.fail("parsed twice"))
    result = sw.prune(build_tiny("llama"), calibration=_calibration(), config=valid, progress=False)
    assert result.pattern == "2:4" and result.achieved_sparsity == 0.5


def test_sparsity_none_keeps_its_meaning_per_entry():
    # the recipe/CLI: not given = the default ratio, or the N:M pattern's implied one
    assert PruneConfig(pattern="unstructured").parse().sparsity == sparsewise.config.DEFAULT_SPARSITY
    assert PruneConfig(pattern="1:4").parse().sparsity == 0.75
    # sw.prune: None only goes with a pattern that implies a ratio
    with pytest.raises(ConfigError, match="needs a sparsity ratio"):
        sw.prune(build_tiny("llama"), "magnitude", None, progress=False)
    with pytest.raises(ConfigError, match="need the global sparsity"):
        sw.prune(build_tiny("llama"), "magnitude", None, pattern="2:4,1:4", allocation="er", progress=False)


def test_a_job_parses_its_config_once(tmp_path, smollm2, monkeypatch, capsys):
    """The CLI job parses before loading the model; sw.prune then runs on that ValidConfig."""
    import transformers as tf

    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    parses, seen = [], []
    real_parse = PruneConfig.parse
    monkeypatch.setattr(PruneConfig, "parse", lambda self, *args, **kwargs: parses.append(1) or
                        real_parse(self, *args, **kwargs))
    real_prune = sw.prune
    monkeypatch.setattr("sparsewise.oneshot.prune", lambda *args, **kwargs: seen.append(kwargs.get("config")) or
                        real_prune(*args, **kwargs))
    assert main(["prune", "--model", str(tmp_path), "--method", "Magnitude", "--pattern", "1:4", "--self-n", "2",
                 "--self-seqlen", "16", "--fidelity-n", "1", "--fidelity-seqlen", "16", "--no-progress"]) == 0
    assert "magnitude 1:4 at 75%" in capsys.readouterr().out
    assert len(parses) == 1 and isinstance(seen[0], ValidConfig) and seen[0].config.method == "magnitude"
