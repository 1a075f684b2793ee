"""Scale: real `gatekeeper server` instances holding N peers (default 10,000): memory, idle CPU.

Fills the servers with N provisioned machines (real keys, real Provision calls, real peers on
their wireguard-go devices), waits for the after-join work to settle, then measures each
instance as a whole: the Python server process and its wireguard-go, separately and summed,
resident memory now (VmRSS) and at its peak (VmHWM, the fill included), and the CPU both use
while nothing happens (utime + stime over `--idle` seconds, in % of one core); then what one
Prometheus scrape of the server's /metrics costs them, and the idle CPU with one scrape every
15 s (Prometheus's default interval: a monitored fleet is idle like this).

Targets (issue 12): <= 150 MB per instance (server + its wireguard-go, steady) and ~0 idle
CPU (here: <= 1 % of one core per instance). `--registry postgresql [--instances 2]`: on one
PostgreSQL started here as the tests start it, the fill split between the instances.

    sudo .venv/bin/python bench/bench_scale.py [--count 10000] [--idle 30]
        [--registry sqlite|postgresql] [--instances 1|2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_storm import STORM, Target, start_servers, wg_peers
from verdict import Verdict, emit

from gatekeeper.lab.siderolink_lab import SideroLinkLab

TICKS = os.sysconf("SC_CLK_TCK")
MAX_MB = 150.0
MAX_IDLE_CPU_PCT = 1.0
# Every server serves /metrics in its own namespace; a fleet's Prometheus scrapes it, by
# default every 15 s (scrape_interval), which an idle fleet pays for too.
METRICS_PORT = 9105
SCRAPE_INTERVAL = 15.0
SCRAPES = 5
_SCRAPER = """
import sys, time, urllib.request
for _ in range(int(sys.argv[2])):
    started = time.monotonic()
    body = urllib.request.urlopen(sys.argv[1], timeout=30).read()
    print(time.monotonic() - started, len(body))
"""


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wireguard_go_of(pid: int) -> int:
    """The wireguard-go process a server started (its child)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "wireguard" in comm:
            found.append(int(entry.name))
    if len(found) != 1:
        raise RuntimeError(f"server {pid}: expected one wireguard-go child, found {found}")
    return found[0]


def memory(pid: int) -> dict[str, float]:
    return {"rss_mb": status_mb(pid, "VmRSS"), "hwm_mb": status_mb(pid, "VmHWM")}


def scrapes(target: Target, pids: tuple[int, int]) -> dict[str, float]:
    """SCRAPES scrapes of one server's /metrics, one after the other, from its namespace: the
    slowest answer, and the CPU the server and its wireguard-go spent per scrape."""
    url = f"http://[{target.underlay}]:{METRICS_PORT}/metrics"
    before = [cpu_seconds(p) for p in pids]
    out = target.ns.run([sys.executable, "-c", _SCRAPER, url, str(SCRAPES)], timeout=300)
    after = [cpu_seconds(p) for p in pids]
    times = [float(line.split()[0]) for line in out.splitlines()]
    return {
        "slowest_s": max(times),
        "server_cpu_s": (after[0] - before[0]) / SCRAPES,
        "wireguard_go_cpu_s": (after[1] - before[1]) / SCRAPES,
    }


def fill(sl: SideroLinkLab, targets: list[Target], count: int) -> dict[str, Any]:
    """`count` machines provisioned, split between the targets, one client process each."""
    client = sl.add_machine(start=False)
    per = count // len(targets)
    token_file = sl.token_file()
    procs = []
    for t in targets:
        argv = [
            sys.executable, str(STORM), t.grpc, "--count", str(per),
            "--concurrency", "500", "--channels", "16", f"--token-file={token_file}",
        ]  # fmt: skip
        procs.append(subprocess.Popen(client.ns.exec_argv(argv), stdout=subprocess.PIPE, text=True))
    outcomes: dict[str, int] = {}
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        for k, v in json.loads(out)["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    return outcomes


def scrape_verdicts(name: str, inst: dict[str, Any], idle_pct: float) -> list[Verdict]:
    scrape = inst["scrape"]
    per = scrape["server_cpu_s"] + scrape["wireguard_go_cpu_s"]
    after = inst["after_scrapes"]
    monitored = idle_pct + 100 * per / SCRAPE_INTERVAL
    return [
        Verdict(
            f"{name}: one /metrics scrape, CPU of server + its wireguard-go",
            "",
            1000 * per,
            "ms",
            note=f"slowest of {SCRAPES} answers {1000 * scrape['slowest_s']:.0f} ms",
        ),
        Verdict(
            f"{name}: idle CPU with /metrics scraped every {SCRAPE_INTERVAL:g} s",
            f"<= {MAX_IDLE_CPU_PCT:g} % of a core",
            monitored,
            "%",
            ok=monitored <= MAX_IDLE_CPU_PCT,
            note="the idle figure above plus one scrape's CPU per interval",
        ),
        Verdict(
            f"{name}: RSS after the scrapes, server + its wireguard-go",
            "",
            after["server"]["rss_mb"] + after["wireguard_go"]["rss_mb"],
            "MB",
            note=f"server {after['server']['rss_mb']:.1f}, "
            f"wireguard-go {after['wireguard_go']['rss_mb']:.1f}",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=40.0, help="wait before measuring idle")
    parser.add_argument("--registry", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--instances", type=int, choices=[1, 2], default=1)
    args = parser.parse_args()
    if args.instances == 2 and args.registry != "postgresql":
        parser.error("--instances 2 needs --registry postgresql")

    with SideroLinkLab() as sl, contextlib.ExitStack() as stack:
        metrics = ("--metrics-listen", f":{METRICS_PORT}")
        targets, _ = start_servers(sl, stack, args.registry, args.instances, metrics)
        pids = [(t.proc.pid, wireguard_go_of(t.proc.pid)) for t in targets]
        empty = [{"server": memory(s), "wireguard_go": memory(w)} for s, w in pids]
        started = time.monotonic()
        outcomes = fill(sl, targets, args.count)
        fill_s = time.monotonic() - started
        # Right after machines join, a server reads its device every 5 s for their new
        # endpoints (endpoint_sync.JOIN_WINDOW); idle is what follows.
        time.sleep(args.settle)
        before = [(cpu_seconds(s), cpu_seconds(w)) for s, w in pids]
        time.sleep(args.idle)
        after = [(cpu_seconds(s), cpu_seconds(w)) for s, w in pids]
        instances = []
        for n, (t, (s, w)) in enumerate(zip(targets, pids, strict=True)):
            instances.append(
                {
                    "instance": n + 1,
                    "peers": wg_peers(t.ns, t.interface),
                    "empty": empty[n],
                    "server": memory(s),
                    "wireguard_go": memory(w),
                    "server_idle_cpu_pct": 100 * (after[n][0] - before[n][0]) / args.idle,
                    "wireguard_go_idle_cpu_pct": 100 * (after[n][1] - before[n][1]) / args.idle,
                }
            )
        # After the steady figures: a scrape's reply (wireguard-go's whole device, 2.7 MB at
        # 10,000 peers) leaves both processes larger, which the steady figures would hide.
        for inst, t, p in zip(instances, targets, pids, strict=True):
            inst["scrape"] = scrapes(t, p)
            inst["after_scrapes"] = {"server": memory(p[0]), "wireguard_go": memory(p[1])}
    print(
        json.dumps(
            {"registry": args.registry, "count": args.count, "fill_s": round(fill_s, 1),
             "fill_outcomes": outcomes, "instances": instances},
            indent=2,
        )
    )  # fmt: skip
    complete = outcomes.get("OK", 0) == args.count // args.instances * args.instances
    verdicts = []
    for inst in instances:
        name = f"scale ({args.registry}) instance {inst['instance']}, {inst['peers']} peers"
        server, wg = inst["server"], inst["wireguard_go"]
        total = server["rss_mb"] + wg["rss_mb"]
        cpu = inst["server_idle_cpu_pct"] + inst["wireguard_go_idle_cpu_pct"]
        verdicts += [
            Verdict(f"{name}: server RSS", "", server["rss_mb"], "MB"),
            Verdict(f"{name}: its wireguard-go RSS", "", wg["rss_mb"], "MB"),
            Verdict(
                f"{name}: RSS, server + its wireguard-go",
                f"<= {MAX_MB:g} MB",
                total,
                "MB",
                ok=complete and total <= MAX_MB,
                note="" if complete else f"fill incomplete: {outcomes}",
            ),
            Verdict(
                f"{name}: peak RSS (VmHWM), server + its wireguard-go",
                "",
                server["hwm_mb"] + wg["hwm_mb"],
                "MB",
                note=f"server {server['hwm_mb']:.1f}, wireguard-go {wg['hwm_mb']:.1f}",
            ),
            Verdict(
                f"{name}: idle CPU, server + its wireguard-go",
                f"<= {MAX_IDLE_CPU_PCT:g} % of a core",
                cpu,
                "%",
                ok=cpu <= MAX_IDLE_CPU_PCT,
                note=f"server {inst['server_idle_cpu_pct']:.2f}, "
                f"wireguard-go {inst['wireguard_go_idle_cpu_pct']:.2f}, over {args.idle:g} s",
            ),
            *scrape_verdicts(name, inst, cpu),
        ]
    ok = emit(f"scale ({args.registry}, {args.instances} instance)", verdicts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
