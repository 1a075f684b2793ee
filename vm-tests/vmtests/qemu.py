"""Starting and stopping QEMU: microvm, the image's kernel, its root on virtio-blk.

KVM is used only when a probe boot under it reaches the initramfs; on this project's hosts
/dev/kvm exists but fails (it is kvm-pvm), so the probe falls back to TCG. Every QEMU is bounded:
waits have deadlines and stop() ends it by PID (QMP quit, then SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmtests.console import Console
from vmtests.errors import Skip, VmFailure
from vmtests.image import Image

ACCELS = ("auto", "tcg", "kvm")
PROBE_SECONDS = 10.0
QEMU_PACKAGE = "qemu-system-x86"


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise Skip(f"qemu-system-x86_64 not found: install the Debian package {QEMU_PACKAGE}")
    return path


def qemu_version(binary: str) -> str:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return out.splitlines()[0] if out else "unknown"


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host clock in kHz: passing it as tsc_early_khz stops the guest's TSC calibration,
    which under TCG sometimes never finishes (a silent hang, about 1 boot in 13)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    return int(float(match.group(1)) * 1000) if match else None


def kernel_cmdline(extra: Sequence[str], tsc_khz: int | None) -> str:
    words = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1", "root=/dev/vda", "rw"]
    if tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    return " ".join([*words, *extra])


@dataclass
class VmSpec:
    image: Image
    cmdline: str
    console: Path
    accel: str = "tcg"
    memory_mb: int = 768
    tap: str | None = None
    mac: str = "52:54:00:6b:00:02"
    with_root: bool = True
    qmp: Path | None = None

    def argv(self, binary: str) -> list[str]:
        argv = [
            binary,
            "-M", "microvm",
            "-accel", self.accel,
            "-cpu", "max" if self.accel == "tcg" else "host",
            "-m", str(self.memory_mb),
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none",
            # -no-reboot: the guest's `poweroff -f` (and a panic, with panic=-1) ends QEMU.
            "-no-reboot",
            "-serial", f"file:{self.console}",
            "-kernel", str(self.image.vmlinux),
            "-initrd", str(self.image.initramfs),
            "-append", self.cmdline,
        ]  # fmt: skip
        if self.with_root:
            # snapshot=on: the guest's writes go to a throwaway overlay, the cached image stays.
            argv += [
                "-drive", f"id=root,file={self.image.rootfs},format=raw,if=none,snapshot=on",
                "-device", "virtio-blk-device,drive=root",
            ]  # fmt: skip
        if self.tap:
            argv += [
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-device,netdev=n0,mac={self.mac}",
            ]  # fmt: skip
        if self.qmp:
            argv += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        return argv


@dataclass
class Vm:
    """A running QEMU; always stop() it (the scenario does, in finally)."""

    spec: VmSpec
    proc: subprocess.Popen[bytes]
    started: float
    stderr_path: Path
    console: Console = field(init=False)

    def __post_init__(self) -> None:
        self.console = Console(self.spec.console, self.started, alive=self.check_alive)

    @classmethod
    def start(cls, spec: VmSpec, *, netns: str | None = None, stderr_path: Path) -> Vm:
        binary = qemu_binary()
        spec.console.unlink(missing_ok=True)
        argv = spec.argv(binary)
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        err = open(stderr_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            err.close()
        return cls(spec, proc, time.monotonic(), stderr_path)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stderr_tail(self, lines: int = 6) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        status = self.proc.poll()
        if status is not None:
            self.console.poll()
            raise VmFailure(
                f"QEMU exited (status {status}) after {self.elapsed():.1f} s\n"
                f"--- qemu stderr ---\n{self.stderr_tail()}\n"
                f"--- console tail ({self.spec.console}) ---\n{self.console.tail()}"
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Power off: QMP quit, then SIGTERM, then SIGKILL, each bounded; by PID only."""
        if self.proc.poll() is None and self.spec.qmp is not None:
            with contextlib.suppress(OSError):
                _qmp_quit(self.spec.qmp)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.spec.qmp is not None:
            self.spec.qmp.unlink(missing_ok=True)


def _qmp_quit(path: Path, timeout: float = 2.0) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        for command in ({"execute": "qmp_capabilities"}, {"execute": "quit"}):
            sock.sendall(json.dumps(command).encode() + b"\r\n")
            reader.readline()


# --- choosing the accelerator ----------------------------------------------------------------


def choose_accel(mode: str, image: Image, workdir: Path, cache: Path) -> tuple[str, str]:
    """("tcg"|"kvm", why). mode "kvm" insists (Skip when KVM does not work)."""
    if mode not in ACCELS:
        raise Skip(f"unknown accelerator {mode!r}: choose one of {', '.join(ACCELS)}")
    if mode == "tcg":
        return "tcg", "software emulation (TCG), as asked"
    works, why = kvm_works(image, workdir, cache)
    if works:
        return "kvm", why
    if mode == "kvm":
        raise Skip(f"KVM asked for but it does not work here: {why}")
    return "tcg", f"{why}; using software emulation (TCG)"


def kvm_works(image: Image, workdir: Path, cache: Path) -> tuple[bool, str]:
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return False, "no /dev/kvm"
    if not os.access(kvm, os.R_OK | os.W_OK):
        return False, "/dev/kvm is not read-writable for this user"
    binary = qemu_binary()
    key = f"{platform.release()} | {qemu_version(binary)} | {image.kernel_release}"
    verdicts = cache / "kvm-probe.json"
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(verdicts.read_text())
        if known.get("key") == key:
            return bool(known["works"]), str(known["why"])
    works, why = _probe_kvm(image, workdir)
    with contextlib.suppress(OSError):
        verdicts.write_text(json.dumps({"key": key, "works": works, "why": why}))
    return works, why


def _probe_kvm(image: Image, workdir: Path) -> tuple[bool, str]:
    """Boot the kernel and initramfs alone under KVM; gk.probe makes init power off at once."""
    spec = VmSpec(
        image=image,
        cmdline=kernel_cmdline(["gk.probe"], None),
        console=workdir / "kvm-probe.console.log",
        accel="kvm",
        memory_mb=256,
        with_root=False,
    )
    vm = Vm.start(spec, stderr_path=workdir / "kvm-probe.qemu.log")
    try:
        vm.console.wait_event("probe", PROBE_SECONDS, "KVM probe boot")
        return True, f"KVM works (probe boot in {vm.elapsed():.1f} s)"
    except VmFailure:
        detail = vm.stderr_tail(2).replace("\n", " | ") or "no console output"
        return False, f"/dev/kvm present but a probe boot failed ({detail[:200]})"
    finally:
        vm.stop(timeout=2.0)
