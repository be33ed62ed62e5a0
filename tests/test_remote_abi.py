"""The engine's register layouts against the real headers.

x86_64: ``struct user_regs_struct`` (sys/user.h) is compiled and its offsets
printed. aarch64: ``struct user_pt_regs`` (asm/ptrace.h) is checked with
``_Static_assert``s generated from serrinj's table, so that compiling with
the cross compiler is itself the check.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from serrinj.remote.arch import X86_64, Aarch64


def test_x86_64_user_regs_struct(tmp_path: Path) -> None:
    if not shutil.which("gcc"):
        pytest.fail("gcc is required for the ABI check")
    body = "\n".join(
        f'printf("{n} %zu\\n", offsetof(struct user_regs_struct, {n}));' for n in X86_64.reg_names
    )
    src = tmp_path / "regs.c"
    src.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <sys/user.h>\n"
        f'int main(void) {{ {body} printf("size %zu\\n", sizeof(struct user_regs_struct));'
        " return 0; }\n"
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "regs"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "regs")], check=True, capture_output=True, text=True)
    got = dict(line.split() for line in out.stdout.splitlines())
    for i, name in enumerate(X86_64.reg_names):
        assert int(got[name]) == 8 * i, name
    assert int(got["size"]) == X86_64().regs_size


@pytest.mark.cross
def test_aarch64_user_pt_regs(tmp_path: Path) -> None:
    asserts = [
        f'_Static_assert(offsetof(struct user_pt_regs, regs[{i}]) == {8 * i}, "x{i}");'
        for i in range(31)
    ]
    for name in ("sp", "pc", "pstate"):
        off = 8 * Aarch64.reg_index[name]
        asserts.append(f'_Static_assert(offsetof(struct user_pt_regs, {name}) == {off}, "{name}");')
    asserts.append(f'_Static_assert(sizeof(struct user_pt_regs) == {Aarch64().regs_size}, "size");')
    src = tmp_path / "regs.c"
    src.write_text("#include <stddef.h>\n#include <asm/ptrace.h>\n" + "\n".join(asserts) + "\n")
    res = subprocess.run(
        ["aarch64-linux-gnu-gcc", "-c", "-o", str(tmp_path / "regs.o"), str(src)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    # The check must be able to fail: a wrong offset is rejected by the compiler.
    bad = tmp_path / "bad.c"
    bad.write_text(
        "#include <stddef.h>\n#include <asm/ptrace.h>\n"
        '_Static_assert(offsetof(struct user_pt_regs, pc) == 0, "pc");\n'
    )
    res = subprocess.run(
        ["aarch64-linux-gnu-gcc", "-c", "-o", str(tmp_path / "bad.o"), str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
