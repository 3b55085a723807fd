"""benchmarks/decode_hf.py end to end on a tiny LLaMA on the CPU: every code path, outputs agree."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_hf.py"


def _load():
    spec = importlib.util.spec_from_file_location("decode_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test (the GPU run is the benchmark itself)")
def test_decode_benchmark_tiny_runs_and_matches_the_reference(tmp_path):
    bench = _load()
    out = tmp_path / "decode.json"
    results = bench.main(["--tiny", "--layers", "1", "--modes", "2:4,2:4+act50", "--batches", "1,2",
                          "--prompt", "8", "--new", "4", "--repeats", "1", "--check", "5", "--calib-seqs", "2",
                          "--calib-len", "16", "--json-out", str(out)])
    assert not results["failed"]
    rows = {(row["mode"], row["batch"]): row for row in results["rows"]}
    assert set(rows) == {(mode, batch) for mode in ("dense", "2:4", "2:4+act50") for batch in (1, 2)}
    assert json.loads(out.read_text())["rows"]
    for (mode, batch), row in rows.items():
        assert row["tok_s"] > 0 and row["ratio_vs_dense"] > 0 and len(row["loop_ms"]) == 1
        if batch == 1 and mode != "dense":
            assert len(row["tokens"]) == 5
            # float32 on the CPU: the runtime's reference paths compute what cuBLAS + hooks did
            assert row["first_step_logits"]["max_abs_rel"] < 1e-4
            assert row["prefill_logits"]["l2_rel"] < 1e-4
            assert row["tokens_match"] == 1.0
    # 2:4 weights with activation sparsity are stored compressed (the 2:4 kernel's layout); plain 2:4
    # on the CPU stays dense where accelerate() measured the CSR kernel slower (tiny layers always are)
    assert rows[("2:4+act50", 1)]["block_weight_mib"] < 0.7 * rows[("dense", 1)]["block_weight_mib"]
    assert 0.4 < rows[("2:4+act50", 1)]["act_sparsity_measured"] < 0.6


def test_decoder_state_resets_to_the_same_generation():
    bench = _load()
    cfg = dict(bench.TINY, num_hidden_layers=1)
    model = bench.make_llama(cfg, torch.device("cpu"), torch.float32)
    prompt = torch.randint(0, cfg["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoder = bench.GreedyDecoder(model, prompt, 5, "eager")
        decoder.run(5)
        first = decoder.out.clone()
        decoder.run(5)
        assert torch.equal(decoder.out, first)
        # the same greedy tokens as transformers' own generate with a static cache
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(first, expected[:, 6:])


@pytest.mark.slow  # Inductor's C++ compile of one tiny layer: 45-100 s on 2 busy cores (cold cache 60 s of it)
def test_fused_step_gives_the_same_tokens():
    """--fuse: the step compiled by Inductor (C++ on the CPU) decodes exactly what the eager step does,
    in one graph, no graph break, no recompile per step; the sparse linears stay sparsewise custom ops."""
    from sparsewise.runtime.cpu_linear import CpuSparseLinear

    bench = _load()
    cfg = dict(bench.TINY, num_hidden_layers=1)
    model = bench.make_llama(cfg, torch.device("cpu"), torch.float32)
    bench.prune_blocks(model, "2:4")
    mlp = model.model.layers[0].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):  # opaque ops inside the compiled graph
        setattr(mlp, name, CpuSparseLinear.from_module(getattr(mlp, name)))
    prompt = torch.randint(0, cfg["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = bench.GreedyDecoder(model, prompt, 5, "eager")
        plain.run(5)
        expected = plain.out.clone()
        plain.close()
        fused = bench.GreedyDecoder(model, prompt, 5, "eager", fuse="default")
        assert fused.fuse_error is None, fused.fuse_error
        stats = fused.fuse_stats
        assert stats["graphs"] == 1 and stats["graph_breaks"] == 0 and stats["compile_s"] > 0
        for _ in range(2):
            fused.run(5)
            assert torch.equal(fused.out, expected)
        assert fused.recompiles() == 0
        fused.close()


def test_fuse_through_main_counts_graphs_and_matches_the_reference(tmp_path, monkeypatch):
    """--fuse end to end with Dynamo's real capture but its "eager" backend (Inductor's compile is the
    slow test above): one graph per (model, batch), no break, no recompile, the reference's tokens."""
    bench = _load()
    real_compile = torch.compile
    modes_seen = []

    def dynamo_only(fn, *, mode=None, dynamic=None, fullgraph=False):
        modes_seen.append(mode)
        return real_compile(fn, backend="eager", dynamic=dynamic, fullgraph=fullgraph)

    monkeypatch.setattr(torch, "compile", dynamo_only)
    results = bench.main(["--tiny", "--layers", "1", "--fuse", "--modes", "2:4+act50", "--batches", "1",
                          "--prompt", "8", "--new", "4", "--repeats", "1", "--check", "5", "--calib-seqs", "2",
                          "--calib-len", "16", "--json-out", str(tmp_path / "decode.json")])
    assert not results["failed"] and not results["notes"]
    assert results["fuse"] == "default" and "torch.compile(mode='default'" in results["settings"]
    assert modes_seen == ["default", "default"]  # dense and the sparse mode: the same setting
    for row in results["rows"]:
        assert row["fused"] and row["fuse_graphs"] == 1 and row["fuse_graph_breaks"] == 0
        assert row["fuse_recompiles"] == 0
    sparse = results["rows"][1]
    assert sparse["mode"] == "2:4+act50" and sparse["tokens_match"] == 1.0
    assert sparse["first_step_logits"]["max_abs_rel"] < 1e-4


def test_fuse_falls_back_to_the_uncompiled_step(monkeypatch):
    bench = _load()
    cfg = dict(bench.TINY, num_hidden_layers=1)
    model = bench.make_llama(cfg, torch.device("cpu"), torch.float32)
    prompt = torch.randint(0, cfg["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))

    def broken(fn, **_):
        def compiled():
            raise RuntimeError("no C++ compiler")
        return compiled

    with torch.no_grad():
        plain = bench.GreedyDecoder(model, prompt, 3, "eager")
        plain.run(3)
        monkeypatch.setattr(torch, "compile", broken)
        notes = []
        decoder = bench.make_decoder(model, prompt, 3, "eager", notes, fuse="default")
        assert decoder.fuse_error == "RuntimeError: no C++ compiler" and decoder.forward == decoder._forward
        assert len(notes) == 1 and "no C++ compiler" in notes[0]
        decoder.run(3)
        assert torch.equal(decoder.out, plain.out)
