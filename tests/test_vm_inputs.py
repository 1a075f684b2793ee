"""vm-tests on bad input: every missing piece is a one-line skip reason, never a hang; a guest
that does not boot in time fails with the tail of its console log. Plus the pure parts of the
image builder (module order, initramfs archive, mirror lookup, kernel extraction)."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

VM_TESTS = Path(__file__).resolve().parent.parent / "vm-tests"
sys.path.insert(0, str(VM_TESTS))

from vmtests import debian, image, qemu  # noqa: E402
from vmtests.console import Console, parse_line  # noqa: E402
from vmtests.cpio import newc_archive  # noqa: E402
from vmtests.errors import Skip, VmFailure  # noqa: E402
from vmtests.modules import ModuleIndex  # noqa: E402

DEP = """\
kernel/drivers/net/wireguard/wireguard.ko: kernel/lib/crypto/libchacha20poly1305.ko \
kernel/arch/x86/crypto/chacha-x86_64.ko kernel/lib/crypto/libchacha.ko kernel/net/ipv4/udp_tunnel.ko
kernel/lib/crypto/libchacha20poly1305.ko: kernel/arch/x86/crypto/chacha-x86_64.ko \
kernel/lib/crypto/libchacha.ko
kernel/arch/x86/crypto/chacha-x86_64.ko: kernel/lib/crypto/libchacha.ko
kernel/lib/crypto/libchacha.ko:
kernel/net/ipv4/udp_tunnel.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/crypto/crc32c_generic.ko:
"""


def _index() -> ModuleIndex:
    return ModuleIndex.parse(
        DEP,
        "softdep ext4 pre: crypto-crc32c\n",
        "alias crypto-crc32c crc32c_generic\n",
        "kernel/drivers/virtio/virtio.ko\n",
    )


def test_module_signatures_are_stripped_and_unsigned_modules_kept() -> None:
    """The appended signature is PKCS#7, then struct module_signature (sig_len last, big
    endian), then the marker: what is left is the ELF the kernel loads without checking."""
    elf = b"\x7fELF" + os.urandom(300)
    pkcs7 = os.urandom(681)
    trailer = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + len(pkcs7).to_bytes(4, "big")
    signed = elf + pkcs7 + trailer + b"~Module signature appended~\n"
    assert image.strip_signature(signed) == elf
    assert image.strip_signature(elf) == elf


def test_modules_load_after_what_they_need() -> None:
    order = _index().load_order(["virtio", "ext4", "wireguard"])
    names = [p.rsplit("/", 1)[1] for p in order]
    assert names == [
        "crc32c_generic.ko",  # ext4's soft dependency, through its alias
        "jbd2.ko",
        "ext4.ko",
        "libchacha.ko",
        "chacha-x86_64.ko",
        "libchacha20poly1305.ko",
        "udp_tunnel.ko",
        "wireguard.ko",
    ]
    for position, path in enumerate(order):
        deps = _index().deps.get(path.rsplit("/", 1)[1].removesuffix(".ko").replace("-", "_"))
        earlier = {
            p.rsplit("/", 1)[1].removesuffix(".ko").replace("-", "_") for p in order[:position]
        }
        assert set(deps or []) <= earlier


def test_unknown_module_is_named() -> None:
    with pytest.raises(KeyError, match="nosuchmod"):
        _index().load_order(["nosuchmod"])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool to read back")
def test_initramfs_archive_reads_back_with_cpio(tmp_path: Path) -> None:
    archive = newc_archive(
        [("bin", 0o40755, b""), ("bin/hello", 0o100755, b"#!/bin/sh\necho hi\n"),
         ("bin/sh", 0o120777, b"hello")]
    )  # fmt: skip
    (tmp_path / "a.cpio").write_bytes(archive)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "-F", str(tmp_path / "a.cpio")], cwd=out, check=True)
    assert (out / "bin/hello").read_text() == "#!/bin/sh\necho hi\n"
    assert os.access(out / "bin/hello", os.X_OK)
    assert os.readlink(out / "bin/sh") == "hello"


def test_mirror_comes_from_either_apt_sources_format() -> None:
    deb822 = (
        "Types: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
    )
    assert debian.mirror_from_sources("bookworm", "", [deb822]) == "http://mirror.invalid/debian"
    legacy = (
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://old.invalid/debian bookworm main\n"
    )
    assert debian.mirror_from_sources("bookworm", legacy, []) == "http://old.invalid/debian"
    assert debian.mirror_from_sources("trixie", legacy, [deb822]) is None


@pytest.mark.parametrize("compress", [lzma.compress, gzip.compress])
def test_vmlinux_is_found_inside_a_compressed_kernel(compress: object) -> None:
    elf = b"\x7fELF" + os.urandom(4096)
    packed = b"MZ setup code " + os.urandom(512) + compress(elf) + b"trailer"  # type: ignore[operator]
    assert image.decompress_kernel(packed) == elf
    assert image.decompress_kernel(b"no kernel here") is None


def test_tsc_khz_from_cpuinfo() -> None:
    assert qemu.host_tsc_khz("processor : 0\ncpu MHz\t\t: 2596.120\n") == 2596120
    assert qemu.host_tsc_khz("nothing") is None


def test_console_lines_with_kernel_noise_still_parse() -> None:
    assert parse_line('[ 1.2] x @@GK {"event": "ready", "uptime": 3}') == {
        "event": "ready",
        "uptime": 3,
    }
    assert parse_line("@@GK {broken") is None
    assert parse_line("plain kernel line") is None


# --- bad input: each a clear skip -----------------------------------------------------------


def test_no_qemu_is_a_skip_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(Skip, match="qemu-system-x86_64 not found: install the Debian package"):
        qemu.qemu_binary()


def test_no_kernel_package_is_a_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "apt-cache"
    fake.write_text("#!/bin/sh\necho 'linux-image-amd64'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(debian, "_refreshed", True)  # no apt-get update from a test
    with pytest.raises(Skip, match="no kernel package"):
        debian.kernel_package()


def test_no_disk_space_is_a_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(image, "NEEDED_BYTES", 1 << 62)
    cache = image.Cache(tmp_path, lambda line: None)
    with pytest.raises(Skip, match=r"no disk space: .* GB free under"):
        cache.layer("kernel", "k", lambda out: None, label="test")
    assert not list(tmp_path.glob("*kernel*"))


def test_kvm_forced_but_broken_is_a_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qemu, "kvm_works", lambda *a: (False, "/dev/kvm present but broken"))
    fake = image.Image(tmp_path, tmp_path, tmp_path, "r", "p")
    with pytest.raises(Skip, match="KVM asked for but it does not work here"):
        qemu.choose_accel("kvm", fake, tmp_path, tmp_path)
    accel, why = qemu.choose_accel("auto", fake, tmp_path, tmp_path)
    assert accel == "tcg" and "broken" in why and "TCG" in why


# --- a guest that does not boot in time -------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> image.Image:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        qemu.qemu_binary()
        return image.build_image(image.DEFAULT_CACHE, lambda line: None)
    except Skip as exc:
        pytest.skip(f"VM tests skipped: {exc}")


def test_a_guest_that_does_not_boot_in_time_fails_with_its_console_tail(
    built: image.Image, tmp_path: Path
) -> None:
    # The kernel runs, but its init does not exist: it panics (panic=-1, -no-reboot) or hangs.
    no_init = ["rdinit=/nonexistent", "init=/nonexistent"]
    spec = qemu.VmSpec(
        image=built,
        cmdline=qemu.kernel_cmdline(no_init, qemu.host_tsc_khz()),
        console=tmp_path / "console.log",
        accel="tcg",
        memory_mb=256,
        with_root=False,
    )  # fmt: skip
    vm = qemu.Vm.start(spec, stderr_path=tmp_path / "qemu.log")
    started = time.monotonic()
    try:
        with pytest.raises(VmFailure) as failure:
            vm.console.wait_event("initramfs", 20, "guest kernel reached init")
    finally:
        vm.stop()
    assert time.monotonic() - started < 25
    message = str(failure.value)
    assert "console tail" in message
    assert "Kernel panic" in message or "not within" in message
    assert vm.proc.poll() is not None


def test_waiting_on_a_silent_console_is_bounded(tmp_path: Path) -> None:
    console = Console(tmp_path / "console.log", time.monotonic())
    (tmp_path / "console.log").write_text("booting...\nstill booting\n")
    started = time.monotonic()
    with pytest.raises(VmFailure, match=r"(?s)guest booted: not within 0 s.*still booting"):
        console.wait_event("runner", 0.3, "guest booted")
    assert time.monotonic() - started < 2
