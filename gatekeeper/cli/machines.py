"""`gatekeeper machines [--json]` and `gatekeeper machines remove UUID`.

Records come from the registry (read directly, so the list works with the server stopped);
live WireGuard data (connected, last handshake, current endpoint) from the running server's
admin socket, on demand. With no server running, those columns say so instead of guessing.
`remove` deletes the record and asks the running server to drop the peer from its device.
Removing does not ban: a machine holding a valid join token can provision again (revoke the
token for that).

CONFLICT names the address of the last machine refused for claiming a connected machine's
identity (the same UUID and unique token from another address: a cloned VM, or firmware that
gives every board one UUID), and how long ago. Listing only reads the registry, so it also
works on a read-only file or file system.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gatekeeper.cli.fleetstate import (
    CliError,
    add_state_dir,
    fail,
    machines_by_uuid,
    open_registry_for,
)
from gatekeeper.cli.token import print_table
from gatekeeper.server.admin import admin_request
from gatekeeper.server.audit import AUDIT_NAME, AuditLog, local_user, rfc3339
from gatekeeper.server.escape import shown
from gatekeeper.server.fleet import CONNECTED_WITHIN
from gatekeeper.server.registry import MachineRecord, RegistryError
from gatekeeper.server.sqlite_registry import SqliteRegistry


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    machines = subparsers.add_parser(
        "machines",
        help="list the server's machines, or remove one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    machines.add_argument("--json", action="store_true", help="print JSON")
    add_state_dir(machines, registry=True)
    machines.set_defaults(func=cmd_list)
    sub = machines.add_subparsers(dest="machines_command", required=False, metavar="COMMAND")
    remove = sub.add_parser("remove", help="drop a machine's record and WireGuard peer")
    remove.add_argument("node_uuid", metavar="UUID")
    add_state_dir(remove, nested=True, registry=True)
    remove.set_defaults(func=cmd_remove)


def machine_rows(
    records: list[MachineRecord], live: dict[str, dict[str, Any]] | None, now: float
) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        peer = live.get(r.public_key) if live is not None else None
        handshake = peer.get("last_handshake") if peer else None
        rows.append(
            {
                "uuid": r.node_uuid,
                "address": str(r.address),
                # None: unknown (no server running to ask).
                "connected": None
                if live is None
                else bool(handshake and now - handshake < CONNECTED_WITHIN),
                "last_handshake": rfc3339(handshake) if handshake else None,
                "endpoint": (peer.get("endpoint") if peer else None) or r.endpoint,
                "tunnel": r.tunnel,
                "version": r.talos_version,
                "registered": rfc3339(r.created),
                "public_key": r.public_key,
                # A second machine refused for claiming this identity while it was connected.
                "conflict": None
                if r.conflict_time is None
                else {"time": rfc3339(r.conflict_time), "from": r.conflict_from},
            }
        )
    return rows


def _conflict(record: MachineRecord, now: float) -> str:
    if record.conflict_time is None:
        return "-"
    ago = max(0.0, now - record.conflict_time)
    return f"{shown(record.conflict_from or '?', 48)} {ago:.0f}s ago"


def _ago(stamp: str | None, handshake: float | None, now: float) -> str:
    if not stamp or handshake is None:
        return "never"
    return f"{max(0, now - handshake):.0f}s ago"


def cmd_list(args: argparse.Namespace) -> int:
    try:
        # Listing only reads: it works on a read-only registry too.
        registry = open_registry_for(args, readonly=True)
        with registry:
            records = registry.machines()
    except (CliError, RegistryError) as exc:
        return fail("machines", str(exc))
    if isinstance(registry, SqliteRegistry) and registry.stale_wal:
        print(
            f"gatekeeper machines: {registry.path} is read-only and its last writer did not "
            "finish: the newest changes may be missing",
            file=sys.stderr,
        )
    try:
        reply = admin_request(Path(args.state_dir), {"op": "peers"})
    except (OSError, ValueError) as exc:
        return fail("machines", str(exc))
    live = None if reply is None else {p["public_key"]: p for p in reply.get("peers", [])}
    now = time.time()
    rows = machine_rows(records, live, now)
    if args.json:
        # JSON escapes every control character itself.
        print(json.dumps(rows, indent=2))
        return 0
    header = (
        "UUID", "ADDRESS", "CONNECTED", "LAST HANDSHAKE", "ENDPOINT", "TUNNEL", "VERSION",
        "CONFLICT",
    )  # fmt: skip
    table = []
    for row, record in zip(rows, records, strict=True):
        peer = live.get(record.public_key) if live else None
        connected = row["connected"]
        # Machines chose their UUID and version (and older registries kept them unchecked):
        # never raw control characters on the operator's terminal.
        table.append(
            (
                shown(row["uuid"], 64),
                row["address"],
                "?" if connected is None else ("yes" if connected else "no"),
                "?"
                if live is None
                else _ago(row["last_handshake"], peer and peer.get("last_handshake"), now),
                shown(row["endpoint"] or "-", 64),
                "yes" if row["tunnel"] else "no",
                shown(row["version"] or "-", 64),
                _conflict(record, now),
            )
        )
    print_table(header, table)
    conflicts = [r for r in records if r.conflict_time is not None]
    if conflicts:
        print(
            f"({len(conflicts)} with CONFLICT: another machine claimed that identity while it "
            "was connected and was refused; duplicate SMBIOS UUIDs need unique tokens)"
        )
    if live is None:
        print(f"(no server running on {args.state_dir}: live columns unknown)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    try:
        registry = open_registry_for(args)
        with registry:
            found = machines_by_uuid(registry, args.node_uuid)
            for record in found:
                registry.remove(record.machine_key)
    except (CliError, RegistryError) as exc:
        return fail("machines remove", str(exc))
    if not found:
        return fail("machines remove", f"no machine with UUID '{shown(args.node_uuid, 64)}'")
    now = time.time()
    audit = AuditLog(Path(args.state_dir) / AUDIT_NAME)
    try:
        for record in found:
            audit.write(
                now,
                "machine.remove",
                "ok",
                who=local_user(),
                node_uuid=record.node_uuid,
                address=str(record.address),
            )
    except OSError as exc:
        print(
            f"gatekeeper machines remove: removed, but the audit line was not written: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
    try:
        reply = admin_request(
            Path(args.state_dir),
            {
                "op": "forget",
                "public_keys": [r.public_key for r in found],
                "addresses": [str(r.address) for r in found],
            },
        )
    except (OSError, ValueError) as exc:
        return fail("machines remove", f"record removed, but the peer may remain: {exc}")
    for record in found:
        print(f"removed {shown(record.node_uuid, 64)} ({record.address})")
    if reply is not None and not reply.get("ok"):
        return fail("machines remove", f"the server could not drop the peer: {reply.get('error')}")
    return 0
