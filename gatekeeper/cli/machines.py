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
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gatekeeper.cli.argtypes import seconds_in
from gatekeeper.cli.fleetstate import (
    CliError,
    add_state_dir,
    duration,
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
from gatekeeper.server.tokens import TokenRecord


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    machines = subparsers.add_parser(
        "machines",
        help="list the server's machines, or remove one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    machines.add_argument("--json", action="store_true", help="print JSON")
    which = machines.add_mutually_exclusive_group()
    which.add_argument("--connected", action="store_true", help="only connected machines")
    which.add_argument("--offline", action="store_true", help="only machines not connected")
    machines.add_argument("--token", metavar="ID", help="only machines that joined with token ID")
    machines.add_argument("--tunnel", action="store_true", help="only machines on the gRPC tunnel")
    machines.add_argument(
        "--watch", "-w", action="store_true", help="list again every --interval s, until Ctrl-C"
    )
    machines.add_argument(
        "--interval",
        type=seconds_in(0.1, 3600),
        default=2.0,
        help="seconds between lists (default 2)",
    )
    add_state_dir(machines, registry=True)
    machines.set_defaults(func=cmd_list)
    sub = machines.add_subparsers(dest="machines_command", required=False, metavar="COMMAND")
    remove = sub.add_parser("remove", help="drop a machine's record and WireGuard peer")
    remove.add_argument("node_uuid", metavar="UUID")
    add_state_dir(remove, nested=True, registry=True)
    remove.set_defaults(func=cmd_remove)


# A machine's join token expiring within this long is worth a warning.
TOKEN_WARN_WITHIN = 7 * 86400


def _warnings(
    r: MachineRecord,
    endpoint: str | None,
    token: TokenRecord | None,
    duplicates: Counter[str],
    now: float,
) -> list[str]:
    warnings = []
    if token is not None and token.revoked is not None:
        warnings.append("join token revoked: cannot provision again")
    elif token is not None and token.expires is not None and token.expires > now:
        left = token.expires - now
        if left < TOKEN_WARN_WITHIN:
            warnings.append(f"join token expires in {duration(left)}")
    if not r.tunnel and not endpoint:
        warnings.append("no endpoint")
    if r.tunnel:
        warnings.append("using the tunnel")
    if duplicates[r.node_uuid.lower()] > 1:
        warnings.append("duplicate UUID")
    return warnings


def machine_rows(
    records: list[MachineRecord],
    live: dict[str, dict[str, Any]] | None,
    now: float,
    tokens: dict[str, TokenRecord] | None = None,
) -> list[dict[str, Any]]:
    tokens = tokens or {}
    duplicates = Counter(r.node_uuid.lower() for r in records)
    rows = []
    for r in records:
        peer = live.get(r.public_key) if live is not None else None
        handshake = peer.get("last_handshake") if peer else None
        connected = None if live is None else bool(handshake and now - handshake < CONNECTED_WITHIN)
        endpoint = (peer.get("endpoint") if peer else None) or r.endpoint
        token = tokens.get(r.join_token_id) if r.join_token_id else None
        rows.append(
            {
                "uuid": r.node_uuid,
                "address": str(r.address),
                # None: unknown (no server running to ask).
                "connected": connected,
                "last_handshake": rfc3339(handshake) if handshake else None,
                # The last sign of life of a machine that is not connected: its last
                # handshake, or its last Provision when it never handshook.
                "offline_since": None
                if connected is not False
                else rfc3339(handshake or r.updated or r.created),
                "endpoint": endpoint,
                "remote_address": r.remote_address,
                "tunnel": r.tunnel,
                # The server instance holding the machine's link (docs/registry.md, Owners).
                "instance": r.owner,
                "version": r.talos_version,
                "registered": rfc3339(r.created),
                "public_key": r.public_key,
                "rx_bytes": peer.get("rx_bytes") if peer else None,
                "tx_bytes": peer.get("tx_bytes") if peer else None,
                "join_token": None
                if r.join_token_id is None
                else {"id": r.join_token_id, "name": token.name if token else None},
                "provisions": r.provisions,
                "warnings": _warnings(r, endpoint, token, duplicates, now),
                # A second machine refused for claiming this identity while it was connected.
                "conflict": None
                if r.conflict_time is None
                else {"time": rfc3339(r.conflict_time), "from": r.conflict_from},
            }
        )
    return rows


def _conflict(row: dict[str, Any], record: MachineRecord, now: float) -> str:
    if record.conflict_time is None:
        return "-"
    ago = max(0.0, now - record.conflict_time)
    return f"{shown(record.conflict_from or '?', 48)} {ago:.0f}s ago"


def _ago(stamp: str | None, handshake: float | None, now: float) -> str:
    if not stamp or handshake is None:
        return "never"
    return f"{max(0, now - handshake):.0f}s ago"


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    value, unit = float(n), "B"
    for bigger in ("K", "M", "G", "T"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n}B" if unit == "B" else f"{value:.1f}{unit}"


def _token_label(token: dict[str, Any] | None) -> str:
    if token is None:
        return "-"
    return f"{token['id']} ({token['name']})" if token["name"] else str(token["id"])


def select_rows(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.connected:
        rows = [r for r in rows if r["connected"] is True]
    if args.offline:
        rows = [r for r in rows if r["connected"] is False]
    if args.token:
        wanted = args.token.strip().partition(".")[0]  # a whole token pasted: its id part
        rows = [r for r in rows if (r["join_token"] or {}).get("id") == wanted]
    if args.tunnel:
        rows = [r for r in rows if r["tunnel"]]
    return rows


def _table(
    rows: list[dict[str, Any]],
    records: dict[str, MachineRecord],
    live: dict[str, dict[str, Any]] | None,
    now: float,
) -> None:
    header = (
        "UUID",
        "ADDRESS",
        "CONNECTED",
        "LAST HANDSHAKE",
        "ENDPOINT",
        "TUNNEL",
        "INSTANCE",
        "VERSION",
        "RX/TX",
        "REMOTE",
        "TOKEN",
        "PROV",
        "WARNINGS",
        "CONFLICT",
    )
    table = []
    for row in rows:
        peer = live.get(row["public_key"]) if live else None
        connected = row["connected"]
        if connected is None:
            state = "?"
        elif connected:
            state = "yes"
        else:
            since = (peer or {}).get("last_handshake")
            state = f"no, {duration(now - since)}" if since else "no"
        token = row["join_token"]
        # Machines chose their UUID and version (and older registries kept them unchecked):
        # never raw control characters on the operator's terminal.
        table.append(
            (
                shown(row["uuid"], 64),
                row["address"],
                state,
                "?"
                if live is None
                else _ago(row["last_handshake"], (peer or {}).get("last_handshake"), now),
                shown(row["endpoint"] or "-", 64),
                "yes" if row["tunnel"] else "no",
                shown(row["instance"] or "-", 64),
                shown(row["version"] or "-", 64),
                "?" if live is None else f"{_bytes(row['rx_bytes'])}/{_bytes(row['tx_bytes'])}",
                shown(row["remote_address"] or "-", 64),
                "-" if token is None else shown(_token_label(token), 64),
                str(row["provisions"]),
                ", ".join(row["warnings"]) or "-",
                _conflict(row, records[row["public_key"]], now),
            )
        )
    print_table(header, table)
    conflicts = [r for r in records.values() if r.conflict_time is not None]
    if conflicts:
        print(
            f"({len(conflicts)} with CONFLICT: another machine claimed that identity while it "
            "was connected and was refused; duplicate SMBIOS UUIDs need unique tokens)"
        )


def cmd_list(args: argparse.Namespace) -> int:
    if not args.watch:
        return _list_once(args)
    # --watch ends on Ctrl-C, also when it lands in the middle of a listing: the signal only
    # sets a flag, looked at between listings (as `gatekeeper status --watch`). A second
    # Ctrl-C interrupts at once, should a listing hang.
    stop = threading.Event()

    def on_interrupt(_sig: int, _frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_interrupt)
    while True:
        code = _list_once(args)
        if code != 0:
            return code
        if stop.wait(args.interval):
            return 0
        print(flush=True)


def _list_once(args: argparse.Namespace) -> int:
    try:
        # Listing only reads: it works on a read-only registry too.
        registry = open_registry_for(args, readonly=True)
        with registry:
            records = registry.machines()
            tokens = {t.token_id: t for t in registry.tokens()}
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
    if live is None and (args.connected or args.offline):
        return fail("machines", "--connected and --offline need the running server (none found)")
    now = time.time()
    rows = select_rows(machine_rows(records, live, now, tokens), args)
    if args.json:
        # JSON escapes every control character itself.
        print(json.dumps(rows, indent=None if args.watch else 2), flush=True)
        return 0
    _table(rows, {r.public_key: r for r in records}, live, now)
    if live is None:
        print(f"(no server running on {args.state_dir}: live columns unknown)")
    sys.stdout.flush()
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
