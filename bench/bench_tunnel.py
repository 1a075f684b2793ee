"""Benchmark: WireGuard over gRPC against direct UDP, in the same lab and the same runs.

One server (`--tunnel-mode allow`) and two machines on the same underlay: one direct, one
asking for the tunnel. Each of `--runs` runs measures, for both paths one after the other:
round-trip time to the server's overlay address with pings 20 ms apart (the spacing the
target names: a link that is mostly idle, where every process on the path has gone to sleep)
and iperf3 throughput (one TCP stream, machine -> server and back).

Targets (issue 14), each the figure it names:
- tunnel RTT added, p50, pings 20 ms apart: tunnel p50 minus direct p50 over all runs' pings,
  <= 1 ms;
- tunnel/direct throughput, the worst ratio of any run in either direction, >= 0.5.
Also reported: datagrams dropped per run (the agent's relay queue, and the kernel's UDP
receive-buffer drops in the machine's and the server's namespace, which include the relay
sockets and wireguard-go's), TCP retransmits inside the tunnel, and the memory of the
agent and of the server each with its wireguard-go (VmRSS now and VmHWM, the peak).

Run as root: `python bench/bench_tunnel.py [--runs N] [--seconds S] [--pings P]`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from verdict import Verdict, emit  # bench/ is the script's directory, first on sys.path

from gatekeeper.lab.netns import Namespace
from gatekeeper.lab.siderolink_lab import Machine, SideroLinkLab
from gatekeeper.wireguard.ownership import OWNER_ENV

SERVER_OVERLAY = "fdae:41e4:649b:9303::1"
PING_GAP = 0.02
RTT_TARGET_MS = 1.0
RATIO_TARGET = 0.5


def iperf(machine: Machine, seconds: float, reverse: bool) -> tuple[float, int]:
    """(Mbit/s received, TCP retransmits) over `seconds`, one stream."""
    argv = ["iperf3", "-c", SERVER_OVERLAY, "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
    for attempt in range(3):
        out = subprocess.run(
            machine.ns.exec_argv(argv), capture_output=True, text=True, timeout=seconds + 30
        )
        doc = json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}
        if out.returncode == 0 and "sum_received" in doc.get("end", {}):
            break
        # The one iperf3 server may still be finishing the previous test ("server is busy").
        if attempt == 2:
            why = doc.get("error") or f"{out.stdout[-300:]}{out.stderr[-300:]}"
            raise RuntimeError(f"iperf3 failed in {machine.name}: {why}")
        time.sleep(1.0)
    end = doc["end"]
    return float(end["sum_received"]["bits_per_second"]) / 1e6, int(
        end["sum_sent"].get("retransmits", 0)
    )


def pings(machine: Machine, count: int) -> list[float]:
    """Round-trip times in ms to the server's overlay address, pings PING_GAP apart."""
    out = subprocess.run(
        machine.ns.exec_argv(
            ["ping", "-6", "-c", str(count), "-i", str(PING_GAP), "-W", "2", SERVER_OVERLAY]
        ),
        capture_output=True,
        text=True,
        timeout=count * PING_GAP + 30,
    ).stdout
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    if len(times) < count // 2:
        raise RuntimeError(f"ping from {machine.name} lost most replies:\n{out[-400:]}")
    return times


def udp_rcvbuf_errors(ns: Namespace) -> int:
    """UDP datagrams the kernel dropped for full receive buffers in this namespace so far."""
    out = subprocess.run(
        ns.exec_argv(["cat", "/proc/net/snmp"]), capture_output=True, text=True, timeout=10
    ).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1], strict=True))["RcvbufErrors"])


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def component_pids(pid: int) -> list[int]:
    """`pid` and every wireguard-go it started (they carry its pid in GATEKEEPER_OWNER)."""
    found = [pid]
    mark = f"{OWNER_ENV}={pid}:".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == pid:
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(mark) for item in env.split(b"\0")):
            found.append(int(proc.name))
    return found


def memory_mb(pid: int) -> tuple[float, float, str]:
    """(VmRSS, VmHWM) in MB summed over the component's processes, and each one's VmRSS."""
    pids = component_pids(pid)
    each = [_status_kb(p, "VmRSS") / 1024 for p in pids]
    hwm = sum(_status_kb(p, "VmHWM") for p in pids) / 1024
    shown = " + ".join(f"{mb:.1f}" for mb in each) + " (Python first, then wireguard-go)"
    return sum(each), hwm, shown


@dataclass
class Run:
    up: dict[str, float] = field(default_factory=dict)
    down: dict[str, float] = field(default_factory=dict)
    p50: dict[str, float] = field(default_factory=dict)
    retransmits: int = 0
    relay_drops: int = 0
    kernel_drops_machine: int = 0
    kernel_drops_server: int = 0

    def ratio(self, way: str) -> float:
        table = self.up if way == "up" else self.down
        return table["tunnel"] / table["direct"]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs in the one lab")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    parser.add_argument("--pings", type=int, default=200, help="pings per path and run")
    args = parser.parse_args()

    runs: list[Run] = []
    times: dict[str, list[float]] = {"direct": [], "tunnel": []}
    with SideroLinkLab() as sl:
        sl.start_server("--tunnel-mode", "allow")
        direct = sl.add_machine()
        tunnel = sl.add_machine(api_url=sl.api_url(grpc_tunnel="true"))
        d_status = sl.wait_connected(direct, timeout=30)
        t_status = sl.wait_connected(tunnel, timeout=30)
        assert d_status["link_name"] == "siderolink", d_status
        assert t_status["link_name"] == "siderolinktun", t_status
        sl.lab.spawn(
            sl.server_ns, ["iperf3", "-s", "-B", SERVER_OVERLAY], log=sl.workdir / "iperf3.log"
        )
        time.sleep(0.5)
        assert tunnel.proc is not None and sl.server_proc is not None
        agent_pid, server_pid = tunnel.proc.pid, sl.server_proc.pid
        idle = {"agent": memory_mb(agent_pid), "server": memory_mb(server_pid)}

        def relay_dropped() -> int:
            return int((tunnel.status().get("tunnel_stream") or {}).get("dropped") or 0)

        for n in range(args.runs):
            run = Run()
            before = (
                relay_dropped(),
                udp_rcvbuf_errors(tunnel.ns),
                udp_rcvbuf_errors(sl.server_ns),
            )
            for name, machine in (("direct", direct), ("tunnel", tunnel)):
                got = pings(machine, args.pings)
                times[name].extend(got)
                run.p50[name] = statistics.median(got)
                run.up[name], up_rt = iperf(machine, args.seconds, reverse=False)
                run.down[name], down_rt = iperf(machine, args.seconds, reverse=True)
                if name == "tunnel":
                    run.retransmits = up_rt + down_rt
            run.relay_drops = relay_dropped() - before[0]
            run.kernel_drops_machine = udp_rcvbuf_errors(tunnel.ns) - before[1]
            run.kernel_drops_server = udp_rcvbuf_errors(sl.server_ns) - before[2]
            runs.append(run)
            print(
                f"run {n + 1}: up {run.up['tunnel']:.0f}/{run.up['direct']:.0f} Mbit/s "
                f"= {run.ratio('up'):.2f}, down {run.down['tunnel']:.0f}/"
                f"{run.down['direct']:.0f} = {run.ratio('down'):.2f}; RTT p50 tunnel "
                f"{run.p50['tunnel']:.3f} direct {run.p50['direct']:.3f} ms; dropped: relay "
                f"queue {run.relay_drops}, kernel UDP machine {run.kernel_drops_machine} "
                f"server {run.kernel_drops_server}; TCP retransmits {run.retransmits}",
                flush=True,
            )
        busy = {"agent": memory_mb(agent_pid), "server": memory_mb(server_pid)}
        status = tunnel.status().get("tunnel_stream") or {}

    added = statistics.median(times["tunnel"]) - statistics.median(times["direct"])
    worst = min(min(r.ratio("up"), r.ratio("down")) for r in runs)
    both_ok = sum(1 for r in runs if min(r.ratio("up"), r.ratio("down")) >= RATIO_TARGET)
    drops = [r.relay_drops + r.kernel_drops_machine + r.kernel_drops_server for r in runs]
    print(
        f"tunnel stream: batching={status.get('batching')} sent={status.get('sent')} "
        f"received={status.get('received')} dropped={status.get('dropped')}"
    )
    verdicts = [
        Verdict(
            "tunnel RTT added p50, pings 20 ms apart",
            f"<= {RTT_TARGET_MS:g} ms",
            added,
            "ms",
            ok=added <= RTT_TARGET_MS,
            note=f"tunnel p50 {statistics.median(times['tunnel']):.3f} - direct "
            f"{statistics.median(times['direct']):.3f}, {len(times['tunnel'])} pings each",
        ),
        Verdict(
            f"tunnel/direct throughput, worst of {len(runs)} runs, each direction",
            f">= {RATIO_TARGET:g}",
            worst,
            "",
            ok=worst >= RATIO_TARGET,
            note=f"both directions >= {RATIO_TARGET:g} in {both_ok} of {len(runs)} runs",
        ),
        Verdict(
            "tunnel datagrams dropped per run (relay queue + kernel UDP buffers), worst",
            "",
            float(max(drops)),
            "datagrams",
            note="per run: " + ", ".join(str(d) for d in drops),
        ),
    ]
    for name in ("agent", "server"):
        rss, hwm, shown = busy[name]
        verdicts.append(
            Verdict(
                f"{name} memory with its wireguard-go, VmRSS after the runs",
                "",
                rss,
                "MB",
                note=f"{shown}; idle before the runs {idle[name][0]:.1f} MB ({idle[name][2]})",
            )
        )
        verdicts.append(Verdict(f"{name} memory with its wireguard-go, VmHWM", "", hwm, "MB"))
    emit("tunnel", verdicts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
