"""sparsewise.metrics: perplexity protocol, fidelity probe, sparsity report."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from conftest import SHARED_DATA, WIKITEXT_TEST, build_tiny, requires_data
from torch import nn

from sparsewise.data import read_text
from sparsewise.errors import DataError
from sparsewise.metrics import (
    FidelityProbe,
    kl_and_agreement,
    perplexity,
    perplexity_from_ids,
    sparsity_report,
)
from sparsewise.metrics.perplexity import window_indices
from sparsewise.patterns import nm_mask
from sparsewise.records import LayerRecord, set_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BASELINE = SHARED_DATA / "baselines" / "smollm2_135m_q4_1_wt2_test_seqlen2048.json"


class CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(ch) % 256 for ch in text]}


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


# ---------------------------------------------------------------- perplexity


def test_window_indices_evenly_spaced():
    chosen = window_indices(595, 32)
    assert len(chosen) == 32 and chosen[:3] == [0, 18, 36] and chosen[-1] == 31 * 18
    assert window_indices(10, None) == list(range(10)) and window_indices(10, 50) == list(range(10))


def test_perplexity_matches_hand_computation(llama):
    text = "The quick brown fox jumps over the lazy dog. " * 12  # 540 chars -> 8 windows of 64, tail dropped
    result = perplexity(llama, CharTokenizer(), text, seqlen=64, max_windows=3, batch_size=2, progress=False)
    ids = torch.tensor([ord(ch) % 256 for ch in text])
    assert result.total_windows == 8 and result.tokens == 540 and result.window_indices == [0, 2, 4]
    expected = []
    with torch.no_grad():
        for index in (0, 2, 4):
            window = ids[index * 64 : (index + 1) * 64]
            logprobs = torch.log_softmax(llama(input_ids=window[None]).logits[0].double(), dim=-1)
            expected.append(float(-logprobs[torch.arange(63), window[1:]].mean()))
    assert result.window_nll == pytest.approx(expected, abs=1e-5)
    assert result.mean_nll == pytest.approx(sum(expected) / 3, abs=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(expected) / 3), rel=1e-5)
    unbatched = perplexity(llama, CharTokenizer(), text, seqlen=64, max_windows=3, batch_size=1, progress=False)
    assert unbatched.window_nll == pytest.approx(result.window_nll, abs=1e-5)


def test_perplexity_reads_files(tmp_path, llama):
    lines = [" ", " = Title = ", " ", " some words here and there . " * 6, " "]
    path = tmp_path / "wiki.test.raw"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from_file = perplexity(llama, CharTokenizer(), str(path), seqlen=32, max_windows=2, progress=False)
    from_text = perplexity(llama, CharTokenizer(), read_text(path), seqlen=32, max_windows=2, progress=False)
    assert from_file.window_nll == from_text.window_nll and from_file.source == str(path)


def test_perplexity_errors(llama):
    with pytest.raises(DataError, match="10 tokens.*seqlen=64"):
        perplexity(llama, CharTokenizer(), "x" * 10, seqlen=64)
    with pytest.raises(DataError, match="missing/wiki.test.raw"):
        perplexity(llama, CharTokenizer(), "missing/wiki.test.raw")
    with pytest.raises(DataError, match="one token stream"):
        perplexity_from_ids(llama, torch.zeros(2, 100, dtype=torch.long), seqlen=10)


@pytest.mark.slow
@requires_data(WIKITEXT_TEST)
@requires_data(BASELINE)
def test_smollm2_first_windows_match_baseline(smollm2):
    model, tokenizer = smollm2
    baseline = json.loads(BASELINE.read_text())
    from sparsewise.data import _encode

    ids = _encode(tokenizer, read_text(WIKITEXT_TEST))
    assert len(ids) == baseline["tokens"]
    result = perplexity_from_ids(model, torch.tensor(ids[: 2 * 2048]), seqlen=2048, progress=False)
    assert result.window_nll == pytest.approx(baseline["window_nll"][:2], abs=1e-3)


# ---------------------------------------------------------------- fidelity


def test_kl_and_agreement_by_hand():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    other = torch.log(torch.tensor([[0.25, 0.75], [0.8, 0.2]]))
    kl, agree = kl_and_agreement(ref, other)
    expected = [0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.5)]
    assert kl.tolist() == pytest.approx(expected, abs=1e-6)
    assert agree.tolist() == [False, True]  # a tie goes to the first index
    with pytest.raises(DataError):
        kl_and_agreement(ref, other[:1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fidelity_identical_and_perturbed(llama, dtype):
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    probe = FidelityProbe.capture(llama, ids, batch_size=2, dtype=dtype)
    same = probe.compare(llama)
    assert same.tokens == 48 and same.top1_agreement == 1.0 and same.kl == pytest.approx(0.0, abs=1e-6)
    perturbed = copy.deepcopy(llama)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    changed = probe.compare(perturbed)
    assert changed.kl > 1e-3 and changed.top1_agreement < 1.0


# ---------------------------------------------------------------- sparsity report


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 4, bias=False)
        self.down = nn.Linear(8, 2, bias=False)


def test_sparsity_report_exact_counts_and_nm_violation():
    model = TwoLinears()
    with torch.no_grad():
        model.up.weight.copy_(nm_mask(torch.randn(4, 8), 2, 4).float() * 3.0)  # valid 2:4, 16 zeros
        down = torch.ones(2, 8)
        down[0, :2] = 0  # row 0 group 0 keeps 2 of 4: fine
        down[1, 4] = 0  # row 1 group 1 keeps 3 of 4: violates 2:4
        model.down.weight.copy_(down)
    records = {
        "up": LayerRecord("up", "2:4", 0.5, 0.5, "magnitude", (4, 8)),
        "down": LayerRecord("down", "2:4", 0.5, 0.5, "magnitude", (2, 8)),
    }
    report = sparsity_report(model, records=records)
    rows = {row.name: row for row in report.rows}
    assert (rows["up"].params, rows["up"].zeros, rows["up"].sparsity, rows["up"].pattern_ok) == (32, 16, 0.5, True)
    assert (rows["down"].params, rows["down"].zeros, rows["down"].pattern_ok) == (16, 3, False)
    assert report.params == 48 and report.zeros == 19 and not report.all_patterns_ok
    table = report.table()
    assert "VIOLATE" in table and "down" in table and "total: 2 layers" in table
    assert json.loads(json.dumps(report.to_json()))["zeros"] == 19
    set_records(model, records)  # records attached to the model are picked up by default
    assert sparsity_report(model).zeros == 19


def test_sparsity_report_adapter_layers_and_conv1d():
    model = build_tiny("llama")
    report = sparsity_report(model)
    assert len(report.rows) == 14 and report.all_patterns_ok  # 7 linears x 2 blocks, lm_head excluded
    assert all(row.pattern == "-" for row in report.rows)
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[:, :10] = 0
    after = sparsity_report(model)
    assert report.zeros == 0  # random normal init holds no exact zeros
    assert after.zeros == 10 * q_proj.weight.shape[0] and after.rows[0].sparsity == pytest.approx(10 / 64)
    assert after.by_type()["q_proj"]["zeros"] == after.rows[0].zeros
    assert "q_proj" in after.table(max_rows=3) and "more layers" in after.table(max_rows=3)

    gpt2 = build_tiny("gpt2")
    name = "transformer.h.0.attn.c_attn"  # Conv1D: weight stored [in=64, out=192]
    module = gpt2.get_submodule(name)
    with torch.no_grad():
        module.weight.copy_((nm_mask(torch.randn(192, 64), 2, 4).float() * module.weight.T).T)
    records = {name: LayerRecord(name, "2:4", 0.5, 0.5, "wanda", (192, 64))}
    row = sparsity_report(gpt2, records=records).rows[0]
    assert row.shape == (192, 64) and row.pattern_ok and row.zeros >= 192 * 32
