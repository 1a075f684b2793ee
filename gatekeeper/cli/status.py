"""`gatekeeper status`: the agent's published status, as a table or JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from gatekeeper.agent.status_file import read_status


def _age(ts: float | None) -> str:
    if not ts:
        return "never"
    return f"{max(0.0, time.time() - ts):.0f} s ago"


def format_status(doc: dict[str, Any]) -> str:
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
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.upper():<{width}}  {v}" for k, v in rows)


def print_status(run_dir: Path, *, as_json: bool) -> int:
    try:
        doc = read_status(run_dir)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"gatekeeper status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2, sort_keys=True) if as_json else format_status(doc))
    return 0
