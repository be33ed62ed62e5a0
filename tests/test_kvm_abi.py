"""serrinj.kvm checked against the real kernel headers, plus codec round trips.

Copied numbers alone prove nothing, so every ioctl number, capability, exit
reason and struct layout in ``serrinj.kvm`` is compared with what a C compiler
computes from the installed uapi headers:

* x86_64: ``tests/abi/kvm_abi_print.c`` is compiled against the system
  ``<linux/kvm.h>`` and run; it prints ``NAME VALUE`` lines.
* arm64: ``tests/abi/kvm_abi_data.c`` is compiled with ``aarch64-linux-gnu-gcc -S``
  against Debian's arm64 cross headers; each value is read back from the
  assembly, nothing is executed.

Both include an ``entries.h`` generated here from the Python modules: every
module-level ``KVMIO``/``KVM_*``/``SIZEOF_KVM_*`` integer is checked, so a newly
added constant is picked up without touching this file. A constant the installed
headers do not define fails the test, unless it is listed in ``NOT_IN_UAPI``
with a reason, or it is a capability or exit reason newer than the newest one
the headers know: that test passes, having checked only what can be checked
there (the number is above every ``KVM_CAP_*`` / ``KVM_EXIT_*`` the headers
define, so it collides with none of them).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serrinj.kvm import api, arm64, x86_64

ABI_DIR = Path(__file__).parent / "abi"
U64 = (1 << 64) - 1
CROSS_CC = "aarch64-linux-gnu-gcc"

#: serrinj names that are not uapi macros but have a C expression to check against
SERRINJ_EXPRESSIONS: Dict[str, str] = {
    "KVM_RUN_OFF_IMMEDIATE_EXIT": "offsetof(struct kvm_run, immediate_exit)",
    "KVM_RUN_OFF_EXIT_REASON": "offsetof(struct kvm_run, exit_reason)",
    "KVM_RUN_OFF_UNION": "offsetof(struct kvm_run, io)",
}
#: serrinj names that look like uapi but are not in it (nothing to compare)
NOT_IN_UAPI: Dict[str, str] = {
    "KVM_MAX_MCE_BANKS": "kernel-internal: arch/x86/include/asm/kvm_host.h",
}


@dataclass(frozen=True)
class Probe:
    """One value computed by the C compiler and the value serrinj uses for it."""

    key: str
    expr: str
    expected: int
    macro: Optional[str] = None  # only probed if the headers define this macro


# --------------------------------------------------------------------------- probes


def module_constants(*modules: ModuleType) -> Dict[str, int]:
    """Every uapi-looking integer constant defined by ``modules``."""
    out: Dict[str, int] = {}
    for module in modules:
        for name, value in vars(module).items():
            if type(value) is not int:
                continue
            if name == "KVMIO" or name.startswith(("KVM_", "SIZEOF_KVM_")):
                out[name] = value
    return out


def constant_probes(*modules: ModuleType) -> List[Probe]:
    probes = []
    for name, value in sorted(module_constants(*modules).items()):
        if name in NOT_IN_UAPI:
            continue
        if name in SERRINJ_EXPRESSIONS:
            probes.append(Probe(name, SERRINJ_EXPRESSIONS[name], value))
        elif name.startswith("SIZEOF_KVM_"):
            struct_name = name[len("SIZEOF_") :].lower()
            probes.append(Probe(name, f"sizeof(struct {struct_name})", value))
        else:
            probes.append(Probe(name, name, value, macro=name))
    return probes


def _items(fmt: struct.Struct) -> List[Tuple[int, int]]:
    """``(offset, size)`` of each item of a ``<`` struct format (``Ns``/``Nx`` are one item)."""
    spec = fmt.format.lstrip("<")
    out: List[Tuple[int, int]] = []
    offset = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", spec):
        n = int(count) if count else 1
        if code in "sx":
            out.append((offset, n))
            offset += n
            continue
        size = struct.calcsize("<" + code)
        for _ in range(n):
            out.append((offset, size))
            offset += size
    assert offset == fmt.size, fmt.format
    return out


def _ident(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_")


def member_probes(
    c_struct: str, member: str, offset: int, size: Optional[int] = None
) -> List[Probe]:
    key = _ident(f"{c_struct}__{member}")
    probes = [Probe(f"off__{key}", f"offsetof(struct {c_struct}, {member})", offset)]
    if size is not None:
        probes.append(Probe(f"size__{key}", f"sizeof(((struct {c_struct} *)0)->{member})", size))
    return probes


def layout_probes(
    c_struct: str,
    fmt: struct.Struct,
    members: Sequence[str],
    *,
    base: int = 0,
    whole: bool = True,
) -> List[Probe]:
    """Offsets and sizes of ``members`` as serrinj's struct format lays them out."""
    items = _items(fmt)
    assert len(items) == len(members), (c_struct, fmt.format, members)
    probes = []
    for member, (offset, size) in zip(members, items):
        probes += member_probes(c_struct, member, base + offset, size)
    if whole:
        probes.append(Probe(f"sizeof__{c_struct}", f"sizeof(struct {c_struct})", fmt.size))
    return probes


def _marker_offset(raw: bytes, marker: int, width: int) -> int:
    needle = marker.to_bytes(width, "little")
    assert raw.count(needle) == 1
    return raw.index(needle)


def common_layout_probes() -> List[Probe]:
    """Structs both architectures share: kvm_one_reg, kvm_run's exit union, memory regions."""
    probes = []
    reg = api.one_reg(0x1122334455667788, 0x99AABBCCDDEEFF00)
    probes += member_probes("kvm_one_reg", "id", _marker_offset(reg, 0x1122334455667788, 8), 8)
    probes += member_probes("kvm_one_reg", "addr", _marker_offset(reg, 0x99AABBCCDDEEFF00, 8), 8)
    probes += layout_probes(
        "kvm_userspace_memory_region",
        api.UserspaceMemoryRegion._FMT,
        ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"],
    )
    probes += member_probes("kvm_run", "exit_reason", api.KVM_RUN_OFF_EXIT_REASON, 4)
    probes += layout_probes(
        "kvm_run",
        api.ExitIo._FMT,
        ["io.direction", "io.size", "io.port", "io.count", "io.data_offset"],
        base=api.KVM_RUN_OFF_UNION,
        whole=False,
    )
    probes += layout_probes(
        "kvm_run",
        api.ExitMmio._FMT,
        ["mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write"],
        base=api.KVM_RUN_OFF_UNION,
        whole=False,
    )
    probes.append(
        Probe("mmio_data_offset", "offsetof(struct kvm_run, mmio.data)", api.ExitMmio.DATA_OFFSET)
    )
    # exit_reason_of() must read the field the kernel writes
    run = bytearray(64)
    struct.pack_into("<I", run, api.KVM_RUN_OFF_EXIT_REASON, 0xA1B2C3D4)
    assert api.exit_reason_of(bytes(run)) == 0xA1B2C3D4
    return probes


X86_EVENTS_MEMBERS = [
    "exception.injected",
    "exception.nr",
    "exception.has_error_code",
    "exception.pending",
    "exception.error_code",
    "interrupt.injected",
    "interrupt.nr",
    "interrupt.soft",
    "interrupt.shadow",
    "nmi.injected",
    "nmi.pending",
    "nmi.masked",
    "nmi.pad",
    "sipi_vector",
    "flags",
    "smi.smm",
    "smi.pending",
    "smi.smm_inside_nmi",
    "smi.latched_init",
    "triple_fault.pending",
    "reserved",
    "exception_has_payload",
    "exception_payload",
]


def x86_layout_probes() -> List[Probe]:
    probes = layout_probes("kvm_vcpu_events", x86_64._EVENTS_FMT, X86_EVENTS_MEMBERS)
    probes += layout_probes(
        "kvm_x86_mce",
        x86_64._MCE_FMT,
        ["status", "addr", "misc", "mcg_status", "bank", "pad1", "pad2"],
    )
    probes += layout_probes("kvm_regs", x86_64._REGS_FMT, list(x86_64.REGS_NAMES))
    probes += layout_probes(
        "kvm_segment",
        x86_64.Segment._FMT,
        ["base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
         "unusable", "padding"],
    )  # fmt: skip
    # kvm_sregs: find where serrinj's accessors actually write
    size = x86_64.SIZEOF_KVM_SREGS
    for name in x86_64.SREGS_SEGMENTS:
        raw = bytearray(size)
        x86_64.sregs_set_segment(raw, name, x86_64.Segment(base=0x0102030405060708))
        probes += member_probes(
            "kvm_sregs", name, _marker_offset(bytes(raw), 0x0102030405060708, 8), 24
        )
        assert x86_64.sregs_get_segment(bytes(raw), name).base == 0x0102030405060708
    for name in ("gdt", "idt"):
        raw = bytearray(size)
        x86_64.sregs_set_dtable(raw, name, 0x1112131415161718, 0xA5B6)
        probes += member_probes(
            "kvm_sregs", f"{name}.base", _marker_offset(bytes(raw), 0x1112131415161718, 8), 8
        )
        probes += member_probes(
            "kvm_sregs", f"{name}.limit", _marker_offset(bytes(raw), 0xA5B6, 2), 2
        )
    for name in x86_64.SREGS_CONTROL:
        raw = bytearray(size)
        x86_64.sregs_set_control(raw, name, 0x2122232425262728)
        probes += member_probes(
            "kvm_sregs", name, _marker_offset(bytes(raw), 0x2122232425262728, 8), 8
        )
        assert x86_64.sregs_get_control(bytes(raw), name) == 0x2122232425262728
    return probes + common_layout_probes()


ARM64_EVENTS_MEMBERS = [
    "exception.serror_pending",
    "exception.serror_has_esr",
    "exception.ext_dabt_pending",
    "exception.pad",
    "exception.serror_esr",
    "reserved",
]
# (op0, op1, CRn, CRm, op2): ESR_EL1, SPSR_EL1, ELR_EL1, VBAR_EL1, and every field at maximum
SYSREG_ENCODINGS = [
    (3, 0, 5, 2, 0),
    (3, 0, 4, 0, 0),
    (3, 0, 4, 0, 1),
    (3, 0, 12, 0, 0),
    (3, 7, 15, 15, 7),
]
_CORE = "KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG"


def arm64_layout_probes() -> List[Probe]:
    probes = layout_probes("kvm_vcpu_events", arm64.VcpuEvents._FMT, ARM64_EVENTS_MEMBERS)
    probes += layout_probes(
        "kvm_vcpu_init", arm64.VcpuInit._FMT, ["target"] + [f"features[{i}]" for i in range(7)]
    )
    probes.append(Probe("REG_PC", f"{_CORE}(regs.pc)", arm64.REG_PC))
    probes.append(Probe("REG_SP", f"{_CORE}(regs.sp)", arm64.REG_SP))
    probes.append(Probe("REG_PSTATE", f"{_CORE}(regs.pstate)", arm64.REG_PSTATE))
    probes += [Probe(f"REG_X{n}", f"{_CORE}(regs.regs[{n}])", arm64.reg_x(n)) for n in range(31)]
    for enc in SYSREG_ENCODINGS:
        probes.append(
            Probe(
                "SYSREG_" + "_".join(map(str, enc)),
                "ARM64_SYS_REG({}, {}, {}, {}, {})".format(*enc),
                arm64.sysreg_id(*enc),
            )
        )
    for name, value in (
        ("PSR_D_BIT", arm64.PSTATE_D),
        ("PSR_A_BIT", arm64.PSTATE_A),
        ("PSR_I_BIT", arm64.PSTATE_I),
        ("PSR_F_BIT", arm64.PSTATE_F),
        ("PSR_MODE_MASK", arm64.PSTATE_MODE_MASK),
    ):
        probes.append(Probe(name, name, value, macro=name))
    for mode, mode_name in arm64.PSTATE_MODE_NAMES.items():
        macro = f"PSR_MODE_{mode_name}"
        probes.append(Probe(macro, macro, mode, macro=macro))
    return probes + common_layout_probes()


X86_PROBES = constant_probes(api, x86_64) + x86_layout_probes()
ARM64_PROBES = constant_probes(api, arm64) + arm64_layout_probes()


def render_entries(probes: Iterable[Probe]) -> str:
    lines = ["/* generated by tests/test_kvm_abi.py from serrinj.kvm; do not edit */"]
    seen: Set[str] = set()
    for p in probes:
        if p.key in seen:
            continue
        seen.add(p.key)
        if p.macro:
            lines += [f"#ifdef {p.macro}", f"ENTRY({p.key}, {p.expr})", "#else",
                      f"MISSING({p.key})", "#endif"]  # fmt: skip
        else:
            lines.append(f"ENTRY({p.key}, {p.expr})")
    return "\n".join(lines) + "\n"


def _unique(probes: List[Probe]) -> List[Probe]:
    by_key: Dict[str, Probe] = {}
    for p in probes:
        if p.key in by_key:
            assert by_key[p.key] == p, f"two different probes named {p.key}"
        by_key[p.key] = p
    return list(by_key.values())


# --------------------------------------------------------------------------- compiling


@dataclass(frozen=True)
class HeaderFacts:
    arch: str
    values: Dict[str, int]
    missing: Set[str]
    macros: Dict[str, int]
    header_text: str

    def highest(self, prefix: str) -> int:
        return max(v for k, v in self.macros.items() if k.startswith(prefix))


_DEFINE_RE = re.compile(r"^#define (\w+) \(?(0x[0-9a-fA-F]+|\d+)[uUlL]*\)?$", re.M)


def _run(cmd: List[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({' '.join(cmd)}):\n{proc.stderr}", pytrace=False)
    return proc.stdout


def _numeric_macros(cc: str) -> Dict[str, int]:
    out = _run([cc, "-dM", "-E", "-include", "linux/kvm.h", "-x", "c", "/dev/null"], "cpp")
    return {m.group(1): int(m.group(2), 0) for m in _DEFINE_RE.finditer(out)}


def _kvm_header_text(cc: str) -> str:
    """The text of the ``linux/kvm.h`` that ``cc`` includes."""
    out = _run([cc, "-E", "-include", "linux/kvm.h", "-x", "c", "/dev/null"], "cpp")
    paths = re.findall(r'^# \d+ "([^"]*/linux/kvm\.h)"', out, re.M)
    assert paths, f"{cc} did not include linux/kvm.h"
    return Path(paths[0]).read_text()


def _facts(arch: str, cc: str, output: Tuple[Dict[str, int], Set[str]]) -> HeaderFacts:
    values, missing = output
    return HeaderFacts(arch, values, missing, _numeric_macros(cc), _kvm_header_text(cc))


def _parse_print_output(text: str) -> Tuple[Dict[str, int], Set[str]]:
    values: Dict[str, int] = {}
    missing: Set[str] = set()
    for line in text.splitlines():
        key, value = line.split()
        if value == "MISSING":
            missing.add(key)
        else:
            values[key] = int(value)
    return values, missing


_ASM_VALUE_RE = re.compile(r"^abi_(\w+):\s*\n\s*\.(xword|quad|8byte|dword|zero)\s+(-?\w+)", re.M)
_ASM_MISSING_RE = re.compile(r"^abi_missing_(\w+):", re.M)


def parse_asm(text: str) -> Tuple[Dict[str, int], Set[str]]:
    """Read ``abi_NAME`` constants and ``abi_missing_NAME`` markers from gcc ``-S`` output."""
    missing = set(_ASM_MISSING_RE.findall(text))
    values: Dict[str, int] = {}
    for name, directive, arg in _ASM_VALUE_RE.findall(text):
        if name.startswith("missing_"):
            continue
        if directive == "zero":
            # gcc emits a zero-valued constant as ".zero <size>"
            assert arg == "8", f"abi_{name} is not 8 bytes"
            values[name] = 0
        else:
            values[name] = int(arg, 0) & U64
    return values, missing


@pytest.fixture(scope="module")
def x86_facts(tmp_path_factory: pytest.TempPathFactory) -> HeaderFacts:
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to check serrinj.kvm against <linux/kvm.h>", pytrace=False)
    work = tmp_path_factory.mktemp("abi_x86_64")
    (work / "entries.h").write_text(render_entries(_unique(X86_PROBES)))
    exe = work / "kvm_abi_print"
    _run(
        ["gcc", "-std=gnu11", "-Wall", "-I", str(work), "-o", str(exe),
         str(ABI_DIR / "kvm_abi_print.c")],
        "compiling the x86_64 ABI probe",
    )  # fmt: skip
    return _facts("x86_64", "gcc", _parse_print_output(_run([str(exe)], "running the probe")))


@pytest.fixture(scope="module")
def arm64_facts(tmp_path_factory: pytest.TempPathFactory) -> HeaderFacts:
    work = tmp_path_factory.mktemp("abi_arm64")
    (work / "entries.h").write_text(render_entries(_unique(ARM64_PROBES)))
    asm = work / "kvm_abi_data.s"
    _run(
        [CROSS_CC, "-std=gnu11", "-S", "-O0", "-I", str(work), "-o", str(asm),
         str(ABI_DIR / "kvm_abi_data.c")],
        "compiling the arm64 ABI probe",
    )  # fmt: skip
    return _facts("arm64", CROSS_CC, parse_asm(asm.read_text()))


def check_probe(probe: Probe, facts: HeaderFacts) -> None:
    if probe.key in facts.missing:
        name = probe.key
        spelled = re.findall(rf"^#define {name}\s+(\w+)\s*$", facts.header_text, re.M)
        if spelled:
            # defined only for other architectures (e.g. KVM_CAP_MCE under __KVM_HAVE_MCE):
            # the number can still be compared with the header's text
            assert [int(v, 0) for v in spelled] == [probe.expected], (
                f"{name}: serrinj has {probe.expected}, the {facts.arch} header text has "
                f"{spelled} (not defined for {facts.arch} itself)"
            )
            return
        for prefix in ("KVM_CAP_", "KVM_EXIT_"):
            if name.startswith(prefix):
                newest = facts.highest(prefix)
                assert probe.expected > newest, (
                    f"{name} = {probe.expected} is missing from the {facts.arch} headers, "
                    f"yet they define {prefix}* up to {newest}: the number is probably wrong"
                )
                # Newer than these headers (KVM_CAP_ARM_SEA_TO_USER and KVM_EXIT_ARM_SEA
                # came in the 6.19 cycle; Debian 12 ships 6.1 uapi headers). The check
                # above is what can be verified here: the number collides with nothing.
                return
        pytest.fail(
            f"{name} is not defined by the installed {facts.arch} <linux/kvm.h>; if it is "
            "not uapi, list it in NOT_IN_UAPI with the reason",
            pytrace=False,
        )
    assert probe.key in facts.values, f"the {facts.arch} probe printed nothing for {probe.key}"
    actual = facts.values[probe.key]
    assert actual == probe.expected, (
        f"{probe.key}: serrinj has {probe.expected:#x} ({probe.expected}), "
        f"the {facts.arch} headers give {actual:#x} ({actual}) for `{probe.expr}`"
    )


@pytest.mark.parametrize("probe", _unique(X86_PROBES), ids=lambda p: p.key)
def test_x86_64_matches_headers(probe: Probe, x86_facts: HeaderFacts) -> None:
    check_probe(probe, x86_facts)


@pytest.mark.cross
@pytest.mark.parametrize("probe", _unique(ARM64_PROBES), ids=lambda p: p.key)
def test_arm64_matches_headers(probe: Probe, arm64_facts: HeaderFacts) -> None:
    check_probe(probe, arm64_facts)


def test_x86_64_probe_covers_every_constant(x86_facts: HeaderFacts) -> None:
    names = set(module_constants(api, x86_64)) - set(NOT_IN_UAPI)
    assert names <= x86_facts.values.keys() | x86_facts.missing


@pytest.mark.cross
def test_arm64_probe_covers_every_constant(arm64_facts: HeaderFacts) -> None:
    names = set(module_constants(api, arm64)) - set(NOT_IN_UAPI)
    assert names <= arm64_facts.values.keys() | arm64_facts.missing


def test_not_in_uapi_really_is_not(x86_facts: HeaderFacts) -> None:
    for name, why in NOT_IN_UAPI.items():
        assert name not in x86_facts.macros, f"{name} is uapi after all ({why} is outdated)"


def test_brief_ioctl_numbers() -> None:
    # the numbers BRIEF sections 2 and 4 quote, which must hold on both arches
    assert api.KVM_GET_VCPU_EVENTS == 0x8040AE9F
    assert api.KVM_SET_VCPU_EVENTS == 0x4040AEA0
    assert x86_64.KVM_X86_GET_MCE_CAP_SUPPORTED == 0x8008AE9D
    assert x86_64.KVM_X86_SETUP_MCE == 0x4008AE9C
    assert x86_64.KVM_X86_SET_MCE == 0x4040AE9E


@pytest.mark.cross
def test_arm64_vcpu_events_ioctls_match_brief(arm64_facts: HeaderFacts) -> None:
    assert arm64_facts.values["KVM_GET_VCPU_EVENTS"] == 0x8040AE9F
    assert arm64_facts.values["KVM_SET_VCPU_EVENTS"] == 0x4040AEA0
    assert arm64_facts.values["sizeof__kvm_vcpu_events"] == 64


def test_check_probe_catches_a_wrong_number(x86_facts: HeaderFacts) -> None:
    with pytest.raises(AssertionError, match="KVM_RUN"):
        check_probe(Probe("KVM_RUN", "KVM_RUN", api.KVM_RUN + 1, macro="KVM_RUN"), x86_facts)
    key = "off__kvm_vcpu_events__flags"
    with pytest.raises(AssertionError, match=key):
        check_probe(Probe(key, "offsetof(struct kvm_vcpu_events, flags)", 21), x86_facts)


def test_check_probe_refuses_a_missing_old_cap(x86_facts: HeaderFacts) -> None:
    facts = HeaderFacts("x86_64", {}, {"KVM_CAP_BOGUS"}, x86_facts.macros, "")
    with pytest.raises(AssertionError, match="probably wrong"):
        check_probe(Probe("KVM_CAP_BOGUS", "KVM_CAP_BOGUS", 100, macro="KVM_CAP_BOGUS"), facts)
    facts = HeaderFacts("x86_64", {}, {"KVM_BOGUS"}, x86_facts.macros, "")
    with pytest.raises(pytest.fail.Exception, match="NOT_IN_UAPI"):
        check_probe(Probe("KVM_BOGUS", "KVM_BOGUS", 1, macro="KVM_BOGUS"), facts)


def test_check_probe_reads_arch_conditional_text() -> None:
    facts = HeaderFacts(
        "arm64", {}, {"KVM_CAP_MCE"}, {}, "#ifdef __KVM_HAVE_MCE\n#define KVM_CAP_MCE 31\n"
    )
    check_probe(Probe("KVM_CAP_MCE", "KVM_CAP_MCE", 31, macro="KVM_CAP_MCE"), facts)
    with pytest.raises(AssertionError, match="header text"):
        check_probe(Probe("KVM_CAP_MCE", "KVM_CAP_MCE", 32, macro="KVM_CAP_MCE"), facts)


def test_parse_asm_reads_gcc_output() -> None:
    text = (
        "\t.global\tabi_A\n\t.section\t.rodata\nabi_A:\n\t.xword\t-1\n"
        "abi_B:\n\t.quad\t42\nabi_Z:\n\t.zero\t8\nabi_missing_C:\n\t.zero\t1\n"
    )
    assert parse_asm(text) == ({"A": U64, "B": 42, "Z": 0}, {"C"})


# --------------------------------------------------------------------------- round trips


@given(st.binary(min_size=64, max_size=64))
def test_x86_vcpu_events_round_trip(raw: bytes) -> None:
    assert x86_64.VcpuEvents.unpack(raw).pack() == raw


@given(st.binary(min_size=64, max_size=64))
def test_arm64_vcpu_events_round_trip(raw: bytes) -> None:
    assert arm64.VcpuEvents.unpack(raw).pack() == raw


@pytest.mark.parametrize("cls", [x86_64.VcpuEvents, arm64.VcpuEvents, x86_64.Mce, arm64.VcpuInit])
@pytest.mark.parametrize("size", [0, 31, 63, 65])
def test_unpack_refuses_a_wrong_size(cls: Any, size: int) -> None:
    with pytest.raises(ValueError):
        cls.unpack(bytes(size))


def _zero_mce_pads(raw: bytes) -> bytes:
    # pad1[7] at 33 and pad2[3] at 40: SET_MCE ignores them and serrinj writes zeros
    return raw[:33] + bytes(31)


@given(st.binary(min_size=64, max_size=64))
def test_mce_round_trip(raw: bytes) -> None:
    canonical = _zero_mce_pads(raw)
    assert x86_64.Mce.unpack(canonical).pack() == canonical
    # non-zero padding is not preserved: it comes back as zeros
    assert x86_64.Mce.unpack(raw).pack() == canonical


@given(
    st.integers(0, U64), st.integers(0, 255), st.integers(0, U64), st.integers(0, U64),
    st.integers(0, U64),
)  # fmt: skip
def test_mce_fields_round_trip(status: int, bank: int, addr: int, misc: int, mcg: int) -> None:
    mce = x86_64.Mce(status=status, bank=bank, addr=addr, misc=misc, mcg_status=mcg)
    raw = mce.pack()
    assert len(raw) == 64
    assert x86_64.Mce.unpack(raw) == mce


@given(st.binary(min_size=32, max_size=32))
def test_vcpu_init_round_trip(raw: bytes) -> None:
    assert arm64.VcpuInit.unpack(raw).pack() == raw


@given(st.binary(min_size=144, max_size=144))
def test_regs_round_trip(raw: bytes) -> None:
    assert x86_64.pack_regs(x86_64.unpack_regs(raw)) == raw


@given(st.binary(min_size=312, max_size=312), st.sampled_from(x86_64.SREGS_SEGMENTS))
def test_sregs_segment_round_trip(raw: bytes, name: str) -> None:
    buf = bytearray(raw)
    x86_64.sregs_set_segment(buf, name, x86_64.sregs_get_segment(raw, name))
    # only the segment's padding byte (offset 23) is normalised to zero
    pad = x86_64.SREGS_SEGMENTS.index(name) * 24 + 23
    expected = bytearray(raw)
    expected[pad] = 0
    assert bytes(buf) == bytes(expected)
