"""Benchmark: WireGuard over gRPC against direct UDP, in the same lab and the same run.

One server (`--tunnel-mode allow`) and two machines on the same underlay: one direct, one
asking for the tunnel. For each: iperf3 throughput over the overlay (machine -> server and
back), round-trip time (ping p50), and with the tunnel busy, the resident memory of the agent
and the server (the Python processes; wireguard-go's own memory is not counted).

Targets (issue 5): tunnel / direct throughput >= 0.5; added RTT at p50 <= 1 ms.
Prints figures; asserts nothing. Run as root: `python bench/bench_tunnel.py [--seconds N]`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab

SERVER_OVERLAY = "fdae:41e4:649b:9303::1"


def iperf(sl: SideroLinkLab, machine: Machine, seconds: float, reverse: bool) -> float:
    """Mbit/s received over `seconds` (TCP, one stream)."""
    argv = ["iperf3", "-c", SERVER_OVERLAY, "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
    out = subprocess.run(
        machine.ns.exec_argv(argv), capture_output=True, text=True, timeout=seconds + 30
    )
    if out.returncode != 0:
        raise RuntimeError(f"iperf3 failed in {machine.name}: {out.stdout[-500:]}{out.stderr}")
    doc = json.loads(out.stdout)
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6


def ping_p50(machine: Machine, count: int, interval: float = 0.02) -> tuple[float, float]:
    """(p50, p90) round-trip time in ms to the server's overlay address."""
    out = subprocess.run(
        machine.ns.exec_argv(
            ["ping", "-6", "-c", str(count), "-i", str(interval), "-W", "2", SERVER_OVERLAY]
        ),
        capture_output=True,
        text=True,
        timeout=count + 30,
    ).stdout
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
    if len(times) < count // 2:
        raise RuntimeError(f"ping from {machine.name} lost most replies:\n{out[-400:]}")
    return statistics.median(times), times[int(len(times) * 0.9) - 1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Sample the resident memory of some processes every 100 ms while a block runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: 0.0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))
            self._stop.wait(0.1)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--pings", type=int, default=200, help="pings per path for the RTT")
    args = parser.parse_args()

    with SideroLinkLab() as sl:
        sl.start_server("--tunnel-mode", "allow")
        direct = sl.add_machine()
        tunnel = sl.add_machine(api_url=sl.api_url(grpc_tunnel="true"))
        d_status = sl.wait_connected(direct, timeout=30)
        t_status = sl.wait_connected(tunnel, timeout=30)
        assert d_status["link_name"] == "siderolink", d_status
        assert t_status["link_name"] == "siderolinktun", t_status
        sl.lab.spawn(
            sl.server_ns,
            ["iperf3", "-s", "-B", SERVER_OVERLAY],
            log=sl.workdir / "iperf3.log",
        )
        time.sleep(0.5)
        assert direct.proc is not None and tunnel.proc is not None
        assert sl.server_proc is not None
        idle = {"agent": rss_mb(tunnel.proc.pid), "server": rss_mb(sl.server_proc.pid)}

        results: dict[str, dict[str, float]] = {}
        peak: dict[str, float] = {}
        for name, machine in (("direct", direct), ("tunnel", tunnel)):
            p50, p90 = ping_p50(machine, args.pings)
            r: dict[str, float] = {"rtt_p50_ms": p50, "rtt_p90_ms": p90}
            # Pings 2 ms apart: every process on the path stays awake (a link in use).
            r["rtt_busy_p50_ms"] = ping_p50(machine, args.pings, interval=0.002)[0]
            pids = {"agent": machine.proc.pid, "server": sl.server_proc.pid}  # type: ignore[union-attr]
            with PeakRss(pids) as watch:
                r["up_mbit"] = iperf(sl, machine, args.seconds, reverse=False)
                r["down_mbit"] = iperf(sl, machine, args.seconds, reverse=True)
            if name == "tunnel":
                peak = watch.peak
            results[name] = r

        status = tunnel.status().get("tunnel_stream") or {}

    d, t = results["direct"], results["tunnel"]
    print(f"{'path':8} {'up Mbit/s':>10} {'down Mbit/s':>12} {'RTT p50 ms':>11} {'p90 ms':>8}")
    for name, r in results.items():
        print(
            f"{name:8} {r['up_mbit']:10.0f} {r['down_mbit']:12.0f} "
            f"{r['rtt_p50_ms']:11.3f} {r['rtt_p90_ms']:8.3f}"
        )
    print(
        f"ratio tunnel/direct: up {t['up_mbit'] / d['up_mbit']:.2f}, "
        f"down {t['down_mbit'] / d['down_mbit']:.2f} (target >= 0.5)"
    )
    print(
        f"added RTT p50: {t['rtt_p50_ms'] - d['rtt_p50_ms']:.3f} ms with pings 20 ms apart, "
        f"{t['rtt_busy_p50_ms'] - d['rtt_busy_p50_ms']:.3f} ms 2 ms apart (target <= 1 ms)"
    )
    print(
        f"memory (RSS, MB): agent {idle['agent']:.1f} idle / {peak.get('agent', 0):.1f} busy; "
        f"server {idle['server']:.1f} idle / {peak.get('server', 0):.1f} busy"
    )
    print(
        f"tunnel stream: batching={status.get('batching')} sent={status.get('sent')} "
        f"received={status.get('received')} dropped={status.get('dropped')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
