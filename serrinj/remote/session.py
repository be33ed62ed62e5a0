"""A seized thread of another process in which serrinj runs syscalls.

Lifecycle (BRIEF section 5)::

    pidfd_open  ->  PTRACE_SEIZE  ->  PTRACE_INTERRUPT  ->  event stop
        save NT_PRSTATUS (and NT_ARM_SYSTEM_CALL on aarch64)
        for each syscall: point pc at an existing syscall instruction, set the
        number and arguments, PTRACE_SYSCALL to the entry stop (checked), then
        to the exit stop (result)
    restore scratch memory and registers  ->  PTRACE_INTERRUPT + PTRACE_CONT
        ->  event stop (the thread is back where it was, in the kernel's own
        signal path)  ->  verify registers  ->  PTRACE_DETACH

Only the one thread is stopped; the VMM's other threads keep running.
PTRACE_O_EXITKILL is never set.

Why the second stop: when the thread was interrupted inside a restartable
syscall (futex, ppoll, nanosleep...), the kernel rewinds it *after* the
event stop, in its signal path. Restoring the registers at the engine's own
syscall-exit stop and detaching there would skip that path and hand the VMM
an impossible -ERESTARTSYS. Stopping once more in the signal path and
detaching from there lets the kernel perform the restart exactly as if
serrinj had never been there, and leaves the registers bit-identical. On
x86_64, when the saved state holds no restart code (the usual vCPU thread:
KVM_RUN returned -EINTR) and no signal is waiting to be re-sent, there is
nothing for the signal path to do, and the thread is let go from the
syscall-exit stop with its registers restored (``_signal_path_needed``).

Signals that arrive for the thread while its registers are borrowed are not
delivered on the borrowed state: they are held and re-sent (tgkill) after the
registers are restored, before the detach. SIGINT/SIGTERM/SIGHUP/SIGQUIT to
serrinj itself are blocked for the life of a session, so Ctrl-C can never
leave a VMM thread with borrowed registers; they are acted on once the thread
is detached. SIGTSTP (Ctrl-Z) is held too, and lets the session finish:
serrinj stops once the thread is released (:func:`_on_tstp`).

Kill safety: SIGKILL cannot be held. Before the first register change the
engine writes a resume frame below the stack pointer (serrinj.remote.sigframe)
and runs its syscalls through a ``syscall; ret`` (``svc #0; ret``) of the VMM
that returns into the VMM's ``rt_sigreturn``: a thread whose tracer died
restores itself. The restore puts registers back before memory, so every
intermediate state is one the thread survives. On aarch64 a thread with live
SVE state gets an ``sve_context`` record in its frame, and the restore puts
its NT_ARM_SVE regset back too (the engine's own syscall discards the SVE bits
above the FPSIMD view, as every syscall does). A thread the frame cannot
serve (a shadow stack or GCS, SME streaming mode or ZA, no gadget) takes the
old path, and :attr:`RemoteThread.kill_safe` says so.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import signal
import struct
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple, Type

from serrinj import _native
from serrinj.errors import (
    Conflict,
    Interrupted,
    PermissionDenied,
    SeccompBlocked,
    SerrinjError,
    TargetGone,
)
from serrinj.host import procfs
from serrinj.remote import ptrace, sigframe
from serrinj.remote.arch import Arch, Registers, host_arch, to_signed
from serrinj.remote.gadget import find_sequence, find_syscall_gadget

if TYPE_CHECKING:
    # imported when a thread has seccomp filters (few do): not on every start-up
    from serrinj.remote import seccomp

_GUARDED_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
#: held for the life of a session too, but not an interruption: Ctrl-Z lets the
#: session finish, and serrinj stops once the thread is released (_on_tstp)
_HELD_SIGNALS = _GUARDED_SIGNALS | {signal.SIGTSTP}
#: the most scratch memory a session borrows below the stack pointer for buffers
MAX_SCRATCH = 4096
#: the most room a kill-safe frame may take (an XSAVE area with AVX-512 is 2.5 KiB;
#: an arm64 frame with 2048-bit SVE state, behind an extra_context, about 10 KiB)
MAX_FRAME = 16384

#: (pid, start time, tid) -> (start, end) of the writable mapping a thread's
#: scratch range was last found in. The thread runs on that stack, so a range
#: below its stack pointer that lies inside it needs no new read of
#: /proc/PID/maps; any other range is checked against a fresh read.
_stack_cache: Dict[Tuple[int, int, int], Tuple[int, int]] = {}
_STACK_CACHE_MAX = 4096
_warmed = False  # the native calls of the stop path have run once in this process
#: -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK
_RESTART_CODES = frozenset({-512, -513, -514, -516})


#: The phases of a session, in order: ``seized`` (stopped, nothing changed),
#: ``frame-written`` (the resume frame is in the scratch memory, registers
#: untouched), ``borrowed`` (registers replaced, the syscall not yet run),
#: ``syscall-entered`` (at the syscall-entry stop), ``syscall-done`` (at its
#: exit stop) and ``restoring`` (about to put registers and memory back).
PhaseObserver = Callable[[str], None]
PHASES = ("seized", "frame-written", "borrowed", "syscall-entered", "syscall-done", "restoring")

#: Called with the name of each phase as a session reaches it. ``None`` in
#: serrinj itself; only a test process installs one (to hold the engine at an
#: exact phase while it strikes), by assigning it in-process.
phase_observer: Optional[PhaseObserver] = None


def _phase(name: str) -> None:
    observer = phase_observer
    if observer is not None:
        observer(name)


def thread_features(sec: procfs.TaskSecurity) -> str:
    """The thread's ``x86_Thread_features`` ('' without one), from the status read
    the seize makes anyway (one read of /proc/PID/task/TID/status, not two)."""
    return sec.thread_features


def _on_tstp(signum: int, _frame: object) -> None:
    """Ctrl-Z: stop serrinj, which (signals being held during a session) never
    holds a VMM thread when this runs; continue with `fg` (SIGCONT)."""
    sys.stderr.write("serrinj: stopped (SIGTSTP), holding no VMM thread; `fg` continues\n")
    sys.stderr.flush()
    signal.signal(signal.SIGTSTP, signal.SIG_DFL)
    try:
        os.kill(os.getpid(), signal.SIGTSTP)  # the default action: stop, here
    finally:
        signal.signal(signal.SIGTSTP, _on_tstp)


def _install_tstp_handler() -> None:
    """Take over SIGTSTP when nobody else did (the default: stop at once, holding
    whatever thread serrinj holds), from the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTSTP) == signal.SIG_DFL:
        signal.signal(signal.SIGTSTP, _on_tstp)


def _check_signals() -> None:
    """Nothing: calling a Python function makes the interpreter run pending signal
    handlers (its eval-breaker check)."""


class EngineError(SerrinjError):
    """The traced thread did something the engine did not expect."""


def _explain_seize_eperm(pid: int, tid: int) -> SerrinjError:
    """Why PTRACE_SEIZE said EPERM: tracer, uid, Yama or capability."""
    try:
        sec = procfs.task_security(pid, tid)
    except ProcessLookupError:
        return TargetGone(f"thread {tid} of process {pid} exited")
    if sec.tracer_pid:
        return Conflict(
            f"thread {tid} of process {pid} is already traced by process {sec.tracer_pid}"
            f" ({_comm_or_unknown(sec.tracer_pid)})",
            hint="detach the debugger or tracer (gdb, strace) first; a thread has one tracer",
        )
    return explain_ptrace_denial(pid, sec, f"ptrace of process {pid}")


def explain_ptrace_denial(pid: int, sec: procfs.TaskSecurity, what: str) -> PermissionDenied:
    """Why the kernel's ptrace access check refused ``what`` on process ``pid``.

    PTRACE_SEIZE and ``pidfd_getfd`` make the same check (kernel/ptrace.c
    ``__ptrace_may_access`` in PTRACE_MODE_ATTACH_REALCREDS, then Yama's hook):
    the message names the first thing that fails it, read from ``sec`` (the
    target's ids and capabilities), serrinj's own ids and capabilities, and Yama.
    """
    cap = procfs.has_capability(procfs.CAP_SYS_PTRACE)
    scope = procfs.ptrace_scope()
    # PTRACE_ATTACH/SEIZE compare the tracer's *real* ids with the target's real,
    # effective and saved ids (kernel/ptrace.c __ptrace_may_access)
    ruid, rgid = os.getuid(), os.getgid()
    if scope == 3:
        return PermissionDenied(
            f"{what} denied: Yama ptrace_scope is 3 (no attach at all)",
            hint="ptrace_scope 3 can only be lowered by a reboot",
        )
    if not cap:
        if any(u != ruid for u in sec.uid[:3]) or any(g != rgid for g in sec.gid[:3]):
            return PermissionDenied(
                f"{what} denied: it runs as uid {sec.uid[0]} gid"
                f" {sec.gid[0]}, serrinj as uid {ruid} gid {rgid} (its real ids; ptrace"
                f" needs them to match), without CAP_SYS_PTRACE",
                hint="run serrinj as the VMM's user, or as root / with CAP_SYS_PTRACE",
            )
        if scope == 2:
            return PermissionDenied(
                f"{what} denied: Yama ptrace_scope is 2 (admin only)",
                hint="run serrinj with CAP_SYS_PTRACE (e.g. as root)",
            )
        if scope == 1:
            return PermissionDenied(
                f"{what} denied: Yama ptrace_scope is 1 (descendants only)",
                hint="run serrinj with CAP_SYS_PTRACE, or set kernel.yama.ptrace_scope=0",
            )
        try:
            if procfs.owner_uid(pid) != sec.uid[1]:
                return PermissionDenied(
                    f"{what} denied: the VMM is not dumpable"
                    " (PR_SET_DUMPABLE 0 or a set-uid binary)",
                    hint="run serrinj with CAP_SYS_PTRACE",
                )
        except OSError:
            pass
        try:
            mine = procfs.task_security(os.getpid()).cap_permitted
        except ProcessLookupError:  # pragma: no cover - we are alive
            mine = 0
        if sec.cap_permitted & ~mine:
            return PermissionDenied(
                f"{what} denied: it holds capabilities serrinj lacks"
                f" (CapPrm {sec.cap_permitted:#x}, serrinj {mine:#x}), and serrinj has no"
                " CAP_SYS_PTRACE",
                hint="run serrinj with at least the VMM's capabilities, or with CAP_SYS_PTRACE",
            )
    return PermissionDenied(
        f"{what} denied by a security module (SELinux, AppArmor or similar)",
        hint="check the audit log for the denial",
    )


def _comm_or_unknown_task(pid: int, tid: int) -> str:
    try:
        return procfs.comm(pid, tid)
    except (ProcessLookupError, OSError):
        return "unknown"


def _comm_or_unknown(pid: int) -> str:
    try:
        return procfs.comm(pid)
    except (ProcessLookupError, OSError):
        return "unknown"


class RemoteThread:
    """A stopped thread of process ``pid`` in which the engine runs syscalls.

    Use as a context manager; leaving it always restores and detaches::

        with RemoteThread(pid, tid) as t:
            ret = t.syscall(t.arch.nr["getpid"])
    """

    def __init__(
        self,
        pid: int,
        tid: int,
        *,
        arch: Optional[Arch] = None,
        stop_timeout: float = 2.0,
        expected_starttime: Optional[int] = None,
        on_stall: Optional[Callable[[], None]] = None,
        stall_after: float = 0.25,
        prefetch_maps: bool = False,
    ) -> None:
        self.pid = pid
        #: called once when a syscall of ours has not returned after ``stall_after``
        #: seconds (e.g. waiting for a vCPU mutex another thread holds)
        self.on_stall = on_stall
        self.stall_after = stall_after
        self.tid = tid
        self.arch = arch or host_arch()
        self.stop_timeout = stop_timeout
        self.expected_starttime = expected_starttime
        self.saved: Optional[Registers] = None
        self.first_stop: Optional[ptrace.Stop] = None
        self.verified: Optional[bool] = None
        #: the thread exited while serrinj held it (nothing left to restore)
        self.gone = False
        #: nanoseconds per phase: ``seize_ns`` (checks and PTRACE_SEIZE; the thread
        #: still runs), ``interrupt_ns`` (PTRACE_INTERRUPT until the stop),
        #: ``attach_ns`` (all of attach), ``syscall_ns`` (the last syscall),
        #: ``syscall_total_ns`` (every syscall), ``restore_ns`` (registers and
        #: memory back, verified), ``detach_ns``, ``restore_detach_ns``, and
        #: ``held_ns``: from PTRACE_INTERRUPT until PTRACE_DETACH, the time the
        #: thread was kept from running
        self.timings: Dict[str, int] = {}
        self._t_interrupt = 0
        self._saved_syscallno: Optional[bytes] = None
        self._at_syscall_stop = False  # the baseline was captured at a syscall stop
        self._pidfd = -1
        self._seized = False
        self._dirty = False  # the thread has run since the baseline stop
        self._at_entry = False  # currently at one of our syscall-entry stops
        self._deferred: List[int] = []
        self._scratch_base = 0
        self._scratch_saved = b""
        self._old_mask: Optional[set[int | signal.Signals]] = None
        self._filters: Optional[List[List[seccomp.Insn]]] = None
        self._seccomp_mode = 0
        self._gadget: Optional[int] = None
        self._gadget_hint: Optional[int] = None  # looked up before the thread was stopped
        self._starttime: Optional[int] = None
        #: read /proc/PID/maps before the stop, for :meth:`scratch` (callers that
        #: will pass buffers say so; the read then costs the VMM nothing)
        self.prefetch_maps = prefetch_maps
        self._maps: Optional[List[procfs.Mapping]] = None
        self._map_starts: List[int] = []  # of _maps (sorted, as the kernel lists them)
        self._running = False  # resumed by us and not yet seen stopped
        #: whether the thread can put itself back if serrinj dies while it holds
        #: it (a resume frame, serrinj.remote.sigframe); ``None`` before attach
        self.kill_safe: Optional[bool] = None
        #: why not, when it is not (shadow stack, no gadget...); '' otherwise
        self.kill_safe_reason = ""
        self._frame: Optional[sigframe.Frame] = None
        self._ret_gadget: Optional[int] = None
        self._restorer: Optional[int] = None
        self._syscall_entry_baseline = False  # the baseline is a syscall-entry stop
        #: aarch64: the baseline's NT_ARM_SVE regset when its SVE state is live
        #: (put back at restore, and carried in the frame); b"" otherwise
        self._saved_sve = b""
        self._arch_read = False  # _arch_problem ran for this baseline

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RemoteThread:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
        if exc_type is None and self.gone:
            raise TargetGone(
                f"thread {self.tid} of process {self.pid} exited before serrinj could restore it"
            )

    def attach(self) -> None:
        """Seize and stop the thread, and save its registers."""
        t0 = time.perf_counter_ns()
        self._block_signals()
        try:
            self._attach()
        except BaseException:
            self.close()
            raise
        self.timings["attach_ns"] = time.perf_counter_ns() - t0

    def _attach(self) -> None:
        pid, tid = self.pid, self.tid
        t_start = time.perf_counter_ns()
        try:
            sec = procfs.task_security(pid, tid)
            self._pidfd = _native.pidfd_open(pid)
            # Read once, after the pidfd pins the process: it keys the gadget
            # cache, so nothing re-reads /proc while the thread is held.
            self._starttime = procfs.stat(pid).starttime
            if self.expected_starttime is not None and self._starttime != self.expected_starttime:
                raise TargetGone(
                    f"process {pid} exited and its pid was reused by another process",
                    hint="list the VMs again",
                )
        except (ProcessLookupError, FileNotFoundError) as err:
            raise TargetGone(f"thread {tid} of process {pid} does not exist") from err
        except OSError as err:
            if err.errno == errno.ESRCH:
                raise TargetGone(f"process {pid} does not exist") from err
            raise
        if sec.tracer_pid:
            raise _explain_seize_eperm(pid, tid)
        if procfs.stat(pid, tid).kernel_thread:
            raise EngineError(
                f"task {tid} of process {pid} ({_comm_or_unknown_task(pid, tid)}) is a kernel"
                " worker without user code; it cannot run a syscall for serrinj"
            )
        self._seccomp_mode = sec.seccomp_mode
        # The resume frame is written below the stack pointer at the first
        # syscall: read the maps now, not while the thread is held.
        wants_stack = self.prefetch_maps or bool(self.arch.syscall_ret_seqs)
        if wants_stack and self._stack_key() not in _stack_cache:
            with contextlib.suppress(OSError):
                self._maps = procfs.maps(pid)
                self._map_starts = [m.start for m in self._maps]
        self._prepare_kill_safety(sec)
        if self._ret_gadget is not None:
            # `syscall; ret` begins with a syscall instruction: the path without a
            # frame (decided after the stop) runs at the same, validated address
            self._gadget_hint = self._ret_gadget
        else:
            self._prefetch_gadget()
        self._warm_up()
        try:
            ptrace.seize(tid)
        except OSError as err:
            if err.errno == errno.EPERM:
                raise _explain_seize_eperm(pid, tid) from err
            if err.errno == errno.ESRCH:
                raise TargetGone(f"thread {tid} of process {pid} exited") from err
            raise
        self._seized = True
        t0 = self._t_interrupt = time.perf_counter_ns()
        self.timings["seize_ns"] = t0 - t_start
        self._ptrace(ptrace.interrupt, tid)
        self._running = True
        self.first_stop = self._wait_event_stop(deliver_signals=True)
        self.timings["interrupt_ns"] = time.perf_counter_ns() - t0
        self.saved = self.get_registers()
        if self.arch.name == "aarch64":
            self._saved_syscallno = ptrace.get_regset(tid, ptrace.NT_ARM_SYSTEM_CALL, 4)
        _phase("seized")

    def close(self) -> None:
        """Restore everything that was changed and detach. Idempotent; never raises
        for a thread that has exited (the restore is then moot)."""
        try:
            if self._seized:
                t0 = time.perf_counter_ns()
                try:
                    self._restore_and_detach()
                except TargetGone:
                    self.gone = True
                finally:
                    self._seized = False
                self.timings["restore_detach_ns"] = time.perf_counter_ns() - t0
        finally:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            self._unblock_signals()

    # ------------------------------------------------------------------ public ops
    def get_registers(self) -> Registers:
        raw = self._ptrace(ptrace.get_regset, self.tid, ptrace.NT_PRSTATUS, self.arch.regs_size)
        return Registers.unpack(self.arch, raw)

    def _prefetch_gadget(self) -> None:
        """Find the syscall instruction while the thread still runs (not on the clock
        of the stop); failures are left for :attr:`gadget` to report."""
        with contextlib.suppress(SerrinjError, OSError):
            self._gadget_hint = find_syscall_gadget(
                self.pid, self.arch, starttime=self._starttime, maps=self._maps
            )

    def _prepare_kill_safety(self, sec: procfs.TaskSecurity) -> None:
        """Decide, before the stop, whether the thread can be kill-safe, and find the
        machine code the kill-safe path runs (serrinj.remote.sigframe)."""
        self.kill_safe, self.kill_safe_reason = False, ""
        features = thread_features(sec)
        if "shstk" in features:
            self.kill_safe_reason = (
                "the thread runs with an x86 user shadow stack, which would reject"
                " serrinj's resume frame"
            )
            return
        try:
            self._ret_gadget = self._find_code(
                self.arch.syscall_ret_seqs, f"a `{self.arch.syscall_ret_name}` sequence"
            )
            self._restorer = self._find_code(self.arch.sigreturn_seqs, "an rt_sigreturn sequence")
        except (SerrinjError, OSError) as err:
            self.kill_safe_reason = (
                err.message if isinstance(err, SerrinjError) else f"cannot read the VMM: {err}"
            )
            return
        self.kill_safe = True

    def _find_code(self, patterns: Sequence[bytes], what: str) -> int:
        """The address of one of ``patterns`` in the VMM's executable mappings."""
        return find_sequence(
            self.pid, self.arch, patterns, starttime=self._starttime, maps=self._maps, what=what
        )

    def _not_kill_safe(self, reason: str) -> None:
        self.kill_safe, self.kill_safe_reason = False, reason

    def _ensure_frame(self) -> None:
        """Write the resume frame below the stack pointer, once, before the first
        register or scratch change: from then on every state the engine puts the
        thread in is one it leaves on its own if serrinj dies."""
        if self._frame is not None:
            return
        if not self._arch_read:
            # also what the restore puts back (live SVE state), kill-safe or not
            arch_problem = self._arch_problem()
            self._arch_read = True
            if arch_problem and self.kill_safe:
                self._not_kill_safe(arch_problem)
        if not self.kill_safe:
            return
        assert self.saved is not None and self._restorer is not None
        frames = sigframe.FRAMES[self.arch.name]
        if self._ret_gadget == self.saved[self.arch.pc_reg]:
            self._not_kill_safe("the thread stopped on the engine's own gadget")
            return
        fp = self._ptrace(ptrace.get_regset, self.tid, frames.fp_note, frames.fp_size)
        problem = frames.fp_problem(fp)
        if problem:
            self._not_kill_safe(problem)
            return
        mask = bytearray(8)
        self._ptrace(_native.ptrace_buf, ptrace.PTRACE_GETSIGMASK, self.tid, 8, mask)
        top = self.saved[self.arch.sp_reg] - self.arch.red_zone
        frame = frames.build(
            top,
            self.saved,
            self._syscall_entry_baseline,
            fp,
            int.from_bytes(mask, "little"),
            self._restorer,
            self._saved_sve,
        )
        try:
            self._claim(frame.base, top)
        except EngineError:  # (TargetGone passes through)
            self._not_kill_safe(
                f"no room for the resume frame ({len(frame.data)} bytes) below the stack pointer"
            )
            return
        self.write_memory(frame.base, frame.data)
        self._frame = frame
        _phase("frame-written")

    def _arch_problem(self) -> str:
        """What of the stopped thread's state a frame cannot carry ('' if nothing):
        on aarch64 a guarded control stack (GCS), SME streaming mode or live ZA
        storage. Live SVE state is read whole into :attr:`_saved_sve`, for the
        frame's ``sve_context`` record and for the restore."""
        if self.arch.name != "aarch64":
            return ""
        gcs = self._optional_regset(sigframe.NT_ARM_GCS, 24)  # b"": no GCS here
        if len(gcs) >= 8 and int.from_bytes(gcs[:8], "little") & sigframe.PR_SHADOW_STACK_ENABLE:
            return (
                "the thread runs with a guarded control stack (GCS), which would reject the frame"
            )
        head = self._optional_regset(sigframe.NT_ARM_SVE, sigframe.SVE_PT_HEADER_SIZE)
        if len(head) >= sigframe.SVE_PT_HEADER_SIZE and sigframe.SveHeader.unpack(head).live:
            sve = self._ptrace(
                ptrace.get_regset, self.tid, sigframe.NT_ARM_SVE, sigframe.SVE_PT_MAX_SIZE
            )
            problem = sigframe.a64_sve_problem(sve)
            if problem:
                return problem
            self._saved_sve = sve
        ssve = self._optional_regset(sigframe.NT_ARM_SSVE, sigframe.SVE_PT_HEADER_SIZE)
        if len(ssve) >= sigframe.SVE_PT_HEADER_SIZE and sigframe.SveHeader.unpack(ssve).live:
            return (
                "the thread is in SME streaming mode, which the frame (non-streaming SVE"
                " and FPSIMD only) would end"
            )
        za = self._optional_regset(sigframe.NT_ARM_ZA, sigframe.SVE_PT_HEADER_SIZE)
        if len(za) >= 4 and int.from_bytes(za[:4], "little") > sigframe.ZA_PT_ZA_OFFSET:
            return "the thread holds live SME ZA storage, which the frame does not carry"
        return ""

    def _optional_regset(self, note: int, size: int) -> bytes:
        """A regset the kernel or CPU may not have (b"" then)."""
        try:
            return ptrace.get_regset(self.tid, note, size)
        except OSError as err:
            if err.errno == errno.ESRCH and not self._alive():
                self._seized = False
                raise TargetGone(f"thread {self.tid} of process {self.pid} exited") from err
            return b""

    def _warm_up(self) -> None:
        """Run the code of the stop path once before the thread is stopped.

        The first call of each native wrapper resolves its libc symbol and builds
        its C types (cffi parses type strings on first use), and the first
        register (un)pack compiles its struct format: hundreds of microseconds
        that would otherwise be spent while the vCPU is held, in every fresh
        process (each CLI run). Waiting for our own pid only fails with ECHILD.
        """
        global _warmed
        if _warmed:
            return
        with contextlib.suppress(OSError):
            _native.waitpid(os.getpid(), ptrace.WNOHANG)
        _native.address_of(bytearray(8))
        regs = Registers.unpack(self.arch, bytes(self.arch.regs_size))
        regs.pack()
        # the resume frame's calls and struct formats; ptrace of pid 0 fails (ESRCH)
        with contextlib.suppress(OSError):
            _native.ptrace_buf(ptrace.PTRACE_GETSIGMASK, 0, 8, bytearray(8))
        with contextlib.suppress(OSError):
            _native.ptrace_iovec(ptrace.PTRACE_GETREGSET, 0, ptrace.NT_PRSTATUS, bytearray(8))
        scratch = bytearray(64)
        _native.process_vm_write(os.getpid(), _native.address_of(scratch), bytes(8))
        frames = sigframe.FRAMES.get(self.arch.name)
        if frames is not None:
            fp = bytearray(frames.fp_size if frames.fp_size < 4096 else 1024)
            with contextlib.suppress(ValueError, struct.error):
                frames.borrow(regs, frames.build(1 << 20, regs, False, bytes(fp), 0, 0), 0)
        _warmed = True

    @property
    def gadget(self) -> int:
        """The address of the syscall instruction the engine executes."""
        if self._gadget is None:
            assert self.saved is not None
            avoid = (self.saved[self.arch.pc_reg],)
            if self._gadget_hint is not None and self._gadget_hint not in avoid:
                self._gadget = self._gadget_hint
                return self._gadget
            try:
                self._gadget = find_syscall_gadget(
                    self.pid, self.arch, avoid=avoid, starttime=self._starttime
                )
            except (SerrinjError, ProcessLookupError) as err:
                self._raise_if_gone(err)
                raise
        return self._gadget

    def _raise_if_gone(self, err: BaseException) -> None:
        """A dying process's /proc files read empty: report that, not the symptom."""
        if not self._alive():
            self._seized = False
            raise TargetGone(f"thread {self.tid} of process {self.pid} exited") from err

    def check_seccomp(self, nr: int, args: Sequence[int]) -> None:
        """Raise :class:`SeccompBlocked` unless the thread's filters let the call through."""
        if self._seccomp_mode == 0:
            return
        if self._seccomp_mode == 1:
            raise SeccompBlocked(
                f"thread {self.tid} of process {self.pid} runs in strict seccomp mode",
                hint="only read/write/exit are allowed there; pick another thread",
            )
        from serrinj.remote import seccomp

        if self._filters is None:
            self._filters = self._read_filters()
        ip = self._syscall_gadget() + len(self.arch.syscall_insn)
        data = seccomp.seccomp_data(nr, self.arch.audit_arch, ip, args)
        verdict = seccomp.evaluate(self._filters, data)
        if not verdict.action.lets_through:
            raise SeccompBlocked(
                f"the seccomp filter of thread {self.tid} in process {self.pid}"
                f" ({_comm_or_unknown(self.pid)}) would answer syscall {nr} with"
                f" {verdict.action.value.upper()} (filter #{verdict.filter_index})",
                hint="nothing was sent; the VMM allows this call only on other threads",
            )

    def _read_filters(self) -> List[List[seccomp.Insn]]:
        from serrinj.remote import seccomp

        filters = []
        for index in range(64):
            try:
                raw = self._ptrace(ptrace.seccomp_filter, self.tid, index)
            except OSError as err:
                if err.errno == errno.ENOENT:
                    break
                if err.errno in (errno.EACCES, errno.EPERM):
                    raise SeccompBlocked(
                        f"thread {self.tid} of process {self.pid} has seccomp filters and"
                        " serrinj may not read them",
                        hint="reading filters needs CAP_SYS_ADMIN; nothing was sent",
                    ) from err
                raise SeccompBlocked(
                    f"cannot read the seccomp filters of thread {self.tid}: {err.strerror}",
                    hint="the kernel needs CONFIG_CHECKPOINT_RESTORE; nothing was sent",
                ) from err
            filters.append(seccomp.decode_program(raw))
        return filters

    def _syscall_gadget(self) -> int:
        """The syscall instruction the engine's syscalls run at: a ``syscall; ret``
        sequence on the kill-safe path, any syscall instruction otherwise."""
        if self.kill_safe and self._ret_gadget is not None:
            return self._ret_gadget
        return self.gadget

    def syscall(self, nr: int, *args: int) -> int:
        """Run syscall ``nr`` in the thread; returns the raw (signed) result."""
        assert self.saved is not None, "attach() first"
        # SIGINT/SIGTERM are held while the thread is ours; once one has come,
        # send nothing more: restore, detach, then act on it.
        self.raise_if_interrupted()
        self.check_seccomp(nr, args)
        self._ensure_frame()
        gadget = self._syscall_gadget()
        regs = self.arch.prepare_syscall(self.saved, gadget, nr, args)
        if self._frame is not None:
            assert self._restorer is not None
            regs = sigframe.FRAMES[self.arch.name].borrow(regs, self._frame, self._restorer)
        t0 = time.perf_counter_ns()
        self._ptrace(ptrace.set_regset, self.tid, ptrace.NT_PRSTATUS, regs.pack())
        self._dirty = True
        _phase("borrowed")
        self.raise_if_interrupted()
        self._resume(ptrace.resume_syscall, 0)
        self._wait_syscall_stop()
        self._at_entry = True
        entry = self.get_registers()
        if not self.arch.entry_matches(entry, gadget, nr):
            raise EngineError(
                f"thread {self.tid} stopped in an unexpected syscall"
                f" ({self.arch.entry_call(entry)[0]}) instead of {nr}"
            )
        _phase("syscall-entered")
        self._resume(ptrace.resume_syscall, 0)
        self._wait_syscall_stop()
        self._at_entry = False
        result = self.arch.syscall_result(self.get_registers())
        spent = time.perf_counter_ns() - t0
        self.timings["syscall_ns"] = spent
        self.timings["syscall_total_ns"] = self.timings.get("syscall_total_ns", 0) + spent
        _phase("syscall-done")
        return result

    def scratch(self, size: int) -> int:
        """An address below the thread's stack pointer with ``size`` bytes of room.

        The original bytes are saved on first use and written back on close.
        The region lies past the red zone (and below the resume frame) and
        inside the thread's stack mapping.
        """
        assert self.saved is not None
        need = (size + 15) & ~15
        if need > MAX_SCRATCH:
            raise ValueError(f"scratch of {size} bytes exceeds {MAX_SCRATCH}")
        self._ensure_frame()
        if self._frame is not None:
            top = self._frame.base
        else:
            top = self.saved[self.arch.sp_reg] - self.arch.red_zone
        base = (top - need) & ~15
        if self._scratch_base and base >= self._scratch_base:
            return base
        self._claim(base, top)
        return base

    def _claim(self, base: int, top: int) -> None:
        """Check that [base, top) lies in the thread's stack mapping and save its
        bytes (with those between it and what is already claimed) for the restore."""
        sp = self.saved[self.arch.sp_reg] if self.saved is not None else top
        key = self._stack_key()
        known = _stack_cache.get(key)
        if known is None or not known[0] <= base < top <= known[1]:
            # A stack read before the stop still holds the stack: the thread has
            # been running on it since. Anything else is checked against a fresh read.
            mapping = None
            if self._maps:
                # /proc/PID/maps lists disjoint ranges in address order: a bisection,
                # not a walk of hundreds of mappings while the thread is held
                i = bisect.bisect_right(self._map_starts, base) - 1
                if i >= 0 and self._maps[i].contains(base, top - base):
                    mapping = self._maps[i]
            if mapping is None or not mapping.writable:
                try:
                    maps = procfs.maps(self.pid)
                except ProcessLookupError as err:
                    self._raise_if_gone(err)
                    raise
                mapping = next((m for m in maps if m.contains(base, top - base)), None)
            if mapping is not None and mapping.writable:
                if len(_stack_cache) >= _STACK_CACHE_MAX:
                    _stack_cache.clear()
                _stack_cache[key] = (mapping.start, mapping.end)
            else:
                self._scratch_fail(sp)
        old_base = self._scratch_base or top
        if base < old_base:
            extra = self.read_memory(base, old_base - base)
            self._scratch_saved = extra + self._scratch_saved
            self._scratch_base = base

    def _stack_key(self) -> Tuple[int, int, int]:
        return (self.pid, self._starttime or 0, self.tid)

    def _scratch_fail(self, sp: int) -> NoReturn:
        self._raise_if_gone(EngineError("no stack mapping"))
        raise EngineError(
            f"no writable memory below the stack pointer {sp:#x} of thread {self.tid}"
        )

    def read_memory(self, addr: int, size: int) -> bytes:
        return self._vm(_native.process_vm_read, self.pid, addr, size)

    def write_memory(self, addr: int, data: bytes) -> None:
        self._vm(_native.process_vm_write, self.pid, addr, data)

    def step_syscalls(
        self,
        want: Callable[[bool, Registers], bool],
        timeout: float,
        wake_within: float = 0.0,
    ) -> bool:
        """Let the thread live on under syscall tracing until ``want(is_entry, regs)``
        holds at a syscall stop; the thread stays stopped there and that point
        becomes the new baseline. Returns ``False`` on timeout (the thread is then
        brought to an ordinary event stop, equally safe to restore from).

        ``wake_within``: the thread sleeps in a syscall (a futex, a poll) that
        may last that long; ``timeout`` then counts from its first syscall exit
        (its wake-up), so that the time it slept, and the time a loaded host
        takes to run it again, is not charged to the work that follows.

        Signals meant for the thread are delivered as usual: its registers are
        its own during stepping. Only valid before the engine borrowed them.
        """
        assert self.saved is not None and not self._dirty
        # The thread runs its own code now and may use the stack below its
        # pointer: give the scratch bytes back; a new frame follows the new baseline.
        self._restore_memory()
        deadline = time.monotonic() + max(timeout, wake_within)
        woke = wake_within <= 0
        entry = True
        self._resume(ptrace.resume_syscall, 0)
        while True:
            stop = self._wait(max(deadline - time.monotonic(), 0.0), allow_timeout=True)
            if stop is None or self.interrupt_pending():
                if stop is None:
                    self._ptrace(ptrace.interrupt, self.tid)
                    stop = self._wait(self.stop_timeout)
                    assert stop is not None
                self._to_event_stop(stop)
                self._rebase()
                self.raise_if_interrupted()
                return False
            if stop.kind is ptrace.StopKind.SYSCALL:
                if want(entry, self.get_registers()):
                    self._rebase(at_syscall_stop=True, syscall_entry=entry)
                    return True
                if not entry and not woke:
                    woke = True
                    deadline = max(deadline, time.monotonic() + timeout)
                entry = not entry
                self._resume(ptrace.resume_syscall, 0)
            elif stop.kind is ptrace.StopKind.SIGNAL:
                self._resume(ptrace.resume_syscall, stop.signo)
            else:
                self._resume(ptrace.resume_syscall, 0)

    def step_to_kvm_run_entry(self, timeout: float, wake_within: float = 0.0) -> Optional[int]:
        """Step to the thread's next ``ioctl(fd, KVM_RUN)`` entry; returns ``fd``
        (``wake_within``: see :meth:`step_syscalls`)."""
        found: List[int] = []

        def want(is_entry: bool, regs: Registers) -> bool:
            fd = self.arch.kvm_run_fd_at_entry(regs) if is_entry else None
            if fd is not None:
                found.append(fd)
            return fd is not None

        return found[0] if self.step_syscalls(want, timeout, wake_within) else None

    def step_to_kvm_run_exit(self, accept: Callable[[int], bool], timeout: float) -> Optional[int]:
        """Step until an ``ioctl(fd, KVM_RUN)`` returns with ``accept(fd)`` true;
        the thread is held right there, before the VMM sees the exit."""
        state: Dict[str, Optional[int]] = {"fd": None, "hit": None}

        def want(is_entry: bool, regs: Registers) -> bool:
            if is_entry:
                state["fd"] = self.arch.kvm_run_fd_at_entry(regs)
                return False
            fd, state["fd"] = state["fd"], None
            if fd is not None and accept(fd):
                state["hit"] = fd
                return True
            return False

        return state["hit"] if self.step_syscalls(want, timeout) else None

    def _rebase(self, at_syscall_stop: bool = False, syscall_entry: bool = False) -> None:
        self.saved = self.get_registers()
        self._at_syscall_stop = at_syscall_stop
        self._syscall_entry_baseline = at_syscall_stop and syscall_entry
        self._saved_sve, self._arch_read = b"", False
        if self.arch.name == "aarch64":
            self._saved_syscallno = ptrace.get_regset(self.tid, ptrace.NT_ARM_SYSTEM_CALL, 4)

    # ------------------------------------------------------------------ restore
    def _restore_and_detach(self) -> None:
        tid = self.tid
        t_restore = time.perf_counter_ns()
        # at one of our own syscall stops (not interrupted in our syscall)
        at_our_stop = not self._running
        if self._running:
            if not self._dirty:
                # Seized but never stopped (e.g. uninterruptible sleep) and
                # unchanged: detaching needs a stop, and the kernel detaches
                # for us harmlessly when serrinj exits.
                return
            # Our syscall is still running on borrowed registers: stop it first.
            self._ptrace(ptrace.interrupt, tid)
            stop = self._wait(self.stop_timeout)
            assert stop is not None
        failure: Optional[EngineError] = None
        if self._dirty:
            _phase("restoring")
        try:
            # Registers first, then memory: until the registers are back the
            # thread may still need its resume frame (serrinj killed meanwhile);
            # once they are, the bytes below its stack pointer are dead to it.
            if self._at_entry:
                self._skip_current_syscall()
            if self.saved is not None and self._dirty:
                self._put_baseline()
                if not self._at_syscall_stop and self._signal_path_needed(at_our_stop):
                    # Back into the kernel's signal path (see the module docstring).
                    self._ptrace(ptrace.interrupt, tid)
                    self._resume(ptrace.cont, 0)
                    self._wait_event_stop(deliver_signals=False)
                after = self.get_registers()
                self.verified = self._same_registers(self.saved, after)
                if not self.verified:
                    failure = EngineError(
                        f"thread {tid} registers differed after restore: {self.saved.diff(after)}"
                    )
                    self._put_baseline()
                elif self._saved_sve and not self._same_sve():
                    self.verified = False
                    failure = EngineError(f"thread {tid} SVE state differed after restore")
                    self._put_baseline()
                self._dirty = False
            elif self.saved is not None:
                self.verified = True
            self._restore_memory()
        finally:
            for sig in self._deferred:
                with contextlib.suppress(ProcessLookupError):
                    _native.tgkill(self.pid, tid, sig)
            self._deferred.clear()
            t0 = time.perf_counter_ns()
            self.timings["restore_ns"] = t0 - t_restore
            if self._t_interrupt:
                # The thread runs again from inside PTRACE_DETACH (and may take
                # this CPU from us before the call returns).
                self.timings["held_ns"] = t0 - self._t_interrupt
            self._ptrace(ptrace.detach, tid, 0)
            self.timings["detach_ns"] = time.perf_counter_ns() - t0
        if failure is not None:
            raise failure

    def _restore_memory(self) -> None:
        if self._scratch_saved:
            self.write_memory(self._scratch_base, self._scratch_saved)
        self._scratch_saved = b""
        self._scratch_base = 0
        self._frame = None

    def _signal_path_needed(self, at_our_stop: bool) -> bool:
        """Whether the thread must stop once more in the kernel's signal path
        before it is let go (see the module docstring).

        Not on x86_64 when the thread sits at our own syscall-exit stop, no signal
        waits to be re-sent, and the saved state holds no restart code: the
        baseline stop was in the signal path with nothing left to restart (a
        KVM_RUN that returned -EINTR, or user code), so returning to user mode
        straight from the syscall exit, with the baseline registers, is what the
        signal path would have done. It saves a stop and a resume: a tenth to
        a fifth of the time the vCPU is held. Anything else takes the full path.
        """
        if self.arch.name != "x86_64" or not at_our_stop or self._deferred:
            return True
        assert self.saved is not None
        return to_signed(self.saved["rax"]) in _RESTART_CODES

    def _put_baseline(self) -> None:
        assert self.saved is not None
        if self._saved_sve:
            # Before the general registers: until they are back, a kill leaves the
            # thread to its frame, which restores the SVE state itself.
            self._ptrace(ptrace.set_regset, self.tid, sigframe.NT_ARM_SVE, self._saved_sve)
        self._ptrace(ptrace.set_regset, self.tid, ptrace.NT_PRSTATUS, self.saved.pack())
        if self._saved_syscallno is not None:
            self._ptrace(
                ptrace.set_regset, self.tid, ptrace.NT_ARM_SYSTEM_CALL, self._saved_syscallno
            )

    def _same_sve(self) -> bool:
        """Whether the NT_ARM_SVE regset reads as it was saved."""
        now = self._ptrace(ptrace.get_regset, self.tid, sigframe.NT_ARM_SVE, len(self._saved_sve))
        return now == self._saved_sve

    def _same_registers(self, a: Registers, b: Registers) -> bool:
        return self.arch.same_after_restore(a, b, self._at_syscall_stop)

    def _skip_current_syscall(self) -> None:
        """At one of our entry stops: cancel the syscall and reach its exit stop."""
        if self.arch.name == "x86_64":
            regs = self.get_registers().replace(orig_rax=(1 << 64) - 1)
            self._ptrace(ptrace.set_regset, self.tid, ptrace.NT_PRSTATUS, regs.pack())
        else:
            self._ptrace(
                ptrace.set_regset,
                self.tid,
                ptrace.NT_ARM_SYSTEM_CALL,
                (-1).to_bytes(4, "little", signed=True),
            )
        self._resume(ptrace.resume_syscall, 0)
        self._wait_syscall_stop()
        self._at_entry = False

    # ------------------------------------------------------------------ waiting
    def _wait(self, timeout: float, allow_timeout: bool = False) -> Optional[ptrace.Stop]:
        stop = ptrace.wait_stop(self.tid, timeout)
        if stop is not None:
            self._running = False
        if stop is None:
            if allow_timeout:
                return None
            state = "?"
            with contextlib.suppress(ProcessLookupError):
                state = procfs.stat(self.pid, self.tid).state
            raise EngineError(
                f"thread {self.tid} of process {self.pid} did not stop within"
                f" {timeout:.1f} s (state {state})",
                hint="a thread in uninterruptible sleep (D) cannot be stopped; try again",
            )
        if stop.kind is ptrace.StopKind.EXITED:
            self._seized = False
            raise TargetGone(f"thread {self.tid} of process {self.pid} exited")
        return stop

    def _wait_event_stop(
        self,
        deliver_signals: bool,
        resume: Callable[[int, int], None] = ptrace.cont,
    ) -> ptrace.Stop:
        while True:
            stop = self._wait(self.stop_timeout)
            assert stop is not None
            if stop.kind is ptrace.StopKind.EVENT_STOP:
                return stop
            sig = 0
            if stop.kind is ptrace.StopKind.SIGNAL:
                if deliver_signals:
                    sig = stop.signo
                else:
                    self._deferred.append(stop.signo)
            self._resume(resume, sig)

    def _to_event_stop(self, stop: ptrace.Stop) -> None:
        """From any stop of a thread being stepped, reach an ordinary event stop.

        Under PTRACE_SYSCALL a PTRACE_INTERRUPT is reported as a syscall stop
        when one comes first (any ptrace stop consumes the pending interrupt
        trap), so waiting for the event stop while resuming with PTRACE_SYSCALL
        never ends for a thread that keeps making syscalls. The interrupt is
        queued again while the thread is stopped, and it is resumed with
        PTRACE_CONT (no syscall stops): its next return to user mode, or its
        next blocking wait, is the event stop. Signals are delivered as usual.
        """
        while stop.kind is not ptrace.StopKind.EVENT_STOP:
            sig = stop.signo if stop.kind is ptrace.StopKind.SIGNAL else 0
            self._ptrace(ptrace.interrupt, self.tid)
            self._resume(ptrace.cont, sig)
            nxt = self._wait(self.stop_timeout)
            assert nxt is not None
            stop = nxt

    def _wait_syscall_stop(self) -> None:
        stalled = False
        while True:
            if self.on_stall is not None and not stalled:
                stop = self._wait(self.stall_after, allow_timeout=True)
                if stop is None:
                    stalled = True
                    self.on_stall()
                    continue
            else:
                stop = self._wait(self.stop_timeout)
            assert stop is not None
            if stop.kind is ptrace.StopKind.SYSCALL:
                return
            if stop.kind is ptrace.StopKind.SIGNAL:
                # Never deliver a signal on borrowed registers.
                self._deferred.append(stop.signo)
            self._resume(ptrace.resume_syscall, 0)

    # ------------------------------------------------------------------ plumbing
    def _resume(self, fn: Callable[[int, int], None], sig: int) -> None:
        self._ptrace(fn, self.tid, sig)
        self._running = True

    def _ptrace(self, fn: Callable[..., object], *args: object) -> bytes:
        try:
            return fn(*args)  # type: ignore[return-value]
        except OSError as err:
            if err.errno == errno.ESRCH and not self._alive():
                self._seized = False
                raise TargetGone(f"thread {self.tid} of process {self.pid} exited") from err
            raise

    def _vm(self, fn: Callable[..., object], *args: object) -> bytes:
        try:
            return fn(*args)  # type: ignore[return-value]
        except OSError as err:
            if err.errno == errno.ESRCH:
                self._seized = False
                raise TargetGone(f"process {self.pid} exited") from err
            raise

    def _alive(self, grace: float = 0.5) -> bool:
        """False once the thread is gone or dying; asked only when something failed.

        A killed thread stays listed (state Z or X) until it is reaped. A SIGKILL
        (the VMM killed, or exiting: exit_group kills its other threads) wakes a
        ptrace-stopped thread at once, so a request can fail with ESRCH an instant
        before the thread shows PF_EXITING: give it ``grace`` seconds to show.
        """
        deadline = time.monotonic() + grace
        while True:
            try:
                if procfs.stat(self.pid, self.tid).exiting or procfs.sigkill_pending(
                    self.pid, self.tid
                ):
                    return False
            except ProcessLookupError:
                return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.005)

    def _block_signals(self) -> None:
        _install_tstp_handler()
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)

    def _unblock_signals(self) -> None:
        if self._old_mask is None:
            return
        old, self._old_mask = self._old_mask, None
        pending = signal.sigpending() & _HELD_SIGNALS
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if pending and not (old & pending):
            # Unblocking delivered them to the C-level handler; Python runs its
            # handler (KeyboardInterrupt, SystemExit...) at its next check, which a
            # call guarantees: act on the signal here, before anything else runs.
            _check_signals()

    def interrupt_pending(self) -> bool:
        """Whether SIGINT/SIGTERM arrived for serrinj during the session."""
        return bool(signal.sigpending() & _GUARDED_SIGNALS)

    def raise_if_interrupted(self) -> None:
        """Raise :class:`Interrupted` when SIGINT/SIGTERM arrived during the session."""
        if self.interrupt_pending():
            raise Interrupted(
                "interrupted", hint="the thread was restored and detached before exiting"
            )
