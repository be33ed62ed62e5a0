"""Host-side checks of the test VM's arm64 guest (it runs only inside the arm64 lab).

The guest's behaviour is proven in ``lab/suite/test_testvm_arm64.py``; here:
its constants against the arm64 kernel headers, its code against binutils, its
page table and memory layout, and the VMM options that select its modes.
"""

from __future__ import annotations

import os
import pathlib
import re
import struct
import subprocess

import pytest

from serrinj.kvm import arm64 as ka
from serrinj.testvm import arm64 as g
from serrinj.testvm import vmm


@pytest.mark.cross
def test_constants_match_the_arm64_headers(tmp_path: pathlib.Path) -> None:
    checks = {
        "KVM_IRQ_LINE": g.KVM_IRQ_LINE,
        "sizeof(struct kvm_irq_level)": g.SIZEOF_KVM_IRQ_LEVEL,
        "KVM_ARM_IRQ_TYPE_SHIFT": g.KVM_ARM_IRQ_TYPE_SHIFT,
        "KVM_ARM_IRQ_VCPU_SHIFT": g.KVM_ARM_IRQ_VCPU_SHIFT,
        "KVM_ARM_IRQ_VCPU2_SHIFT": g.KVM_ARM_IRQ_VCPU2_SHIFT,
        "KVM_ARM_IRQ_TYPE_CPU": g.KVM_ARM_IRQ_TYPE_CPU,
        "KVM_ARM_IRQ_CPU_IRQ": g.KVM_ARM_IRQ_CPU_IRQ,
        "offsetof(struct kvm_regs, sp_el1)": 34 * 8,
        "(KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE"
        " | KVM_REG_ARM_CORE_REG(sp_el1))": g.REG_SP_EL1,
        "sizeof(struct kvm_vcpu_init)": ka.SIZEOF_KVM_VCPU_INIT,
        "KVM_ARM_VCPU_PSCI_0_2": ka.KVM_ARM_VCPU_PSCI_0_2,
        "KVM_EXIT_MMIO": 6,
    }
    lines = ["#include <stddef.h>", "#include <linux/kvm.h>"]
    for i, (expr, value) in enumerate(checks.items()):
        lines.append(f'_Static_assert(({expr}) == {value:#x}ULL, "check {i}: {expr}");')
    src = tmp_path / "abi.c"
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        ["aarch64-linux-gnu-gcc", "-fsyntax-only", "-std=c11", str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.cross
def test_guest_code_disassembles_cleanly(tmp_path: pathlib.Path) -> None:
    image = g.build_guest()
    raw = tmp_path / "guest.bin"
    raw.write_bytes(image.code)
    out = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-D", "-b", "binary", "-m", "aarch64",
         f"--adjust-vma={g.RAM_GPA:#x}", str(raw)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    insns = re.findall(r"^\s*([0-9a-f]+):\s+([0-9a-f]{8})\s+(.*)$", out, re.M)
    assert len(insns) == len(image.code) // 4
    assert [i for i in insns if re.search(r"\.inst|udf|unknown|undefined", i[2])] == []
    listing = {int(addr, 16): text for addr, _, text in insns}
    # the load the mmio probe makes, which the synchronous handler knows by address
    assert re.match(r"ldr\s+x0, \[x23\]", listing[image.symbols["probe_insn"]])
    # the report: one 64-bit store (ISV=1, so KVM can hand it to the VMM)
    addr = image.symbols["report"]
    body = []
    while not listing[addr].startswith("ret"):
        body.append(listing[addr])
        addr += 4
    assert [b for b in body if b.startswith(("str", "stp", "ldr"))] == ["str\tx0, [x10]"]
    text = "\n".join(listing.values())
    for needed in ("msr\tvbar_el1", "msr\tsctlr_el1", "msr\tttbr0_el1", "eret", "wfi"):
        assert needed in text


def test_vector_table_is_aligned_and_entry_branches_past_it() -> None:
    image = g.build_guest()
    assert image.entry == g.RAM_GPA
    assert image.symbols["vectors"] % 0x800 == 0
    (first,) = struct.unpack_from("<I", image.code, 0)
    assert first >> 26 == 0b000101  # b
    assert g.RAM_GPA + 4 * (first & 0x3FFFFFF) == image.symbols["start"]
    assert len(image.code) <= g.PT_OFFSET


def test_page_table_maps_ram_normal_and_the_report_page_device() -> None:
    entries = struct.unpack("<512Q", g.page_table())
    device, ram = entries[0], entries[1]
    assert all(e == 0 for e in entries[2:])
    for desc in (device, ram):
        assert desc & 0b11 == 0b01  # a level-1 block
        assert desc & (1 << 10)  # AF, or the first access faults
    assert device & ~0xFFF & ((1 << 48) - 1) == 0
    assert (device >> 2) & 7 == 0  # MAIR attr0: Device-nGnRnE
    assert device & (1 << 54) and device & (1 << 53)  # never executable
    assert ram & ~0xFFF & ((1 << 48) - 1) == g.RAM_GPA
    assert (ram >> 2) & 7 == 1  # MAIR attr1: Normal write-back
    assert (ram >> 8) & 3 == 3  # inner shareable
    assert g.REPORT_GPA < 1 << 30 and g.PROBE_GPA < 1 << 30  # in the Device GiB
    assert not g.RAM_GPA <= g.REPORT_GPA < g.RAM_GPA + g.RAM_SIZE
    assert not g.RAM_GPA <= g.PROBE_GPA < g.RAM_GPA + g.RAM_SIZE


def test_layout_fits_the_most_vcpus_the_vmm_allows() -> None:
    assert g.PERCPU_GPA + 32 * g.PERCPU_SIZE <= g.RAM_GPA + g.RAM_SIZE
    assert g.RAM_GPA + g.PT_OFFSET + 0x1000 <= g.PERCPU_GPA
    offsets = sorted(v for k, v in g.LAYOUT.items() if k != "PC_STACK_TOP")
    assert all(o % 8 == 0 for o in offsets)
    assert offsets[-1] + 0x40 <= 0x1000  # reports stay well below the stack


def test_vmm_options_reach_the_arch() -> None:
    opts = vmm.parse_args(["--arch", "arm64", "--vcpus", "2", "--mask-serror", "--mmio-probe"])
    assert opts.arch == "arm64" and opts.mask_serror and opts.mmio_probe
    plain = vmm.parse_args(["--arch", "arm64"])
    assert not plain.mask_serror and not plain.mmio_probe
    arch = vmm.load_arch("arm64")
    assert arch.name == "arm64"
    assert {"serror", "ext_dabt", "unmask", "events", "heartbeat"} <= arch.commands


def test_instruction_count_is_reported() -> None:
    image = g.build_guest()
    words = struct.unpack(f"<{len(image.code) // 4}I", image.code)
    nops = sum(1 for w in words if w == 0xD503201F)
    assert image.instruction_count == len(words) - nops
    print(f"arm64 test VM guest: {image.instruction_count} instructions")


def test_module_does_not_need_kvm_to_import() -> None:
    # the guest is built on any host (the lab ships this tree); only the VMM needs /dev/kvm
    assert os.path.basename(g.__file__) == "arm64.py"
    assert g.build_guest() is g.build_guest()  # cached
