"""Triton's CPU interpreter (TRITON_INTERPRET=1: kernel tests without a GPU, in CI).

``INTERPRETED`` tells kernels to avoid what the interpreter lacks (libdevice). Importing this
module also makes the interpreter accept runtime loop bounds: it hands scalar kernel arguments
over as 1-element arrays and converts them with ``int(array)``, which NumPy >= 2.4 refuses
("only 0-dimensional arrays can be converted"), so ``tl.range(0, n)`` over an argument ``n``
failed there while the compiled kernel is fine.
"""

from __future__ import annotations

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _accept_scalar_arrays() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton absent: no interpreter to patch
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_sparsewise", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparsewise = True
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _accept_scalar_arrays()
