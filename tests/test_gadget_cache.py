"""The on-disk gadget cache: a fresh serrinj process finds the VMM's machine code
without scanning libc, and a cache entry is never trusted beyond what a scan
would accept (the bytes at the address, read afresh, in an executable mapping).

The target is a real process (``sleep``, linked against libc); nothing is traced.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from serrinj import _native
from serrinj.host import procfs
from serrinj.remote import gadget
from serrinj.remote.arch import host_arch


@pytest.fixture
def sleeper() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while procfs.comm(proc.pid) != "sleep":  # not before the exec
            assert time.monotonic() < deadline
            time.sleep(0.001)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(gadget, "_disk", None)
    monkeypatch.setattr(gadget, "_cache", {})
    return tmp_path / "serrinj" / "gadgets.json"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """The size of every read of the target's memory."""
    sizes: List[int] = []
    real = _native.process_vm_read

    def spy(pid: int, addr: int, size: int) -> bytes:
        sizes.append(size)
        return real(pid, addr, size)

    monkeypatch.setattr(_native, "process_vm_read", spy)
    return sizes


def _fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget what this process learnt, as a new serrinj process would."""
    monkeypatch.setattr(gadget, "_disk", None)
    monkeypatch.setattr(gadget, "_cache", {})


def _mapping_of(pid: int, addr: int) -> procfs.Mapping:
    return next(m for m in procfs.maps(pid) if m.contains(addr))


def test_a_scan_hit_is_kept_on_disk_and_a_fresh_process_uses_it(
    sleeper: int, cache_home: Path, reads: List[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    arch = host_arch()
    seqs = arch.sigreturn_seqs
    first = gadget.find_sequence(sleeper, arch, seqs)
    assert max(reads) > 4096  # found by scanning
    m = _mapping_of(sleeper, first)
    assert m.executable and m.inode
    entries = json.loads(cache_home.read_text())
    assert list(entries.values()) == [first - m.start + m.offset]
    _fresh_process(monkeypatch)
    reads.clear()
    assert gadget.find_sequence(sleeper, arch, seqs) == first
    assert reads == [max(len(p) for p in seqs)]  # one short read: the validation


def test_a_stale_entry_is_ignored_and_replaced(
    sleeper: int, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch = host_arch()
    seqs = arch.sigreturn_seqs
    good = gadget.find_sequence(sleeper, arch, seqs)
    entries = json.loads(cache_home.read_text())
    (key,) = entries
    for wrong in (entries[key] + 1, 1 << 40):  # not the pattern there; outside the mapping
        cache_home.write_text(json.dumps({key: wrong}))
        _fresh_process(monkeypatch)
        assert gadget.find_sequence(sleeper, arch, seqs) == good
        assert json.loads(cache_home.read_text()) == entries


def test_an_avoided_address_is_not_taken_from_disk(
    sleeper: int, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch = host_arch()
    first = gadget.find_syscall_gadget(sleeper, arch)
    _fresh_process(monkeypatch)
    assert gadget.find_syscall_gadget(sleeper, arch, avoid=(first,)) != first


def test_an_unwritable_cache_is_no_error(
    sleeper: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file: no directory under it
    _fresh_process(monkeypatch)
    assert gadget.find_syscall_gadget(sleeper, host_arch())


# ---------------------------------------------------------------------- whose file
@pytest.mark.root
def test_root_acting_for_another_user_keeps_its_own_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through sudo the caller's XDG_CACHE_HOME and HOME must not choose where root
    writes: the cache is root's, under root's home from the password database."""
    import os
    import pwd

    from serrinj.host import privilege

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SUDO_UID", "65534")
    monkeypatch.setenv("SUDO_GID", "65534")
    privilege.reset()
    try:
        assert privilege.current().elevated
        path = gadget._disk_path()
    finally:
        monkeypatch.undo()
        privilege.reset()
    assert path == os.path.join(pwd.getpwuid(0).pw_dir, ".cache", "serrinj", "gadgets.json")
    # and without sudo's variables, root's own environment is honoured
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gadget._disk_path() == str(tmp_path / "serrinj" / "gadgets.json")


def test_a_symlink_or_fifo_in_the_cache_place_is_not_read(
    sleeper: int, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    arch = host_arch()
    seqs = arch.sigreturn_seqs
    good = gadget.find_sequence(sleeper, arch, seqs)
    real = cache_home.with_name("elsewhere.json")
    cache_home.rename(real)
    cache_home.symlink_to(real)
    _fresh_process(monkeypatch)
    assert gadget._disk_entries() == {}  # not followed
    cache_home.unlink()
    os.mkfifo(cache_home)
    _fresh_process(monkeypatch)
    started = time.monotonic()
    assert gadget._disk_entries() == {}  # no writer: a blocking open would hang here
    assert time.monotonic() - started < 5
    assert gadget.find_sequence(sleeper, arch, seqs) == good


def test_the_write_follows_no_symlink_planted_at_the_temporary_name(
    sleeper: int, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    victim = cache_home.parent.parent / "victim"
    victim.write_text("untouched")
    cache_home.parent.mkdir(parents=True)
    (cache_home.parent / f"gadgets.json.{os.getpid()}").symlink_to(victim)
    arch = host_arch()
    assert gadget.find_sequence(sleeper, arch, arch.sigreturn_seqs)  # a scan, then a write
    assert victim.read_text() == "untouched"
