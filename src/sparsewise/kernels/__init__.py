"""Sparse kernels (GPU, and one for the CPU). Every kernel has a plain PyTorch reference (CI tests it).

``layouts`` holds the compressed decode layouts (:class:`Rows24` for 2:4, :class:`BitPlanes` for
any sparsity) and their PyTorch unpacking; ``decode`` the decode-sized ops (2:4 / bitmask GEMV,
activation-sparse GEMV) as PyTorch custom ops over the CUDA C++ kernels of ``cuda/*.cu``;
``cusparselt`` the 2:4 sparse tensor-core path for prefill-sized inputs, whose y^T output is
transposed back by the Triton kernel of ``transpose``; ``triton_sparsegpt`` SparseGPT's
lazy-block kernel; ``interpreter`` the switches for Triton's CPU interpreter (kernel tests
without a GPU); ``cpu_sparse`` the C++ CPU kernel (CSR x dense). Dispatch between them lives in
:mod:`sparsewise.runtime`, never here.
"""

from .layouts import BitPlanes, Rows24, pack_bitplanes, pack_rows24, unpack_bitplanes, unpack_rows24

__all__ = ["BitPlanes", "Rows24", "pack_bitplanes", "pack_rows24", "unpack_bitplanes", "unpack_rows24"]
