"""The sparse runtime: SparseLinear, accelerate(), the dispatch table (CPU), and its GPU backends."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, build_tiny

import sparsewise as sw
from sparsewise.patterns import nm_mask, unstructured_mask
from sparsewise.runtime import SparseLinear, accelerate, dispatch, weight_kind
from sparsewise.runtime.cpu_linear import CpuSparseLinear


def _pruned_linear(n, k, pattern, bias=True, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        score = linear.weight.abs()
        mask = nm_mask(score, 2, 4) if pattern == "2:4" else unstructured_mask(score, 0.6)
        linear.weight.mul_(mask)
    return linear.to(device, dtype)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparse_linear_on_cpu_equals_dense_linear(pattern):
    linear = _pruned_linear(24, 96, pattern)
    sparse = SparseLinear.from_linear(linear)
    assert sparse.kind == ("24" if pattern == "2:4" else "bitmask")
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(sparse(x), linear(x))
    assert sparse.choice(10)["backend"] == "decompress"  # CPU: the PyTorch reference
    assert sparse.weight_nbytes < linear.weight.numel() * 4 * 0.7


def test_sparse_linear_rejects_bad_input():
    from sparsewise.errors import PatternError

    linear = _pruned_linear(8, 32, "2:4")
    sparse = SparseLinear.from_linear(linear)
    with pytest.raises(ValueError, match="expects inputs with 32 features"):
        sparse(torch.randn(3, 31))
    broken = _pruned_linear(8, 32, "2:4")
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    with pytest.raises(PatternError, match="NaN"):
        SparseLinear.from_linear(broken)


def test_weight_kind():
    assert weight_kind(_pruned_linear(8, 32, "2:4").weight) == "24"
    assert weight_kind(_pruned_linear(8, 32, "unstructured").weight) == "bitmask"


def _prune_tiny(pattern="2:4", family="llama"):
    model = build_tiny(family)
    generator = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, VOCAB, (2, 32), generator=generator)}]
    sw.prune(model, method="magnitude", sparsity=0.5 if pattern == "unstructured" else None,
             pattern=pattern, calibration=calib, progress=False)
    return model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_accelerate_swaps_pruned_linears_and_generate_is_unchanged(family):
    model = _prune_tiny(family=family)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = model(prompt).logits
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    pruned = [name for name, layer in model.named_modules()
              if type(layer) is torch.nn.Linear and float((layer.weight == 0).float().mean()) >= 0.4]
    report = accelerate(model, rows=None)  # CPU model: every pruned layer to the CSR kernel, untimed
    assert sorted(report.swapped) == sorted(pruned) and report.swapped
    assert all(isinstance(model.get_submodule(name), CpuSparseLinear) for name in report.swapped)
    assert 0.5 < report.memory_ratio < 0.85  # fp32 values + int16 columns of half the weights: 0.75x
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, expected_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)


def test_accelerate_leaves_dense_and_tied_layers():
    model = build_tiny("llama")  # nothing pruned, lm_head tied to the embeddings
    report = accelerate(model)
    assert report.swapped == []
    assert "lm_head" in report.skipped
    with pytest.raises(ValueError, match="min_sparsity"):
        accelerate(model, min_sparsity=1.5)


def test_load_can_return_the_accelerated_model(tmp_path):
    model = _prune_tiny("unstructured")
    sw.save(model, tmp_path / "ckpt")
    loaded = sw.load(tmp_path / "ckpt", accelerate={"rows": None})
    assert any(isinstance(module, CpuSparseLinear) for module in loaded.modules())
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits, rtol=1e-4, atol=1e-4)


def test_dispatch_table_round_trip_and_damaged_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    table = dispatch.DispatchTable("Some GPU/1")
    key = dispatch.shape_key("24", 4096, 4096, torch.float16)
    table.put(key, 8, {"backend": "gemv", "config": [8, 2, 4, 1]})
    table.save()
    again = dispatch.DispatchTable("Some GPU/1")
    assert again.get(key, 5) == {"backend": "gemv", "config": [8, 2, 4, 1]}  # 5 rows -> bucket 8
    assert again.get(key, 9) is None
    assert json.loads(again.path.read_text())["device"] == "Some GPU/1"
    again.path.write_text("{not json")
    assert dispatch.DispatchTable("Some GPU/1").entries == {}
    assert [dispatch.bucket(r) for r in (1, 3, 64, 65, 9000)] == [1, 4, 64, 128, 8192]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_every_gpu_backend_matches_float64(dtype, pattern):
    from sparsewise.runtime.accelerate import _candidates

    linear = _pruned_linear(512, 1024, pattern, dtype=dtype, device="cuda")
    sparse = SparseLinear.from_linear(linear, cusparselt=True)
    assert (sparse.cslt is not None) == (pattern == "2:4")
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    wrong = []
    for rows in (1, 3, 8, 64, 100, 2048):
        x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
        ref = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
        for choice in _candidates(sparse, rows):
            for repeat in range(2):  # twice: split-K counters must be back at zero after a call
                out = sparse.run(x, choice)
                error = ((out.double() - ref).norm() / ref.norm()).item()
                if out.shape != (rows, 512) or not error < tolerance:
                    wrong.append((rows, repeat, choice, error))
    assert not wrong, wrong


@cuda
@pytest.mark.gpu
def test_accelerated_model_on_gpu_generates_like_the_masked_model_and_graph_captures():
    model = _prune_tiny().to("cuda", torch.float16)
    prompt = torch.randint(0, VOCAB, (2, 6), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
        logits = model(prompt).logits.float()
    report = accelerate(model, rows=None)  # every pruned layer sparse, whatever the timing
    assert len(report.swapped) == 14
    with torch.no_grad():
        got = model(prompt).logits.float()
        assert ((got - logits).norm() / logits.norm()).item() < 2e-3
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
    layer = next(module for module in model.modules() if isinstance(module, SparseLinear))
    x = torch.randn(1, layer.in_features, device="cuda", dtype=torch.float16)
    layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, layer(x))


def test_sparse_linear_buffers_move_cast_copy_and_state_dict():
    import copy

    linear = _pruned_linear(16, 64, "2:4")
    sparse = SparseLinear.from_linear(linear)
    assert {"values", "meta", "bias"} <= set(sparse.state_dict())
    x = torch.randn(3, 64)
    twin = copy.deepcopy(sparse)
    with torch.no_grad():
        twin.bias.add_(1.0)
    torch.testing.assert_close(twin(x), sparse(x) + 1.0)  # the copy computes with its own tensors
    half = copy.deepcopy(sparse).to(torch.float64)
    assert half.values.dtype == torch.float64 and half.meta.dtype == torch.int16
    torch.testing.assert_close(half(x.double()), linear(x).double(), rtol=1e-5, atol=1e-5)


def test_accelerated_model_compiles_without_graph_breaks():
    model = _prune_tiny()
    accelerate(model, rows=None)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(prompt).logits, model(prompt).logits)


def test_accelerate_on_cpu_keeps_dense_where_the_csr_kernel_loses(monkeypatch):
    from sparsewise.runtime import cpu_linear

    model = _prune_tiny()
    speed = {64: 1.3}  # pretend: only layers with 64 outputs win
    monkeypatch.setattr(cpu_linear, "measure_speedup",
                        lambda module, rows, **_: speed.get(module.weight.shape[0], 0.5))
    report = accelerate(model, rows=(1,))
    swapped = {name for name, m in model.named_modules() if isinstance(m, CpuSparseLinear)}
    assert swapped == set(report.swapped) and swapped
    assert all(model.get_submodule(name).out_features == 64 for name in swapped)
    kept = [d for d in report.decisions if not d.sparse]
    assert kept and all(d.reason == "dense is faster at M=1" and d.ratios == {1: 0.5} for d in kept)
    assert "dense is faster at M=1" in report.summary()


def test_accelerate_follows_the_pruning_records():
    from sparsewise.records import get_records, set_records

    model = _prune_tiny()
    records = get_records(model)
    dropped = sorted(records)[0]
    set_records(model, {name: record for name, record in records.items() if name != dropped})
    report = accelerate(model, rows=None)
    assert dropped not in report.swapped and report.skipped[dropped] == "not pruned (no record)"
    assert sorted(report.swapped) == sorted(set(records) - {dropped})


def test_a_searched_cusparselt_id_reaches_every_layer_of_the_shape():
    """tune() searches one layer per shape; the id travels in the choice. The key it is stored under
    must be the one a plan looks up (bucket of the padded rows), or calls fall back to id 0."""
    from sparsewise.kernels.cusparselt import CsltLinear, algorithm_key

    class FakeCslt:  # CsltLinear's bookkeeping without a GPU
        mode = "sparse_a"
        use_algorithm = CsltLinear.use_algorithm

        def __init__(self):
            self.alg_ids, self._plans, self.calls = {}, {}, []

        def __call__(self, x, bias, transposed=False):
            rows = x.reshape(-1, x.shape[-1]).shape[0]
            key = algorithm_key(-(-rows // 16) * 16, "sparse_a_t" if transposed else self.mode)
            self.calls.append(self.alg_ids.get(key, 0))
            return torch.zeros(*x.shape[:-1], 8)

    linear = torch.nn.Linear(32, 8, bias=False).requires_grad_(False)
    linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4))
    layer = SparseLinear.from_linear(linear, pattern="2:4")
    layer.cslt = FakeCslt()
    for rows, transposed in ((8, False), (3, True), (100, False)):
        layer.run(torch.randn(rows, 32), {"backend": "cusparselt", "alg_id": 7 + rows, "transposed": transposed})
    assert layer.cslt.calls == [15, 10, 107]
    assert algorithm_key(8, "sparse_a") == algorithm_key(16, "sparse_a") != algorithm_key(17, "sparse_a")


def test_tune_refuses_backends_whose_output_disagrees_with_dense():
    from sparsewise.runtime.accelerate import agrees

    reference = torch.randn(4, 16)
    assert agrees(reference.half(), reference)
    assert not agrees(reference * 1.1, reference)  # 10% off: a wrong kernel or a faulting algorithm id
    assert not agrees(reference[:, :8], reference)
    broken = reference.clone()
    broken[0, 0] = float("nan")
    assert not agrees(broken, reference)
