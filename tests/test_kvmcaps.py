"""The host's KVM capabilities: probed on /dev/kvm once per process."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from serrinj.errors import Unsupported
from serrinj.host import kvmcaps


@pytest.mark.kvm
def test_the_host_is_probed_once_per_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    opened: List[str] = []
    real_open = kvmcaps.open_kvm

    def counting_open() -> int:
        opened.append(kvmcaps.KVM_DEV)
        return real_open()

    monkeypatch.setattr(kvmcaps, "open_kvm", counting_open)
    monkeypatch.setattr(kvmcaps, "_probed", {})
    first = kvmcaps.probe()
    assert first.api_version == 12 and first.caps["KVM_CAP_VCPU_EVENTS"] > 0
    assert kvmcaps.probe() is first and opened == ["/dev/kvm"]
    # fresh: /dev/kvm is asked again, and the same answer is kept from then on
    again = kvmcaps.probe(fresh=True)
    assert opened == ["/dev/kvm"] * 2 and again == first and again is not first
    assert kvmcaps.probe() is again
    # another device is another key, and a failure is not kept: the next call tries again
    monkeypatch.setattr(kvmcaps, "KVM_DEV", str(tmp_path / "kvm"))
    for _ in range(2):
        with pytest.raises(Unsupported):
            kvmcaps.probe()
    assert opened == ["/dev/kvm"] * 2 + [str(tmp_path / "kvm")] * 2
    monkeypatch.setattr(kvmcaps, "KVM_DEV", "/dev/kvm")
    assert kvmcaps.probe() is again and len(opened) == 4
