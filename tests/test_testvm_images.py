"""The bytes the test-VM builders emit, pinned by hash.

The guests and firmware are assembled from Python; refactoring the builders must not change
what a guest does. The digest below was recorded from the builders as they were and pins the
machine code (and the label values the VMMs read) of every image the tests use: the x86
firmware, both built-in guests, and each arm64 firmware variant. A deliberate change to a
guest updates the digest here in the same commit; the assertion message lists each image's own
hash, to find the one that changed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Dict, Mapping

from serrinj.testvm import arm64, firmware_arm64, firmware_x86, x86_64
from serrinj.testvm.firmware_arm64 import FirmwareOptions

#: sha256 of the JSON of :func:`_image_hashes`, recorded before the builders were refactored
DIGEST = "ab75f9490857a3b2f9dd9f425ab0d141353f91c11a5818c2e6f6e3739e707b2a"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha_labels(symbols: Mapping[str, int]) -> str:
    return _sha(json.dumps(sorted(symbols.items())).encode())


def _image_hashes() -> Dict[str, str]:
    x86, a64 = x86_64.build_guest(), arm64.build_guest()
    hashes = {
        "x86 firmware": _sha(firmware_x86.build_firmware()),
        "x86 guest": _sha(x86.code),
        "x86 guest labels": _sha_labels(x86.symbols),
        "x86 ivt": _sha(x86_64.ivt(x86)),
        "arm64 guest": _sha(a64.code),
        "arm64 guest labels": _sha_labels(a64.symbols),
        "arm64 page table": _sha(arm64.page_table()),
    }
    for mode, mask, probe in itertools.product(firmware_arm64.MODES, (False, True), (False, True)):
        fw = firmware_arm64.build(FirmwareOptions(mode=mode, mask_serror=mask, mmio_probe=probe))
        name = f"arm64 firmware {mode} mask_serror={int(mask)} mmio_probe={int(probe)}"
        hashes[name] = _sha(fw.elf())
        hashes[f"{name} labels"] = _sha_labels(fw.symbols)
    opts = FirmwareOptions(mode="spin", mask_serror=True, mmio_probe=True, probe_addr=0x0C001000)
    hashes["arm64 firmware probe_addr=0xc001000"] = _sha(firmware_arm64.build(opts).elf())
    return hashes


def test_builders_emit_the_recorded_bytes() -> None:
    hashes = _image_hashes()
    assert _sha(json.dumps(hashes, sort_keys=True).encode()) == DIGEST, hashes
