"""2:4 sparse training GEMMs (training/sparse24.py): the mask against the rank definition (ties
included), the emulated backend's forward, input gradient and weight gradient against float64
formulas for fwd24 / dyn24 / bdwp, the nn.Module wrapper, the Triton mask pass under Triton's CPU
interpreter, and the GPU backends on CUDA."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsewise.errors import ConfigError
from sparsewise.patterns import check_mask, nm_mask
from sparsewise.training import Sparse24Function, Sparse24Linear
from sparsewise.training.sparse24 import (
    EmulatedBackend,
    Masker,
    make_backend,
    mask24,
    sparse24_linear,
    sparse24_operands,
)

ROOT = Path(__file__).resolve().parents[1]


def rank_mask(w: torch.Tensor) -> torch.Tensor:
    """The definition: keep an entry when fewer than two entries of its group of 4 (last dim) beat it,
    i.e. have a larger |w|, or an equal |w| at an earlier position."""
    a = w.detach().abs().double().reshape(-1, 4)
    ai, aj = a[:, :, None], a[:, None, :]
    position = torch.arange(4)
    earlier = (position[None, :] < position[:, None])[None]  # [1, i, j]: j before i
    beats = (aj > ai) | ((aj == ai) & earlier)
    return (beats.sum(dim=2) < 2).reshape(w.shape)


def every_tied_group() -> torch.Tensor:
    """All 7^4 groups over values with ties, signed zeros and infinities."""
    values = [0.0, -0.0, 1.0, -1.0, 2.0, 3.0, float("inf")]
    return torch.tensor(list(itertools.product(values, repeat=4)))


# ---------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_mask24_is_the_rank_definition_on_every_tie_pattern(dtype):
    groups = every_tied_group().to(dtype)
    keep = mask24(groups)
    assert torch.equal(keep, rank_mask(groups))
    assert torch.equal(keep, nm_mask(groups.abs(), 2, 4))  # sparsewise's N:M mask, ties included
    assert (keep.sum(dim=1) == 2).all()


def test_mask24_on_random_weights_of_any_rank():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 16, generator=generator)
    w[0, :, 4:8] = 0.5  # tied groups
    keep = mask24(w)
    assert keep.shape == w.shape and torch.equal(keep, rank_mask(w))
    assert check_mask(keep.reshape(-1, 16), "2:4")


def test_masker_torch_path():
    masker = Masker("cpu", use_triton=False)
    assert not masker.use_triton and masker.note == "torch ops"
    w = torch.randn(12, 20)
    assert torch.equal(masker.apply(w), w * rank_mask(w))
    transposed = masker.transpose(w)
    assert torch.equal(transposed, w.t()) and transposed.is_contiguous()


# ---------------------------------------------------------------------------------------- the Function
def reference(x, w, dy, variant):
    """float64 formulas: y = x W_f^T, dx = dy W_b, dW = dy^T x, with W_f = W*M along in (fwd24:
    the mask of the weight as given) and W_b = W_f (fwd24, dyn24) or W*M along out (bdwp)."""
    x, w, dy = x.double(), w.double(), dy.double()
    w_f = w * rank_mask(w)
    w_b = (w * rank_mask(w.t()).t()) if variant == "bdwp" else w_f
    return {"y": x @ w_f.t(), "dx": dy @ w_b, "dw": dy.t() @ x}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


TOLERANCES = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("variant", ["fwd24", "dyn24", "bdwp"])
def test_emulated_function_matches_the_float64_formulas(variant, dtype):
    generator = torch.Generator().manual_seed(1)
    w = (torch.randn(24, 32, generator=generator) / 32**0.5).to(dtype)
    w[:3, 8:16] = 0.125  # ties along in and, for bdwp, along out
    w[8:16, :3] = 0.125
    if variant == "fwd24":  # the static case: the weight holds the 2:4 zeros
        w = w * rank_mask(w)
    x = torch.randn(40, 32, generator=generator).to(dtype).requires_grad_(True)
    dy = torch.randn(40, 24, generator=generator).to(dtype)
    weight = w.clone().requires_grad_(True)
    y = Sparse24Function.apply(x, weight, sparse24_operands(weight, variant, EmulatedBackend()))
    y.backward(dy)
    ref = reference(x.detach(), w, dy, variant)
    errors = {"y": rel_error(y.detach(), ref["y"]), "dx": rel_error(x.grad, ref["dx"]),
              "dw": rel_error(weight.grad, ref["dw"])}
    assert max(errors.values()) < TOLERANCES[dtype], errors
    assert y.dtype == x.grad.dtype == weight.grad.dtype == dtype


def test_bdwp_masks_the_input_gradient_along_the_output_dim():
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=generator, dtype=torch.float64)
    ops = sparse24_operands(w, "bdwp", EmulatedBackend())
    # both handles are 2:4 along their last dim: W_f [out, in], W_b^T [in, out]
    assert check_mask(ops.fwd != 0, "2:4") and check_mask(ops.bwd != 0, "2:4")
    assert ops.bwd.shape == (32, 16) and ops.bwd_dense is None
    dyn = sparse24_operands(w, "dyn24", EmulatedBackend())
    assert torch.equal(dyn.fwd, ops.fwd) and torch.equal(dyn.bwd_dense, ops.fwd) and dyn.bwd is None
    assert not torch.equal(ops.bwd.t(), ops.fwd)  # M_b differs from M_f


def test_fwd24_operands_take_the_mask_or_trust_the_zeros():
    w = torch.randn(8, 16)
    mask = rank_mask(w)
    masked = sparse24_operands(w, "fwd24", EmulatedBackend(), mask=mask)
    assert torch.equal(masked.fwd, w * mask) and torch.equal(masked.bwd_dense, w * mask)
    trusted = sparse24_operands(w, "fwd24", EmulatedBackend())
    assert torch.equal(trusted.fwd, w)  # mask=None: the weight is used as it is
    with pytest.raises(ConfigError, match="variant"):
        sparse24_operands(w, "dense", EmulatedBackend())


def test_only_the_needed_gradients_are_computed():
    w = torch.randn(8, 16)
    x = torch.randn(4, 16, requires_grad=True)
    y = sparse24_linear(x, w, sparse24_operands(w, "dyn24", EmulatedBackend()))  # weight: no grad
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(4, 8) @ (w * rank_mask(w)))


# ---------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("variant", ["fwd24", "dyn24", "bdwp"])
def test_module_matches_the_formulas_with_bias_and_leading_dims(variant):
    torch.manual_seed(0)
    layer = Sparse24Linear(32, 16, variant=variant, dtype=torch.float64)
    if variant == "fwd24":
        assert check_mask(layer.weight != 0, "2:4") and torch.equal(layer.mask, rank_mask(layer.weight))
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, 16, dtype=torch.float64)
    y = layer(x)
    y.backward(dy)
    ref = reference(x.detach().reshape(-1, 32), layer.weight.detach(), dy.reshape(-1, 16), variant)
    assert y.shape == (2, 5, 16)
    assert rel_error(y.detach().reshape(-1, 16) - layer.bias.detach(), ref["y"]) < 1e-13
    assert rel_error(x.grad.reshape(-1, 32), ref["dx"]) < 1e-13
    assert rel_error(layer.weight.grad, ref["dw"]) < 1e-13
    assert torch.allclose(layer.bias.grad, dy.sum(dim=(0, 1)))


def test_module_from_linear_shares_parameters_and_fwd24_stays_2_4():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = Sparse24Linear.from_linear(linear, variant="fwd24")
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert check_mask(linear.weight != 0, "2:4")  # masked in place
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    optimizer.step()
    assert not check_mask(layer.weight != 0, "2:4")  # the dense gradient moved the pruned weights
    layer.apply_mask()
    assert torch.equal(layer.weight != 0, layer.mask)
    assert "mask" in layer.state_dict()
    assert "mask" not in Sparse24Linear(16, 8, variant="dyn24").state_dict()


def test_module_refuses_what_2_4_cannot_hold():
    with pytest.raises(ConfigError, match="divisible by 4"):
        Sparse24Linear(18, 8)
    with pytest.raises(ConfigError, match="divisible by 4"):
        Sparse24Linear(16, 6, variant="bdwp")
    Sparse24Linear(16, 6, variant="dyn24")  # dX is dense: out needs no 2:4 groups
    with pytest.raises(ConfigError, match="variant"):
        Sparse24Linear(16, 8, variant="srste")
    with pytest.raises(ConfigError, match="backend"):
        make_backend("cutlass")


# ---------------------------------------------------------------------------------------- Triton, GPU
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_triton(), reason="needs triton (pip install triton)")
def test_triton_mask_pass_in_interpreter(monkeypatch):
    """Both Triton kernels (tile, scalar) under Triton's CPU interpreter: w*mask and the mask equal
    mask24 on every tie pattern; the Masker picks the tile kernel."""
    code = """
import torch
from sparsewise.training.sparse24 import Masker, mask24, mask24_apply_triton
import itertools
values = [0.0, -0.0, 1.0, -1.0, 2.0, 3.0, float("inf")]
ties = torch.tensor(list(itertools.product(values, repeat=4)))
for kind in ("tile", "scalar"):
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(64, 128).to(dtype)
        w[:, 16:24] = 0.5
        w[5, :8] = 0.0
        for t in (w, ties.to(dtype)):
            out, keep = mask24_apply_triton(t.contiguous(), want_keep=True, kind=kind)
            kept = torch.where(mask24(t), t, torch.zeros_like(t))  # (inf * 0 would be nan)
            print(kind, dtype, torch.equal(keep, mask24(t)) and torch.equal(out, kept))
print("masker", Masker("cpu", use_triton=True).kind)
"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 9 and all(line.endswith("True") for line in lines[:-1]), lines
    assert lines[-1] == "masker tile"


def test_benchmark_cli_plans_on_cpu():
    script = str(ROOT / "benchmarks" / "train_speed.py")
    result = subprocess.run([sys.executable, script, "--dry-run", "--ms", "4096"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"fwd24_best_speedup"' in result.stdout
    assert subprocess.run([sys.executable, script, "--help"], capture_output=True, timeout=300).returncode == 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_triton_masker_on_cuda_matches_mask24():
    masker = Masker("cuda", use_triton=True)
    assert masker.use_triton, masker.note
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    w[:, 32:48] = 0.25
    assert torch.equal(masker.apply(w), w * mask24(w))
    assert torch.equal(masker.transpose(w), w.t())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["torch", "cslt"])
@pytest.mark.parametrize("variant", ["fwd24", "dyn24", "bdwp"])
def test_gpu_backends_match_the_float64_formulas(backend, variant):
    try:
        gemm = make_backend(backend)
    except Exception as exc:  # noqa: BLE001 - a backend this GPU or torch build lacks
        pytest.skip(f"backend {backend}: {exc}")
    torch.manual_seed(0)
    layer = Sparse24Linear(256, 512, bias=False, variant=variant, backend=gemm, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(128, 512, device="cuda", dtype=torch.bfloat16)
    layer(x).backward(dy)
    y = layer(x.detach())
    ref = reference(x.detach().cpu(), layer.weight.detach().cpu(), dy.cpu(), variant)
    assert rel_error(y.detach().cpu(), ref["y"]) < 2e-2
    assert rel_error(x.grad.cpu(), ref["dx"]) < 2e-2
    assert rel_error(layer.weight.grad.cpu(), ref["dw"]) < 2e-2
