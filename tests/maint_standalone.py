"""A maintenance API process driven by JSON lines on stdin (for labs, tests and benchmarks).

    ip netns exec m python tests/maint_standalone.py --uuid 0000-... --port 50000

Each stdin line is one command; each gets one JSON line on stdout ({"ok": true, ...} with the
current binding, or {"ok": false, "error": ...}):

    {"op": "apply", "target": "none" | "all" | "<address>"}
    {"op": "prefix", "prefix": "fdae:41e4:649b:9303::/64" | null}
    {"op": "status", "host": "h:443", "connected": true, "link": "siderolink", "tunnel": false}
    {"op": "config", "api_endpoint": "https://h/?jointoken=x", "host": "h:443",
     "join_token": "x", "insecure": false, "tunnel": false}
    {"op": "link", "name": "siderolink", "up": true, "mtu": 1280, "index": 7,
     "addresses": ["fdae:...:7081/64"]}
    {"op": "state"}
    {"op": "quit"}

It is the same MaintenanceService the agent embeds; nothing here is test-only behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from gatekeeper import __version__
from gatekeeper.maintenance import catalog
from gatekeeper.maintenance.binding import (
    DEFAULT_PORT,
    BindTarget,
    ListenAll,
    ListenOn,
    NotListening,
)
from gatekeeper.maintenance.server import MaintenanceBindError, MaintenanceService


def parse_target(text: str) -> BindTarget:
    if text == "none":
        return NotListening()
    if text == "all":
        return ListenAll()
    return ListenOn(text)


async def handle(service: MaintenanceService, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd.get("op")
    store = service.store
    if op == "apply":
        await service.apply(parse_target(str(cmd["target"])))
    elif op == "prefix":
        service.overlay_prefix = cmd.get("prefix")
    elif op == "status":
        catalog.publish_siderolink_status(
            store,
            host=str(cmd.get("host", "")),
            connected=bool(cmd.get("connected", False)),
            link_name=str(cmd.get("link", "siderolink")),
            tunnel=bool(cmd.get("tunnel", False)),
        )
    elif op == "config":
        catalog.publish_siderolink_config(
            store,
            api_endpoint=str(cmd["api_endpoint"]),
            host=str(cmd.get("host", "")),
            join_token=cmd.get("join_token"),
            insecure=bool(cmd.get("insecure", False)),
            tunnel=bool(cmd.get("tunnel", False)),
        )
    elif op == "link":
        name = str(cmd.get("name", "siderolink"))
        catalog.publish_link_status(
            store,
            name,
            index=int(cmd.get("index", 0)),
            mtu=int(cmd.get("mtu", 1280)),
            up=bool(cmd.get("up", True)),
        )
        catalog.publish_addresses(store, name, cmd.get("addresses", []))
    elif op not in ("state", "quit"):
        raise ValueError(f"unknown op {op!r}")
    return {
        "ok": True,
        "bound": service.bound_address,
        "port": service.bound_port,
        "fingerprint": service.fingerprint,
    }


async def run(args: argparse.Namespace) -> int:
    store = catalog.new_store()
    catalog.publish_version(store, f"v{__version__}")
    catalog.publish_system_information(store, uuid=args.uuid)
    service = MaintenanceService(store, port=args.port, overlay_prefix=args.prefix)
    print(json.dumps({"ready": True, "fingerprint": service.fingerprint}), flush=True)
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            cmd: Any = None
            try:
                cmd = json.loads(line)
                reply = await handle(service, cmd)
            except (MaintenanceBindError, ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": str(exc)}
            print(json.dumps(reply), flush=True)
            if isinstance(cmd, dict) and cmd.get("op") == "quit":
                break
    finally:
        await service.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/maint_standalone.py")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--prefix", default=None, help="overlay prefix (admins come from it)")
    parser.add_argument("--uuid", default="00000000-0000-0000-0000-000000000000")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
