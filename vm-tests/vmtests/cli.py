"""`vm-tests/run`: build the Talos-like image (cached) and boot it against a gatekeeper server.

Exit status: 0 all checks passed, 1 a check failed or the guest did not boot in time,
77 skipped (this host cannot run it: the reason is printed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from vmtests.errors import Skip, VmFailure
from vmtests.image import DEFAULT_CACHE, VM_TESTS, Image, build_image
from vmtests.qemu import ACCELS, choose_accel, qemu_binary
from vmtests.scenario import Report, run_scenario

DEFAULT_LOGS = VM_TESTS / "logs"
SCENARIOS = ("direct", "tunnel")
EXIT_SKIPPED = 77


def say(line: str) -> None:
    print(f"vm-tests: {line}", file=sys.stderr, flush=True)


def preflight() -> None:
    """The reasons this host cannot run the VM tests at all, before anything is built."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise Skip("the VM tests need an x86_64 Linux host")
    if os.geteuid() != 0:
        raise Skip("the VM tests need root (network namespaces, tap devices, debootstrap)")
    qemu_binary()
    tools = {"ip": "iproute2", "wireguard-go": "wireguard-go", "wg": "wireguard-tools"}
    tools["ping"] = "iputils-ping"
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            raise Skip(f"{tool} not found: install the Debian package {package}")


def prepare(cache: Path, accel_mode: str, log_root: Path) -> tuple[Image, str, str]:
    """Preflight, the image and the accelerator: (image, accel, why)."""
    preflight()
    image = build_image(cache, say)
    log_root.mkdir(parents=True, exist_ok=True)
    accel, why = choose_accel(accel_mode, image, log_root, cache)
    say(f"accelerator: {accel} ({why})")
    return image, accel, why


def run_one(image: Image, scenario: str, accel: str, why: str, log_root: Path) -> Report:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = log_root / f"{stamp}-{scenario}"
    return run_scenario(
        image, log_dir, accel=accel, accel_reason=why, tunnel=scenario == "tunnel", progress=say
    )


def print_report(report: Report) -> None:
    print(f"\n== {report.scenario} ({report.accel}) — logs in {report.log_dir}")
    for label, seconds in report.timings.items():
        guest = report.guest_uptime.get(label)
        extra = f"  (guest uptime {guest:.2f} s)" if guest is not None else ""
        print(f"   {label:<18} {seconds:6.2f} s after QEMU start{extra}")
    for check in report.checks:
        print(f"   [{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    for what, why in report.not_run.items():
        print(f"   [not run] {what}: {why}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vm-tests/run", description=__doc__)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="image cache folder")
    parser.add_argument(
        "--logs", type=Path, default=DEFAULT_LOGS, help="where each run's console log goes"
    )
    parser.add_argument("--accel", choices=ACCELS, default="auto", help="default: auto")
    parser.add_argument(
        "--scenario",
        choices=(*SCENARIOS, "all"),
        default="all",
        help="direct WireGuard, WireGuard over the gRPC tunnel, or both (default)",
    )
    parser.add_argument("--build-only", action="store_true", help="only build (or check) the image")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    failed = False
    try:
        if args.build_only:
            image = build_image(args.cache, say)
            say(f"image ready in {image.seconds:.1f} s: {image.kernel_package}, {image.rootfs}")
            return 0
        image, accel, why = prepare(args.cache, args.accel, args.logs)
        scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
        for scenario in scenarios:
            try:
                report = run_one(image, scenario, accel, why, args.logs)
            except VmFailure as exc:
                print(f"\n== {scenario} — FAILED: {exc}")
                failed = True
                continue
            print_report(report)
            failed = failed or not report.ok
    except Skip as exc:
        say(f"SKIPPED: {exc}")
        return EXIT_SKIPPED
    except VmFailure as exc:
        say(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; the VM is off and the lab removed")
        return 130
    return 1 if failed else 0
