"""x86_64 machine check: KVM_X86_SET_MCE writes one bank and, for an uncorrected
error, raises #MC (vector 18) in the guest.

Before sending, the vCPU's CR4, MCG_CAP/MCG_STATUS and the bank's MCi_CTL are read
and KVM's verdict predicted (:func:`serrinj.codec.mce.predict`): an error KVM would
turn into a triple fault or drop silently is refused unless ``force``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from serrinj.codec import mce as mce_codec
from serrinj.errors import Conflict, InvalidInput, Unsupported
from serrinj.faults.base import Delivery
from serrinj.faults.fields import Fields, show, type_name
from serrinj.faults.loop import Reading, VcpuFault
from serrinj.host.kvmcaps import HostCaps
from serrinj.kvm import api
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.kvm.arch import Arch
from serrinj.vcpu.x86_64 import X86Vcpu


@dataclass(frozen=True)
class MachineCheck(VcpuFault[X86Vcpu]):
    """``mce``: the ``struct kvm_x86_mce`` to send; ``force``: send it even when KVM would
    turn it into a triple fault or drop it."""

    kind: ClassVar[str] = "mce"
    arch: ClassVar[Arch] = Arch.X86_64
    requests: ClassVar[Tuple[int, ...]] = (
        api.KVM_GET_VCPU_EVENTS,
        kvm_x86.KVM_GET_MSRS,
        kvm_x86.KVM_GET_SREGS,
        kvm_x86.KVM_X86_SET_MCE,
    )
    fields: ClassVar[Tuple[str, ...]] = (
        "bank",
        "preset",
        "status",
        "addr",
        "misc",
        "mcg_status",
        "force",
    )
    title: ClassVar[str] = "a machine-check"
    # the checks read the guest's own MCE state (_guest_state), and the outcome
    # comes from the prediction: the event readings only feed the report
    admit_reads: ClassVar[bool] = False
    outcome_reads: ClassVar[bool] = False

    mce: kvm_x86.Mce
    force: bool = False

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> MachineCheck:
        """A preset, with any field given overriding it, checked as KVM_X86_SET_MCE would
        check it; the bank count of the vCPU itself is checked when it is read."""
        f = Fields(cls.kind, data)
        preset = _preset(f, data.get("preset"))
        status = f.flags("status", mce_codec.STATUS_BITS)
        mcg_status = f.flags("mcg_status", mce_codec.MCG_STATUS_BITS)
        addr = f.number("addr")
        misc = f.number("misc")
        bank = _bank(f, data.get("bank"))
        force = f.boolean("force")
        if bank is not None and not f.given("status") and not f.given("preset"):
            f.need(
                ("status", "preset"),
                f"presets: {', '.join(mce_codec.PRESETS)}",
                hint=f"presets: {', '.join(mce_codec.PRESETS)}",
            )
        f.done()
        assert bank is not None and (status is not None or preset is not None)
        m = kvm_x86.Mce(
            status=status if status is not None else preset.status,  # type: ignore[union-attr]
            bank=bank,
            addr=addr or 0,
            misc=misc if misc is not None else (preset.misc if preset else 0),
            mcg_status=mcg_status
            if mcg_status is not None
            else (preset.mcg_status if preset else 0),
        )
        try:
            mce_codec.validate(m, kvm_x86.KVM_MAX_MCE_BANKS)
        except InvalidInput as err:
            f.fail("status" if f.given("status") else "preset", err.message, err.hint)
        f.done()
        return cls(m, force)

    def validate(self, wait: Optional[float] = None) -> None:
        mce_codec.validate(self.mce, kvm_x86.KVM_MAX_MCE_BANKS)

    def check(self, caps: HostCaps) -> None:
        if not caps.cap(api.KVM_CAP_MCE):
            raise Unsupported("this host's KVM has no machine-check support (KVM_CAP_MCE is 0)")

    def audit(self) -> Dict[str, object]:
        m = self.mce
        return {
            "bank": m.bank,
            "status": m.status,
            "addr": m.addr,
            "misc": m.misc,
            "mcg_status": m.mcg_status,
            "force": self.force,
        }

    def request(self) -> Dict[str, object]:
        out = self.audit()
        del out["force"]
        out["status_decoded"] = mce_codec.decode_status(self.mce.status).as_dict()
        return out

    def severity(self) -> str:
        """``fatal`` when a Linux guest panics on this machine check (or may: SRAR)."""
        status = int(self.mce.status)
        if not status & kvm_x86.MCI_STATUS_UC or mce_codec.is_ucna(self.mce):
            return "survivable"
        notes = mce_codec.linux_notes(status, int(self.mce.mcg_status))
        return "fatal" if any("panics" in n for n in notes) else "survivable"

    def raises_exception(self) -> bool:
        return mce_codec.predict(self.mce, bank_count=kvm_x86.KVM_MAX_MCE_BANKS).raises_mc

    def label(self) -> str:
        return f"bank {self.mce.bank}, status {self.mce.status:#x}"

    # ---- the loop's steps
    def read(self, vc: X86Vcpu) -> Reading:
        ev = vc.get_events()
        return Reading(ev, ev.as_dict)

    def admit(self, vcpu_id: int, vc: X86Vcpu, before: Reading, plan: Any) -> Dict[str, object]:
        state, banks = _guest_state(vc, self.mce.bank)
        effect = mce_codec.predict(self.mce, bank_count=banks, state=state)
        if effect.outcome in ("triple-fault", "dropped") and not self.force:
            raise Conflict(
                f"vCPU {vcpu_id}: this machine check would be {effect.outcome}:"
                f" {effect.reason}; nothing was sent",
                hint="use --force to inject it anyway",
            )
        return effect.as_dict()

    def send(self, vc: X86Vcpu) -> None:
        vc.inject_mce(self.mce)

    def settled(
        self, after: Reading, prediction: Dict[str, object], sent_after: float
    ) -> Optional[Delivery]:
        if prediction.get("raises_mc"):
            return None
        return Delivery(
            True, None, 0, "logged in the bank; it raises no exception (the guest polls)"
        )

    def pending(self, vc: X86Vcpu) -> bool:
        exc = vc.get_events().exception
        return bool((exc.pending or exc.injected) and exc.nr == kvm_x86.MC_VECTOR)


def _preset(f: Fields, name: object) -> Optional[mce_codec.McePreset]:
    if name is None:
        return None
    if type(name) is not str:
        f.fail("preset", f"must be a string, not {type_name(name)} ({show(name)})")
        return None
    try:
        return mce_codec.preset(name)
    except InvalidInput as err:
        f.fail("preset", err.message, err.hint)
        return None


def _bank(f: Fields, value: object) -> Optional[int]:
    if value is None:
        f.need(
            ("bank",), "the machine-check bank, MCi", hint="`serrinj status` shows the bank count"
        )
        return None
    if type(value) is int and value < 0:
        f.fail("bank", f"bank {value} does not exist: banks are numbered from 0")
        return None
    bank = f.number("bank")
    if bank is not None and bank >= kvm_x86.KVM_MAX_MCE_BANKS:
        f.fail(
            "bank",
            f"bank {bank} does not exist: KVM gives a vCPU at most {kvm_x86.KVM_MAX_MCE_BANKS}"
            f" banks (0..{kvm_x86.KVM_MAX_MCE_BANKS - 1}); the VM's own count is checked"
            " before each injection",
        )
        return None
    return bank


def _guest_state(vc: X86Vcpu, bank: int) -> Tuple[mce_codec.GuestMceState, int]:
    msrs = vc.get_msrs(
        (
            kvm_x86.MSR_IA32_MCG_CAP,
            kvm_x86.MSR_IA32_MCG_STATUS,
            kvm_x86.MSR_IA32_MCG_CTL,
            kvm_x86.mci_msr(bank, "ctl"),
            kvm_x86.mci_msr(bank, "status"),
        )
    )
    cap = msrs.get(kvm_x86.MSR_IA32_MCG_CAP, 0)
    cr4 = kvm_x86.sregs_get_control(vc.get_sregs(), "cr4")
    ones = (1 << 64) - 1
    state = mce_codec.GuestMceState(
        cr4_mce=bool(cr4 & kvm_x86.CR4_MCE),
        mcip=bool(msrs.get(kvm_x86.MSR_IA32_MCG_STATUS, 0) & kvm_x86.MCG_STATUS_MCIP),
        mcg_ctl_all_ones=msrs.get(kvm_x86.MSR_IA32_MCG_CTL) == ones
        if cap & kvm_x86.MCG_CTL_P
        else None,
        mci_ctl_all_ones=msrs.get(kvm_x86.mci_msr(bank, "ctl")) == ones,
        bank_status=msrs.get(kvm_x86.mci_msr(bank, "status")),
        mcg_cap=cap,
    )
    return state, cap & kvm_x86.MCG_CAP_COUNT_MASK
