"""``serrinj events save`` / ``load``: move pending vCPU events between VMs.

The KVM API's split between "an SError is pending" and "pending with this
ESR" exists so that a VMM can migrate a pending SError. Labs test exactly
that, so serrinj can capture every vCPU's KVM_GET_VCPU_EVENTS, with what is
needed to interpret it, and put it into another VM.

File format (JSON, versioned)::

    {
      "schema": "serrinj-events/1",
      "arch": "aarch64" | "x86_64",
      "saved_at": "2026-11-24T12:00:00+00:00",
      "host": {"caps": {...}, "kernel": "7.2.13+deb14-arm64"},  # of the saving host
      "source": {"pid": 123, "name": "vm-a", "vmm": "qemu"},
      "vcpus": [
        {"vcpu_id": 0, "raw": "<128 hex digits>", "decoded": {...},
         "pstate": 965}                          # arm64 only, informative
      ]
    }

``raw`` is authoritative; ``decoded`` is for people and is re-derived and
checked against ``raw`` on load, so a hand-edited file that disagrees with
itself is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, cast

from serrinj.codec.events import decode_events
from serrinj.errors import Conflict, FileError, InvalidInput, Unsupported
from serrinj.host import kvmcaps as host
from serrinj.host import privilege
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.kvm.arch import Arch
from serrinj.ops import guard
from serrinj.ops.guard import guarded
from serrinj.target import attach as target
from serrinj.vcpu.arm64 import Arm64Vcpu
from serrinj.vcpu.base import Events

SCHEMA = "serrinj-events/1"
SAVE_REQUESTS_ARM64 = (api.KVM_GET_VCPU_EVENTS, api.KVM_GET_ONE_REG)
SAVE_REQUESTS_X86 = (api.KVM_GET_VCPU_EVENTS,)
LOAD_REQUESTS = (api.KVM_GET_VCPU_EVENTS, api.KVM_SET_VCPU_EVENTS)


@dataclass(frozen=True)
class SavedVcpu:
    """One vCPU's saved ``struct kvm_vcpu_events`` (``raw``) and, on arm64, its PSTATE."""

    vcpu_id: int
    raw: bytes
    pstate: Optional[int] = None

    def events(self, arch: str) -> Events:
        return _unpack(arch, self.raw)


@dataclass(frozen=True)
class Snapshot:
    """Every saved vCPU's events, with what is needed to read them (an events file)."""

    arch: str
    vcpus: Sequence[SavedVcpu]
    caps: Mapping[str, int] = field(default_factory=dict)
    source: Mapping[str, object] = field(default_factory=dict)
    saved_at: str = ""
    #: the saving host's kernel release (informative: the file loads on any kernel)
    kernel: str = ""

    def as_dict(self) -> Dict[str, object]:
        return {
            "schema": SCHEMA,
            "arch": self.arch,
            "saved_at": self.saved_at,
            "host": {"caps": dict(self.caps), "kernel": self.kernel},
            "source": dict(self.source),
            "vcpus": [
                {
                    "vcpu_id": v.vcpu_id,
                    "raw": v.raw.hex(),
                    "decoded": decode_events(self.arch, v.events(self.arch), v.pstate),
                    **({"pstate": v.pstate} if v.pstate is not None else {}),
                }
                for v in self.vcpus
            ],
        }

    def dumps(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=False) + "\n"

    def write(self, path: str) -> None:
        """Write the file (``events load`` reads it), atomically and with the
        caller's rights (:class:`OutputFile`)."""
        out = OutputFile(path)
        out.commit(self.dumps())


def _unpack(arch: str, raw: bytes) -> Events:
    if arch == Arch.AARCH64:
        return kvm_arm64.VcpuEvents.unpack(raw)
    return kvm_x86.VcpuEvents.unpack(raw)


# ---------------------------------------------------------------------- save
def save(tgt: target.Target) -> Snapshot:
    """Read KVM_GET_VCPU_EVENTS of every selected vCPU."""
    from serrinj.ops import policy

    policy.enforce("events-save", tgt.vm)
    caps = host.probe()
    vm = target.ensure_mapped(tgt.vm, tgt.vcpu_ids)
    requests = SAVE_REQUESTS_ARM64 if vm.arch == Arch.AARCH64 else SAVE_REQUESTS_X86
    out: List[SavedVcpu] = []
    for vid in tgt.vcpu_ids:
        with target.attach(vm, vid, requests) as (vc, _rt):
            ev = vc.get_events()
            pstate = cast(Arm64Vcpu, vc).pstate() if vm.arch == Arch.AARCH64 else None
        out.append(SavedVcpu(vid, ev.pack(), pstate))
    return Snapshot(
        arch=vm.arch,
        vcpus=out,
        caps=caps.caps,
        source={"pid": vm.pid, "name": vm.name, "vmm": vm.vmm},
        saved_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        kernel=os.uname().release,
    )


# ---------------------------------------------------------------------- files
class OutputFile:
    """The file ``events save -o`` writes.

    It is created (as a temporary next to it) with the caller's rights before
    any VM is read, so that a place the caller may not write is refused first
    (:class:`~serrinj.errors.PermissionDenied` under sudo), and it is moved into
    place whole by :meth:`commit`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        try:
            self._f: Optional[IO[str]] = privilege.open_file(
                self.tmp, "w", "events file", encoding="utf-8"
            )
        except FileError as err:
            raise InvalidInput(f"cannot write {path}: {err.strerror}") from None

    def commit(self, text: str) -> None:
        assert self._f is not None
        try:
            with self._f:
                self._f.write(text)
        except OSError as err:  # the boundary for this file's writes (ENOSPC, EIO)
            self.discard()
            raise InvalidInput(f"cannot write {self.path}: {err.strerror}") from None
        self._f = None
        try:
            privilege.replace(self.tmp, self.path, "events file")
        except FileError as err:
            self.discard()
            raise InvalidInput(f"cannot write {self.path}: {err.strerror}") from None

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        privilege.unlink_quietly(self.tmp)


def read_file(path: str) -> str:
    """The text of an events file, read with the caller's rights (``-``: standard input)."""
    if path == "-":
        try:
            return sys.stdin.read()
        except OSError as err:
            raise InvalidInput(f"cannot read the standard input: {err}") from None
    try:
        f = privilege.open_file(path, "r", "events file", encoding="utf-8")
    except FileError as err:
        raise InvalidInput(f"cannot read {path}: {err.strerror}") from None
    with f:
        try:
            text: str = f.read()
        except OSError as err:  # the boundary for this file's reads (EIO)
            raise InvalidInput(f"cannot read {path}: {err.strerror}") from None
    return text


# ---------------------------------------------------------------------- parse
def _err(path: str, where: str, what: str, hint: Optional[str] = None) -> InvalidInput:
    return InvalidInput(f"{path}: {where}: {what}", hint=hint)


def parse(text: str, path: str = "<events>") -> Snapshot:
    """Parse and check an events file; every error names the key that is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _err(path, f"line {err.lineno} column {err.colno}", f"not JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise _err(path, "top level", "expected a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise _err(
            path, "schema", f"{schema!r} is not {SCHEMA!r}", hint="save it again with this serrinj"
        )
    arch = data.get("arch")
    if arch not in ("aarch64", "x86_64"):
        raise _err(path, "arch", f"{arch!r} is not 'aarch64' or 'x86_64'")
    vcpus_raw = data.get("vcpus")
    if not isinstance(vcpus_raw, list) or not vcpus_raw:
        raise _err(path, "vcpus", "expected a non-empty list")
    vcpus: List[SavedVcpu] = []
    seen = set()
    for i, item in enumerate(vcpus_raw):
        where = f"vcpus[{i}]"
        if not isinstance(item, dict):
            raise _err(path, where, "expected an object")
        vid = item.get("vcpu_id")
        if not isinstance(vid, int) or isinstance(vid, bool) or vid < 0:
            raise _err(path, f"{where}.vcpu_id", f"{vid!r} is not a vCPU id")
        if vid in seen:
            raise _err(path, f"{where}.vcpu_id", f"vCPU {vid} appears twice")
        seen.add(vid)
        raw_hex = item.get("raw")
        try:
            raw = bytes.fromhex(raw_hex) if isinstance(raw_hex, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != api.SIZEOF_KVM_VCPU_EVENTS:
            raise _err(path, f"{where}.raw", "expected 128 hex digits (64 bytes)")
        pstate = item.get("pstate")
        if pstate is not None and (not isinstance(pstate, int) or isinstance(pstate, bool)):
            raise _err(path, f"{where}.pstate", f"{pstate!r} is not an integer")
        try:
            # KVM would refuse what does not decode (an SError ESR beyond ISS bits
            # [24:0]), so refuse it here, with or without a "decoded" to compare
            fresh = _jsonable(decode_events(arch, _unpack(arch, raw), pstate))
        except InvalidInput as err:
            raise _err(path, f"{where}.raw", err.message) from None
        decoded = item.get("decoded")
        if decoded is not None and _jsonable(decoded) != fresh:
            raise _err(
                path,
                f"{where}.decoded",
                "does not match 'raw'",
                hint="'raw' is what is loaded; edit it, or delete 'decoded'",
            )
        vcpus.append(SavedVcpu(vid, raw, pstate))
    host_doc = data.get("host")
    caps_any = host_doc.get("caps") if isinstance(host_doc, dict) else None
    if not isinstance(caps_any, dict):  # informative only: anything else is ignored
        caps_any = {}
    caps = {k: v for k, v in caps_any.items() if isinstance(k, str) and isinstance(v, int)}
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    kernel = host_doc.get("kernel") if isinstance(host_doc, dict) else None
    return Snapshot(
        arch,
        vcpus,
        caps,
        source or {},
        str(data.get("saved_at", "")),
        kernel if isinstance(kernel, str) else "",
    )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------- load
@dataclass(frozen=True)
class LoadResult:
    """What ``events load`` did to one vCPU: what it loaded, the events before and after."""

    vcpu_id: int
    loaded: Dict[str, object]
    before: Dict[str, object]
    after: Dict[str, object]
    notes: Sequence[str] = ()

    def as_dict(self) -> Dict[str, object]:
        return {
            "vcpu_id": self.vcpu_id,
            "loaded": self.loaded,
            "before": self.before,
            "after": self.after,
            "notes": list(self.notes),
        }


def check_compatible(snap: Snapshot, vm_arch: str, caps: host.HostCaps) -> None:
    if snap.arch != vm_arch:
        raise Unsupported(
            f"the events were saved from an {snap.arch} VM; this VM is {vm_arch}",
            hint="vCPU events only load into a VM of the same architecture",
        )
    if snap.arch == Arch.AARCH64 and not caps.serror_esr:
        for v in snap.vcpus:
            ev = v.events(snap.arch)
            assert isinstance(ev, kvm_arm64.VcpuEvents)
            if ev.serror_pending and ev.serror_has_esr:
                raise Unsupported(
                    f"vCPU {v.vcpu_id} has an SError pending with ESR {ev.serror_esr:#x}, and"
                    " this host cannot inject an ESR (KVM_CAP_ARM_INJECT_SERROR_ESR is 0)",
                    hint="the ESR would be lost; load it on a host with RAS",
                )


def _for_set(arch: str, ev: Events, caps: host.HostCaps) -> Events:
    if isinstance(ev, kvm_arm64.VcpuEvents):
        # GET reports has_esr=1 on RAS hosts whatever is pending; only a pending
        # SError's ESR means anything, and ext_dabt can never be read back.
        if not ev.serror_pending:
            return kvm_arm64.VcpuEvents()
        return kvm_arm64.VcpuEvents.serror(ev.serror_esr if ev.serror_has_esr else None)
    return ev


@guarded(
    "events-load",
    lambda snap, **kw: {
        "vcpus": [v.vcpu_id for v in snap.vcpus],
        "arch": snap.arch,
        "force": kw.get("force", False),
    },
)
def load(tgt: target.Target, snap: Snapshot, *, force: bool = False) -> List[LoadResult]:
    """Put ``snap``'s events into the matching vCPUs (by vcpu_id) of ``tgt``."""
    caps = host.probe()
    check_compatible(snap, tgt.vm.arch, caps)
    by_id = {v.vcpu_id: v for v in snap.vcpus}
    wanted = [vid for vid in tgt.vcpu_ids if vid in by_id]
    missing = [v.vcpu_id for v in snap.vcpus if v.vcpu_id not in {x.vcpu_id for x in tgt.vm.vcpus}]
    if missing:
        raise InvalidInput(
            f"the file has vCPU(s) {missing} that VM {tgt.vm.label} does not have",
            hint="choose the vCPUs with --vcpu, or load into a VM with as many vCPUs",
        )
    vm = target.ensure_mapped(tgt.vm, wanted)
    out: List[LoadResult] = guard.results()
    for vid in wanted:
        saved = by_id[vid].events(snap.arch)
        new = _for_set(snap.arch, saved, caps)
        with target.attach(vm, vid, LOAD_REQUESTS) as (vc, _rt):
            before = vc.get_events()
            notes: List[str] = []
            if isinstance(before, kvm_arm64.VcpuEvents) and before.serror_pending:
                if not force:
                    raise Conflict(
                        f"vCPU {vid} of {vm.label} already has an SError pending; nothing"
                        " was loaded",
                        hint="a pending SError cannot be cancelled; --force loads anyway",
                    )
                notes.append("an SError was already pending and stays pending")
            if isinstance(new, kvm_arm64.VcpuEvents) and not new.serror_pending:
                notes.append("nothing pending to load on arm64 (an SError cannot be cancelled)")
            else:
                vc.set_events(new)
            after = vc.get_events()
            if (
                isinstance(new, kvm_arm64.VcpuEvents)
                and new.serror_pending
                and isinstance(after, kvm_arm64.VcpuEvents)
                and not after.serror_pending
            ):
                notes.append(
                    "taken at once: this vCPU has SErrors unmasked, and this kernel puts an"
                    " unmasked SError into the vCPU's registers at KVM_SET_VCPU_EVENTS"
                    " (Linux 6.17 and later)"
                )
        out.append(
            LoadResult(
                vcpu_id=vid,
                loaded=decode_events(snap.arch, saved),
                before=decode_events(snap.arch, before),
                after=decode_events(snap.arch, after),
                notes=tuple(notes),
            )
        )
    return out
