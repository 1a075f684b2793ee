"""Build the Talos-like image, one cached layer at a time.

  kernel     Debian's linux-image-*-amd64: an uncompressed vmlinux (QEMU microvm boots it
             directly) and its modules, run through depmod.
  initramfs  busybox (from busybox-static) and the modules needed to reach the root and the
             network, loaded in dependency order by guest/init.
  base       debootstrap --variant=minbase with python3, libnftables1, kmod, iproute2.
  pydeps     Gatekeeper's Python dependencies as wheels (pip --target), pinned to the versions
             installed beside this checkout.
  rootfs     base + netfilter modules (autoloaded through kmod) + pydeps + Gatekeeper itself
             + the guest's init and runner, byte-compiled in the guest's Python, as ext4.

Each layer lives under the cache folder in a directory named by a hash of its inputs, so a
changed input rebuilds that layer and what depends on it, and nothing else. A layer is built in
a temporary directory and renamed into place when complete, so an interrupted build leaves no
half layer; older versions of a layer are removed once the new one is in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmtests import debian
from vmtests.cpio import newc_archive, tree_entries
from vmtests.errors import Skip, VmFailure
from vmtests.modules import ModuleIndex

VM_TESTS = Path(__file__).resolve().parent.parent
REPO = VM_TESTS.parent
GUEST = VM_TESTS / "guest"
DEFAULT_CACHE = VM_TESTS / ".cache"

# Bump a layer's recipe when the way it is built changes (its other inputs are hashed).
RECIPES = {"kernel": "1", "initramfs": "2", "base": "1", "pydeps": "1", "rootfs": "3"}
BASE_PACKAGES = ["python3", "libnftables1", "kmod", "iproute2"]
# The last two are what the agent's ruleset needs (nf_tables with conntrack and fib): a Talos
# kernel has them built in. Loaded by the initramfs, they cost a fraction of what autoloading
# them costs under TCG (the kernel runs kmod's modprobe for each, and nftables replays its
# transaction after each): the agent's first firewall apply took seconds that way.
INITRAMFS_MODULES = [
    "virtio_mmio",
    "virtio_blk",
    "ext4",
    "virtio_net",
    "wireguard",
    "nft_ct",
    "nft_fib_inet",
]
# Any other netfilter module is autoloaded in the guest (nftables asks the kernel, the kernel
# asks kmod's modprobe).
ROOTFS_MODULE_DIRS = (
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
    "kernel/drivers/net/wireguard/",
)
SLIM = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt"]
# Space a cold build needs under the cache folder (kernel package and tree, root, image).
NEEDED_BYTES = 2_500_000_000
_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class Image:
    vmlinux: Path
    initramfs: Path
    rootfs: Path
    kernel_release: str
    kernel_package: str
    # Layer name -> "cached" or seconds it took to build.
    layers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


Progress = Callable[[str], None]


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tree_digest(root: Path, pattern: str = "*") -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob(pattern)):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class Cache:
    def __init__(self, root: Path, progress: Progress) -> None:
        self.root = root
        self.progress = progress
        self.layers: dict[str, str] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress(f"waiting for another build using {self.root} ...")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def layer(self, kind: str, key: str, build: Callable[[Path], None], *, label: str) -> Path:
        """The layer directory for kind+key, built by build(tmpdir) when missing."""
        final = self.root / f"{kind}-{key}"
        if final.exists():
            self.layers[kind] = "cached"
            self.progress(f"{kind:<10} {label}: cached")
            return final
        self._check_space()
        tmp = self.root / f".{kind}-{key}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.progress(f"{kind:<10} {label}: building ...")
        started = time.monotonic()
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(final)
        took = time.monotonic() - started
        self.layers[kind] = f"{took:.1f}"
        self.progress(f"{kind:<10} {label}: built in {took:.1f} s")
        for old in self.root.glob(f"{kind}-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _check_space(self) -> None:
        free = shutil.disk_usage(self.root).free
        if free < NEEDED_BYTES:
            raise Skip(
                f"no disk space: {free / 1e9:.1f} GB free under {self.root}, building the VM "
                f"image needs about {NEEDED_BYTES / 1e9:.1f} GB"
            )


# --- kernel ------------------------------------------------------------------------------------


def decompress_kernel(vmlinuz: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage (xz, gzip or zstd payload); None when not found."""
    for magic in (_XZ_MAGIC, _GZIP_MAGIC, _ZSTD_MAGIC):
        start = vmlinuz.find(magic)
        while start != -1:
            payload = vmlinuz[start:]
            try:
                if magic == _XZ_MAGIC:
                    out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
                elif magic == _GZIP_MAGIC:
                    out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
                else:
                    out = _unzstd(payload)
            except (lzma.LZMAError, zlib.error, OSError, subprocess.SubprocessError):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            start = vmlinuz.find(magic, start + 1)
    return None


def _unzstd(payload: bytes) -> bytes:
    if shutil.which("zstd") is None:
        return b""
    done = subprocess.run(
        ["zstd", "-dc"], input=payload, capture_output=True, timeout=120, check=False
    )
    return done.stdout


def _build_kernel(deb: Path, out: Path) -> None:
    scratch = out / "pkg"
    debian.extract(deb, scratch)
    (vmlinuz,) = sorted((scratch / "boot").glob("vmlinuz-*"))
    release = vmlinuz.name.removeprefix("vmlinuz-")
    vmlinux = decompress_kernel(vmlinuz.read_bytes())
    if vmlinux is None:
        # QEMU boots the bzImage too, only a little slower under TCG.
        shutil.copy(vmlinuz, out / "vmlinux")
    else:
        (out / "vmlinux").write_bytes(vmlinux)
    modules = scratch / "lib/modules" / release
    if not modules.is_dir():
        raise Skip(f"{deb.name} ships no modules for {release}")
    shutil.move(str(modules), out / "modules")
    if shutil.which("depmod") is None:
        raise Skip("depmod not found: install the Debian package kmod")
    # depmod wants <base>/lib/modules/<release>: point a base at the moved tree.
    base = out / "depmod"
    (base / "lib/modules").mkdir(parents=True)
    (base / "lib/modules" / release).symlink_to(out / "modules")
    subprocess.run(["depmod", "-b", str(base), release], check=True, timeout=300)
    shutil.rmtree(base)
    shutil.rmtree(scratch)
    (out / "release").write_text(release)


def _module_index(kernel: Path) -> ModuleIndex:
    mods = kernel / "modules"

    def read(name: str) -> str:
        path = mods / name
        return path.read_text() if path.exists() else ""

    return ModuleIndex.parse(
        read("modules.dep"),
        read("modules.softdep"),
        read("modules.alias"),
        read("modules.builtin"),
    )


_SIGNATURE_MARKER = b"~Module signature appended~\n"


def strip_signature(module: bytes) -> bytes:
    """The module without its appended signature (struct module_signature, then the marker).

    Debian signs every module (RSA-4096 over SHA-256); the guest kernel checks each one it
    loads, and under TCG that checking is a visible part of the boot. A Talos kernel has
    these drivers built in and loads none of them, so the image carries them unsigned: the
    kernel (which does not enforce signatures here) loads them without the check.
    """
    if not module.endswith(_SIGNATURE_MARKER):
        return module
    trailer = module[: -len(_SIGNATURE_MARKER)]
    # struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len.
    sig_len = int.from_bytes(trailer[-4:], "big")
    return trailer[: -12 - sig_len]


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = _unzstd(data)
    return strip_signature(data)


def _plain(rel: str) -> str:
    return re.sub(r"\.(xz|gz|zst)$", "", rel)


# --- initramfs ---------------------------------------------------------------------------------


def _build_initramfs(kernel: Path, busybox_deb: Path, out: Path) -> None:
    tree = out / "tree"
    debian.extract(busybox_deb, out / "bb")
    (tree / "bin").mkdir(parents=True)
    shutil.copy(out / "bb/bin/busybox", tree / "bin/busybox")
    shutil.rmtree(out / "bb")
    shutil.copy(GUEST / "init", tree / "init")
    (tree / "init").chmod(0o755)
    order = _module_index(kernel).load_order(INITRAMFS_MODULES)
    for rel in order:
        dest = tree / "lib/modules" / _plain(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(_module_bytes(kernel / "modules" / rel))
    (tree / "etc").mkdir()
    (tree / "etc/modules.load").write_text("".join(_plain(r) + "\n" for r in order))
    # Uncompressed: unpacking costs less under TCG than decompressing.
    (out / "initramfs.cpio").write_bytes(newc_archive(tree_entries(tree)))
    (out / "busybox").write_bytes((tree / "bin/busybox").read_bytes())
    shutil.rmtree(tree)


# --- root file system --------------------------------------------------------------------------


def _build_base(codename: str, mirror: str, out: Path, log: Path) -> None:
    root = out / "root"
    debian.debootstrap(root, codename, mirror, BASE_PACKAGES, log)
    for rel in SLIM:
        shutil.rmtree(root / rel, ignore_errors=True)
    for lists in (root / "var/lib/apt/lists").glob("*_Packages"):
        lists.unlink()


def python_requirements() -> list[str]:
    """Gatekeeper's dependencies, pinned to what is installed beside this checkout."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = []
    for spec in meta["project"]["dependencies"]:
        # The name and its extras (psycopg[binary] brings the libpq the guest has no
        # package of), without the version bounds.
        found = re.match(r"\s*([^\s\[<>=!~;]+)\s*(\[[^\]]*\])?", spec)
        name = found[1] if found else spec
        wanted = name + ((found[2] or "") if found else "")
        try:
            pins.append(f"{wanted}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(spec)
    return sorted(pins)


def _guest_python(root: Path) -> str:
    found = sorted(
        p.name.removeprefix("python")
        for p in (root / "usr/lib").glob("python3.*")
        if re.fullmatch(r"python3\.\d+", p.name)
    )
    if not found:
        raise Skip("the root file system has no python3")
    return found[-1]


def _build_pydeps(requirements: list[str], python: str, out: Path, log: Path) -> None:
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(17, 37)] + ["manylinux2014_x86_64"]
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-compile",
        "--disable-pip-version-check",
        "--target",
        str(out / "site"),
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python,
    ]
    for platform in platforms:
        argv += ["--platform", platform]
    with open(log, "wb") as sink:
        try:
            done = subprocess.run(
                argv + requirements, stdout=sink, stderr=subprocess.STDOUT, timeout=900
            )
        except subprocess.TimeoutExpired:
            raise Skip("pip did not fetch the guest's Python packages within 15 minutes") from None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-2:]
        raise Skip(f"pip could not fetch the guest's Python packages: {' | '.join(tail)}")
    shutil.rmtree(out / "site/bin", ignore_errors=True)


def _copy_package(dest: Path) -> None:
    shutil.copytree(
        REPO / "gatekeeper",
        dest / "gatekeeper",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        dirs_exist_ok=True,
    )


def _build_rootfs(
    base: Path, kernel: Path, initramfs: Path, pydeps: Path, python: str, out: Path
) -> None:
    stage = out / "stage"
    subprocess.run(["cp", "-a", str(base / "root"), str(stage)], check=True, timeout=600)
    release = (kernel / "release").read_text()
    index = _module_index(kernel)
    mods = stage / "lib/modules" / release
    for rel in index.closure_under(ROOTFS_MODULE_DIRS) + index.load_order(INITRAMFS_MODULES):
        dest = mods / _plain(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(_module_bytes(kernel / "modules" / rel))
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel / "modules" / name).exists():
            shutil.copy(kernel / "modules" / name, mods / name)
    subprocess.run(["depmod", "-b", str(stage), release], check=True, timeout=300)
    site = stage / f"usr/local/lib/python{python}/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", f"{pydeps / 'site'}/.", str(site)], check=True, timeout=300)
    _copy_package(site)
    gk = stage / "opt/gk-vm"
    gk.mkdir(parents=True)
    shutil.copy(GUEST / "runner.py", gk / "runner.py")
    shutil.copy(initramfs / "busybox", gk / "busybox")
    (gk / "busybox").chmod(0o755)
    init = stage / "sbin/gk-init"
    init.unlink(missing_ok=True)
    shutil.copy(GUEST / "gk-init", init)
    init.chmod(0o755)
    wrapper = stage / "usr/local/bin/gatekeeper"
    wrapper.write_text('#!/bin/sh\nexec /usr/bin/python3 -m gatekeeper "$@"\n')
    wrapper.chmod(0o755)
    (stage / "etc/hostname").write_text("gatekeeper-vm\n")
    # Byte-compile with the guest's own Python: imports under TCG are slow enough without it.
    compiled = subprocess.run(
        [
            "chroot",
            str(stage),
            "/usr/bin/python3",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            f"/usr/local/lib/python{python}",
            "/opt/gk-vm",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if compiled.returncode != 0:
        raise VmFailure(
            "byte-compiling the guest's Python failed: "
            + " | ".join((compiled.stdout + compiled.stderr).strip().splitlines()[-4:])
        )
    used = sum(p.lstat().st_size for p in stage.rglob("*"))
    size_mb = int(used * 1.25 / 1e6) + 96
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "gkroot",
            "-m",
            "0",
            # Inode tables and journal zeroed here, once: otherwise the guest kernel's
            # ext4lazyinit thread zeroes them after every boot's mount, beside the agent.
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(stage),
            str(out / "rootfs.ext4"),
            f"{size_mb}M",
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    shutil.rmtree(stage)


# --- all of it ---------------------------------------------------------------------------------


def build_image(cache_dir: Path = DEFAULT_CACHE, progress: Progress | None = None) -> Image:
    say = progress or (lambda line: print(f"vm-tests: {line}", file=sys.stderr, flush=True))
    if os.geteuid() != 0:
        raise Skip("building the VM image needs root (debootstrap, chroot)")
    for tool, package in (
        ("mkfs.ext4", "e2fsprogs"),
        ("dpkg-deb", "dpkg"),
        ("chroot", "coreutils"),
    ):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} not found: install the Debian package {package}")
    started = time.monotonic()
    cache = Cache(cache_dir, say)
    with cache.locked():
        kpkg = debian.kernel_package()
        kver = debian.package_version(kpkg)
        bbver = debian.package_version("busybox-static")
        debs = cache_dir / "debs"

        def kernel_build(out: Path) -> None:
            _build_kernel(debian.download(kpkg, kver, debs), out)

        kernel = cache.layer(
            "kernel", _digest(RECIPES["kernel"], kpkg, kver), kernel_build, label=f"{kpkg} {kver}"
        )
        release = (kernel / "release").read_text()

        def initramfs_build(out: Path) -> None:
            _build_initramfs(kernel, debian.download("busybox-static", bbver, debs), out)

        initramfs = cache.layer(
            "initramfs",
            _digest(
                RECIPES["initramfs"],
                kernel.name,
                bbver,
                INITRAMFS_MODULES,
                (GUEST / "init").read_bytes().hex(),
            ),
            initramfs_build,
            label=f"busybox {bbver}, {len(INITRAMFS_MODULES)} modules + dependencies",
        )
        codename = debian.host_codename()
        mirror = debian.host_mirror(codename)
        base = cache.layer(
            "base",
            _digest(RECIPES["base"], codename, mirror, BASE_PACKAGES),
            lambda out: _build_base(codename, mirror, out, cache_dir / "debootstrap.log"),
            label=f"debootstrap {codename} minbase + {' '.join(BASE_PACKAGES)}",
        )
        python = _guest_python(base / "root")
        requirements = python_requirements()
        pydeps = cache.layer(
            "pydeps",
            _digest(RECIPES["pydeps"], python, requirements),
            lambda out: _build_pydeps(requirements, python, out, cache_dir / "pip.log"),
            label=f"python{python} wheels: {' '.join(requirements)}",
        )
        rootfs = cache.layer(
            "rootfs",
            _digest(
                RECIPES["rootfs"],
                kernel.name,
                initramfs.name,
                base.name,
                pydeps.name,
                _tree_digest(REPO / "gatekeeper"),
                _tree_digest(GUEST),
                (REPO / "pyproject.toml").read_bytes().hex(),
            ),
            lambda out: _build_rootfs(base, kernel, initramfs, pydeps, python, out),
            label="ext4 root: base + modules + wheels + gatekeeper",
        )
    return Image(
        vmlinux=kernel / "vmlinux",
        initramfs=initramfs / "initramfs.cpio",
        rootfs=rootfs / "rootfs.ext4",
        kernel_release=release,
        kernel_package=f"{kpkg} {kver}",
        layers=dict(cache.layers),
        seconds=time.monotonic() - started,
    )
