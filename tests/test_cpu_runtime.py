"""The CPU sparse path: CSR kernel (C++, built once per session and cached on disk), CpuSparseLinear,
its torch.sparse fallback, and measure_speedup. Every result is checked against float64 references."""

from __future__ import annotations

import io
import shutil
import warnings

import pytest
import torch
from torch import nn

from sparsewise.kernels import cpu_sparse
from sparsewise.runtime.cpu_linear import (
    CpuSparseLinear,
    cpu_sparse_conv1x1,
    cpu_sparse_linear,
    measure_speedup,
)

HAS_COMPILER = shutil.which(cpu_sparse._compiler()) is not None


@pytest.fixture(scope="module", autouse=True)
def kernel_backend():
    """Build (or load from the disk cache) the C++ kernel once for this file; without a compiler
    every test runs through the torch.sparse fallback instead."""
    if not HAS_COMPILER:
        previous, cpu_sparse.FORCE_TORCH_FALLBACK = cpu_sparse.FORCE_TORCH_FALLBACK, True
        yield "torch"
        cpu_sparse.FORCE_TORCH_FALLBACK = previous
        return
    assert cpu_sparse.load_extension() is not None, "the C++ kernel failed to build although a compiler is present"
    yield "cpp"


def _pruned_weight(out_features, in_features, sparsity, seed=0, zero_rows=()):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[torch.rand(out_features, in_features, generator=generator) < sparsity] = 0
    weight[list(zero_rows)] = 0
    return weight


def _close(actual, expected, tol=2e-5):
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


def _reference(layer: CpuSparseLinear, x):
    bias = None if layer.bias is None else layer.bias.double()
    if layer.conv:
        return cpu_sparse.reference_conv1x1(x.double(), layer.row_ptr, layer.cols, layer.values, bias, layer.in_features)
    return cpu_sparse.reference_linear(x.double(), layer.row_ptr, layer.cols, layer.values, bias, layer.in_features)


def test_compress_round_trip_and_index_width():
    weight = _pruned_weight(9, 37, 0.7, zero_rows=(0, 4))
    row_ptr, cols, values = cpu_sparse.compress(weight)
    assert row_ptr.dtype == torch.int64 and cols.dtype == torch.int16 and values.dtype == torch.float32
    assert int(row_ptr[-1]) == int((weight != 0).sum()) == values.numel()
    assert torch.equal(cpu_sparse.decompress(row_ptr, cols, values, 37), weight)
    wide = _pruned_weight(3, 40_000, 0.9)
    _, wide_cols, _ = cpu_sparse.compress(wide)
    assert wide_cols.dtype == torch.int32  # int16 cannot address 40k inputs
    with pytest.raises(ValueError, match="NaN"):
        cpu_sparse.compress(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 64, 70])
def test_linear_matches_float64_reference(sparsity, bias, rows):
    linear = nn.Linear(53, 37, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_pruned_weight(37, 53, sparsity, zero_rows=(2, 36)))
    layer = CpuSparseLinear.from_module(linear)
    assert layer.density == pytest.approx(float((linear.weight != 0).float().mean()))
    x = torch.randn(rows, 53)
    _close(layer(x), _reference(layer, x))
    _close(layer(x), linear(x).detach())
    batched = torch.randn(2, 3, 53)  # leading dims are flattened and restored
    assert layer(batched).shape == (2, 3, 37)
    _close(layer(batched), _reference(layer, batched))


def test_linear_int32_indices_and_threads():
    layer = CpuSparseLinear.from_weight(_pruned_weight(40, 33_000, 0.95), torch.randn(40))
    assert layer.cols.dtype == torch.int32
    for rows in (1, 9):
        x = torch.randn(rows, 33_000)
        _close(layer(x), _reference(layer, x))
    threads = torch.get_num_threads()
    try:  # one thread and the default split must agree (rows are split by nonzeros)
        torch.set_num_threads(1)
        single = layer(x)
    finally:
        torch.set_num_threads(threads)
    _close(layer(x), single, tol=1e-6)


@pytest.mark.parametrize("spatial", [(1, 1), (3, 5), (9, 9), (28, 28)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_matches_float64_reference(spatial, bias):
    conv = nn.Conv2d(24, 20, 1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(_pruned_weight(20, 24, 0.8, zero_rows=(5,))[:, :, None, None])
    layer = CpuSparseLinear.from_module(conv)
    assert layer.conv
    x = torch.randn(2, 24, *spatial)
    _close(layer(x), _reference(layer, x))
    _close(layer(x), conv(x).detach())
    _close(layer(x[0]), conv(x[0]).detach())  # unbatched [C, H, W]


def test_transformers_conv1d_is_read_transposed():
    from transformers.pytorch_utils import Conv1D

    conv1d = Conv1D(19, 45)  # nf = out features, nx = in features; weight stored [in, out]
    with torch.no_grad():
        conv1d.weight.copy_(_pruned_weight(45, 19, 0.6))
        conv1d.bias.normal_()
    layer = CpuSparseLinear.from_module(conv1d)
    assert (layer.in_features, layer.out_features) == (45, 19)
    x = torch.randn(3, 45)
    _close(layer(x), conv1d(x).detach())


def test_half_precision_inputs_come_back_in_their_dtype():
    layer = CpuSparseLinear.from_weight(_pruned_weight(24, 40, 0.7), torch.randn(24))
    layer.half()  # the values must stay float32 for the kernel
    assert layer.values.dtype == torch.float32 and layer.bias.dtype == torch.float32
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(5, 40).to(dtype)
        out = layer(x)
        assert out.dtype == dtype
        _close(out, _reference(layer, x.float()), tol=2e-2)


@pytest.mark.parametrize("module", [
    nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1, padding=1),
])
def test_other_convolutions_are_refused_with_advice(module):
    with pytest.raises(ValueError, match="1x1 convolutions with stride 1.*dense nn.Conv2d"):
        CpuSparseLinear.from_module(module)


def test_other_modules_are_refused():
    with pytest.raises(ValueError, match="nn.Linear"):
        CpuSparseLinear.from_module(nn.Embedding(4, 4))
    layer = CpuSparseLinear.from_weight(_pruned_weight(4, 6, 0.5))
    with pytest.raises(ValueError, match="6 features"):
        layer(torch.randn(2, 5))


def test_state_dict_round_trip_adopts_the_saved_sparsity():
    saved = CpuSparseLinear.from_weight(_pruned_weight(30, 50, 0.9, seed=1), torch.randn(30))
    other = CpuSparseLinear.from_weight(_pruned_weight(30, 50, 0.5, seed=2), torch.randn(30))
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    assert other.nnz == saved.nnz
    x = torch.randn(4, 50)
    torch.testing.assert_close(other(x), saved(x))
    assert set(saved.state_dict()) == {"row_ptr", "cols", "values", "bias", "dims"}
    conv = CpuSparseLinear.from_weight(_pruned_weight(7, 9, 0.5), None, conv=True)
    conv.load_state_dict(saved.state_dict())  # another shape and kind: the saved one wins
    assert (conv.in_features, conv.out_features, conv.conv) == (50, 30, False)
    torch.testing.assert_close(conv(x), saved(x))
    assert saved.weight_nbytes < 30 * 50 * 4 * 0.2


def test_custom_ops_and_compile_without_graph_breaks():
    layer = CpuSparseLinear.from_weight(_pruned_weight(16, 24, 0.8), torch.randn(16))
    x = torch.randn(3, 24)
    args = (x, layer.row_ptr, layer.cols, layer.values, layer.bias, 24)
    torch.library.opcheck(cpu_sparse_linear, args)
    conv = CpuSparseLinear.from_weight(_pruned_weight(16, 24, 0.8), None, conv=True)
    torch.library.opcheck(cpu_sparse_conv1x1, (torch.randn(2, 24, 3, 3), conv.row_ptr, conv.cols, conv.values,
                                               None, 24))
    model = nn.Sequential(layer, nn.ReLU())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    _close(compiled(x), model(x))


def test_fallback_without_the_extension(monkeypatch):
    layer = CpuSparseLinear.from_weight(_pruned_weight(21, 35, 0.85, zero_rows=(3,)), torch.randn(21))
    conv = CpuSparseLinear.from_weight(_pruned_weight(12, 35, 0.85), torch.randn(12), conv=True)
    x, image = torch.randn(6, 35), torch.randn(2, 35, 4, 3)
    monkeypatch.setattr(cpu_sparse, "FORCE_TORCH_FALLBACK", True)
    assert not cpu_sparse.extension_available()
    _close(layer(x), _reference(layer, x))
    _close(conv(image), _reference(conv, image))


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler: 'c++' is not on the PATH")

    monkeypatch.setattr(cpu_sparse, "FORCE_TORCH_FALLBACK", False)
    monkeypatch.setattr(cpu_sparse, "_ops", None)
    monkeypatch.setattr(cpu_sparse, "_build_failed", False)
    monkeypatch.setattr(cpu_sparse, "_build", no_compiler)
    layer = CpuSparseLinear.from_weight(_pruned_weight(10, 20, 0.7), None)
    x = torch.randn(1, 20)
    with pytest.warns(RuntimeWarning, match="torch.sparse CSR"):
        out = layer(x)
    _close(out, _reference(layer, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        layer(x)


@pytest.mark.skipif(not HAS_COMPILER, reason="the build hash names the compiler")
def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEWISE_CACHE", str(tmp_path))
    assert cpu_sparse.cache_dir() == tmp_path / "cpu_ext"
    assert len(cpu_sparse.build_hash()) == 16


def test_measure_speedup_reports_a_ratio():
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(_pruned_weight(48, 64, 0.9))
    ratio = measure_speedup(linear, rows=4, repeats=3)
    assert 0 < ratio < float("inf")
    conv = nn.Conv2d(16, 16, 1)
    assert measure_speedup(conv, rows=1, repeats=3, spatial=(4, 4)) > 0
    assert measure_speedup(CpuSparseLinear.from_module(linear), rows=1, repeats=3) > 0
    with pytest.raises(ValueError, match="spatial"):
        measure_speedup(conv, rows=1)
