"""Calibration in every common form, re-batched by each pass; memory checked ahead; data-path and
progress fixes (issue 17, "What a new user hit")."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import VOCAB, build_tiny

import sparsewise as sw
from sparsewise import data
from sparsewise.allocation import ecoflap
from sparsewise.calibration import engine, progress
from sparsewise.calibration.engine import InsufficientMemoryError, available_memory
from sparsewise.calibration.run import calibration_batches
from sparsewise.data import (
    CALIBRATION_FORMS,
    CalibrationBatches,
    CalibrationSet,
    DataFileNotFoundError,
    MissingDependencyError,
    as_calibration,
    looks_like_path,
    resolve_text,
)
from sparsewise.errors import ConfigError, DataError, SparsewiseError

N, SEQLEN = 16, 24


def _ids(n: int = N, seqlen: int = SEQLEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _masks(model, result) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach() != 0 for name in result.records}


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[name], right[name]) for name in left)


def _weights(model, result) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone() for name in result.records}


# ---------------------------------------------------------------- the normalizer


def test_every_accepted_form_normalizes_to_the_same_samples():
    ids = _ids()
    forms = {
        "tensor": ids,
        "int32 tensor": ids.int(),
        "list of 1-D tensors": list(ids),
        "list of 2-D tensors": list(ids.split(5)),
        "list of dicts": [{"input_ids": row[None]} for row in ids],
        "single dict": {"input_ids": ids},
        "tuple of dicts": tuple({"input_ids": part} for part in ids.split(3)),
        "generator of dicts": ({"input_ids": part} for part in ids.split(4)),
        "dict of lists": {"input_ids": ids.tolist()},
        "CalibrationSet": CalibrationSet(input_ids=ids, source="x"),
    }
    for label, form in forms.items():
        calib = as_calibration(form)
        assert isinstance(calib, CalibrationSet), label
        assert calib.n == N and calib.seqlen == SEQLEN, label
        assert torch.equal(calib.input_ids.long(), ids), label
    given = CalibrationSet(input_ids=ids)
    assert as_calibration(given) is given  # a set is used as it is
    one = as_calibration({"input_ids": ids[0], "attention_mask": torch.ones(SEQLEN, dtype=torch.long)})
    assert one.n == 1 and one.samples["attention_mask"].shape == (1, SEQLEN)  # a 1-D sample gets its sample dim


def test_tokenizer_batch_encoding_is_one_dict():
    from transformers import BatchEncoding

    ids = _ids()
    calib = as_calibration(BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    assert calib.n == N and set(calib.samples) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(("form", "words"), [
    ("c4.jsonl", "sw.data.calibration"),
    (42, "int"),
    (torch.randn(4, 8), "token ids"),
    (torch.zeros(2, 3, 4, dtype=torch.long), "shape"),
    ([], "empty"),
    ([[1, 2, 3]], "list"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}, torch.zeros(1, 4, dtype=torch.long)], "beside dicts"),
    ({"use_cache": False}, "without tensors"),
    ({"input_ids": [[1, 2], [3]]}, "rectangular"),
    (None, "None"),
])
def test_other_forms_get_a_clear_error(form, words):
    with pytest.raises(DataError, match=words) as info:
        as_calibration(form)
    if "sw.data.calibration" not in words:
        assert "Accepted forms" in str(info.value) or "empty" in str(info.value)


def test_prune_names_the_accepted_forms():
    with pytest.raises(DataError) as info:
        sw.prune(build_tiny("llama"), "wanda", 0.5, calibration=3.5, progress=False)
    assert CALIBRATION_FORMS in str(info.value)


def test_samples_of_different_lengths_stay_separate_batches():
    parts = [_ids(2, 16), _ids(3, 24)]
    calib = as_calibration(parts)
    assert isinstance(calib, CalibrationBatches) and calib.n == 5
    assert [batch["input_ids"].shape for batch in calib.batches(2)] == [(2, 16), (2, 24), (1, 24)]
    model = build_tiny("llama")
    result = sw.prune(model, "wanda", 0.5, calibration=parts, sequential="block", batch_size=2, progress=False)
    assert result.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ConfigError, match="different shapes.*sequential='block'"):
        sw.prune(build_tiny("llama"), "wanda", 0.5, calibration=parts, progress=False)


def test_calibration_batches_rebatch_any_form():
    ids = _ids()
    for form in (ids, {"input_ids": ids}, [{"input_ids": ids[:3]}, {"input_ids": ids[3:]}], list(ids)):
        assert [batch["input_ids"].shape[0] for batch in calibration_batches(form, 5)] == [5, 5, 5, 1]
        (whole,) = calibration_batches(form, None)
        assert torch.equal(whole["input_ids"], ids)


# ---------------------------------------------------------------- one pipeline, any form


def _prune(form, method, sequential, **options):
    model = build_tiny("llama")
    result = sw.prune(model, method, 0.5, calibration=form, sequential=sequential, batch_size=4, progress=False,
                      **options)
    return model, result


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", ["layer", "block"])
def test_one_dict_of_all_samples_prunes_like_separate_dicts(method, sequential):
    ids = _ids()
    reference_model, reference = _prune([{"input_ids": row[None]} for row in ids], method, sequential)
    expected = _weights(reference_model, reference)
    for form in ({"input_ids": ids}, ids):
        model, result = _prune(form, method, sequential)
        assert _same(_masks(model, result), _masks(reference_model, reference))
        for name, weight in _weights(model, result).items():
            assert torch.equal(weight, expected[name]), name
    assert result.calibration == {"source": "tensor", "n": N, "seqlen": SEQLEN}


def test_block_mode_runs_batches_of_batch_size():
    seen = []
    model = build_tiny("llama")
    model.model.layers[1].register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
    sw.prune(model, "wanda", 0.5, calibration={"input_ids": _ids()}, sequential="block", batch_size=4, progress=False)
    assert seen == [4, 4, 4, 4, 4, 4, 4, 4]  # statistics pass, then the pruned outputs: 16 samples in fours


def test_ecoflap_first_order_backward_runs_in_micro_batches(monkeypatch):
    sizes = []
    original = ecoflap._lm_loss

    def recording(model, batch, device):
        sizes.append(int(batch["input_ids"].shape[0]))
        return original(model, batch, device)

    monkeypatch.setattr(ecoflap, "_lm_loss", recording)
    ids = _ids()
    options = {"score": "first", "batch_size": 4}
    model, result = _prune([{"input_ids": ids}], "wanda", "layer", allocation="ecoflap", allocation_options=options)
    assert sizes == [4, 4, 4, 4]
    sizes.clear()
    separate_model, separate = _prune([{"input_ids": row[None]} for row in ids], "wanda", "layer",
                                      allocation="ecoflap", allocation_options=options)
    assert sizes == [4, 4, 4, 4]
    assert {name: record.sparsity for name, record in result.records.items()} == \
        {name: record.sparsity for name, record in separate.records.items()}
    assert _same(_masks(model, result), _masks(separate_model, separate))


def test_reconstruction_steps_on_micro_batches_of_one_dict(monkeypatch):
    from sparsewise.correction import reconstruct

    sizes = []
    original = reconstruct._output

    def recording(block, call):
        sizes.append(int(call.hidden_states.shape[0]))
        return original(block, call)

    monkeypatch.setattr(reconstruct, "_output", recording)
    ids = _ids()
    options = {"epochs": 1, "micro_batch": 4, "holdout": 0.25}
    model, result = _prune({"input_ids": ids}, "sparsegpt", "layer", reconstruct=options)
    assert sizes and max(sizes) == 4 and len(result.reconstruction) == 2
    separate_model, _ = _prune([{"input_ids": row[None]} for row in ids], "sparsegpt", "layer", reconstruct=options)
    for name, weight in _weights(model, result).items():
        assert torch.equal(weight, separate_model.get_submodule(name).weight.detach()), name


# ---------------------------------------------------------------- memory checked ahead


def test_available_memory_reads_the_system():
    psutil_free = available_memory("cpu")
    assert psutil_free is None or psutil_free > 0


def test_available_memory_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    free = available_memory(torch.device("cpu"))
    with open("/proc/meminfo", encoding="ascii") as handle:
        has_meminfo = any(line.startswith("MemAvailable:") for line in handle)
    assert (free is not None and free > 0) if has_meminfo else free is None


def test_block_walk_refused_when_hidden_states_cannot_fit(monkeypatch):
    # 16 samples x 24 tokens x hidden 64 x 4 bytes x 2 copies = 196,608 bytes
    monkeypatch.setattr(engine, "available_memory", lambda _device: 196_607)
    model = build_tiny("llama")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(InsufficientMemoryError, match=r"16 samples.*lower the number of calibration samples \(n\)"):
        sw.prune(model, "wanda", 0.5, calibration=_ids(), progress=False)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    with pytest.raises(InsufficientMemoryError, match="4 copies"):  # reconstruction holds a dense stream too
        monkeypatch.setattr(engine, "available_memory", lambda _device: 196_608)
        sw.prune(build_tiny("llama"), "wanda", 0.5, calibration=_ids(), reconstruct={"epochs": 1}, progress=False)
    result = sw.prune(build_tiny("llama"), "wanda", 0.5, calibration=_ids(), progress=False)  # just fits
    assert result.records
    monkeypatch.setattr(engine, "available_memory", lambda _device: None)  # unknown: nothing refused
    assert sw.prune(build_tiny("llama"), "wanda", 0.5, calibration=_ids(), progress=False).records


def test_ecoflap_refused_before_its_backward_when_it_cannot_fit(monkeypatch):
    monkeypatch.setattr(engine, "available_memory", lambda _device: 10 * 2**20)  # 10 MB
    calls = []
    monkeypatch.setattr(ecoflap, "_lm_loss", lambda *args: calls.append(args))
    ids = _ids(64, 128)  # 64 x 128 tokens x vocab 256 x 4 bytes x 2 = 16 MB of log-probabilities alone
    with pytest.raises(InsufficientMemoryError, match="ECoFLaP.*64 samples.*lower allocation_options batch_size"):
        sw.prune(build_tiny("llama"), "wanda", 0.5, calibration=ids, allocation="ecoflap",
                 allocation_options={"score": "first", "batch_size": 64}, progress=False)
    assert calls == []  # refused before any pass
    assert isinstance(InsufficientMemoryError("x"), (ConfigError, MemoryError))


# ---------------------------------------------------------------- path-looking strings


@pytest.mark.parametrize(("text", "path_like"), [
    ("path/with.typo", True), ("wiki.test.raw", True), ("c4.jsonl", True), ("data.parquet", True),
    ("./notes", True), ("~/corpus", True), ("/data/x", True), ("My Data/wiki.txt", True),
    ("and/or some words", False), ("The quick brown fox.", False), ("wikitext2", False),
    ("line one\nline two.txt", False), ("", False),
])
def test_looks_like_path(text, path_like):
    assert looks_like_path(text) is path_like


def test_missing_path_is_an_error_not_text(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="path/with.typo does not exist.*newline") as info:
        resolve_text("path/with.typo")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        resolve_text(str(tmp_path / "wiki.tset.raw"))
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        data.calibration("path/with.typo", None, n=1, seqlen=4)
    text = "the cat sat and/or lay on the mat"
    assert resolve_text(text) == (text, f"<text: {len(text)} chars>")
    assert resolve_text("path/with.typo\n")[0] == "path/with.typo\n"  # literal text: give it a newline
    real = tmp_path / "eval.txt"
    real.write_text("some evaluation text", encoding="utf-8")
    assert resolve_text(str(real)) == ("some evaluation text", str(real))


def test_dataset_names_stay_allowed(monkeypatch):
    monkeypatch.setattr(data, "_hub_rows", lambda name, split: [f"{name} {split} row", "second"])
    assert resolve_text("wikitext2") == ("wikitext2 test row\n\nsecond", "wikitext2")


def test_perplexity_refuses_a_missing_path():
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(ch) % VOCAB for ch in text]}

    with pytest.raises(DataFileNotFoundError):
        sw.evaluate.perplexity(build_tiny("llama"), Tok(), "path/with.typo", seqlen=4, progress=False)


# ---------------------------------------------------------------- parquet without pyarrow


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "calib.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(MissingDependencyError, match=r"pip install pyarrow.*sparsewise\[data\]") as info:
        data.calibration(str(path), None, n=1, seqlen=4)
    # the CLI prints SparsewiseErrors as one line; old callers catching ImportError still do
    assert isinstance(info.value, SparsewiseError) and isinstance(info.value, ImportError)
    with pytest.raises(MissingDependencyError):
        data.read_text(path)


# ---------------------------------------------------------------- progress in logs


class _Tok:
    bos_token_id = 1
    eos_token_id = 2


def test_self_generation_prints_progress_lines_when_not_a_tty(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_QUIET_S", 0.0)
    model = build_tiny("llama")
    calib = data.calibration("self", _Tok(), n=4, seqlen=6, seed=0, model=model, batch_size=2, progress=True)
    assert calib.n == 4
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("self-generating")]
    assert len(lines) >= 5  # a line per tenth of the tokens, at least
    assert "self-generating calibration: 0/4 samples" in lines[0] and lines[0].endswith(" s left")  # with an ETA
    assert "2/4 samples (50% of 20 tokens)" in "\n".join(lines)
    assert lines[-1].startswith("self-generating calibration: 4/4 samples (100% of 20 tokens), ")


def test_progress_lines_quiet_for_short_work_and_when_disabled(capsys):
    model = build_tiny("llama")
    data.calibration("self", _Tok(), n=2, seqlen=4, model=model, progress=True)  # well under 5 s
    data.calibration("self", _Tok(), n=2, seqlen=4, model=model, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_lines_every_30_seconds(capsys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with data._progress(1000, "bar", True, label="work") as bar:
        for _ in range(3):  # 0.3% of the work per minute: only the 30 s rule prints
            clock[0] += 60
            bar.update(1)
        clock[0] += 1
        bar.update(997)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["work: 1/1,000, 60 s, ~59940 s left", "work: 2/1,000, 120 s, ~59880 s left",
                     "work: 3/1,000, 180 s, ~59820 s left", "work: 1,000/1,000, 181 s"]
