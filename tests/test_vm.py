"""The VM run (vm-tests/): a Talos-like QEMU guest with kernel WireGuard joins a gatekeeper
server over SideroLink; everything is checked from the server's side.

Skipped, with the reason, where the host cannot run it (no QEMU, no kernel package, no disk
space, not root); KVM that is present but broken only means software emulation. The image is
built once (cached under vm-tests/.cache/) and each run's console log is kept under
vm-tests/logs/.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

VM_TESTS = Path(__file__).resolve().parent.parent / "vm-tests"
sys.path.insert(0, str(VM_TESTS))

from vmtests.cli import DEFAULT_LOGS, prepare, run_one  # noqa: E402
from vmtests.errors import Skip  # noqa: E402
from vmtests.image import DEFAULT_CACHE, Image  # noqa: E402
from vmtests.scenario import Report  # noqa: E402

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def vm() -> Iterator[tuple[Image, str, str]]:
    try:
        yield prepare(DEFAULT_CACHE, "auto", DEFAULT_LOGS)
    except Skip as exc:
        pytest.skip(f"VM tests skipped: {exc}")


def _assert_all_passed(report: Report) -> None:
    lines = [f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in report.checks]
    assert report.ok, f"logs in {report.log_dir}\n" + "\n".join(lines)


def test_guest_joins_over_siderolink_with_kernel_wireguard(vm: tuple[Image, str, str]) -> None:
    image, accel, why = vm
    report = run_one(image, "direct", accel, why, DEFAULT_LOGS)
    _assert_all_passed(report)
    names = {c.name for c in report.checks}
    assert "guest link uses kernel WireGuard" in names
    assert "backend contract suite on kernel WireGuard (in the guest)" in names
    assert "overlay ping server -> guest" in names
    assert "maintenance API answers over the overlay" in names
    assert "firewall in force in the guest (status, firewall show --json)" in names


def test_guest_joins_through_the_grpc_tunnel(vm: tuple[Image, str, str]) -> None:
    image, accel, why = vm
    _assert_all_passed(run_one(image, "tunnel", accel, why, DEFAULT_LOGS))
