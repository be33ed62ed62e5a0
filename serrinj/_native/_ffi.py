"""The cffi FFI object and libc (ABI mode: nothing is compiled, ever).

Only this package imports cffi. The declarations live in ``cdefs.py``; the
generated ``_abi.py`` (``scripts/gen_ffi.py``; a test keeps it current) holds
them pre-parsed. If this cffi cannot load that module, the declarations are
parsed here instead, which is slower but equivalent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ffi", "libc"]

try:
    from serrinj._native._abi import ffi
except Exception:  # a cffi whose backend refuses the generated module
    import cffi

    from serrinj._native.cdefs import CDEF

    ffi = cffi.FFI()
    ffi.cdef(CDEF)

libc: Any = ffi.dlopen(None)
