"""arm64 packages from Debian's archive, through a private apt root.

The lab never touches the host's apt configuration: no ``dpkg
--add-architecture``, no extra sources in /etc/apt. It keeps its own apt
directory tree under the cache (sources, lists, an empty dpkg status) and runs
the ordinary ``apt-get``/``apt-cache`` with ``APT_CONFIG`` pointing there. With
an empty status, ``apt-get -s install`` resolves a package's full dependency
closure as if for a fresh arm64 system, and the archive's signatures are
checked with the host's Debian keyring as usual.

Downloads are verified against the SHA256 in the (signed) index, on download
and again whenever the cached file changed since it was last verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from lab.arm64 import config
from lab.arm64.config import say


class DebianError(RuntimeError):
    """apt could not resolve or fetch what the lab needs."""


@dataclass(frozen=True)
class Package:
    """One binary package version as the index describes it."""

    name: str
    version: str
    filename: str
    size: int
    sha256: str
    depends: str = ""

    @property
    def basename(self) -> str:
        return os.path.basename(self.filename)

    @property
    def stem(self) -> str:
        return self.basename[: -len(".deb")] if self.basename.endswith(".deb") else self.basename


# --- pure parsers (unit-tested) -------------------------------------------------

_INST = re.compile(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) ")


def parse_simulation(text: str) -> Dict[str, str]:
    """Package -> version from the ``Inst`` lines of ``apt-get -s install``."""
    out: Dict[str, str] = {}
    for raw in text.splitlines():
        match = _INST.match(raw)
        if match:
            name = match.group(1).split(":", 1)[0]  # drop a ":arm64" qualifier
            out[name] = match.group(2)
    return out


def parse_stanzas(text: str) -> List[Dict[str, str]]:
    """RFC822-style stanzas (``apt-cache show``) as dicts; continuation lines are joined."""
    stanzas: List[Dict[str, str]] = []
    current: Dict[str, str] = {}
    key = ""
    for raw in text.splitlines():
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif raw[0] in " \t" and key:
            current[key] += "\n" + raw.strip()
        else:
            key, _, value = raw.partition(":")
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def parse_candidate(text: str) -> Optional[str]:
    """The ``Candidate:`` version of ``apt-cache policy`` output (None when there is none)."""
    for raw in text.splitlines():
        key, _, value = raw.strip().partition(":")
        if key == "Candidate":
            value = value.strip()
            return None if value in ("", "(none)") else value
    return None


def exact_dependency(depends: str, pattern: str) -> Optional[Tuple[str, str]]:
    """The first ``name (= version)`` in a Depends field whose name matches ``pattern``."""
    for alternative in depends.split(","):
        for item in alternative.split("|"):
            match = re.match(r"\s*(\S+)\s*\(=\s*([^)\s]+)\s*\)", item)
            if match and re.fullmatch(pattern, match.group(1)):
                return match.group(1), match.group(2)
    return None


def exact_dependencies(depends: str, pattern: str) -> List[Tuple[str, str]]:
    """Every ``name (= version)`` in a Depends field whose name matches ``pattern``."""
    out: List[Tuple[str, str]] = []
    for alternative in depends.split(","):
        for item in alternative.split("|"):
            match = re.match(r"\s*(\S+)\s*\(=\s*([^)\s]+)\s*\)", item)
            if match and re.fullmatch(pattern, match.group(1)):
                out.append((match.group(1), match.group(2)))
    return out


#: where a Debian arm64 kernel package keeps its Image: ``boot/vmlinuz-<release>`` up
#: to 6.x, ``usr/lib/modules/<release>/vmlinuz`` in the 7.x ``linux-binary-*`` packages
KERNEL_MEMBER = r"boot/vmlinuz-[^/]+|usr/lib/modules/[^/]+/vmlinuz"


def sources_list(suites: Iterable[Tuple[str, str]], keyring: str) -> str:
    lines = [
        f"deb [arch=arm64 signed-by={keyring}] {mirror} {suite} main" for mirror, suite in suites
    ]
    return "\n".join(lines) + "\n"


# --- the private apt root ---------------------------------------------------------


class Apt:
    """apt-get and apt-cache, confined to a directory of their own, for arm64."""

    def __init__(self, root: str, suites: Sequence[Tuple[str, str]] = config.APT_SUITES) -> None:
        self.root = root
        self.suites = tuple(suites)
        self.conf = os.path.join(root, "apt.conf")
        self.sources = os.path.join(root, "etc", "sources.list")
        self.lists = os.path.join(root, "state", "lists")
        self.updated = False

    def setup(self) -> None:
        """Write the configuration; lists are dropped when the sources changed."""
        for sub in (
            "etc/sources.list.d",
            "etc/preferences.d",
            "state/lists/partial",
            "cache/archives/partial",
        ):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        status = os.path.join(self.root, "state", "status")
        if not os.path.exists(status):
            open(status, "w").close()
        sources = sources_list(self.suites, config.DEBIAN_KEYRING)
        old = _read(self.sources)
        if old != sources:
            _write_atomic(self.sources, sources)
            shutil.rmtree(self.lists, ignore_errors=True)
            os.makedirs(os.path.join(self.lists, "partial"), exist_ok=True)
        conf = "".join(f'{key} "{value}";\n' for key, value in self.settings())
        if _read(self.conf) != conf:
            _write_atomic(self.conf, conf)

    def settings(self) -> List[Tuple[str, str]]:
        """The configuration of this root. apt reads the host's apt.conf.d *after*
        ``APT_CONFIG``, so each setting is also passed with ``-o``, which wins."""
        r = self.root
        return [
            ("Dir::Etc::SourceList", f"{r}/etc/sources.list"),
            ("Dir::Etc::SourceParts", f"{r}/etc/sources.list.d"),
            ("Dir::Etc::Preferences", f"{r}/etc/preferences"),
            ("Dir::Etc::PreferencesParts", f"{r}/etc/preferences.d"),
            ("Dir::State", f"{r}/state"),
            ("Dir::State::Lists", f"{r}/state/lists"),
            ("Dir::State::status", f"{r}/state/status"),
            ("Dir::Cache", f"{r}/cache"),
            # a binary cache of the lists: without it every call re-parses them
            ("Dir::Cache::pkgcache", f"{r}/cache/pkgcache.bin"),
            ("Dir::Cache::srcpkgcache", f"{r}/cache/srcpkgcache.bin"),
            ("APT::Architecture", "arm64"),
            ("APT::Architectures", "arm64"),
            ("APT::Default-Release", ""),
            ("APT::Install-Recommends", "false"),
            ("Acquire::Languages", "none"),
            # downloads land in the cache (under $HOME), which apt's
            # unprivileged "_apt" user cannot enter
            ("APT::Sandbox::User", "root"),
            # the host's dpkg lock has nothing to do with this root
            ("Debug::NoLocking", "true"),
        ]

    def has_lists(self) -> bool:
        """Whether every suite's arm64 Packages index is present (possibly compressed)."""
        try:
            names = os.listdir(self.lists)
        except FileNotFoundError:
            return False
        for _mirror, suite in self.suites:
            part = f"_dists_{suite}_main_binary-arm64_Packages"
            if not any(part in n for n in names):
                return False
        return True

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["APT_CONFIG"] = self.conf
        env["LC_ALL"] = "C"
        env["DEBIAN_FRONTEND"] = "noninteractive"
        return env

    def run(self, args: Sequence[str], cwd: Optional[str] = None, timeout: float = 600) -> str:
        overrides = [f"-o{key}={value}" for key, value in self.settings()]
        try:
            proc = subprocess.run(
                [args[0], *overrides, *args[1:]],
                env=self._env(),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise DebianError(f"{' '.join(args)} took longer than {timeout:.0f} s") from err
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise DebianError(f"{' '.join(args[:3])} ... failed (rc={proc.returncode}):\n{tail}")
        return proc.stdout

    def update(self) -> None:
        say("apt-get update (private arm64 root: " + ", ".join(s for _, s in self.suites) + ")")
        self.run(["apt-get", "update", "-q", "--error-on=any"], timeout=900)
        self.updated = True

    def ensure_lists(self, refresh: bool = False) -> None:
        if refresh or not self.has_lists():
            self.update()

    def closure(self, roots: Sequence[str]) -> Dict[str, str]:
        """Every package (name -> version) a fresh system needs to install ``roots``."""
        out = self.run(["apt-get", "-s", "install", "--no-install-recommends", *roots])
        resolved = parse_simulation(out)
        missing = [r for r in roots if r.split("=", 1)[0] not in resolved]
        if missing:
            raise DebianError(f"apt did not resolve {missing}")
        return resolved

    def candidate(self, name: str, release: Optional[str]) -> str:
        args = ["apt-cache", "policy", name]
        if release:
            args[1:1] = ["-o", f"APT::Default-Release={release}"]
        version = parse_candidate(self.run(args))
        if version is None:
            raise DebianError(f"no candidate for {name} (release {release or 'default'})")
        return version

    def show(self, wanted: Mapping[str, str]) -> Dict[str, Package]:
        """Index records (filename, size, sha256) of exact ``name -> version`` pairs."""
        if not wanted:
            return {}
        out = self.run(["apt-cache", "show", *(f"{n}={v}" for n, v in sorted(wanted.items()))])
        found: Dict[str, Package] = {}
        for st in parse_stanzas(out):
            name, version = st.get("Package", ""), st.get("Version", "")
            if wanted.get(name) != version or name in found:
                continue
            found[name] = Package(
                name=name,
                version=version,
                filename=st["Filename"],
                size=int(st["Size"]),
                sha256=st["SHA256"],
                depends=st.get("Depends", ""),
            )
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise DebianError(f"the index has no record of {missing}")
        return found

    def kernel_image(self, release: Optional[str]) -> Tuple[Package, ...]:
        """The image package that ``linux-image-arm64`` (from ``release``) depends on,
        then the packages it depends on by exact version (``linux-binary-*``,
        ``linux-image-*-unsigned``), any of which may carry the Image.

        Which one holds it is decided later by looking into the packages
        (:func:`kernel_member`), not by the version: Debian's 7.x image package is
        a metapackage whose ``linux-binary-*`` dependency ships
        ``usr/lib/modules/<release>/vmlinuz``, where 6.x shipped ``boot/vmlinuz-*``.
        """
        meta_version = self.candidate("linux-image-arm64", release)
        meta = self.show({"linux-image-arm64": meta_version})["linux-image-arm64"]
        dep = exact_dependency(meta.depends, r"linux-image-.*-arm64(-unsigned)?")
        if dep is None:
            raise DebianError(f"linux-image-arm64 {meta_version} names no image: {meta.depends!r}")
        image = self.show({dep[0]: dep[1]})[dep[0]]
        carriers = exact_dependencies(image.depends, r"linux-(binary|image)-.*-arm64(-unsigned)?")
        return (image, *self.show(dict(carriers)).values())

    def download(self, packages: Iterable[Package], dest: str) -> Dict[str, str]:
        """Make every package present and verified in ``dest``; returns name -> path."""
        os.makedirs(dest, exist_ok=True)
        paths: Dict[str, str] = {}
        missing: List[Package] = []
        for pkg in packages:
            path = os.path.join(dest, pkg.basename)
            paths[pkg.name] = path
            if not verified(path, pkg.sha256, pkg.size):
                missing.append(pkg)
        if not missing:
            return paths
        total = sum(p.size for p in missing) / 1e6
        say(f"downloading {len(missing)} arm64 package(s), {total:.1f} MB")
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            self.run(
                ["apt-get", "download", "-q", *(f"{p.name}={p.version}" for p in missing)], cwd=tmp
            )
            by_hash = {p.sha256: p for p in missing}
            for name in os.listdir(tmp):
                digest = sha256_file(os.path.join(tmp, name))
                if digest in by_hash:
                    got = by_hash.pop(digest)
                    os.replace(os.path.join(tmp, name), os.path.join(dest, got.basename))
                    _stamp(os.path.join(dest, got.basename), digest)
            if by_hash:
                bad = ", ".join(sorted(p.name for p in by_hash.values()))
                raise DebianError(f"downloaded files did not match the index for: {bad}")
        return paths


# --- files -------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: str) -> List[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _stamp(path: str, digest: str) -> None:
    _write_atomic(path + ".verified", json.dumps({"sha256": digest, "stat": _stat_key(path)}))


def verified(path: str, sha256: str, size: Optional[int] = None) -> bool:
    """Whether ``path`` exists with this content; re-hashes only when the file changed."""
    if not os.path.isfile(path):
        return False
    if size is not None and os.path.getsize(path) != size:
        return False
    try:
        with open(path + ".verified") as fh:
            stamp = json.load(fh)
        if stamp.get("sha256") == sha256 and stamp.get("stat") == _stat_key(path):
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != sha256:
        return False
    _stamp(path, sha256)
    return True


def unpack(deb: str, dest: str) -> str:
    """``dpkg-deb -x`` into ``dest`` once; a partial unpack is never mistaken for a whole one."""
    marker = os.path.join(dest, ".unpacked")
    if os.path.exists(marker):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True, timeout=300, capture_output=True)
        open(os.path.join(tmp, ".unpacked"), "w").close()
        os.replace(tmp, dest)
    except subprocess.CalledProcessError as err:
        raise DebianError(f"dpkg-deb -x {deb}: {err.stderr.decode(errors='replace')}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extract_member(deb: str, pattern: str, dest: str) -> str:
    """Extract the one data member of ``deb`` whose path matches ``pattern`` to file ``dest``."""
    regex = re.compile(pattern)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    found = False
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and regex.fullmatch(member.name.lstrip("./")):
                    src = tar.extractfile(member)
                    assert src is not None
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.replace(tmp, dest)
                    found = True
                    break
    finally:
        proc.stdout.close()
        proc.kill()  # we may stop reading early; the pid is ours
        proc.wait()
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not found:
        raise DebianError(f"{os.path.basename(deb)} has no member matching {pattern}")
    return dest


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
