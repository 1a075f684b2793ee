"""Debian packages for the image, through the host's own apt configuration.

The kernel and busybox come as .deb files fetched with `apt-get download`; the root file
system comes from debootstrap, pointed at the first Debian mirror the host's apt sources name
(or --mirror / GATEKEEPER_VM_MIRROR), so the image follows whatever mirror the host uses.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from vmtests.errors import Skip

_SOURCES_LIST = Path("/etc/apt/sources.list")
_SOURCES_DIR = Path("/etc/apt/sources.list.d")


def host_codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "bookworm"
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return match.group(1) if match else "bookworm"


def mirror_from_sources(
    codename: str, sources_list: str = "", deb822: list[str] | None = None
) -> str | None:
    """The first `deb` URI serving `codename` with component main, from apt's two formats."""
    for stanza_text in deb822 or []:
        for stanza in re.split(r"\n\s*\n", stanza_text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in fields.get("types", "").split():
                continue
            if (
                codename in fields.get("suites", "").split()
                and "main" in fields.get("components", "").split()
            ):
                return fields.get("uris", "").split()[0]
    for line in sources_list.splitlines():
        # deb [option=value ...] URI SUITE COMPONENT...
        words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 4 and words[0] == "deb" and words[2] == codename and "main" in words[3:]:
            return words[1]
    return None


def host_mirror(codename: str) -> str:
    env = os.environ.get("GATEKEEPER_VM_MIRROR")
    if env:
        return env
    deb822 = []
    if _SOURCES_DIR.is_dir():
        deb822 = [p.read_text(errors="replace") for p in sorted(_SOURCES_DIR.glob("*.sources"))]
    legacy = _SOURCES_LIST.read_text(errors="replace") if _SOURCES_LIST.exists() else ""
    for path in sorted(_SOURCES_DIR.glob("*.list")) if _SOURCES_DIR.is_dir() else []:
        legacy += "\n" + path.read_text(errors="replace")
    mirror = mirror_from_sources(codename, legacy, deb822)
    if mirror is None:
        raise Skip(
            f"no Debian mirror for {codename} in the host's apt sources: "
            "set GATEKEEPER_VM_MIRROR to one"
        )
    return mirror


def _apt(argv: list[str], what: str, timeout: float) -> str:
    if shutil.which(argv[0]) is None:
        raise Skip(f"{argv[0]} not found: the VM image is built from Debian packages with apt")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise Skip(
            f"{what}: no answer within {timeout:.0f} s (no network to the mirror?)"
        ) from None
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise Skip(f"{what}: {lines[-1] if lines else 'failed'}")
    return done.stdout


_refreshed = False


def _refresh_lists() -> bool:
    """apt-get update, once per process: a fresh machine may have no or stale package lists."""
    global _refreshed
    if _refreshed or os.geteuid() != 0:
        return False
    _refreshed = True
    with contextlib.suppress(Skip):
        _apt(["apt-get", "update", "-qq"], "refreshing the package lists", 300)
    return True


def kernel_package() -> str:
    """The versioned kernel package the linux-image-amd64 meta-package points at now."""
    for _ in range(2):
        out = _apt(
            ["apt-cache", "depends", "linux-image-amd64"], "looking up the kernel package", 60
        )
        for line in out.splitlines():
            match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
            if match:
                return match.group(1)
        if not _refresh_lists():
            break
    raise Skip(
        "no kernel package: apt knows no linux-image-amd64 (run apt-get update, or check "
        "the apt sources)"
    )


def package_version(name: str) -> str:
    for _ in range(2):
        out = _apt(["apt-cache", "policy", name], f"looking up {name}", 60)
        match = re.search(r"Candidate:\s*(\S+)", out)
        if match and match.group(1) != "(none)":
            return match.group(1)
        if not _refresh_lists():
            break
    raise Skip(f"no Debian package {name} available (run apt-get update)")


def download(name: str, version: str, dest: Path) -> Path:
    """Fetch name=version as a .deb into dest (an existing file of that name is reused)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.glob(f"{name}_*.deb") if _deb_version(p) == version]
    if found:
        return found[0]
    # apt's sandbox user cannot write root-owned cache folders; download where it may.
    argv = ["sh", "-c", 'cd "$1" && apt-get download -q "$2"', "sh", str(dest)]
    try:
        _apt([*argv, f"{name}={version}"], f"downloading {name} {version}", 600)
    except Skip:
        if not _refresh_lists():
            raise
        _apt([*argv, f"{name}={version}"], f"downloading {name} {version}", 600)
    found = [p for p in dest.glob(f"{name}_*.deb") if _deb_version(p) == version]
    if not found:
        raise Skip(f"apt-get download {name}={version} left no .deb in {dest}")
    return found[0]


def _deb_version(path: Path) -> str:
    version = path.name.split("_")[1]
    return version.replace("%3a", ":")


def extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, timeout=300)


def debootstrap(dest: Path, codename: str, mirror: str, include: list[str], log: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise Skip("debootstrap not found: install the Debian package debootstrap")
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(include)}",
        codename,
        str(dest),
        mirror,
    ]
    with open(log, "wb") as out:
        try:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
        except subprocess.TimeoutExpired:
            raise Skip("debootstrap did not finish within 20 minutes") from None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise Skip(f"debootstrap failed (log {log}): {' | '.join(tail)}")
