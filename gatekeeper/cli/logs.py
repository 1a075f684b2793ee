"""`gatekeeper logs UUID [--follow]` and `gatekeeper events [--follow] [--machine UUID]`.

Both read what the server stored, so they work while the server runs or not; `--follow`
keeps printing new entries as they are stored. With the default SQLite registry they read the
journals in --state-dir; with `--registry postgresql://...` they read the registry's tables,
which hold what every server of the fleet received.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatekeeper.cli.fleetstate import (
    CliError,
    add_state_dir,
    fail,
    machines_by_uuid,
    open_registry_for,
)
from gatekeeper.cli.token import duration_arg
from gatekeeper.server.escape import shown
from gatekeeper.server.events import EVENTS_JOURNAL
from gatekeeper.server.fleet import events_dir, logs_dir
from gatekeeper.server.journal import entry_time, read_journal
from gatekeeper.server.registry import RegistryError, machine_key
from gatekeeper.server.registry_url import parse_registry_url, read_password_file

if TYPE_CHECKING:
    from gatekeeper.server.pg_telemetry import PostgresTelemetryReader

SINCE_HELP = "only what the server received in this last stretch (30s, 10m, 2h, 7d)"


def _recent(entries: Iterator[dict[str, Any]], since: float | None) -> Iterator[dict[str, Any]]:
    """The entries stored within the last `since` seconds (all of them without `since`)."""
    if since is None:
        yield from entries
        return
    cutoff = time.time() - since
    for entry in entries:
        stored = entry_time(entry)
        if stored is None or stored >= cutoff:
            yield entry


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    logs = subparsers.add_parser(
        "logs",
        help="print a machine's logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    logs.add_argument("node_uuid", metavar="UUID")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--json", action="store_true", help="one stored JSON object per line")
    logs.add_argument("--since", type=duration_arg, metavar="DURATION", help=SINCE_HELP)
    add_state_dir(logs, registry=True)
    logs.set_defaults(func=cmd_logs)

    events = subparsers.add_parser(
        "events",
        help="print machine events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    events.add_argument("--machine", metavar="UUID", help="only this machine's events")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("--json", action="store_true", help="one stored JSON object per line")
    events.add_argument("--since", type=duration_arg, metavar="DURATION", help=SINCE_HELP)
    add_state_dir(events, registry=True)
    events.set_defaults(func=cmd_events)


def _machine_key(args: argparse.Namespace) -> tuple[str, bool]:
    """The key the machine's logs are stored under, and whether the registry knows it."""
    node_uuid = args.node_uuid
    try:
        with open_registry_for(args, readonly=True) as registry:
            found = machines_by_uuid(registry, node_uuid)
    except RegistryError as exc:
        raise CliError(str(exc)) from None
    if len(found) > 1:
        raise CliError(
            f"{len(found)} machines share UUID '{shown(node_uuid, 64)}' (different unique tokens)"
        )
    # A removed machine's logs stay until retention drops them: try the key of a machine
    # without a unique token, which is what the record would have said.
    if found:
        return found[0].machine_key, True
    return machine_key(node_uuid.strip(), None), False


def _no_logs(node_uuid: str) -> CliError:
    return CliError(f"no machine with UUID '{shown(node_uuid, 64)}' and no logs from one")


def _postgres_reader(args: argparse.Namespace) -> PostgresTelemetryReader | None:
    """The reader for a postgresql:// --registry; None for SQLite (journals in --state-dir)."""
    try:
        target = parse_registry_url(args.registry, Path(args.state_dir))
        if target.kind != "postgresql":
            return None
        from gatekeeper.server.pg_telemetry import PostgresTelemetryReader

        file = args.registry_password_file
        password = read_password_file(Path(file)) if file else None
        return PostgresTelemetryReader(target.where, shown=target.where, password=password)
    except RegistryError as exc:
        raise CliError(str(exc)) from None


def format_log(entry: dict[str, Any]) -> str:
    """One terminal line; every field came from a machine, so each is escaped (`shown`)."""
    when = shown(entry.get("talos-time") or entry.get("received") or "-", 64)
    level = shown(entry.get("talos-level") or "-", 32)
    facility = entry.get("facility")
    where = f"{shown(facility, 32)}.{level}" if facility else level
    return f"{when} {where}: {shown(entry.get('msg', ''), None)}"


def format_event(entry: dict[str, Any]) -> str:
    data = entry.get("data")
    body = json.dumps(data, sort_keys=True) if data is not None else shown(entry.get("type", ""))
    machine, kind = shown(entry.get("machine", "-"), 64), shown(entry.get("type", "-"))
    return f"{shown(entry.get('time', '-'), 64)} {machine} {kind}: {body}"


def _print(line: str) -> None:
    print(line, flush=True)


def _print_all(entries: Iterator[dict[str, Any]], line: Callable[[dict[str, Any]], str]) -> None:
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        for entry in entries:
            _print(line(entry))


def cmd_logs(args: argparse.Namespace) -> int:
    def line(entry: dict[str, Any]) -> str:
        return json.dumps(entry) if args.json else format_log(entry)

    try:
        key, known = _machine_key(args)
        reader = _postgres_reader(args)
        if reader is not None:
            with contextlib.closing(reader):
                if not known and not reader.has_logs(key):
                    raise _no_logs(args.node_uuid)
                _print_all(reader.logs(key, since=args.since, follow=args.follow), line)
            return 0
    except (CliError, RegistryError) as exc:
        return fail("logs", str(exc))
    path = logs_dir(Path(args.state_dir)) / f"{key}.jsonl"
    if not known and not path.exists():
        return fail("logs", str(_no_logs(args.node_uuid)))
    _print_all(_recent(read_journal(path, follow=args.follow), args.since), line)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    def line(entry: dict[str, Any]) -> str:
        return json.dumps(entry) if args.json else format_event(entry)

    wanted = args.machine.strip().lower() if args.machine else None
    try:
        reader = _postgres_reader(args)
        if reader is not None:
            with contextlib.closing(reader):
                entries = reader.events(machine=wanted, since=args.since, follow=args.follow)
                _print_all(entries, line)
            return 0
        # An SQLite registry: this state directory's own journal, if it is a server's.
        with open_registry_for(args, readonly=True):
            pass
    except (CliError, RegistryError) as exc:
        return fail("events", str(exc))
    path = events_dir(Path(args.state_dir)) / f"{EVENTS_JOURNAL}.jsonl"
    stored = _recent(read_journal(path, follow=args.follow), args.since)
    _print_all(
        (e for e in stored if not wanted or str(e.get("machine", "")).lower() == wanted), line
    )
    sys.stdout.flush()
    return 0
