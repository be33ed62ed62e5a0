"""The views: one ``view_*`` function per command, turning the command's JSON-ready dict
into a document of :mod:`serrinj.cli.render` blocks (headings, fields, tables, lines).

A view reads only the data the JSON output carries, so ``--json`` and the human output
say the same thing; the helpers above the views name numbers, flags and vCPU events in words.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

from serrinj.cli.render import (
    BAD,
    DIM,
    OK,
    WARN,
    Cell,
    Doc,
    Fields,
    Heading,
    Line,
    Styled,
    Table,
)


# ====================================================================== helpers
def hx(value: Optional[int], width: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:#0{width + 2}x}" if width else f"{value:#x}"


def yesno(flag: object) -> str:
    return "yes" if flag else "no"


def _vm_label(vm: Mapping[str, Any]) -> str:
    name = vm.get("name")
    return f"{name!r} (pid {vm['pid']})" if name else f"pid {vm['pid']}"


X86_VECTORS: Mapping[int, str] = {
    0: "#DE",
    1: "#DB",
    2: "NMI",
    3: "#BP",
    4: "#OF",
    5: "#BR",
    6: "#UD",
    7: "#NM",
    8: "#DF",
    10: "#TS",
    11: "#NP",
    12: "#SS",
    13: "#GP",
    14: "#PF",
    16: "#MF",
    17: "#AC",
    18: "#MC",
    19: "#XM",
    20: "#VE",
    21: "#CP",
}


#: (group, flag, words, style) of the x86 event flags worth a line, in the order shown
_X86_EVENT_FLAGS: Tuple[Tuple[str, str, str, str], ...] = (
    ("nmi", "pending", "NMI pending", WARN),
    ("nmi", "injected", "NMI injected", WARN),
    ("nmi", "masked", "NMIs blocked (in an NMI handler)", DIM),
    ("smi", "smm", "in SMM", DIM),
    ("smi", "pending", "SMI pending", WARN),
)


def x86_events_summary(ev: Mapping[str, Any]) -> List[Styled]:
    """The notable parts of an x86 ``kvm_vcpu_events`` dict, in words."""
    out: List[Styled] = []
    exc = ev.get("exception", {})
    if exc.get("pending") or exc.get("injected"):
        nr = int(exc.get("nr", 0))
        what = "pending" if exc.get("pending") else "injected"
        name = X86_VECTORS.get(nr, f"vector {nr}")
        code = f" error code {hx(exc.get('error_code'))}" if exc.get("has_error_code") else ""
        out.append(Styled(f"exception {name} ({nr}) {what}{code}", WARN))
    intr = ev.get("interrupt", {})
    if intr.get("injected"):
        out.append(Styled(f"interrupt {intr.get('nr')} injected", WARN))
    for group, flag, text, style in _X86_EVENT_FLAGS:
        if ev.get(group, {}).get(flag):
            out.append(Styled(text, style))
    if ev.get("triple_fault_pending"):
        out.append(Styled("triple fault pending", BAD))
    return out


def arm64_events_summary(ev: Mapping[str, Any]) -> List[Styled]:
    """The notable parts of an arm64 ``kvm_vcpu_events`` dict, in words."""
    out: List[Styled] = []
    if ev.get("serror_pending"):
        dec = ev.get("serror_esr_decoded") or {}
        sev = dec.get("aet_name") or ("IDS (impl. defined)" if dec.get("ids") else "")
        extra = f", {sev}" if sev else ""
        out.append(Styled(f"SError pending (ISS {hx(ev.get('serror_esr'))}{extra})", WARN))
    if ev.get("ext_dabt_pending"):
        out.append(Styled("external data abort pending", WARN))
    taken = ev.get("last_exception")
    if taken and taken.get("serror"):
        out.append(Styled(_last_exception_text(taken), WARN))
    masked = ev.get("serror_masked")
    if masked is not None:
        out.append(
            Styled("SErrors masked (PSTATE.A=1)", DIM)
            if masked
            else Styled("SErrors unmasked (PSTATE.A=0)", DIM)
        )
    return out


def events_summary(arch: str, ev: Mapping[str, Any]) -> Styled:
    parts = arm64_events_summary(ev) if arch == "aarch64" else x86_events_summary(ev)
    if not parts:
        return Styled("nothing pending", OK)
    style = next((p.style for p in parts if p.style in (BAD, WARN)), parts[0].style)
    return Styled("; ".join(p.text for p in parts), style)


# ====================================================================== list
def view_list(data: Mapping[str, Any]) -> Doc:
    doc: Doc = []
    vms = data.get("vms", [])
    for vm in vms:
        n = len(vm["vcpus"])
        doc.append(
            Heading(
                f"VM {_vm_label(vm)}  vmm={vm['vmm']}  arch={vm['arch']}  comm={vm['comm']}"
                f"  vcpus={n}"
            )
        )
        rows: List[List[Cell]] = []
        for v in vm["vcpus"]:
            mapped = "+".join(v.get("sources") or ()) or v.get("mapped_by")
            rows.append(
                [
                    str(v["vcpu_id"]),
                    _fds_text(v),
                    str(v["tid"]) if v.get("tid") is not None else Styled("?", WARN),
                    v.get("thread_name") or "-",
                    v.get("thread_state") or "-",
                    mapped if mapped else Styled("unmapped (try --probe)", WARN),
                    _seccomp(v.get("seccomp_mode")),
                ]
            )
        if rows:
            doc.append(
                Table(["vCPU", "fd", "tid", "thread", "state", "mapped by", "seccomp"], rows)
            )
            doc.extend(_disagreements(vm["vcpus"]))
        else:
            doc.append(Line(Styled("no vCPUs yet", WARN)))
    return doc


def _fds_text(v: Mapping[str, Any]) -> str:
    """The vCPU's fds, the one serrinj uses first (``7`` or ``7,8``)."""
    fds = [v["fd"]] + [fd for fd in v.get("fds") or () if fd != v["fd"]]
    return ",".join(str(fd) for fd in fds)


def _disagreements(vcpus: Sequence[Mapping[str, Any]]) -> Doc:
    """One line per vCPU whose sources named different threads."""
    doc: Doc = []
    for v in vcpus:
        th = v.get("thread")
        info = th if isinstance(th, Mapping) else v
        lost = info.get("disagreements") or ()
        if not lost:
            continue
        tid = info.get("tid")
        said = "; ".join(f"{e['source']} said thread {e['tid']}" for e in lost)
        used = (
            f"thread {tid} ({info.get('mapped_by')}) is used" if tid is not None else "none is used"
        )
        doc.append(Line(Styled(f"vCPU {v['vcpu_id']}: {said}; {used}", WARN)))
    return doc


def _seccomp(mode: Optional[int]) -> str:
    return {None: "-", 0: "off", 1: "strict", 2: "filter"}.get(mode, str(mode))


# ====================================================================== status
def _caps_text(host: Mapping[str, Any]) -> str:
    caps = host.get("caps", {})
    return "\n".join(f"{name} = {value}" for name, value in caps.items()) or "-"


_MCG_CAP_FLAGS: Sequence[Tuple[int, str]] = (
    (1 << 8, "CTL_P"),
    (1 << 9, "EXT_P"),
    (1 << 10, "CMCI_P"),
    (1 << 11, "TES_P"),
    (1 << 24, "SER_P"),
    (1 << 26, "ELOG_P"),
    (1 << 27, "LMCE_P"),
)


def host_fields(host: Mapping[str, Any]) -> Fields:
    rows: List[Tuple[str, Cell]] = [
        ("arch", host["arch"]),
        ("KVM API", str(host["api_version"])),
        ("capabilities", _caps_text(host)),
    ]
    mce_cap = host.get("mce_cap_supported")
    if mce_cap is not None:
        names = [n for bit, n in _MCG_CAP_FLAGS if mce_cap & bit]
        banks = host.get("caps", {}).get("KVM_CAP_MCE")
        rows.append(
            (
                "machine checks",
                f"MCG_CAP bits {hx(mce_cap)} [{' '.join(names)}]"
                + (f", up to {banks} banks" if banks else ""),
            )
        )
    return Fields(rows)


def view_status(data: Mapping[str, Any]) -> Doc:
    host = data["host"]
    vm = data["vm"]
    arch = vm["arch"]
    doc: Doc = [Heading("Host"), host_fields(host)]
    doc.append(Heading(f"VM {_vm_label(vm)}  vmm={vm['vmm']}  arch={arch}"))
    rows: List[List[Cell]] = []
    for v in data["vcpus"]:
        th = v["thread"]
        rows.append(
            [
                str(v["vcpu_id"]),
                str(th["tid"]),
                th["name"],
                v["state"],
                v.get("mp_state") or "-",
                events_summary(arch, v["events"]),
            ]
        )
    doc.append(Table(["vCPU", "tid", "thread", "state", "mp_state", "events"], rows))
    doc.extend(_disagreements(data["vcpus"]))
    for v in data["vcpus"]:
        if arch == "aarch64":
            doc.extend(_arm64_detail(v))
        if "kill_safe" in v:
            safe = f"vCPU {v['vcpu_id']}: kill-safe: " + (
                "yes" if v["kill_safe"] else f"no ({v.get('kill_safe_reason', '?')})"
            )
            doc.append(Line(Styled(safe, OK if v["kill_safe"] else WARN)))
        if not v.get("registers_restored", True):
            doc.append(
                Line(
                    Styled(
                        f"vCPU {v['vcpu_id']}: the thread's registers could not be verified"
                        " after the read",
                        BAD,
                    )
                )
            )
    pol = data.get("policy")
    if pol:
        doc.append(Line(f"policy: {pol['applies']}"))
        if pol.get("allowed") is not None:
            allowed = ", ".join(pol["allowed"]) or "nothing"
            doc.append(Line(f"{pol['caller']['name']} may do here: {allowed}"))
    return doc


def _arm64_detail(v: Mapping[str, Any]) -> Doc:
    ev = v["events"]
    rows: List[Tuple[str, Cell]] = []
    pd = v.get("pstate_decoded")
    if pd:
        rows.append(
            (
                "PSTATE",
                f"{hx(v.get('pstate'))}  mode={pd['mode']}  "
                + " ".join(f"{k}={int(bool(pd[k]))}" for k in ("D", "A", "I", "F")),
            )
        )
    rows.append(("SError pending", yesno(ev.get("serror_pending"))))
    rows.append(("host RAS (has_esr)", yesno(ev.get("serror_has_esr"))))
    dec = ev.get("serror_esr_decoded")
    if dec:
        rows.append(("pending ESR", _syndrome_oneline(dec)))
    last = v.get("last_exception")
    if last and last.get("esr_el1"):
        rows.append(
            ("last exception", Styled(_last_exception_text(last), WARN if last["serror"] else ""))
        )
    return [Line(f"vCPU {v['vcpu_id']}:"), Fields(rows)]


def _last_exception_text(x: Mapping[str, Any]) -> str:
    """The last exception an arm64 guest took, from its EL1 registers, in words."""
    if not x.get("serror"):
        return f"EC {hx(x.get('ec'))} ({x.get('ec_name')}), ESR_EL1 {hx(x.get('esr_el1'))}"
    text = f"SError taken: ESR_EL1 {hx(x.get('esr_el1'))}"
    syn = x.get("syndrome") or {}
    if syn.get("aet_name"):
        text += f" ({syn['aet_name']})"
    elif syn.get("ids"):
        text += " (IDS, impl. defined)"
    if x.get("at_serror_vector"):
        return text + "; in the guest's registers, PC at its SError vector (handler not run yet)"
    return text + f" (the last exception the guest took; ELR_EL1 {hx(x.get('elr_el1'))})"


def _syndrome_oneline(s: Mapping[str, Any]) -> str:
    parts = [f"ISS {hx(s['iss'])} (guest ESR_EL1 {hx(s['esr'])})"]
    if s.get("ids"):
        parts.append(f"IDS=1, implementation-defined {hx(s.get('impdef'))}")
    else:
        if s.get("dfsc") is not None:
            parts.append(f"DFSC {hx(s['dfsc'])} {s.get('dfsc_name')}")
        if s.get("aet") is not None:
            parts.append(f"AET {s.get('aet_name')}")
    return ", ".join(parts)


# ====================================================================== injections
def _prediction_serror(p: Mapping[str, Any]) -> Cell:
    if not p:
        return "-"
    verdict = "survives" if p.get("survives") else "panics"
    text = f"a Linux guest {verdict} ({p.get('severity')}): {p.get('reason')}"
    if p.get("console_line"):
        text += f"\nconsole: {p['console_line']}"
    if p.get("timing"):
        text += f"\ntaken: {p['timing']}: {p.get('timing_reason')}"
    return Styled(text, OK if p.get("survives") else BAD)


def _prediction_mce(p: Mapping[str, Any]) -> Cell:
    if not p:
        return "-"
    text = f"{p.get('outcome')}: {p.get('reason')}"
    for c in p.get("caveats", []):
        text += f"\n- {c}"
    style = BAD if p.get("outcome") in ("triple-fault", "dropped") else OK
    return Styled(text, style)


def _delivery(d: Optional[Mapping[str, Any]]) -> Optional[Cell]:
    if d is None:
        return None
    if d.get("delivered"):
        lat = d.get("latency_s")
        polls = d.get("polls") or 0
        if lat is None and not polls:
            return Styled(str(d.get("reason") or "nothing to wait for"), OK)
        when = f" after {lat * 1000:.1f} ms" if lat is not None else ""
        reason = f" ({d['reason']})" if d.get("reason") else ""
        return Styled(f"taken by the guest{when}, {polls} poll(s){reason}", OK)
    return Styled(f"still pending: {d.get('reason')}", BAD)


def _mce_request(req: Mapping[str, Any]) -> str:
    dec = req.get("status_decoded") or {}
    flags = " ".join(dec.get("flags", []))
    lines = [
        f"bank {req['bank']}",
        f"MCi_STATUS {hx(req['status'], 16)} [{flags}]",
        f"  class {dec.get('class')} ({dec.get('class_description')})",
        f"  MCA code {hx(dec.get('mca_error_code'), 4)}: {dec.get('mca_error_code_description')}",
        f"MCi_ADDR {hx(req['addr'])}  MCi_MISC {hx(req['misc'])}"
        f"  MCG_STATUS {hx(req['mcg_status'])}",
    ]
    return "\n".join(lines)


def view_injections(data: Mapping[str, Any]) -> Doc:
    doc: Doc = []
    dry = bool(data.get("dry_run"))
    for inj in data["injections"]:
        kind = inj["kind"]
        vm = inj["vm"]
        verb = "Would inject" if dry else "Injected"
        title = (
            f"{verb} {_KIND_NAMES.get(kind, kind)} into vCPU {inj['vcpu_id']} of VM {_vm_label(vm)}"
        )
        doc.append(Heading(Styled(title, WARN if dry else "")))
        arch = "aarch64" if kind in ("serror", "ext-dabt") else "x86_64"
        rows: List[Tuple[str, Cell]] = [("thread", f"{inj['tid']} ({inj['thread_state']})")]
        req = inj["request"]
        if kind == "serror":
            esr_v = req.get("esr")
            rows.append(
                (
                    "syndrome",
                    f"ISS {hx(esr_v)}"
                    if req.get("has_esr")
                    else "none given: KVM/the CPU choose it (IDS=1 on a RAS host)",
                )
            )
            pred = inj.get("prediction") or {}
            if pred.get("guest_esr") is not None:
                rows.append(("guest ESR_EL1", hx(pred["guest_esr"])))
            rows.append(("prediction", _prediction_serror(pred)))
        elif kind == "mce":
            rows.append(("machine check", _mce_request(req)))
            rows.append(("prediction", _prediction_mce(inj.get("prediction") or {})))
        elif kind == "ext-dabt":
            mmio = (inj.get("before") or {}).get("mmio_exit")
            if mmio:
                rows.append(
                    (
                        "at MMIO exit",
                        f"{'write' if mmio.get('is_write') else 'read'} of {mmio.get('len')}"
                        f" byte(s) at {hx(mmio.get('phys_addr'))}",
                    )
                )
            else:
                addr = req.get("mmio_addr")
                rows.append(
                    (
                        "plan",
                        "at the vCPU's next MMIO exit"
                        + (f" at {hx(addr)}" if addr is not None else "")
                        + f", within {req.get('mmio_timeout')} s",
                    )
                )
        if inj.get("before"):
            rows.append(("before", events_summary(arch, inj["before"])))
        if inj.get("after") and not dry:
            rows.append(("after", events_summary(arch, inj["after"])))
        if inj.get("readback") is False:
            rows.append(("events", "not read (--no-readback)"))
        delivery = _delivery(inj.get("delivery"))
        if delivery is not None:
            rows.append(("delivery", delivery))
        if dry:
            rows.append(("sent", Styled("nothing (--dry-run)", WARN)))
        if kind != "ext-dabt" or not dry:
            rows.append(
                (
                    "registers",
                    Styled("restored bit for bit", OK)
                    if inj.get("registers_restored")
                    else Styled("NOT verified after restore", BAD),
                )
            )
        if inj.get("kill_safe") is False and not dry:
            reason = inj.get("kill_safe_reason") or "?"
            rows.append(("kill-safe", Styled(f"no: {reason}", WARN)))
        timings = inj.get("timings_us") or {}
        if timings:
            rows.append(("timings", "  ".join(f"{k} {v:.0f} us" for k, v in timings.items())))
        doc.append(Fields(rows))
    return doc


_KIND_NAMES = {
    "serror": "an SError",
    "ext-dabt": "an external data abort",
    "nmi": "an NMI",
    "mce": "a machine check",
}


# ====================================================================== esr
_FIELD_ROWS: Sequence[Tuple[str, str, str]] = (
    ("EC", "31:26", "ec"),
    ("IL", "25", "il"),
    ("IDS", "24", "ids"),
    ("IESB", "13", "iesb"),
    ("AET", "12:10", "aet"),
    ("EA", "9", "ea"),
    ("DFSC", "5:0", "dfsc"),
)


def _field_value(s: Mapping[str, Any], key: str) -> Tuple[str, str]:
    value = s.get(key)
    if value is None:
        return "-", "not applicable"
    if key == "ec":
        return hx(value), str(s.get("ec_name"))
    if key == "aet":
        return f"{value:#05b}", f"{s.get('aet_name')}: {s.get('aet_description') or 'reserved'}"
    if key == "dfsc":
        return hx(value), str(s.get("dfsc_name"))
    meaning = {
        "il": "32-bit instruction length (always 1 for SErrors)",
        "ids": "implementation-defined syndrome" if value else "architected (RAS) syndrome",
        "iesb": "synchronized by an implicit error synchronization barrier",
        "ea": "external abort type (implementation-defined)",
    }[key]
    return str(int(bool(value))), meaning if value or key == "ids" else "-"


def syndrome_doc(s: Mapping[str, Any], linux: Optional[Mapping[str, Any]]) -> Doc:
    head = f"ESR_EL1 {hx(s['esr'])}  ISS {hx(s['iss'])}"
    if s.get("form") == "esr":
        head = f"full ESR {hx(s['value'])}" + (
            f" (low 32 bits {hx(s['esr'])})" if s.get("sign_extended") else ""
        )
        head += f"  ISS {hx(s['iss'])}"
    doc: Doc = [Heading(head)]
    rows: List[List[Cell]] = []
    for name, bits, key in _FIELD_ROWS:
        if key in ("ec", "il") or s.get("is_serror"):
            value, meaning = _field_value(s, key)
            rows.append([name, bits, value, meaning])
    if s.get("ids"):
        rows.append(["IMPDEF", "23:0", hx(s.get("impdef")), "implementation-defined bits"])
    if s.get("iss2"):
        rows.append(["ISS2", "55:32", hx(s["iss2"]), "not injectable through KVM"])
    if s.get("res0"):
        rows.append(["RES0", "", hx(s["res0"]), Styled("reserved bits are set", WARN)])
    doc.append(Table(["field", "bits", "value", "meaning"], rows))
    for note in s.get("notes", []):
        doc.append(Line(Styled(f"note: {note}", WARN)))
    if s.get("injectable_iss") is not None:
        doc.append(Line(f"inject it with: serrinj inject --esr {hx(s['injectable_iss'])}"))
    if linux:
        doc.append(Heading("A Linux guest"))
        rows2: List[Tuple[str, Cell]] = [
            (
                "outcome",
                Styled("survives", OK) if linux["survives"] else Styled("panics", BAD),
            ),
            ("severity", str(linux["severity"])),
            ("why", str(linux["reason"])),
        ]
        if linux.get("console_line"):
            rows2.append(("console", f"{linux['console_line']}\n{linux['panic_message']}"))
        doc.append(Fields(rows2))
        for note in linux.get("kernel_notes") or []:
            doc.append(Line(f"host kernels: {note}"))
    return doc


def view_esr(data: Mapping[str, Any]) -> Doc:
    return syndrome_doc(data["syndrome"], data.get("linux"))


# ====================================================================== demo
def view_demo(data: Mapping[str, Any]) -> Doc:
    tv = data.get("testvm") or {}
    doc: Doc = [
        Heading(
            f"serrinj demo on {data.get('arch')}: test VM pid {tv.get('pid')}"
            f" ({tv.get('vcpus')} vCPUs, {tv.get('mode')})"
        )
    ]
    status = data.get("status")
    if status:
        rows: List[List[Cell]] = []
        for v in status["vcpus"]:
            rows.append(
                [
                    str(v["vcpu_id"]),
                    str(v["thread"]["tid"]),
                    v["state"],
                    events_summary(status["vm"]["arch"], v["events"]),
                ]
            )
        doc.append(Line("status before injecting:"))
        doc.append(Table(["vCPU", "tid", "state", "events"], rows))
    doc.append(Heading("Injected vs observed by the guest"))
    rows = []
    for step in data.get("steps", []):
        ok = step.get("match")
        rows.append(
            [
                step.get("name", ""),
                step.get("injected_text", ""),
                step.get("observed_text", "") or Styled("nothing", BAD),
                Styled("match", OK) if ok else Styled("MISMATCH", BAD),
            ]
        )
    doc.append(Table(["step", "injected", "the guest observed", "result"], rows))
    for step in data.get("steps", []):
        if step.get("error"):
            doc.append(Line(Styled(f"{step.get('name')}: {step['error']}", BAD)))
    verdict = data.get("ok")
    doc.append(
        Line(
            Styled("every injection was observed by the guest as injected", OK)
            if verdict
            else Styled("the guest did not observe what was injected", BAD)
        )
    )
    return doc


# ====================================================================== events
def view_events_saved(data: Mapping[str, Any]) -> Doc:
    snap = data["snapshot"]
    src = snap.get("source") or {}
    where = data.get("file") or "stdout"
    doc: Doc = [
        Heading(f"Saved the vCPU events of VM {_vm_label(src)} ({snap['arch']}) to {where}")
    ]
    rows: List[List[Cell]] = [
        [str(v["vcpu_id"]), events_summary(snap["arch"], v["decoded"])] for v in snap["vcpus"]
    ]
    doc.append(Table(["vCPU", "events"], rows))
    return doc


def view_events_loaded(data: Mapping[str, Any]) -> Doc:
    arch = data.get("arch", "")
    doc: Doc = [Heading(f"Loaded {data.get('file')} into VM {_vm_label(data.get('vm') or {})}")]
    rows: List[List[Cell]] = []
    for r in data["results"]:
        rows.append(
            [
                str(r["vcpu_id"]),
                events_summary(arch, r["before"]),
                events_summary(arch, r["after"]),
                "; ".join(r.get("notes") or []),
            ]
        )
    doc.append(Table(["vCPU", "before", "after", "notes"], rows))
    return doc


# ====================================================================== campaigns
_OUTCOME_STYLE = {"passed": OK, "failed": BAD, "error": BAD, "skipped": WARN}


def view_campaign(data: Mapping[str, Any]) -> Doc:
    camp = data.get("campaign") or {}
    doc: Doc = [Heading(f"Campaign {camp.get('name')} ({camp.get('source')})")]
    rows: List[List[Cell]] = []
    for e in data.get("executions", []):
        outcome = str(e.get("outcome"))
        rows.append(
            [
                str(e.get("index")),
                str(e.get("label") or e.get("name")),
                Styled(outcome, _OUTCOME_STYLE.get(outcome, "")),
                f"{float(e.get('duration_s') or 0):.3f} s",
                str(e.get("message") or ""),
            ]
        )
    doc.append(Table(["#", "step", "outcome", "time", "detail"], rows))
    counts = data.get("counts") or {}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "nothing run"
    code = int(data.get("exit_code", 0))
    doc.append(
        Line(
            Styled(
                f"{summary} in {float(data.get('duration_s') or 0):.2f} s (exit {code})",
                OK if code == 0 else BAD,
            )
        )
    )
    if data.get("junit"):
        doc.append(Line(f"JUnit report: {data['junit']}"))
    return doc
