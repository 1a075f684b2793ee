"""`gatekeeper instances [--json]`: the server instances of one fleet, from its registry.

One line per instance (docs/registry.md, "Owners and failover"): whether its heartbeat is live
(written within the last 15 s), how long ago it was written, how many machines it holds, when
it started, its host and the WireGuard endpoints it advertises. An instance whose heartbeat is
stale has stopped or lost the store; a survivor takes its machines over (when one still
writes its own heartbeat). Machines whose owner has no row at all (it left, or they were
written before owners existed) are counted on a line of their own. Read only: it works with
every server stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from typing import Any

from gatekeeper.cli.fleetstate import CliError, add_state_dir, duration, fail, open_registry_for
from gatekeeper.cli.token import print_table
from gatekeeper.server.escape import shown
from gatekeeper.server.registry import InstanceRecord, MachineRecord, RegistryError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "instances",
        help="list the server instances of the fleet and their heartbeats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_state_dir(parser, registry=True)
    parser.set_defaults(func=cmd_instances)


def instance_rows(
    instances: list[InstanceRecord], machines: list[MachineRecord], now: float
) -> tuple[list[dict[str, Any]], int]:
    """The rows, and how many machines have an owner no row names."""
    held = Counter(m.owner for m in machines)
    rows = []
    for i in instances:
        age = now - i.seen
        rows.append(
            {
                "name": i.name,
                "live": i.live(now),
                # Another writer may have stored anything: JSON has no NaN nor infinity.
                "heartbeat_age_s": round(max(0.0, age), 1) if math.isfinite(age) else None,
                "machines": held.pop(i.name, 0),
                "started": i.started if math.isfinite(i.started) else None,
                # The run id begins with the host the instance runs on (run_id_here).
                "host": i.run_id.split(":", 1)[0],
                "endpoints": list(i.endpoints),
            }
        )
    return rows, sum(held.values())


def _ago(seconds: float | None) -> str:
    return "?" if seconds is None else f"{duration(seconds)} ago"


def cmd_instances(args: argparse.Namespace) -> int:
    try:
        registry = open_registry_for(args, readonly=True)
        with registry:
            now = time.time()
            instances = registry.instances(now)
            machines = registry.machines()
    except (CliError, RegistryError) as exc:
        return fail("instances", str(exc))
    rows, unowned = instance_rows(instances, machines, now)
    if args.json:
        out = {"instances": rows, "machines_without_instance": unowned}
        print(json.dumps(out, indent=2, allow_nan=False))
        return 0
    if not rows:
        print("no instance has written a heartbeat to this registry")
    else:
        print_table(
            ["NAME", "STATE", "HEARTBEAT", "MACHINES", "STARTED", "HOST", "ENDPOINTS"],
            [
                [
                    shown(r["name"], 64),
                    "live" if r["live"] else "stale",
                    _ago(r["heartbeat_age_s"]),
                    str(r["machines"]),
                    _ago(None if r["started"] is None else now - r["started"]),
                    shown(r["host"], 64),
                    shown(",".join(r["endpoints"]) or "-", 200),
                ]
                for r in rows
            ],
        )
    if unowned:
        print(
            f"machines held by no listed instance: {unowned} (a live instance takes them over "
            "once it has written its heartbeat for 15 s)"
        )
    return 0
