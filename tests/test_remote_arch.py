"""Pure checks of the per-arch register rules."""

from __future__ import annotations

from serrinj.remote.arch import X86_64, Aarch64, Registers


def _regs(arch: object, **values: int) -> Registers:
    base = Registers(arch, [0] * len(arch.reg_names))  # type: ignore[attr-defined]
    return base.replace(**values)


def test_aarch64_tolerates_only_ssbs_and_syscall_stop_x7() -> None:
    a = Aarch64()
    before = _regs(a, pstate=0x60000000, x7=5)
    assert a.same_after_restore(before, before.replace(pstate=0x60001000), False)
    assert not a.same_after_restore(before, before.replace(pstate=0x60001100), False)
    assert not a.same_after_restore(before, before.replace(x7=1), False)
    assert a.same_after_restore(before, before.replace(x7=1), True)
    assert not a.same_after_restore(before, before.replace(x0=1), True)


def test_x86_64_is_strict() -> None:
    x = X86_64()
    before = _regs(x, rip=0x1000, eflags=0x246)
    assert x.same_after_restore(before, before, False)
    assert not x.same_after_restore(before, before.replace(eflags=0x247), True)


def test_prepare_syscall_sets_only_what_it_must() -> None:
    a = Aarch64()
    base = _regs(a, pstate=0x60000C00 | 0x5, x9=7, pc=0x4000)
    regs = a.prepare_syscall(base, 0x1000, 29, (3, 0xAE9F, 0x2000))
    assert regs["pc"] == 0x1000 and regs["x8"] == 29
    assert (regs["x0"], regs["x1"], regs["x2"]) == (3, 0xAE9F, 0x2000)
    assert regs["x9"] == 7
    assert regs["pstate"] == 0x60000005  # BTYPE cleared, nothing else
    x = X86_64()
    base = _regs(x, rip=0x4000, rbx=9)
    regs = x.prepare_syscall(base, 0x1000, 16, (3, 0xAE9A))
    assert (regs["rip"], regs["rax"], regs["orig_rax"]) == (0x1000, 16, 2**64 - 1)
    assert (regs["rdi"], regs["rsi"], regs["rbx"]) == (3, 0xAE9A, 9)
