"""The one way the tests start serrinj's test VM: :class:`VmFactory`, exposed as the
``start_vm`` fixture of ``tests/conftest.py``.

Every VM it starts runs ``python -m serrinj.testvm`` in a process of its own,
and :meth:`VmFactory.close` ends each one by its pid (continued first, should a
test have stopped it with SIGSTOP), whatever the test did or how it failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Dict, List, Optional, Sequence

from serrinj.testvm.process import TestVmProcess

#: how long a guest may take to report ``guest-ready`` on a loaded 2-CPU machine
READY_TIMEOUT = 20.0


def wait_guest_ready(vm: TestVmProcess, timeout: float = READY_TIMEOUT) -> None:
    """Wait until the guest of every vCPU of ``vm`` has reported ``guest-ready``."""
    for info in vm.vcpus:
        vm.wait_event(
            lambda e, v=info.vcpu_id: e.get("event") == "guest-ready" and e.get("vcpu") == v,
            timeout,
        )


class VmFactory:
    """Starts test VMs; :meth:`close` stops every one of them by its pid."""

    def __init__(self) -> None:
        self.vms: List[TestVmProcess] = []

    def __call__(
        self,
        vcpus: int = 2,
        mode: str = "halt",
        extra: Sequence[str] = (),
        *,
        ready: Optional[bool] = None,
        ready_timeout: float = READY_TIMEOUT,
        arch: Optional[str] = None,
        python: str = sys.executable,
        env: Optional[Dict[str, str]] = None,
        own_process_group: bool = False,
    ) -> TestVmProcess:
        """Start a test VM of ``vcpus`` vCPUs in ``mode`` with the testvm options
        ``extra``; unless ``ready`` is False (by default: unless it starts paused),
        return once every vCPU's guest has reported ``guest-ready``."""
        vm = TestVmProcess.start(
            arch=arch,
            vcpus=vcpus,
            mode=mode,
            extra_args=list(extra),
            python=python,
            env=env,
            own_process_group=own_process_group,
        )
        self.vms.append(vm)
        if ready is None:
            ready = "--start-paused" not in extra
        if ready:
            wait_guest_ready(vm, ready_timeout)
        return vm

    def close(self) -> None:
        """Stop every VM started here, by its pid (SIGCONT first: a stopped VM
        would not act on SIGTERM until SIGKILL)."""
        for vm in self.vms:
            if vm.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(vm.pid, signal.SIGCONT)
            vm.stop()
        self.vms.clear()
