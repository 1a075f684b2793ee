"""Scale: a real `gatekeeper server` holding N peers (default 10,000): memory and idle CPU.

Fills the server with N provisioned machines (real keys, real Provision calls, real peers on
its wireguard-go device), then measures, separately, the Python server process and its
wireguard-go child: resident memory (VmRSS) and CPU used while nothing happens
(utime + stime over `--idle` seconds). Prints JSON.

    sudo python bench/bench_scale.py [--count 10000] [--idle 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gatekeeper.lab.siderolink_lab import SideroLinkLab

STORM = Path(__file__).parent / "storm_client.py"
TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=40.0, help="wait before measuring idle")
    args = parser.parse_args()
    with SideroLinkLab() as sl:
        sl.start_server()
        assert sl.server_proc is not None
        server_pid = sl.server_proc.pid
        (wg_pid,) = [
            p for p in children(server_pid) if "wireguard" in Path(f"/proc/{p}/comm").read_text()
        ]
        base = {"server_rss_mb": rss_mb(server_pid), "wireguard_go_rss_mb": rss_mb(wg_pid)}
        client = sl.add_machine(start=False)
        started = time.perf_counter()
        done = subprocess.run(
            client.ns.exec_argv(
                [
                    sys.executable, str(STORM), f"[{sl.server_underlay}]:8090",
                    "--count", str(args.count), "--concurrency", "1000",
                    "--token", sl.join_token,
                ]
            ),
            capture_output=True, text=True, timeout=1200, check=True,
        )  # fmt: skip
        fill_s = time.perf_counter() - started
        storm = json.loads(done.stdout)
        # Right after machines join, the server reads its device every 5 s for their new
        # endpoints (fleet.JOIN_WINDOW); idle is what follows.
        time.sleep(args.settle)
        before = (cpu_seconds(server_pid), cpu_seconds(wg_pid))
        time.sleep(args.idle)
        after = (cpu_seconds(server_pid), cpu_seconds(wg_pid))
        result = {
            "peers": len(sl.server_peers()),
            "fill_s": round(fill_s, 1),
            "fill_outcomes": storm["outcomes"],
            "empty": base,
            "server_rss_mb": rss_mb(server_pid),
            "wireguard_go_rss_mb": rss_mb(wg_pid),
            "idle_seconds": args.idle,
            "server_idle_cpu_pct": round(100 * (after[0] - before[0]) / args.idle, 2),
            "wireguard_go_idle_cpu_pct": round(100 * (after[1] - before[1]) / args.idle, 2),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
