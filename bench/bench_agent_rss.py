"""Benchmark: the agent's memory, idle with the link up, every process of it counted.

Real parts in a throwaway lab (server and machine namespaces, wireguard-go, gRPC over veth).
The agent's Python process and its wireguard-go are found among the descendants of the
process the lab started; for each, VmRSS (steady, after the link has idled) and VmHWM (the
peak since start) from /proc. The target names the agent's Python process; wireguard-go and
the sum stand beside it. Run as root: `python bench/bench_agent_rss.py [--idle S]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from verdict import Verdict, emit  # bench/ is sys.path[0] when run as a script

from gatekeeper.lab.siderolink_lab import SideroLinkLab

TARGET_MB = 60.0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _memory_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _find(root: int) -> tuple[int, int]:
    """(agent python pid, wireguard-go pid) among root's descendants."""
    agent = wireguard = None
    for pid in _descendants(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gatekeeper" in argv and b"agent" in argv:
            agent = pid
        elif argv and argv[0].endswith(b"wireguard-go"):
            wireguard = pid
    if agent is None or wireguard is None:
        raise SystemExit(f"cannot find the agent ({agent}) and its wireguard-go ({wireguard})")
    return agent, wireguard


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle with the link up")
    args = parser.parse_args()
    with SideroLinkLab() as lab:
        lab.start_server()
        machine = lab.add_machine(start=False)
        lab.start_agent(machine)
        lab.wait_connected(machine, timeout=30)
        time.sleep(args.idle)
        assert machine.proc is not None
        agent, wireguard = _find(machine.proc.pid)
        agent_rss, agent_hwm = _memory_mb(agent)
        wg_rss, wg_hwm = _memory_mb(wireguard)
        lab.stop_agent(machine)
    idle = f"idle {args.idle:g} s with the link up"
    return (
        0
        if emit(
            "bench_agent_rss",
            [
                Verdict(
                    "agent Python process RSS",
                    f"<= {TARGET_MB:g} MB",
                    agent_rss,
                    "MB",
                    ok=agent_rss <= TARGET_MB,
                    note=idle,
                ),
                Verdict("agent Python process peak (VmHWM)", "", agent_hwm, "MB"),
                Verdict("agent's wireguard-go RSS", "", wg_rss, "MB", note=f"peak {wg_hwm:.1f}"),
                Verdict(
                    "agent + wireguard-go RSS",
                    "",
                    agent_rss + wg_rss,
                    "MB",
                    note=f"peaks summed {agent_hwm + wg_hwm:.1f} MB",
                ),
            ],
        )
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
