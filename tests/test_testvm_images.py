"""The bytes the test-VM builders emit, pinned by hash.

The guests and firmware are assembled from Python; refactoring the builders must not change
what a guest does. These hashes were recorded from the builders as they were and pin the
machine code (and the label values the VMMs read) of every image the tests use: the x86
firmware, both built-in guests, and each arm64 firmware variant. A deliberate change to a
guest updates the hash here in the same commit.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

import pytest

from serrinj.testvm import arm64, firmware_arm64, firmware_x86, x86_64
from serrinj.testvm.firmware_arm64 import FirmwareOptions


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha_symbols(symbols: Mapping[str, int]) -> str:
    return _sha(json.dumps(sorted(symbols.items())).encode())


def test_x86_firmware_bytes() -> None:
    assert _sha(firmware_x86.build_firmware()) == (
        "7bcafee444efb514ce8280b8c03146690a7f7d1328f10beed6edc182236e96b8"
    )


def test_x86_guest_bytes() -> None:
    guest = x86_64.build_guest()
    assert _sha(guest.code) == "f1875640d464c36dc9a0890978b7a3d72951125e8748cc5b141d8354cbd998a6"
    assert _sha_symbols(guest.symbols) == (
        "64e0571eaf021f134ce81240ff8647734b7aa2428fb69cc90b9ffaa4cb8550a6"
    )
    assert (
        _sha(x86_64.ivt(guest))
        == "d42da078affab879640c526a73d55ec0e8d24268d0c8ebf234a149e16b0cd922"
    )


def test_arm64_guest_bytes() -> None:
    guest = arm64.build_guest()
    assert _sha(guest.code) == "0836046aea75b13c03ec1a9f5e961b8ea0ad06bcd066f88c2688eb8d90ef3db0"
    assert _sha_symbols(guest.symbols) == (
        "864b0b4da4cd6ee10d8f4de0ad18f74a66c2939f13ee5bc989ee861b74f1ba3d"
    )
    assert (
        _sha(arm64.page_table())
        == "5d157b57868a4f202436d002e02f502e5391a21208aaa44f9ae67626731e8012"
    )


#: (mode, mask_serror, mmio_probe) -> (sha256 of the ELF, sha256 of the symbols)
_ARM64_FIRMWARE = {
    ("wfi", False, False): (
        "1b87efbc0426ed1708d0b508c275af7204e7f1e4c0603941d596be5773752b2d",
        "96184e83edbd356f65b61bbf867177f69b46ea6ebd17cfad38e27850e20aa3a0",
    ),
    ("wfi", False, True): (
        "5c18ae9cbd9924d11b8106725e66fbde2b88fc8b77c3beb28cd1b63f216d28ad",
        "11a5a87aa1c965fa7fe0ac550e49b97f6181705aaea0a21a53201e253afe956f",
    ),
    ("wfi", True, False): (
        "787dd6faa4d4f850003012c187f3e1910ad8b7fd02f2f09dccab3011275c7d6e",
        "1c5db64578e87e04e4be6218e0953e78abbd94340ebc38551c4531acc2d9c62a",
    ),
    ("wfi", True, True): (
        "77474a901549cce63c40cd6071df78218edcccf63e375767c704aba860cbcc9d",
        "89f179afa50e9fcad299a157e23d77dccf8e6bfcf20dc48239e3f190b6104415",
    ),
    ("spin", False, False): (
        "59b29b4234acb03bd1f11a8c7e3796ce101d5e47054d8b4ee15c9611cd326499",
        "2a3f7ad7693c0cd051e02085ed0f266515629786018aa87d8f6ab5c48e428679",
    ),
    ("spin", False, True): (
        "8bb1ffb56032736bfefff8cc08f02ff5a070a7411c9d6749653a474698c0a4cd",
        "6f6516615a418b178d1ae777c95f00a04fe2a0d457de2a68d1746dabd41ef615",
    ),
    ("spin", True, False): (
        "71ccbe74bb07dc00c4083f93af4671ead513db391eb00fdfb48eef937fd915da",
        "c6277dc1aaef05cf738edc98aea898d962766ed92cbf8b44e15a15db5d70beb3",
    ),
    ("spin", True, True): (
        "abf5a335d98ce2a0606f0c9d2c66f2a9e362822a2866d4abcdbde68f8625771e",
        "bb5dab6f0596085bc53f1ccfd91afeeaac1ad2f9733abcaf493cc9302f9d3106",
    ),
}


@pytest.mark.parametrize("variant", sorted(_ARM64_FIRMWARE), ids=lambda v: "-".join(map(str, v)))
def test_arm64_firmware_bytes(variant: tuple[str, bool, bool]) -> None:
    mode, mask, probe = variant
    fw = firmware_arm64.build(FirmwareOptions(mode=mode, mask_serror=mask, mmio_probe=probe))
    assert (_sha(fw.elf()), _sha_symbols(fw.symbols)) == _ARM64_FIRMWARE[variant]


def test_arm64_firmware_probe_addr_bytes() -> None:
    opts = FirmwareOptions(mode="spin", mask_serror=True, mmio_probe=True, probe_addr=0x0C001000)
    assert _sha(firmware_arm64.build(opts).elf()) == (
        "741d806d20b75eb29944b72125ae5d6e797418b201d1819cf7fefa44f31a5312"
    )
