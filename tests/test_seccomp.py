"""The seccomp evaluator: against a reference predicate, against the kernel itself,
and in the engine (a filtered thread is refused before anything is sent)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator, List, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serrinj.errors import SeccompBlocked
from serrinj.remote import RemoteThread, seccomp
from serrinj.remote.arch import host_arch
from serrinj.vcpu.remote import RemoteExecutor

ARCH = host_arch()
IOCTL = ARCH.nr["ioctl"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(nr: int, args: Sequence[int]) -> bytes:
    return seccomp.seccomp_data(nr, ARCH.audit_arch, 0x1000, args)


@given(
    requests=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6, unique=True),
    probe=st.integers(0, 2**32 - 1),
    nr=st.sampled_from([IOCTL, ARCH.nr["getpid"], 0, 1]),
    action=st.sampled_from(
        [seccomp.SECCOMP_RET_TRAP, seccomp.SECCOMP_RET_KILL_PROCESS, seccomp.SECCOMP_RET_ERRNO | 1]
    ),
)
def test_deny_ioctls_matches_its_definition(
    requests: List[int], probe: int, nr: int, action: int
) -> None:
    prog = seccomp.decode_program(seccomp.deny_ioctls(ARCH.audit_arch, IOCTL, requests, action))
    got = seccomp.run(prog, _data(nr, (3, probe, 0)))
    expected = action if nr == IOCTL and probe in requests else seccomp.SECCOMP_RET_ALLOW
    assert got == expected


def test_other_arch_is_allowed_by_the_builder() -> None:
    prog = seccomp.decode_program(
        seccomp.deny_ioctls(ARCH.audit_arch, IOCTL, [0x1234], seccomp.SECCOMP_RET_TRAP)
    )
    other = seccomp.seccomp_data(IOCTL, 0x40000003, 0, (3, 0x1234))
    assert seccomp.run(prog, other) == seccomp.SECCOMP_RET_ALLOW


def test_most_restrictive_filter_wins_like_the_kernel() -> None:
    errno_f = seccomp.decode_program(
        seccomp.deny_ioctls(ARCH.audit_arch, IOCTL, [0x10], seccomp.SECCOMP_RET_ERRNO | 5)
    )
    trap_f = seccomp.decode_program(
        seccomp.deny_ioctls(ARCH.audit_arch, IOCTL, [0x10, 0x20], seccomp.SECCOMP_RET_TRAP)
    )
    v = seccomp.evaluate([errno_f, trap_f], _data(IOCTL, (0, 0x10)))
    assert v.action is seccomp.Action.TRAP and v.filter_index == 1
    v = seccomp.evaluate([errno_f, trap_f], _data(IOCTL, (0, 0x30)))
    assert v.action is seccomp.Action.ALLOW and v.filter_index == -1
    kill = [(seccomp.BPF_RET | seccomp.BPF_K, 0, 0, seccomp.SECCOMP_RET_KILL_PROCESS)]
    v = seccomp.evaluate([trap_f, kill], _data(0, ()))
    assert v.action is seccomp.Action.KILL_PROCESS


def test_alu_and_scratch_memory_instructions() -> None:
    # A = nr; A += 5; M[3] = A; X = 2; A = M[3]; A <<= X; return A
    prog = [
        (seccomp.BPF_LD | seccomp.BPF_W | seccomp.BPF_ABS, 0, 0, seccomp.OFF_NR),
        (seccomp.BPF_ALU | seccomp.BPF_ADD | seccomp.BPF_K, 0, 0, 5),
        (seccomp.BPF_ST, 0, 0, 3),
        (seccomp.BPF_LDX | seccomp.BPF_W | seccomp.BPF_IMM, 0, 0, 2),
        (seccomp.BPF_LD | seccomp.BPF_MEM, 0, 0, 3),
        (seccomp.BPF_ALU | seccomp.BPF_LSH | seccomp.BPF_X, 0, 0, 0),
        (seccomp.BPF_RET | seccomp.BPF_A, 0, 0, 0),
    ]
    assert seccomp.run(prog, _data(7, ())) == (7 + 5) << 2


class Child:
    def __init__(self, filters: Sequence[bytes]) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests/helpers/seccomp_child.py")]
            + [f.hex() for f in filters],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self._line()
        assert line.startswith("READY"), line
        self.pid = self.proc.pid

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def child(request: pytest.FixtureRequest) -> Iterator[Child]:
    c = Child(request.param)
    try:
        yield c
    finally:
        c.close()


_ERRNO_F = seccomp.deny_ioctls(
    ARCH.audit_arch, IOCTL, [0x5401, 0x5413], seccomp.SECCOMP_RET_ERRNO | 77
)
_ERRNO_G = seccomp.deny_ioctls(ARCH.audit_arch, IOCTL, [0x5413], seccomp.SECCOMP_RET_ERRNO | 78)


@pytest.mark.parametrize("child", [[_ERRNO_F, _ERRNO_G]], indirect=True)
def test_evaluator_agrees_with_the_kernel(child: Child) -> None:
    """The kernel's answer to each probe equals the evaluator's prediction."""
    progs = [seccomp.decode_program(_ERRNO_G), seccomp.decode_program(_ERRNO_F)]  # newest first
    for req in (0x5401, 0x5413, 0x541B, 0x1234):
        observed = int(child.ask(f"{req:x}").split()[1])
        v = seccomp.evaluate(progs, _data(IOCTL, (0, req, 0)))
        if v.action is seccomp.Action.ERRNO:
            assert observed == v.data, hex(req)
        else:
            assert v.action is seccomp.Action.ALLOW
            assert observed not in (77, 78), hex(req)


_TRAP = seccomp.deny_ioctls(ARCH.audit_arch, IOCTL, [0x5401], seccomp.SECCOMP_RET_TRAP)


@pytest.mark.root
@pytest.mark.parametrize("child", [[_TRAP]], indirect=True)
def test_engine_refuses_what_the_filter_would_trap(child: Child) -> None:
    child.ask("5401")  # the kernel traps it: the call is rolled back and SIGSYS sent
    assert child.ask("sigsys") == "sigsys 1"
    with RemoteThread(child.pid, child.pid) as t:
        ex = RemoteExecutor(t)
        with pytest.raises(SeccompBlocked, match="TRAP"):
            ex.ioctl_int(0, 0x5401, 0)
        with pytest.raises(OSError) as allowed:
            ex.ioctl_int(0, 0x541B, 0)  # FIONREAD on a pipe: allowed, fails normally
        assert allowed.value.errno != 38
    assert t.verified
    assert child.ask("sigsys") == "sigsys 1", "the engine's refused call reached the filter"
