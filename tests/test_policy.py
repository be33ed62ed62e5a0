"""The policy file's logic (pure): parsing, matching, the first rule that decides,
and the severities serrinj predicts. The real thing, through sudo, is in
tests/test_sudo.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serrinj.codec import mce
from serrinj.errors import InvalidInput, PermissionDenied
from serrinj.ops import policy
from serrinj.ops.policy import Request, Subject

#: the example of the README and the man page, and a rule of the tests' own
EXAMPLE = (
    "# the README's example\n"
    + (Path(__file__).resolve().parent.parent / "docs" / "policy-example.toml").read_text()
    + """
[[rule]]
name = "bob-own-vms"
users = ["bob", 4242]
vmm_users = ["caller"]
do = ["read", "nmi"]
"""
)

ALICE = Subject(
    uid=1001, name="alice", gids=frozenset({100, 2000}), group_names=frozenset({"users", "ras"})
)
BOB = Subject(uid=1002, name="bob", gids=frozenset({100}), group_names=frozenset({"users"}))
QEMU_UID = 64055


def decide(who: Subject, op: str, vm: str, sev: object = None, vmm_uid: int = QEMU_UID) -> str:
    d = policy.decide(policy.parse(EXAMPLE, "p.toml"), who, Request(op, vm, None, vmm_uid, sev))  # type: ignore[arg-type]
    return f"{'allow' if d.allowed else 'refuse'} {d.rule.name if d.rule else '-'}"


def test_the_ras_group_may_do_anything_to_ras_vms_and_only_look_elsewhere() -> None:
    assert decide(ALICE, "nmi", "ras-1", "survivable") == "allow ras-lab"
    assert decide(ALICE, "mce", "ras-1", "survivable") == "allow ras-lab"
    assert decide(ALICE, "events-save", "ras-1") == "allow ras-lab"
    assert decide(ALICE, "status", "prod-db") == "allow ras-look-elsewhere"
    assert decide(ALICE, "nmi", "prod-db", "survivable") == "refuse -"
    assert decide(ALICE, "events-save", "prod-db") == "refuse -"
    # a VM without a name is not a ras-* VM
    d = policy.decide(policy.parse(EXAMPLE), ALICE, Request("nmi", None, None, 0, "survivable"))
    assert not d.allowed and "VM without a name" in d.message


def test_nobody_but_root_injects_a_fatal_fault_into_a_vm_it_does_not_own() -> None:
    assert decide(ALICE, "serror", "ras-1", "fatal") == "refuse no-fatal-into-others"
    assert decide(ALICE, "mce", "ras-1", "fatal") == "refuse no-fatal-into-others"
    # its own VM: the deny rule does not match, the ras rule allows
    assert decide(ALICE, "mce", "ras-1", "fatal", vmm_uid=ALICE.uid) == "allow ras-lab"
    # reads have no severity: a severity rule never matches them
    assert decide(ALICE, "status", "ras-1", None) == "allow ras-lab"


def test_users_by_name_or_uid_and_the_callers_own_vmm() -> None:
    assert decide(BOB, "nmi", "x", "survivable", vmm_uid=BOB.uid) == "allow bob-own-vms"
    assert decide(BOB, "status", "x", None, vmm_uid=BOB.uid) == "allow bob-own-vms"
    assert decide(BOB, "nmi", "x", "survivable") == "refuse -"  # qemu's VM
    assert decide(BOB, "mce", "x", "survivable", vmm_uid=BOB.uid) == "refuse -"  # not in do
    by_uid = Subject(uid=4242, name="svc", gids=frozenset(), group_names=frozenset())
    assert decide(by_uid, "nmi", "x", "survivable", vmm_uid=4242) == "allow bob-own-vms"


def test_messages_name_the_file_the_rule_and_its_line() -> None:
    pol = policy.parse(EXAMPLE, "/etc/serrinj/policy.toml")
    d = policy.decide(pol, ALICE, Request("mce", "ras-1", None, 0, "fatal"))
    assert d.message == (
        '/etc/serrinj/policy.toml: rule "no-fatal-into-others" (line 2) refuses'
        " mce (fatal) on VM 'ras-1' to alice"
    )
    d = policy.decide(pol, BOB, Request("nmi", "prod", None, 0, "survivable"))
    assert d.message == (
        "/etc/serrinj/policy.toml: no rule allows nmi (survivable) on VM 'prod' to bob"
    )


def test_what_a_caller_may_do_on_one_vm() -> None:
    pol = policy.parse(EXAMPLE)
    assert policy.allowed_operations(pol, ALICE, "prod", None, 0) == ["status"]
    assert policy.allowed_operations(pol, ALICE, "ras-1", None, 0) == [
        "status",
        "events-save",
        *(f"{op} (survivable only)" for op in policy.INJECTIONS),
    ]
    assert policy.allowed_operations(pol, BOB, "prod", None, 0) == []


def test_domains_and_vmm_users() -> None:
    pol = policy.parse(
        '[[rule]]\nname = "d"\nusers = ["*"]\ndomains = ["lab-*"]\nvmm_users = ["libvirt-qemu"]\n'
    )
    lab = Request("nmi", "lab-1", "lab-1", QEMU_UID, "survivable")
    assert policy.decide(pol, BOB, lab, frozenset({"libvirt-qemu"})).allowed
    assert not policy.decide(pol, BOB, lab, frozenset({"root"})).allowed
    # a QEMU named lab-1 on its command line is not the libvirt domain lab-1
    assert not policy.decide(pol, BOB, Request("nmi", "lab-1", None, QEMU_UID, "survivable"),
                             frozenset({"libvirt-qemu"})).allowed  # fmt: skip


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[rule]]\nname = "a"\nvms = ["x"]\n', "p.toml:1: rule 'a' says for whom"),
        ('[[rule]]\nname = "a"\nusers = ["*"]\ndo = ["reboot"]\n', "unknown operation 'reboot'"),
        ('[[rule]]\nname = "a"\nusers = ["*"]\nseverity = "bad"\n', "severity must be"),
        ('[[rule]]\nname = "a"\nusers = ["*"]\nowner = "me"\n', "owner must be caller or other"),
        ('[[rule]]\nname = "a"\nusers = ["*"]\nvm = ["x"]\n', "p.toml:4: unknown key 'vm'"),
        ('[[rule]]\nname = "a"\nusers = []\n', "users must be a non-empty list"),
        ('[[rule]]\nusers = ["*"]\n', "every rule needs a name"),
        ('[[rule]]\nname = "a"\nusers = ["*"]\n[[rule]]\nname = "a"\nusers = ["*"]\n', "two rules"),
        ('[[rule]]\nname = "a"\nusers = ["*"]\neffect = "maybe"\n', "effect must be"),
        ('audit_log = "/tmp/x"\n', "unknown key 'audit_log'"),
    ],
)
def test_a_bad_policy_names_its_line(text: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as err:
        policy.parse(text, "p.toml")
    assert problem in err.value.message


def test_severities_are_serrinjs_own_predictions() -> None:
    assert policy.serror_severity(0x1811) == "survivable"  # CE
    assert policy.serror_severity(0x0811) == "survivable"  # UEO
    assert policy.serror_severity(0x0C11) == "fatal"  # UER
    assert policy.serror_severity(None) == "fatal"  # KVM's own syndrome: IDS=1
    assert policy.mce_severity(mce.preset("corrected").build(1)) == "survivable"
    assert policy.mce_severity(mce.preset("srao").build(1)) == "survivable"
    assert policy.mce_severity(mce.preset("uc-fatal").build(1)) == "fatal"
    assert policy.mce_severity(mce.preset("srar").build(1)) == "fatal"
    assert policy.mce_severity(mce.preset("ucna").build(1)) == "survivable"


@pytest.mark.root
def test_only_a_root_owned_file_that_others_cannot_write_is_used(tmp_path: Path) -> None:
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    path = d / "policy.toml"
    assert policy.load_system(str(path)) is None  # no file: no policy
    path.write_text(EXAMPLE)
    path.chmod(0o644)
    assert [r.name for r in policy.load_system(str(path)).rules][:2] == [  # type: ignore[union-attr]
        "no-fatal-into-others",
        "ras-lab",
    ]
    path.chmod(0o664)
    with pytest.raises(PermissionDenied, match="writable by its group or others"):
        policy.load_system(str(path))
    path.chmod(0o644)
    os.chown(path, 1, 1)
    with pytest.raises(PermissionDenied, match="owned by uid 1, not root"):
        policy.load_system(str(path))
    os.chown(path, 0, 0)
    d.chmod(0o777)
    with pytest.raises(PermissionDenied, match="cannot be trusted"):
        policy.load_system(str(path))
    d.chmod(0o755)
    link = d / "link.toml"
    link.symlink_to(path)
    with pytest.raises(PermissionDenied, match="symbolic link"):
        policy.load_system(str(link))
    path.write_text("[[rule]]\nname = 1\n")
    with pytest.raises(PermissionDenied, match="is invalid"):
        policy.load_system(str(path))


def test_the_documented_example_is_the_one_tested_here() -> None:
    import re

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(# /etc/serrinj/policy\.toml.*?)```", readme, re.S)
    documented = policy.parse(block)
    tested = policy.parse(EXAMPLE)
    assert [(r.name, r.allow, r.users, r.groups, r.vms, r.owner, r.do, r.severity)
            for r in documented.rules] == [
        (r.name, r.allow, r.users, r.groups, r.vms, r.owner, r.do, r.severity)
        for r in tested.rules[:3]
    ]  # fmt: skip
    man = (root / "man" / "serrinj.1").read_text()
    body = block.split("\n", 2)[2]  # without the two comment lines
    assert body.replace("-", "\\-") in man
