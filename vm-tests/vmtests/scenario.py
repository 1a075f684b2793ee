"""One VM run: a gatekeeper server in a lab namespace, the guest on a tap device beside it.

The server side is gatekeeper's own SideroLink lab (the one the demo and the end-to-end tests
use): a namespace with a bridge carrying the underlay, `gatekeeper server` on wireguard-go.
The guest's tap device joins that bridge, and QEMU runs inside the namespace, so every packet
stays in namespaces this run made. All checks look from the server's side; what only the guest
can see (its backend, the contract suite, its firewall) it reports over the serial console.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmtests.console import Event
from vmtests.errors import VmFailure
from vmtests.image import Image
from vmtests.qemu import Vm, VmSpec, host_tsc_khz, kernel_cmdline

GUEST_UNDERLAY = "fd00:6b:1::200"
TAP = "tap0"
MAINTENANCE_PORT = 50000
# What the guest runs and reports once its link is up (guest/runner.py).
GUEST_CHECKS = ("contract", "firewall")

# When the guest's maintenance API first answers, found by one process in the server's
# namespace, started with QEMU and ready (imports done) long before the link comes up: it
# reads the overlay address, then calls Version in-process until an answer, so the figure is
# the guest's and not the start-up of a CLI process on the host (which the functional check
# `gatekeeper maint version` below still pays, and reports as cli_answering).
API_PROBE = """
import sys, time
from gatekeeper.maintenance import client
print("ready", flush=True)
address, deadline = sys.stdin.readline().split()
while time.monotonic() < float(deadline):
    try:
        with client.connect(address, timeout=1) as conn:
            client.version(conn, timeout=2)
    except Exception:
        time.sleep(0.02)
        continue
    print(time.monotonic(), flush=True)
    break
else:
    print("none", flush=True)
"""


@dataclass
class Bounds:
    """Seconds each stage may take (TCG on a 2-core host is the yardstick, with room)."""

    initramfs: float = 30.0
    runner: float = 60.0
    connected: float = 90.0
    ping: float = 15.0
    checks: float = 180.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    scenario: str
    accel: str
    accel_reason: str
    log_dir: str
    # Seconds since QEMU started, as seen by the host.
    timings: dict[str, float] = field(default_factory=dict)
    # Seconds since the guest kernel started, as the guest reports them.
    guest_uptime: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


class Run:
    """Builds the lab, boots the guest, collects evidence; close() undoes all of it."""

    def __init__(
        self, image: Image, log_dir: Path, accel: str, *, tunnel: bool, guest_checks: list[str]
    ) -> None:
        from gatekeeper.lab.siderolink_lab import SideroLinkLab

        self.image = image
        self.log_dir = log_dir
        self.accel = accel
        self.tunnel = tunnel
        self.guest_checks = guest_checks
        self.vm: Vm | None = None
        self.api_probe: subprocess.Popen[str] | None = None
        self.lab = SideroLinkLab()
        self.node_uuid = str(uuid.uuid4())

    def start(self) -> Vm:
        lab = self.lab
        # allow: the server tunnels exactly the machines that ask (grpc_tunnel=true).
        lab.start_server(*(["--tunnel-mode", "allow"] if self.tunnel else []))
        ns = lab.server_ns
        ns.run(["ip", "tuntap", "add", TAP, "mode", "tap"])
        ns.run(["ip", "link", "set", TAP, "master", "br0", "up"])
        query = {"grpc_tunnel": "true"} if self.tunnel else {}
        extra = [
            f"siderolink.api={lab.api_url(**query)}",
            f"gk.ip={GUEST_UNDERLAY}/64",
            # QEMU's microvm has no SMBIOS, so no /sys/class/dmi/id/product_uuid: the UUID
            # rides on the command line and the runner passes it to the agent.
            f"gk.node_uuid={self.node_uuid}",
            f"gk.checks={','.join(self.guest_checks)}",
        ]
        spec = VmSpec(
            image=self.image,
            cmdline=kernel_cmdline(extra, host_tsc_khz()),
            console=self.log_dir / "console.log",
            accel=self.accel,
            tap=TAP,
            qmp=self.log_dir / "qmp.sock",
        )
        self.api_probe = subprocess.Popen(
            ns.exec_argv([sys.executable, "-c", API_PROBE]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.vm = Vm.start(spec, netns=ns.name, stderr_path=self.log_dir / "qemu.log")
        return self.vm

    def aim_api_probe(self, address: str, timeout: float) -> None:
        """Point the probe at the guest's overlay address; it polls from now on."""
        probe = self.api_probe
        if probe is None or probe.stdin is None or probe.stdout is None:
            return
        try:
            if probe.stdout.readline().strip() == "ready":
                probe.stdin.write(f"{address} {time.monotonic() + timeout}\n")
                probe.stdin.flush()
        except OSError:
            self._stop_probe()

    def api_answered(self, timeout: float) -> float | None:
        """time.monotonic() of the guest API's first Version answer to the probe, or None."""
        probe = self.api_probe
        if probe is None:
            return None
        try:
            out, _ = probe.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self._stop_probe()
        last = out.strip().splitlines()[-1:] or ["none"]
        return None if last[0] == "none" else float(last[0])

    def _stop_probe(self) -> None:
        if self.api_probe is not None and self.api_probe.poll() is None:
            self.api_probe.kill()
            self.api_probe.wait()

    def server_ns_run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.lab.server_ns.exec_argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ping(self, address: str, deadline: float) -> float | None:
        """Seconds until the first reply to ping from the server's namespace, or None."""
        started = time.monotonic()
        while time.monotonic() < deadline:
            done = self.server_ns_run(["ping", "-6", "-c", "1", "-W", "1", address], timeout=5)
            if done.returncode == 0:
                return time.monotonic() - started
        return None

    def maint(self, address: str, timeout: float) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gatekeeper", "maint", "version", "-n", address]
        return self.server_ns_run([*argv, "--timeout", str(timeout)], timeout=timeout + 20)

    def close(self) -> None:
        try:
            self._stop_probe()
            if self.vm is not None:
                self.vm.stop()
        finally:
            with contextlib.suppress(OSError):
                shutil.copy(self.lab.server_log, self.log_dir / "server.log")
            self.lab.close()


def run_scenario(
    image: Image,
    log_dir: Path,
    *,
    accel: str,
    accel_reason: str,
    tunnel: bool = False,
    guest_checks: tuple[str, ...] = GUEST_CHECKS,
    bounds: Bounds | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> Report:
    bounds = bounds or Bounds()
    name = "tunnel" if tunnel else "direct"
    log_dir.mkdir(parents=True, exist_ok=True)
    report = Report(name, accel, accel_reason, str(log_dir))
    run = Run(image, log_dir, accel, tunnel=tunnel, guest_checks=list(guest_checks))
    try:
        vm = run.start()
        console = vm.console
        progress(f"{name}: QEMU started ({accel}); console log {vm.spec.console}")

        def mark(event: Event, label: str) -> None:
            report.timings[label] = round(event.seen, 2)
            if "uptime" in event.data:
                report.guest_uptime[label] = float(event.data["uptime"])

        initramfs = console.wait_event("initramfs", bounds.initramfs, "guest kernel reached init")
        mark(initramfs, "initramfs")
        runner = console.wait_event("runner", bounds.runner, "guest root file system and Python")
        mark(runner, "python")
        connected = console.wait(
            lambda e: e.name == "status" and bool(e.data["status"].get("connected")),
            bounds.connected,
            "guest agent connected over SideroLink",
        )
        mark(connected, "link_up")
        status: dict[str, Any] = connected.data["status"]
        progress(f"{name}: link up {connected.seen:.1f} s after QEMU started")
        address = str(status.get("node_address") or "").split("/")[0]
        if address:
            run.aim_api_probe(address, timeout=20)

        ping_deadline = time.monotonic() + bounds.ping
        took = run.ping(address, ping_deadline) if address else None
        if took is not None:
            report.timings["overlay_ping"] = round(vm.elapsed(), 2)
        report.checks.append(
            Check(
                "overlay ping server -> guest",
                took is not None,
                f"{address}" + ("" if took is not None else f": no reply in {bounds.ping:.0f} s"),
            )
        )
        peers = run.lab.server_peers()
        report.checks.append(
            Check(
                "machine appears in the server's WireGuard peers (wg show)",
                status.get("public_key") in peers,
                f"{len(peers)} peer(s)",
            )
        )
        report.checks.append(
            Check(
                "guest link uses kernel WireGuard",
                status.get("backend") == "kernel",
                f"backend={status.get('backend')!r} ({status.get('backend_reason')})",
            )
        )
        report.checks.append(
            Check(
                "tunnel mode as asked" if tunnel else "direct WireGuard (no tunnel)",
                bool(status.get("tunnel")) == tunnel,
                f"tunnel={status.get('tunnel')}",
            )
        )

        first = run.api_answered(timeout=30) if address else None
        if first is not None:
            report.timings["api_answering"] = round(first - vm.started, 2)
        answered = run.maint(address, timeout=20)
        if answered.returncode == 0:
            report.timings["cli_answering"] = round(vm.elapsed(), 2)
        report.checks.append(
            Check(
                "maintenance API answers over the overlay",
                answered.returncode == 0,
                _one_line(answered.stdout if answered.returncode == 0 else answered.stderr),
            )
        )
        refused = run.maint(GUEST_UNDERLAY, timeout=3)
        report.checks.append(
            Check(
                "maintenance API refuses on the guest's underlay address",
                refused.returncode != 0,
                _one_line(refused.stderr or refused.stdout),
            )
        )

        ready = console.wait_event("ready", bounds.checks, "guest checks (contract, firewall)")
        mark(ready, "guest_checks_done")
        contract = console.find(lambda e: e.name == "contract")
        if "contract" not in guest_checks:
            report.not_run["contract suite"] = "not asked for"
        elif contract is None:
            report.checks.append(Check("backend contract suite on kernel WireGuard", False))
        else:
            failed = contract.data.get("failed") or {}
            passed = contract.data.get("passed") or []
            report.checks.append(
                Check(
                    "backend contract suite on kernel WireGuard (in the guest)",
                    not failed and bool(passed),
                    f"{len(passed)} passed in {contract.data.get('seconds')} s"
                    + "".join(f"; {k}: {v}" for k, v in failed.items()),
                )
            )
        if "firewall" not in guest_checks:
            report.not_run["firewall"] = "not asked for"
        else:
            shown = console.find(lambda e: e.name == "firewall")
            view = (shown.data.get("show") if shown else None) or {}
            chains = [c.get("name") for c in (view.get("live") or {}).get("chains") or []]
            report.checks.append(
                Check(
                    "firewall in force in the guest (status, firewall show --json)",
                    status.get("firewall") == "ok"
                    and shown is not None
                    and shown.data.get("returncode") == 0
                    and view.get("in_sync") is True
                    and bool(chains),
                    f"status firewall={status.get('firewall')!r}, in_sync={view.get('in_sync')}, "
                    f"live chains={chains}"
                    + (
                        f", {shown.data.get('stderr')}"
                        if shown and shown.data.get("stderr")
                        else ""
                    ),
                )
            )

        console.poll()
        token_leaked = run.lab.join_token in vm.spec.console.read_text(errors="replace")
        report.checks.append(
            Check("join token never on the console", not token_leaked, str(vm.spec.console))
        )
        return report
    finally:
        run.close()
        (log_dir / "report.json").write_text(json.dumps(asdict(report), indent=2))


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[:4])[:300]


def fail_if_needed(report: Report) -> None:
    bad = report.failures()
    if bad:
        raise VmFailure(
            f"{report.scenario}: "
            + "; ".join(f"{c.name}: {c.detail}" for c in bad)
            + f" (logs in {report.log_dir})"
        )
