"""Kernel layouts against their PyTorch references (CPU), and the Triton kernels on CUDA."""

from __future__ import annotations

import pytest
import torch

from sparsewise.kernels import pack_24, pack_bitmask_tiles, reference_linear, unpack
from sparsewise.patterns import nm_mask, unstructured_mask


def sparse_24(n, k, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    return (weight * nm_mask(weight.abs(), 2, 4)).to(device, dtype)


def sparse_unstructured(n, k, sparsity=0.5, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    return (weight * unstructured_mask(weight.abs(), sparsity)).to(device, dtype)


@pytest.mark.parametrize(("n", "k"), [(8, 32), (24, 64), (5, 576)])
def test_24_layout_round_trip_and_size(n, k):
    weight = sparse_24(n, k)
    layout = pack_24(weight)
    assert torch.equal(unpack(layout), weight)
    assert layout.nbytes == n * k // 2 * 4 + n * k // 8  # values + 2 bits per kept entry


def test_24_layout_with_underfull_groups():
    weight = sparse_24(4, 64)
    weight[:, :8] = 0  # two whole groups empty, the packer pads them with zero values
    weight[1, 9] = 0
    assert torch.equal(unpack(pack_24(weight)), weight)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.0, 0.99])
@pytest.mark.parametrize(("n", "k"), [(8, 128), (3, 576), (16, 256)])
def test_bitmask_layout_round_trip(n, k, sparsity):
    weight = sparse_unstructured(n, k, sparsity)
    layout = pack_bitmask_tiles(weight)
    assert torch.equal(unpack(layout), weight)
    # offsets point at each tile's first kept value
    tile = layout.tile_k
    counts = (weight != 0).reshape(-1, tile).sum(-1)
    assert torch.equal(layout.tile_offsets.reshape(-1).long(), torch.cumsum(counts, 0) - counts)


def test_reference_linear_equals_dense():
    weight = sparse_24(16, 64)
    x = torch.randn(3, 5, 64)
    bias = torch.randn(16)
    torch.testing.assert_close(reference_linear(x, pack_24(weight), bias), torch.nn.functional.linear(x, weight, bias))


def test_layouts_reject_shapes_they_cannot_tile():
    from sparsewise.errors import PatternError

    with pytest.raises(PatternError, match="divisible by 32"):
        pack_24(sparse_24(4, 48))
    with pytest.raises(PatternError, match="divisible by tile_k"):
        pack_bitmask_tiles(sparse_unstructured(4, 96))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["24", "bitmask"])
@pytest.mark.parametrize(("n", "k"), [(200, 576), (1024, 4096), (4096, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 33, 64])
def test_triton_kernel_matches_float64_reference(kind, dtype, n, k, m):
    from sparsewise.kernels.triton_sparse import linear

    weight = (sparse_24 if kind == "24" else sparse_unstructured)(n, k, dtype=dtype, device="cuda", seed=m)
    layout = pack_24(weight) if kind == "24" else pack_bitmask_tiles(weight)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = linear(x, layout, bias)
    ref = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    error = _relative_error(out, ref)
    assert error < (1e-2 if dtype == torch.bfloat16 else 2e-3), error


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["24", "bitmask"])
@pytest.mark.parametrize(("n", "k"), [(200, 576), (1024, 4096), (4096, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_gemv_matches_float64_reference(kind, dtype, n, k, m, with_bias):
    from sparsewise.kernels.triton_gemv import gemv

    weight = (sparse_24 if kind == "24" else sparse_unstructured)(n, k, dtype=dtype, device="cuda", seed=m)
    layout = pack_24(weight) if kind == "24" else pack_bitmask_tiles(weight)
    x = torch.randn(1, m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    out = gemv(x, layout, bias)
    ref = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == dtype and out.shape == (1, m, n)
    assert torch.isfinite(out).all()
    error = _relative_error(out, ref)
    assert error < (1e-2 if dtype == torch.bfloat16 else 2e-3), error
