"""`gatekeeper status`: the agent's published status, with a health block, as a table or JSON.

The health block comes first (see gatekeeper.cli.health): what the agent reports, checked
against the device, the firewall, the listening socket and the sinks where that is possible.
Exit 0 when the link is up, 3 when the agent runs but is not connected, 1 when there is no
agent status to read. `--watch` prints it again every --interval seconds until Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gatekeeper.agent.status_file import read_status
from gatekeeper.cli.health import observe

CLEAR = "\033[H\033[J"


def _age(ts: float | None) -> str:
    if not ts:
        return "never"
    return f"{max(0.0, time.time() - ts):.0f} s ago"


def status_rows(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [
        ("state", doc.get("state")),
        ("connected", "yes" if doc.get("connected") else "no"),
        ("api", doc.get("api") or "-"),
        ("config from", doc.get("config_source") or "-"),
        ("link", doc.get("link_name") or "-"),
        ("address", doc.get("node_address") or "-"),
        ("server", doc.get("server_address") or "-"),
        ("endpoint", doc.get("endpoint") or "-"),
        ("endpoints", ", ".join(doc.get("endpoints") or []) or "-"),
        ("tunnel", "yes" if doc.get("tunnel") else "no"),
        ("last handshake", _age(doc.get("last_handshake"))),
        ("received", f"{doc.get('rx_bytes', 0)} bytes"),
        ("backend", doc.get("backend") or "-"),
        ("listen port", doc.get("listen_port") or "-"),
        ("provisions", doc.get("provisions", 0)),
        ("last error", doc.get("last_error") or "-"),
        ("config error", doc.get("config_error") or "-"),
        ("firewall", doc.get("firewall_error") or doc.get("firewall_policy") or "-"),
    ]
    for name, health in sorted((doc.get("reconcilers") or {}).items()):
        if health.get("state") != "running":
            rows.append(
                (f"{name} reconciler", f"{health.get('state')}: {health.get('last_error')}")
            )
    if doc.get("next_retry_in") is not None:
        rows.append(("next retry in", f"{doc['next_retry_in']:.1f} s"))
    return rows


def format_status(doc: dict[str, Any], health: list[tuple[str, str]] | None = None) -> str:
    rows = status_rows(doc)
    width = max(len(k) for k, _ in [*rows, *(health or [])])
    out = []
    if health is not None:
        out.append("HEALTH")
        out += [f"  {k:<{width}}  {v}" for k, v in health]
        out.append("")
    out += [f"{k.upper():<{width + 2}}  {v}" for k, v in rows]
    return "\n".join(out)


def render(run_dir: Path, cmdline: Path, *, as_json: bool, one_line: bool) -> tuple[str, int]:
    """The text (or JSON) to print and the exit status it goes with."""
    doc = read_status(run_dir)
    health = observe(doc, cmdline)
    code = 0 if doc.get("connected") else 3
    if as_json:
        full = {**doc, "health": health.as_dict()}
        return json.dumps(full, indent=None if one_line else 2, sort_keys=True), code
    return format_status(doc, health.rows()), code


def print_status(
    run_dir: Path, cmdline: Path, *, as_json: bool, watch: bool = False, interval: float = 2.0
) -> int:
    # --watch ends on Ctrl-C. A KeyboardInterrupt raised at an arbitrary point can land in a
    # finalizer (libnftables' __del__), where Python ignores it and the loop would go on:
    # the signal only sets a flag, looked at between updates.
    stop = threading.Event()
    if watch:
        signal.signal(signal.SIGINT, lambda _sig, _frame: stop.set())
    while True:
        try:
            # --watch --json: one document per line, for `| jq` and friends.
            text, code = render(run_dir, cmdline, as_json=as_json, one_line=watch)
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            print(f"gatekeeper status: {exc}", file=sys.stderr)
            if not watch:
                return 1
            text, code = "", 1
        if watch and not as_json and sys.stdout.isatty():
            sys.stdout.write(CLEAR)
        if text:
            print(text, flush=True)
        if not watch:
            return code
        if not as_json:
            print(flush=True)
        if stop.wait(interval):
            return 0
