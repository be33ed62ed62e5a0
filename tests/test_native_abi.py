"""The generated cffi module is current, and the bindings load without pycparser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_abi_module_is_current() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen_ffi.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


def test_bindings_import_without_the_c_parser() -> None:
    code = (
        "import sys, serrinj._native as n, os\n"
        "assert n.ioctl_int is not None\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pycparser', 'cffi.cparser'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generated_and_parsed_declarations_agree() -> None:
    """Every function and struct of cdefs.py has the same C type both ways."""
    import cffi

    from serrinj._native._abi import ffi as generated
    from serrinj._native.cdefs import CDEF

    parsed = cffi.FFI()
    parsed.cdef(CDEF)
    for struct in ("struct iovec", "struct sock_filter", "struct sock_fprog"):
        assert generated.sizeof(struct) == parsed.sizeof(struct)
        assert [f for f, _ in generated.typeof(struct).fields] == [
            f for f, _ in parsed.typeof(struct).fields
        ]
    lib_g = generated.dlopen(None)
    lib_p = parsed.dlopen(None)
    for name in ("ioctl", "syscall", "prctl", "waitpid", "process_vm_readv", "mmap"):
        assert (
            generated.typeof(getattr(lib_g, name)).cname
            == parsed.typeof(getattr(lib_p, name)).cname
        )
