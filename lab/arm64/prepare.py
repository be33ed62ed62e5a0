"""Fetch and build everything a lab boot needs, reusing the cache when it is valid.

The cache (``~/.cache/serrinj/lab``) holds, each keyed by content or version:

``apt/``        the private apt root (its lists are updated only when missing,
                on ``--refresh``, or when the archive dropped a version we asked for)
``apt-kernel/`` a second one with Debian unstable alone, asked only for the
                "newest" kernel (the userland never sees it)
``debs/``       arm64 .deb files, verified against the index's SHA256
``unpacked/``   ``dpkg-deb -x`` trees of the userland packages
``wheels/``     the PyPI wheel set, with a manifest of SHA256s
``kernels/``    the kernel Images taken out of the linux-image packages
``images/``     the base and nested initramfs pieces, each with a metadata file
                (its SHA256, checked before use: a damaged piece is rebuilt)
``runs/``       per-run console logs and the project piece

A lock serialises preparation between concurrent runs; boots run unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Set

from lab.arm64 import config, initramfs, wheels
from lab.arm64.config import say
from lab.arm64.debian import (
    KERNEL_MEMBER,
    Apt,
    DebianError,
    Package,
    extract_member,
    sha256_file,
)


@dataclass(frozen=True)
class KernelImage:
    label: str
    #: the ``linux-image-*`` package ``linux-image-arm64`` names
    package: Package
    image: str
    #: the package the Image was found in (``package`` itself, or its ``linux-binary-*``)
    carrier: Optional[Package] = None

    @property
    def release(self) -> str:
        """``6.1.0-56-arm64`` from ``linux-image-6.1.0-56-arm64``."""
        name = self.package.name[len("linux-image-") :]
        return name[: -len("-unsigned")] if name.endswith("-unsigned") else name


@dataclass(frozen=True)
class Prepared:
    """Paths of everything the boots use."""

    kernels: Mapping[str, KernelImage]
    base: str
    nested: Optional[str]


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    os.makedirs(config.lab_cache(), exist_ok=True)
    with open(os.path.join(config.lab_cache(), "lock"), "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another lab run is preparing the cache; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _dir(name: str) -> str:
    path = os.path.join(config.lab_cache(), name)
    os.makedirs(path, exist_ok=True)
    return path


def _image_ok(path: str) -> Optional[Dict[str, object]]:
    """The metadata of a cached piece when the piece is intact, else None."""
    try:
        with open(path + ".json") as fh:
            meta: Dict[str, object] = json.load(fh)
    except (OSError, ValueError):
        return None
    if not os.path.isfile(path) or meta.get("sha256") != sha256_file(path):
        return None
    os.utime(path)  # "recently used": pruning spares it
    return meta


def _record_image(path: str, **meta: object) -> None:
    meta["sha256"] = sha256_file(path)
    tmp = f"{path}.json.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
    os.replace(tmp, path + ".json")


def _prune(pattern: str, keep: str, max_age_s: float = 3600) -> None:
    """Delete older cached pieces of one kind; recently used ones may serve another run."""
    now = time.time()
    for path in glob.glob(pattern):
        if path in (keep, keep + ".json") or now - os.path.getmtime(path) < max_age_s:
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)


def _sweep() -> None:
    """Remove what an interrupted preparation left (temporary names are never used)."""
    for sub in ("debs", "wheels", "kernels", "images", "unpacked"):
        for path in glob.glob(os.path.join(_dir(sub), ".download-*")) + glob.glob(
            os.path.join(_dir(sub), "*.tmp-*")
        ):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _kernel_image(chain: Sequence[Package], debs: Mapping[str, str]) -> tuple[str, Package]:
    """The Image of a kernel and the package it came from.

    ``chain`` is the image package then its exact dependencies; the first one whose
    data holds an Image (:data:`debian.KERNEL_MEMBER`) gives it. A cached Image is
    used when its recorded source package is still one of the chain.
    """
    path = os.path.join(_dir("kernels"), f"{chain[0].stem}.Image")
    meta = _image_ok(path)
    if meta is not None:
        for pkg in chain:
            if meta.get("deb_sha256") == pkg.sha256:
                return path, pkg
    for pkg in chain:
        say(f"kernel: looking for the Image in {pkg.basename}")
        try:
            extract_member(debs[pkg.name], KERNEL_MEMBER, path)
        except DebianError:
            continue
        _record_image(path, deb_sha256=pkg.sha256, package=pkg.name)
        return path, pkg
    names = ", ".join(p.name for p in chain)
    raise DebianError(f"no kernel Image ({KERNEL_MEMBER}) in any of: {names}")


def _resolve(
    apt: Apt, kernel_apt: Apt, labels: Sequence[str], with_qemu: bool
) -> tuple[Dict[str, Package], Dict[str, Package], Dict[str, Sequence[Package]]]:
    """(base userland, nested userland, kernel packages per label) as index records."""
    base_roots = list(config.BASE_PAYLOAD)
    base_versions = apt.closure(base_roots)
    nested_versions: Dict[str, str] = {}
    if with_qemu:
        nested_versions = apt.closure(base_roots + list(config.NESTED_PAYLOAD))
    records = apt.show({**base_versions, **nested_versions})
    base = {n: records[n] for n in base_versions}
    nested = {n: records[n] for n in nested_versions}
    kernels: Dict[str, Sequence[Package]] = {}
    for label in labels:
        flavour = config.KERNELS[label]
        kernels[label] = (kernel_apt if flavour.kernel_root else apt).kernel_image(flavour.release)
    return base, nested, kernels


def prepare(labels: Sequence[str], with_qemu: bool, refresh: bool = False) -> Prepared:
    """Resolve, download, verify and build; the archive is asked again only when needed."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DebianError(f"{tool} is missing: the lab needs a Debian host")
    if not os.path.exists(config.DEBIAN_KEYRING):
        raise DebianError(f"{config.DEBIAN_KEYRING} is missing (package debian-archive-keyring)")
    with cache_lock():
        _sweep()
        apt = Apt(_dir("apt"))
        apt.setup()
        apt.ensure_lists(refresh)
        kernel_apt = Apt(_dir("apt-kernel"), config.KERNEL_APT_SUITES)
        roots = [apt]
        if any(config.KERNELS[label].kernel_root for label in labels):
            kernel_apt.setup()
            kernel_apt.ensure_lists(refresh)
            roots.append(kernel_apt)
        try:
            return _prepare(apt, kernel_apt, labels, with_qemu, refresh)
        except DebianError as err:
            stale = [root for root in roots if not root.updated]
            if not stale:
                raise
            # the archive drops superseded versions: our lists may name one
            say(f"{err}".splitlines()[0] + " -- refreshing the package lists and retrying")
            for root in stale:
                root.update()
            return _prepare(apt, kernel_apt, labels, with_qemu, refresh)


def _prepare(
    apt: Apt, kernel_apt: Apt, labels: Sequence[str], with_qemu: bool, refresh: bool
) -> Prepared:
    wanted = list(dict.fromkeys(list(labels) + ([config.DEFAULT_KERNEL] if with_qemu else [])))
    base_pkgs, nested_pkgs, kernel_pkgs = _resolve(apt, kernel_apt, wanted, with_qemu)
    for label, chain in kernel_pkgs.items():
        if label[:1].isdigit() and not chain[0].version.startswith(label + "."):
            say(f"note: kernel flavour {label} now resolves to {chain[0].name} {chain[0].version}")
    userland = {**base_pkgs, **nested_pkgs}
    debs = apt.download(list(userland.values()), _dir("debs"))
    for label, chain in kernel_pkgs.items():
        root = kernel_apt if config.KERNELS[label].kernel_root else apt
        debs.update(root.download(chain, _dir("debs")))
    wheel_files = wheels.ensure(refresh)

    kernels: Dict[str, KernelImage] = {}
    for label, chain in kernel_pkgs.items():
        image, carrier = _kernel_image(chain, debs)
        kernels[label] = KernelImage(label, chain[0], image, carrier)

    unpack_dir = _dir("unpacked")
    base_land = initramfs.Userland(base_pkgs, debs, unpack_dir)
    key = initramfs.base_key(base_land, wheel_files)
    base = os.path.join(_dir("images"), f"base-{key}.cpio.gz")
    meta = _image_ok(base)
    if meta is None:
        say(f"base: building {os.path.basename(base)}")
        sonames = initramfs.build_base(base_land, wheel_files, base)
        _record_image(base, sonames=sorted(sonames))
        meta = _image_ok(base)
        assert meta is not None
        _prune(os.path.join(_dir("images"), "base-*"), base)
    else:
        say(f"base: cached {os.path.basename(base)}")

    nested: Optional[str] = None
    if with_qemu:
        guest = kernels[config.DEFAULT_KERNEL]
        nkey = initramfs.nested_key(key, guest.package)
        nested = os.path.join(_dir("images"), f"nested-{nkey}.cpio.gz")
        if _image_ok(nested) is None:
            say(f"nested: building {os.path.basename(nested)}")
            land = initramfs.Userland(nested_pkgs, debs, unpack_dir)
            base_sonames: Set[str] = set(meta["sonames"])  # type: ignore[call-overload]
            initramfs.build_nested(land, base_sonames, guest.image, nested)
            _record_image(nested)
            _prune(os.path.join(_dir("images"), "nested-*"), nested)
        else:
            say(f"nested: cached {os.path.basename(nested)}")
    return Prepared(kernels={label: kernels[label] for label in labels}, base=base, nested=nested)


def new_run_dir() -> str:
    """A fresh directory for one run's logs and project piece; old runs are pruned."""
    runs = _dir("runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(runs, f"{stamp}-{os.getpid()}")
    os.makedirs(path)
    previous = sorted(p for p in glob.glob(os.path.join(runs, "*")) if p != path)
    for old in previous[:-10]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def concatenate(pieces: List[str], out: str) -> str:
    """One initrd file from several cpio pieces (QEMU takes a single -initrd)."""
    with open(out, "wb") as dst:
        for piece in pieces:
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            # the kernel reads an uncompressed archive only at a 4-byte aligned
            # offset, and skips the zeros in between
            dst.write(b"\0" * (-dst.tell() % 4))
    return out
