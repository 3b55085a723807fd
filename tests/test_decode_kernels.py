"""The CUDA C++ decode kernels (kernels/decode.py) and their layouts.

CPU: layouts round-trip exactly and the ops' reference paths compute the function. GPU (marked,
skipped without CUDA): every compiled variant against a float64 reference, fp16 and bf16, odd N,
M = 1..16, bias, poisoned outputs, CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsewise.errors import PatternError
from sparsewise.kernels import decode
from sparsewise.kernels.layouts import PLANE_PAD, pack_bitplanes, pack_rows24, unpack_bitplanes, unpack_rows24
from sparsewise.patterns import nm_mask, unstructured_mask


def _weight(n, k, kind, seed=0, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    if kind == "2:4":
        weight = weight * nm_mask(weight.abs(), 2, 4)
    elif kind.endswith("%"):
        weight = weight * unstructured_mask(weight.abs(), float(kind[:-1]) / 100)
    return weight.to(device=device, dtype=dtype)


def test_rows24_round_trip_with_underfull_groups():
    weight = _weight(37, 48, "2:4", seed=1)
    weight[0, :4] = 0
    weight[3, 4:7] = 0
    layout = pack_rows24(weight)
    assert layout.values.shape == (37, 24) and layout.meta.shape == (37, 3)
    assert torch.equal(unpack_rows24(layout), weight)


def test_rows24_refuses_non_24_and_bad_k():
    with pytest.raises(PatternError, match="not 2:4"):
        pack_rows24(torch.ones(4, 16))
    with pytest.raises(PatternError, match="divisible by 16"):
        pack_rows24(_weight(4, 20, "2:4"))


@pytest.mark.parametrize("kind", ["50%", "90%", "0%", "2:4"])
def test_bitplanes_round_trip(kind):
    weight = _weight(19, 300, kind, seed=2)  # K not a multiple of the 256-input tile
    layout = pack_bitplanes(weight)
    assert layout.words.shape == (19, 16) and layout.offsets.shape == (19, 2)
    assert layout.values.numel() == int((weight != 0).sum()) + PLANE_PAD
    assert torch.equal(unpack_bitplanes(layout), weight)


def test_bitplanes_bytes_at_half_sparsity():
    weight = _weight(64, 4096, "50%", dtype=torch.float16)
    assert pack_bitplanes(weight).nbytes / (weight.numel() * 2) < 0.575


def test_reference_ops_compute_the_linear():
    weight = _weight(40, 64, "2:4", seed=3)
    bias, x = torch.randn(40), torch.randn(3, 5, 64)
    expected = F.linear(x, weight, bias)
    layout = pack_rows24(weight)
    torch.testing.assert_close(decode.gemv24(x, layout.values, layout.meta, bias, 40, [1, 4, 4, 0]), expected)
    planes = pack_bitplanes(weight)
    torch.testing.assert_close(decode.gemv_bitplanes(x, planes.values, planes.words, planes.offsets, bias, 40, 64,
                                                     [1, 4, 4]), expected)
    thresholds = torch.rand(64)
    kept = torch.where(x.abs() > thresholds, x, torch.zeros(()))
    torch.testing.assert_close(decode.gemv24(x, layout.values, layout.meta, bias, 40, [1, 4, 4, 0], thresholds),
                               F.linear(kept, weight, bias))
    torch.testing.assert_close(decode.gemv24_tc(x, layout.values, layout.meta, bias, 40, [1, 1, 4], thresholds),
                               F.linear(kept, weight, bias))
    torch.testing.assert_close(decode.act_gemv(x, thresholds, weight.t().contiguous(), bias, 0),
                               F.linear(kept, weight, bias))
    planes_t = pack_bitplanes(weight.t().contiguous())
    torch.testing.assert_close(decode.act_gemv_bitplanes(x, thresholds, planes_t.values, planes_t.words,
                                                         planes_t.offsets.t().contiguous(), bias, 40, 0), F.linear(kept, weight, bias))


def test_act_splits_cover_k_with_at_most_1024_inputs_per_block():
    for k, n in [(4096, 4096), (14336, 4096), (4096, 14336), (100, 8), (5000, 1024)]:
        splits = decode.act_splits(k, n)
        assert -(-k // splits) <= decode.ACT_MAX_KPER


# ---------------------------------------------------------------------------------------------- GPU
def _rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def needs_cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", decode.GEMV24_CONFIGS)
def test_gpu_gemv24_every_variant(config, dtype):
    n, k = 333, 1040  # odd N, K = 65 chunks (not a multiple of the lanes)
    weight = _weight(n, k, "2:4", seed=4, device="cuda", dtype=dtype)
    layout = pack_rows24(weight)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    for m in (1, 2, 3, 5, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = F.linear(x.double(), weight.double(), bias.double())
        out = decode.gemv24(x, layout.values, layout.meta, bias, n, list(config))
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < TOL[dtype], (config, m)
        thresholds = torch.rand(k, device="cuda")  # activation sparsity fused into the kernel
        kept = torch.where(x.abs().float() > thresholds, x, torch.zeros((), dtype=dtype, device="cuda"))
        out = decode.gemv24(x, layout.values, layout.meta, bias, n, list(config), thresholds)
        assert _rel(out, F.linear(kept.double(), weight.double(), bias.double())) < TOL[dtype], (config, m)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", decode.GEMV24_TC_CONFIGS)
def test_gpu_gemv24_tensor_cores_every_variant(config, dtype):
    n, k = 333, 1056  # odd N (partial 16-row tiles), K = 33 steps of 32 (not a multiple of the warps)
    weight = _weight(n, k, "2:4", seed=8, device="cuda", dtype=dtype)
    weight[0, :4] = 0  # an empty group: its two positions still have to be in order
    layout = pack_rows24(weight)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    for m in (1, 3, 8, 9, 16, 17):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        out = decode.gemv24_tc(x, layout.values, layout.meta, bias, n, list(config))
        assert _rel(out, F.linear(x.double(), weight.double(), bias.double())) < TOL[dtype], (config, m)
        thresholds = torch.rand(k, device="cuda")
        kept = torch.where(x.abs().float() > thresholds, x, torch.zeros((), dtype=dtype, device="cuda"))
        out = decode.gemv24_tc(x, layout.values, layout.meta, bias, n, list(config), thresholds)
        assert _rel(out, F.linear(kept.double(), weight.double(), bias.double())) < TOL[dtype], (config, m)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", decode.BITPLANES_CONFIGS)
@pytest.mark.parametrize("kind", ["50%", "90%"])
def test_gpu_bitplanes_every_variant(config, dtype, kind):
    n, k = 257, 1000  # K not a multiple of the tile: x is never read past K
    weight = _weight(n, k, kind, seed=5, device="cuda", dtype=dtype)
    layout = pack_bitplanes(weight)
    for m in (1, 3, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = F.linear(x.double(), weight.double())
        out = decode.gemv_bitplanes(x, layout.values, layout.words, layout.offsets, None, n, k, list(config))
        assert _rel(out, ref) < TOL[dtype], (config, m)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights", ["dense", "2:4", "50%"])
def test_gpu_activation_sparse(dtype, weights):
    n, k = 520, 3000
    weight = _weight(n, k, "0%" if weights == "dense" else weights, seed=6, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    planes = pack_bitplanes(weight.t().contiguous())
    for m in (1, 2, 3, 4):
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            thresholds = torch.rand(k, device="cuda") * 2 * sparsity - (0.1 if sparsity == 0 else 0)
            kept = torch.where(x.abs().float() > thresholds, x, torch.zeros((), dtype=dtype, device="cuda"))
            ref = F.linear(kept.double(), weight.double(), bias.double())
            for splits in (0, 1, 7):
                if weights == "dense":
                    out = decode.act_gemv(x, thresholds, weight.t().contiguous(), bias, splits)
                else:
                    out = decode.act_gemv_bitplanes(x, thresholds, planes.values, planes.words,
                                                    planes.offsets.t().contiguous(), bias, n, splits)
                assert _rel(out, ref) < TOL[dtype], (m, sparsity, splits)


@needs_cuda
def test_gpu_kernels_capture_in_cuda_graphs():
    weight = _weight(512, 1024, "2:4", seed=7, device="cuda", dtype=torch.float16)
    layout, planes = pack_rows24(weight), pack_bitplanes(weight)
    thresholds = torch.full((1024,), 0.5, device="cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)

    def step():
        return (decode.gemv24(x, layout.values, layout.meta, None, 512, [1, 4, 4, 0]),
                decode.gemv_bitplanes(x, planes.values, planes.words, planes.offsets, None, 512, 1024, [1, 4, 4]),
                decode.act_gemv(x, thresholds, weight.t().contiguous(), None, 0))

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.copy_(torch.randn_like(x))
    for out in outs:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    kept = torch.where(x.abs().float() > thresholds, x, torch.zeros_like(x))
    assert _rel(outs[0], F.linear(x.double(), weight.double())) < 2e-3
    assert _rel(outs[1], F.linear(x.double(), weight.double())) < 2e-3
    assert _rel(outs[2], F.linear(kept.double(), weight.double())) < 2e-3
