"""``python -m lab.arm64``: the emulated arm64 RAS host where serrinj's arm64 features are proven.

Commands::

    run    [--kernel 6.1|6.12|newest|all] [--cpu max|cortex-a57|all] [--no-qemu] [--timeout S]
           [--jobs N] [--refresh] [-- PYTEST ARGS]
           boot the matrix and run the suite in each boot (``make lab-arm64``);
           N boots side by side (default: one per CPU)
    shell  [--kernel 6.1|6.12|newest] [--cpu max|cortex-a57] [--no-qemu] [--timeout S]
           boot once with a shell on the console (``make lab-shell``)
    fetch  [--kernel ...] [--no-qemu] [--refresh]
           download and build only (warms the cache)
    clean  delete the lab's cache

Results go to stdout (one line per test, a summary per boot and overall);
progress goes to stderr. The exit status is 0 only when every boot reached
the suite, finished it, no test failed, and every skip was one the boot's
allow-list accepts (``lab/skips.py``). The closing line gives the run's
wall-clock time and whether it met the lab's 10-minute target.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence

from lab import protocol, skips
from lab.arm64 import boot, config, initramfs, prepare
from lab.arm64.config import say
from lab.arm64.debian import DebianError
from lab.arm64.initramfs import BuildError
from lab.arm64.wheels import WheelError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREPARE = 3
#: observation lines printed under a passing test (all of them are in the boot's log)
OBSERVED_LINES = 12


def _out(text: str = "") -> None:
    print(text, flush=True)


def _kernels(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    return list(config.KERNELS) if value == "all" else [value]


def _cpus(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    return list(config.CPUS) if value == "all" else [value]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lab.arm64",
        description="The emulated arm64 RAS host (QEMU TCG, KVM inside) for serrinj's arm64 tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kernels = [*config.KERNELS, "all"]
    cpus = [*config.CPUS, "all"]

    def common(p: argparse.ArgumentParser, many: bool) -> None:
        p.add_argument(
            "--kernel",
            choices=kernels if many else list(config.KERNELS),
            help="kernel flavour (default: " + ("all" if many else config.DEFAULT_KERNEL) + ")",
        )
        p.add_argument(
            "--cpu",
            choices=cpus if many else list(config.CPUS),
            help="emulated CPU model (default: "
            + ("max on every kernel plus one cortex-a57 boot" if many else "max")
            + ")",
        )
        p.add_argument(
            "--no-qemu",
            dest="with_qemu",
            action="store_false",
            help="leave the inner QEMU and nested guest out of the lab",
        )
        p.add_argument("--with-qemu", dest="with_qemu", action="store_true", help="(default)")
        p.add_argument("--refresh", action="store_true", help="update the apt lists and wheels")
        p.set_defaults(with_qemu=True)

    run = sub.add_parser("run", help="boot the matrix and run the suite (make lab-arm64)")
    common(run, many=True)
    run.add_argument(
        "--timeout",
        type=float,
        default=config.BOOT_TIMEOUT_S,
        help=f"wall-clock limit of each boot in seconds (default {config.BOOT_TIMEOUT_S})",
    )
    run.add_argument(
        "--jobs",
        "-j",
        type=int,
        help="boots at a time (default: one per CPU)",
    )
    run.add_argument("pytest_args", nargs="*", help="after --: pytest arguments inside the lab")

    shell = sub.add_parser("shell", help="boot once with a shell on the console (make lab-shell)")
    common(shell, many=False)
    shell.add_argument("--timeout", type=float, default=0, help="wall-clock limit (default none)")

    fetch = sub.add_parser("fetch", help="download and build only")
    common(fetch, many=True)

    sub.add_parser("clean", help=f"delete {config.lab_cache()}")
    return parser


def _prepare(labels: Sequence[str], with_qemu: bool, refresh: bool) -> prepare.Prepared:
    boot.qemu_binary()
    return prepare.prepare(labels, with_qemu, refresh)


def _project(run_dir: str, pytest_args: Sequence[str]) -> str:
    path = os.path.join(run_dir, "project.cpio.gz")
    n = initramfs.build_project(config.repo_root(), path, pytest_args)
    say(f"project: {n} files from {config.repo_root()}")
    return path


def _pieces(prepared: prepare.Prepared, project: str) -> List[str]:
    pieces = [prepared.base]
    if prepared.nested:
        pieces.append(prepared.nested)
    return [*pieces, project]


def _summary(passed: int, failed: int, skipped: int) -> str:
    text = f"{passed} passed, {failed} failed"
    return text + (f", {skipped} skipped" if skipped else "")


def _minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


def _closing(outcomes: Sequence[boot.BootOutcome], seconds: float) -> str:
    """The run's last line: the counts, the boots that passed, and the wall-clock time
    of the whole run (preparation included) against the lab's target."""
    passed = sum(o.report.passed for o in outcomes)
    failed = sum(o.report.failed for o in outcomes)
    skipped = sum(o.report.skipped for o in outcomes)
    ok = sum(1 for o in outcomes if o.ok)
    target = config.WALL_TARGET_S
    verdict = "within" if seconds <= target else "OVER"
    return (
        f"== overall: {_summary(passed, failed, skipped)}; {ok}/{len(outcomes)} boots ok; "
        f"wall time {seconds:.1f} s ({_minutes(seconds)}), {verdict} the "
        f"{target // 60}-minute target"
    )


def _tally(outcomes: Sequence[boot.BootOutcome]) -> str:
    """The very last line, in the plain ``N passed, N failed`` form that CI systems
    read: a boot that failed without a failing test (it never reached the suite,
    ran out of time, or skipped what its allow-list does not accept) counts as one
    failure, so the line never says 0 failed when the exit status says otherwise."""
    passed = sum(o.report.passed for o in outcomes)
    failed = sum(max(o.report.failed, 0 if o.ok else 1) for o in outcomes)
    skipped = sum(o.report.skipped for o in outcomes)
    return f"lab-arm64: {_summary(passed, failed, skipped)}"


def _run_boot(
    spec: boot.BootSpec,
    kimg: prepare.KernelImage,
    initrd: str,
    log: str,
    args: argparse.Namespace,
    out: Callable[[str], None],
    cancel: threading.Event,
) -> boot.BootOutcome:
    """One boot of ``run``: its header, a line per test, its summary, all through ``out``."""
    debian = kimg.package.version
    allowed = skips.allowed_for(spec.cpu.ras, args.with_qemu)
    out(f"== {spec.name}: Linux {kimg.release} (Debian {debian}), -cpu {spec.cpu.name}")
    say(f"booting {spec.name}")

    def on_line(
        report: protocol.BootReport, done: Optional[protocol.CaseResult], text: str
    ) -> None:
        if protocol.TAG + " " + protocol.INFO in text:
            info = report.info
            caps = " ".join(f"{c}={info.get(f'cap{c}', '?')}" for c in (41, 158, 178))
            ras = {"1": "yes", "0": "no"}.get(info.get("ras_detected", ""), "?")
            out(f"   kernel RAS detection: {ras}; /dev/kvm caps: {caps}")
        if done is not None:
            out(f"   {done.outcome:<8} {done.nodeid}  ({done.duration:.2f} s)")
        elif f"{protocol.TAG} {protocol.DETAIL}" in text and report.results:
            # the detail lines of a failure (or a skip's reason) follow its RESULT
            last = report.results[-1]
            if last.failed or last.outcome == "XPASS":
                out(f"            | {last.details[-1]}")
            elif last.outcome == "SKIPPED" and len(last.details) == 1:
                why = allowed(last)
                verdict = f"accepted: {why}" if why else "NOT in the allow-list: a failure"
                out(f"            | {last.details[-1]} ({verdict})")
        elif f"{protocol.TAG} {protocol.OBSERVED} " in text and report.results:
            # what a passing test printed: its first lines (the boot log keeps them all)
            n = len(report.results[-1].observed)
            if n <= OBSERVED_LINES:
                out(f"            > {report.results[-1].observed[-1]}")
            elif n == OBSERVED_LINES + 1:
                out(f"            > ... (more in {log})")

    outcome = boot.run(spec, initrd, log, args.timeout, args.with_qemu, on_line, cancel)
    rep = outcome.report
    for err in rep.errors:
        out(f"   guest error: {err}")
    status = "ok" if outcome.ok else "FAILED: " + "; ".join(outcome.problems())
    cpu = f" (QEMU CPU {outcome.cpu_seconds:.0f} s)" if outcome.cpu_seconds is not None else ""
    out(
        f"   {spec.name}: {_summary(rep.passed, rep.failed, rep.skipped)} "
        f"in {outcome.seconds:.1f} s{cpu} -- {status}"
    )
    if not rep.reached_suite or not rep.finished or not rep.results:
        out(f"   last console lines (full log: {outcome.log}):")
        for text in outcome.tail[-20:]:
            out(f"   > {text}")
    say(f"{spec.name} done in {outcome.seconds:.1f} s")
    return outcome


def _jobs(requested: Optional[int], boots: int) -> int:
    """Boots at a time: by default one per CPU.

    A boot keeps one CPU busy most of the time and two now and then (two busy
    vCPUs). Four boots on two CPUs (the CI matrix) get half a CPU each: in such
    a run each RAS boot had finished 15 to 36 of its tests after 16 minutes, and
    the inner QEMU's and the tests' own timeouts meet a slowed guest. One per
    CPU costs the same CPU time, and each boot runs at full speed.
    """
    if requested is not None:
        return max(1, min(requested, boots))
    return max(1, min(os.cpu_count() or 1, boots))


def cmd_run(args: argparse.Namespace) -> int:
    combos = boot.matrix(_kernels(args.kernel), _cpus(args.cpu))
    labels = list(dict.fromkeys(k for k, _ in combos))
    started = time.monotonic()
    prepared = _prepare(labels, args.with_qemu, args.refresh)
    run_dir = prepare.new_run_dir()
    initrd = prepare.concatenate(
        _pieces(prepared, _project(run_dir, args.pytest_args)), os.path.join(run_dir, "initrd.img")
    )
    jobs = _jobs(args.jobs, len(combos))
    say(
        f"ready in {time.monotonic() - started:.1f} s; {len(combos)} boot(s), {jobs} at a time,"
        f" logs in {run_dir}"
    )

    specs = [
        boot.BootSpec(kernel, config.CPUS[cpu], prepared.kernels[kernel].image)
        for kernel, cpu in combos
    ]
    cancel = threading.Event()
    lock = threading.Lock()

    def one(spec: boot.BootSpec) -> boot.BootOutcome:
        log = os.path.join(run_dir, f"{spec.kernel}-{spec.cpu.name}.log")
        kimg = prepared.kernels[spec.kernel]
        if jobs == 1:
            return _run_boot(spec, kimg, initrd, log, args, _out, cancel)
        # boots running side by side: each one's lines are printed together when it ends
        lines: List[str] = []
        try:
            return _run_boot(spec, kimg, initrd, log, args, lines.append, cancel)
        finally:
            with lock:
                for text in lines:
                    _out(text)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="boot")
    try:
        futures = [pool.submit(one, spec) for spec in specs]
        outcomes = [f.result() for f in futures]
    except BaseException:
        cancel.set()  # every running boot kills its QEMU within a second
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)

    bad = [o for o in outcomes if not o.ok]
    if bad:
        _out("   failed boots: " + ", ".join(o.spec.name for o in bad) + f" (logs in {run_dir})")
    _out(_closing(outcomes, time.monotonic() - started))
    _out(_tally(outcomes))
    return EXIT_OK if not bad else EXIT_FAILED


def cmd_shell(args: argparse.Namespace) -> int:
    kernel = args.kernel or config.DEFAULT_KERNEL
    cpu = args.cpu or "max"
    prepared = _prepare([kernel], args.with_qemu, args.refresh)
    run_dir = prepare.new_run_dir()
    initrd = prepare.concatenate(
        _pieces(prepared, _project(run_dir, ())), os.path.join(run_dir, "initrd.img")
    )
    spec = boot.BootSpec(kernel, config.CPUS[cpu], prepared.kernels[kernel].image)
    say(f"booting {spec.name} with a shell on the console; leave with `poweroff -f` or Ctrl-A X")
    return boot.interactive(spec, initrd, args.with_qemu, args.timeout or None)


def cmd_fetch(args: argparse.Namespace) -> int:
    combos = boot.matrix(_kernels(args.kernel), _cpus(args.cpu))
    prepared = _prepare(list(dict.fromkeys(k for k, _ in combos)), args.with_qemu, args.refresh)
    for label, k in prepared.kernels.items():
        _out(f"kernel {label}: {k.package.name} {k.package.version} -> {k.image}")
    _out(f"base: {prepared.base}")
    if prepared.nested:
        _out(f"nested: {prepared.nested}")
    return EXIT_OK


def cmd_clean(_args: argparse.Namespace) -> int:
    with prepare.cache_lock():
        for name in os.listdir(config.lab_cache()):
            if name == "lock":
                continue
            path = os.path.join(config.lab_cache(), name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    say(f"removed the contents of {config.lab_cache()}")
    return EXIT_OK


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so every boot kills its QEMU by pid."""

    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


def _raise_terminated(signo: int, _frame: object) -> None:
    raise Terminated(signo)


def catch_termination() -> None:
    """Python's default for SIGTERM and SIGHUP ends the process at once, without unwinding,
    which would leave the running boots' QEMUs orphaned; raise instead."""
    for signo in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signo, _raise_terminated)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"run": cmd_run, "shell": cmd_shell, "fetch": cmd_fetch, "clean": cmd_clean}
    catch_termination()
    try:
        return handlers[args.command](args)
    except Terminated as err:
        print(f"lab: stopped by signal {err.signo}; the boots' QEMUs were killed", file=sys.stderr)
        return 128 + err.signo
    except (DebianError, WheelError, BuildError, FileNotFoundError) as err:
        print(f"lab: error: {err}", file=sys.stderr)
        return EXIT_PREPARE
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
