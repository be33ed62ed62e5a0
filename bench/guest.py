"""The test VM's stall probe, driven through guest RAM from outside the VMM.

The x86 test guest (``serrinj.testvm.x86_64``, "The stall probe") spins on
RDTSC while ``PC_PROBE`` is set and keeps the largest gap between two reads.
This module reads and writes those words with process_vm_readv/writev, which
neither stops the VMM nor makes the guest exit, so the act of measuring does
not disturb what is measured.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any, List, Mapping

from serrinj import _native
from serrinj.testvm.x86_64 import LAYOUT


class ProbeError(RuntimeError):
    """The guest did not answer the probe protocol in time."""


@dataclass
class GuestProbe:
    """One vCPU's probe: its page in the VMM's memory and the TSC rate."""

    pid: int
    page_hva: int
    tsc_khz: int
    _seq: int = 0

    @classmethod
    def of(cls, ready: Mapping[str, Any], pid: int, vcpu_index: int) -> GuestProbe:
        """The probe of the ``vcpu_index``-th vCPU, from the VMM's ``ready`` event."""
        khz = ready.get("tsc_khz")
        if not khz:
            raise ProbeError("the test VM did not report its TSC rate (tsc_khz)")
        return cls(pid, int(ready["ram_hva"]) + int(ready["percpu_gpa"][vcpu_index]), int(khz))

    # ------------------------------------------------------------- raw words
    def _u32(self, name: str) -> int:
        raw = _native.process_vm_read(self.pid, self.page_hva + LAYOUT[name], 4)
        return int(struct.unpack("<I", raw)[0])

    def _u64(self, name: str) -> int:
        raw = _native.process_vm_read(self.pid, self.page_hva + LAYOUT[name], 8)
        return int(struct.unpack("<Q", raw)[0])

    def _put32(self, name: str, value: int) -> None:
        _native.process_vm_write(self.pid, self.page_hva + LAYOUT[name], struct.pack("<I", value))

    # ------------------------------------------------------------- protocol
    def ticks_to_us(self, ticks: int) -> float:
        return ticks * 1000.0 / self.tsc_khz

    def start(self, timeout: float = 10.0) -> None:
        """Turn the probe on and wait until the guest runs it."""
        self._seq = self._u32("PC_PR_WACK")
        self._put32("PC_PROBE", 1)
        deadline = time.monotonic() + timeout
        while not self._u32("PC_PR_ACTIVE"):
            if time.monotonic() > deadline:
                raise ProbeError(f"the guest did not enter the probe within {timeout} s")
            time.sleep(0.001)

    def stop(self) -> None:
        self._put32("PC_PROBE", 0)

    def samples(self) -> int:
        return self._u64("PC_PR_SAMPLES")

    def new_window(self, timeout: float = 20.0) -> None:
        """Start a window (its maximum restarts from 0) and wait for the guest to see it."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._put32("PC_PR_WSEQ", self._seq)
        deadline = time.monotonic() + timeout
        while self._u32("PC_PR_WACK") != self._seq:
            if time.monotonic() > deadline:
                raise ProbeError(f"the guest did not start window {self._seq} within {timeout} s")

    def window_max_us(self, settle_samples: int = 3, timeout: float = 20.0) -> float:
        """The largest gap of the current window, once the guest has run on.

        Waits until the guest has taken ``settle_samples`` more samples, so a
        stall that just ended has been measured (its gap is recorded at the
        first read after it).
        """
        start = self.samples()
        deadline = time.monotonic() + timeout
        while self.samples() < start + settle_samples:
            if time.monotonic() > deadline:
                raise ProbeError(f"the guest took no samples for {timeout} s")
        return self.ticks_to_us(self._u32("PC_PR_WMAX"))

    def histogram(self) -> List[int]:
        raw = _native.process_vm_read(self.pid, self.page_hva + LAYOUT["PC_PR_HIST"], 128)
        return list(struct.unpack("<32I", raw))

    def max_us(self) -> float:
        return self.ticks_to_us(self._u32("PC_PR_MAX"))
