"""Sparse GPU kernels. Every kernel has a plain PyTorch reference (used on CPU and in CI).

``layouts`` holds the compressed "planes" layouts and their references (pure PyTorch);
``triton_planes`` the Triton decode/small-batch kernels over them; ``cusparselt`` the 2:4
sparse tensor-core path for prefill-sized inputs. Dispatch between them lives in
:mod:`sparsewise.runtime`, never here.
"""

from .layouts import NM24, Bitmask, choose_width, pack_24, pack_unstructured, reference_linear, unpack

__all__ = ["Bitmask", "NM24", "choose_width", "pack_24", "pack_unstructured", "reference_linear", "unpack"]
