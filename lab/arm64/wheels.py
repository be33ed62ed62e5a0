"""arm64 wheels from PyPI for serrinj's dependencies and the lab's test tools.

``pip download --platform ... --only-binary=:all:`` resolves for the lab's
Python (CPython 3.11 on aarch64, glibc 2.36) from this x86_64 host. A set is
cached under a key of its requirements, with a manifest of SHA256s, so a warm
run neither resolves nor downloads again; ``--refresh`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Sequence

from lab.arm64 import config
from lab.arm64.config import say
from lab.arm64.cpio import Tree
from lab.arm64.debian import sha256_file


class WheelError(RuntimeError):
    """pip could not provide the lab's wheels."""


def runtime_requirements() -> List[str]:
    """serrinj's own runtime dependencies, from pyproject.toml (the single source)."""
    if sys.version_info >= (3, 11):
        import tomllib

        with open(os.path.join(config.repo_root(), "pyproject.toml"), "rb") as fh:
            deps = tomllib.load(fh)["project"]["dependencies"]
        return [str(d) for d in deps]
    # older Pythons: the installed (editable) package's metadata says the same
    from importlib import metadata

    reqs = metadata.requires("serrinj") or []
    return [r for r in reqs if "extra ==" not in r]


def requirements() -> List[str]:
    return sorted(set(runtime_requirements()) | set(config.LAB_WHEELS))


def set_key(reqs: Sequence[str]) -> str:
    blob = json.dumps(
        {
            "reqs": list(reqs),
            "platforms": list(config.WHEEL_PLATFORMS),
            "py": config.PYTHON_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _manifest_ok(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "manifest.json")) as fh:
            manifest: Dict[str, str] = json.load(fh)["wheels"]
    except (OSError, ValueError, KeyError):
        return False
    if not manifest:
        return False
    for name, digest in manifest.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or sha256_file(path) != digest:
            return False
    return True


def ensure(refresh: bool = False) -> List[str]:
    """Paths of the cached wheel set, downloading it when absent, damaged or refreshed."""
    reqs = requirements()
    base = os.path.join(config.lab_cache(), "wheels")
    directory = os.path.join(base, set_key(reqs))
    if not refresh and _manifest_ok(directory):
        return wheel_paths(directory)
    say(f"pip download (aarch64, cp{config.PYTHON_VERSION.replace('.', '')}): {' '.join(reqs)}")
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=base, prefix=".download-")
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "-d",
            tmp,
        ]
        for plat in config.WHEEL_PLATFORMS:
            cmd += ["--platform", plat]
        cmd += [
            "--only-binary=:all:",
            "--python-version",
            config.PYTHON_VERSION,
            "--implementation",
            "cp",
            "--abi",
            "cp" + config.PYTHON_VERSION.replace(".", ""),
            *reqs,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise WheelError(f"pip download failed:\n{proc.stderr.strip()[-2000:]}")
        wheels = sorted(n for n in os.listdir(tmp) if n.endswith(".whl"))
        if not wheels:
            raise WheelError("pip download produced no wheels")
        manifest = {n: sha256_file(os.path.join(tmp, n)) for n in wheels}
        with open(os.path.join(tmp, "manifest.json"), "w") as fh:
            json.dump({"requirements": reqs, "wheels": manifest}, fh, indent=1)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel_paths(directory)


def wheel_paths(directory: str) -> List[str]:
    with open(os.path.join(directory, "manifest.json")) as fh:
        names = sorted(json.load(fh)["wheels"])
    return [os.path.join(directory, n) for n in names]


_DATA_DIR = re.compile(r"^[^/]+\.data/(purelib|platlib)/(.+)$")


def install(wheel: str, tree: Tree, site: str) -> int:
    """Install ``wheel`` into ``tree`` under ``site`` (what pip does for a plain library).

    ``*.data/purelib`` and ``platlib`` are merged into the site directory; other
    data schemes (scripts, headers) are not needed in the lab and are skipped.
    Returns the number of files added.
    """
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename
            match = _DATA_DIR.match(name)
            if match:
                name = match.group(2)
            elif re.match(r"^[^/]+\.data/", name):
                continue
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            tree.add_bytes(posixpath.join(site, name), zf.read(info), mode=mode)
            count += 1
    return count
