"""`gatekeeper logs UUID [--follow]` and `gatekeeper events [--follow] [--machine UUID]`.

Both read the journals the server keeps in its state directory (bounded: see
`gatekeeper.server.journal`), so they work while the server runs or not; `--follow` keeps
printing new entries as the server appends them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gatekeeper.cli.fleetstate import CliError, add_state_dir, fail, machines_by_uuid, open_registry
from gatekeeper.cli.token import duration_arg
from gatekeeper.server.escape import shown
from gatekeeper.server.events import EVENTS_JOURNAL
from gatekeeper.server.fleet import events_dir, logs_dir
from gatekeeper.server.journal import entry_time, read_journal
from gatekeeper.server.registry import RegistryError, machine_key

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
    add_state_dir(logs)
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
    add_state_dir(events)
    events.set_defaults(func=cmd_events)


def _journal_for(state_dir: str, node_uuid: str) -> Path:
    try:
        with open_registry(state_dir, readonly=True) as registry:
            found = machines_by_uuid(registry, node_uuid)
    except RegistryError as exc:
        raise CliError(str(exc)) from None
    if len(found) > 1:
        raise CliError(
            f"{len(found)} machines share UUID '{shown(node_uuid, 64)}' (different unique tokens)"
        )
    # A removed machine's logs stay until rotated away: try the key of a machine without a
    # unique token, which is what the record would have said.
    key = found[0].machine_key if found else machine_key(node_uuid.strip(), None)
    path = logs_dir(Path(state_dir)) / f"{key}.jsonl"
    if not found and not path.exists():
        raise CliError(f"no machine with UUID '{shown(node_uuid, 64)}' and no logs from one")
    return path


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


def cmd_logs(args: argparse.Namespace) -> int:
    try:
        path = _journal_for(args.state_dir, args.node_uuid)
    except CliError as exc:
        return fail("logs", str(exc))
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        for entry in _recent(read_journal(path, follow=args.follow), args.since):
            _print(json.dumps(entry) if args.json else format_log(entry))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    if not (state / "registry.sqlite3").exists():
        return fail("events", f"no registry in {state}: is that the server's --state-dir?")
    wanted = args.machine.strip().lower() if args.machine else None
    path = events_dir(state) / f"{EVENTS_JOURNAL}.jsonl"
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        for entry in _recent(read_journal(path, follow=args.follow), args.since):
            if wanted and str(entry.get("machine", "")).lower() != wanted:
                continue
            _print(json.dumps(entry) if args.json else format_event(entry))
    sys.stdout.flush()
    return 0
