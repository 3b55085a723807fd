"""The Triton kernels (transpose epilogue, SparseGPT lazy block) under Triton's CPU interpreter and on
CUDA, and the cached cuSPARSELt plans on CUDA. The decode kernels and their layouts: test_decode_kernels.py."""

from __future__ import annotations

import math

import pytest
import torch

from sparsewise.patterns import nm_mask


def sparse_24(n, k, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    return (weight * nm_mask(weight.abs(), 2, 4)).to(device, dtype)


def _relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_triton(), reason="needs triton (pip install triton)")
def test_transpose_kernel_in_interpreter(monkeypatch):
    """The transpose epilogue of the cuSPARSELt path (y^T -> y + bias), run by Triton's CPU
    interpreter: odd tiles, a strided view, with and without bias."""
    import subprocess
    import sys

    # The interpreter is chosen when triton is first imported: a fresh process runs the check.
    code = """
import torch
from sparsewise.kernels.transpose import transpose_bias
yt, bias = torch.randn(70, 130), torch.randn(70)
print("transpose", torch.allclose(transpose_bias(yt[:, :100], bias), yt[:, :100].t() + bias),
      torch.equal(transpose_bias(yt), yt.t()))
"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "transpose True True"


SPARSEGPT_CASES = [(40, 96, "unstructured", 32), (37, 100, "2:4", 32), (20, 64, "4:8", 128), (33, 72, "1:4", 16)]


@pytest.mark.skipif(not _has_triton(), reason="needs triton (pip install triton)")
def test_sparsegpt_lazy_block_kernel_in_interpreter(monkeypatch):
    """SparseGPT's lazy-block Triton kernel, run by Triton's CPU interpreter: the masks of the torch
    column loop exactly (unstructured, N:M chosen in-kernel, partial last block, odd row tiles, a
    dead input) and its weights up to float rounding."""
    import subprocess
    import sys

    code = f"""
import torch
from sparsewise.solvers.sparsegpt import sparsegpt_prune
g = torch.Generator().manual_seed(0)
for rows, cols, pattern, block in {SPARSEGPT_CASES!r}:
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(256, cols, generator=g)
    x[:, 3] = 0
    h = x.T @ x
    ref, ref_keep, ref_info = sparsegpt_prune(w, h, 0.6, pattern, block_size=block)
    out, keep, info = sparsegpt_prune(w, h, 0.6, pattern, block_size=block, kernel="triton")
    print(pattern, torch.equal(keep, ref_keep), float((out - ref).abs().max()),
          abs(info["recon_error"] - ref_info["recon_error"]) / ref_info["recon_error"])
"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(SPARSEGPT_CASES)
    for line in lines:
        pattern, same_mask, max_diff, error_gap = line.split()
        assert same_mask == "True", line
        assert float(max_diff) < 1e-5 and float(error_gap) < 1e-5, line


def test_sparsegpt_triton_kernel_refuses_cpu_tensors():
    from sparsewise.errors import ConfigError
    from sparsewise.kernels.interpreter import INTERPRETED
    from sparsewise.solvers.sparsegpt import sparsegpt_prune

    if INTERPRETED:
        pytest.skip("under TRITON_INTERPRET=1 CPU tensors are the interpreter's")
    with pytest.raises(ConfigError, match="CUDA"):
        sparsegpt_prune(torch.randn(8, 16), torch.eye(16), 0.5, "unstructured", kernel="triton")
    with pytest.raises(ConfigError, match="'auto', 'torch' or 'triton'"):
        sparsegpt_prune(torch.randn(8, 16), torch.eye(16), 0.5, "unstructured", kernel="cuda")
    # "auto" on the CPU is the torch loop: same result bit for bit
    w, x = torch.randn(8, 16), torch.randn(64, 16)
    auto = sparsegpt_prune(w, x.T @ x, 0.5, "unstructured")
    plain = sparsegpt_prune(w, x.T @ x, 0.5, "unstructured", kernel="torch")
    assert torch.equal(auto[0], plain[0]) and torch.equal(auto[1], plain[1])


def test_sparsegpt_triton_kernel_refuses_what_it_cannot_hold():
    from sparsewise.errors import ConfigError
    from sparsewise.solvers import sparsegpt as solver

    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match="float32 with block_size <= 256"):
        solver._pick_column_loop("triton", cuda, torch.float64, 128)
    with pytest.raises(ConfigError, match="float32 with block_size <= 256"):
        solver._pick_column_loop("triton", cuda, torch.float32, 512)
    # "auto" falls back to the torch loop where the kernel does not apply
    assert solver._pick_column_loop("auto", cuda, torch.float64, 128) is solver._column_loop
    assert solver._pick_column_loop("auto", cuda, torch.float32, 512) is solver._column_loop
    assert solver._pick_column_loop("auto", torch.device("cpu"), torch.float32, 128) is solver._column_loop


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 100, 2048])
@pytest.mark.parametrize(("mode", "transposed"), [("sparse_a", False), ("sparse_a", True), ("sparse_b", False)])
def test_cusparselt_cached_plans_match_reference(dtype, m, mode, transposed):
    from sparsewise.kernels import cusparselt

    if not cusparselt.available():
        pytest.skip("cuSPARSELt not available")
    weight = sparse_24(512, 1024, dtype=dtype, device="cuda", seed=m)
    linear = cusparselt.CsltLinear(weight, mode=mode)
    x = torch.randn(m, 1024, device="cuda", dtype=dtype)
    bias = torch.randn(512, device="cuda", dtype=dtype)
    ref = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    out = linear(x, bias, transposed=transposed)
    assert out.shape == (m, 512) and out.dtype == dtype and out.is_contiguous()
    assert _relative_error(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    again = linear(x, bias, transposed=transposed)  # cached plan
    assert torch.equal(out, again)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_cusparselt_search_keeps_a_correct_fastest_algorithm(transposed):
    from sparsewise.kernels import cusparselt

    if not cusparselt.available():
        pytest.skip("cuSPARSELt not available")
    weight = sparse_24(1024, 2048, dtype=torch.float16, device="cuda", seed=3)
    linear = cusparselt.CsltLinear(weight)
    found = linear.search(200, transposed=transposed, repeats=3)
    assert found["tried"] >= 1
    assert found["ms"] <= found["default_ms"] or math.isnan(found["default_ms"])  # id 0 may be refused
    mode = "sparse_a_t" if transposed else "sparse_a"
    assert linear.alg_ids[(256, mode)] == found["alg_id"]  # kept for every M of the power-of-two bucket
    x = torch.randn(200, 2048, device="cuda", dtype=torch.float16)
    ref = torch.nn.functional.linear(x.double(), weight.double())
    assert _relative_error(linear(x, transposed=transposed), ref) < 2e-3


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "cols", "pattern"), [(4096, 4096, "unstructured"), (11008, 4096, "2:4"),
                                                        (4096, 11008, "unstructured"), (1536, 576, "4:8")])
def test_sparsegpt_lazy_block_kernel_matches_the_torch_loop_on_cuda(rows, cols, pattern):
    """Against a float64 run of the same algorithm, the Triton kernel drifts no more than the fp32
    torch loop. Unstructured masks of a lazy block are chosen from weights updated by the earlier
    blocks, so rounding flips near-ties and the flips compound (~1% of a 4096x11008 layer for
    either fp32 loop): the objective, not the mask, is what both must reproduce."""
    from sparsewise.solvers.sparsegpt import sparsegpt_prune

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(rows, cols, device="cuda", generator=g)
    x = torch.randn(4096, cols, device="cuda", generator=g)
    h = x.T @ x
    _, keep64, info64 = sparsegpt_prune(w, h, 0.5, pattern, compute_dtype=torch.float64)
    drift = {}
    for kernel in ("torch", "triton"):
        _, keep, info = sparsegpt_prune(w, h, 0.5, pattern, kernel=kernel)
        assert torch.equal(keep.sum(), keep64.sum())  # same kept count per layer
        first = slice(0, 128)  # chosen from the original weights (unstructured) or one block's updates
        drift[kernel] = (float((keep[:, first] != keep64[:, first]).float().mean()),
                         float((keep != keep64).float().mean()),
                         abs(info["recon_error"] / info64["recon_error"] - 1))
    assert drift["triton"][0] <= drift["torch"][0] + 1e-5, drift
    assert drift["triton"][1] <= 2 * drift["torch"][1] + 1e-4, drift
    assert drift["triton"][2] < 1e-3, drift
