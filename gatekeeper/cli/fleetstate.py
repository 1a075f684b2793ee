"""Shared by the fleet commands: opening the server's registry from the CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gatekeeper.server.registry import MachineRecord, RegistryError
from gatekeeper.server.sqlite_registry import SqliteRegistry

DEFAULT_STATE_DIR = "/var/lib/gatekeeper"


class CliError(RuntimeError):
    """One line for stderr, exit status 1."""


def add_state_dir(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """`--state-dir` on a command; `nested` for a subcommand of a command that has it too.

    A nested one has no default of its own: argparse would otherwise let the subcommand's
    default overwrite what was given before it (`machines --state-dir X remove U` must use
    X). The top-level option's default stands.
    """
    parser.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS if nested else DEFAULT_STATE_DIR,
        help=f"the server's state directory (default {DEFAULT_STATE_DIR})",
    )


def open_registry(
    state_dir: str, *, create: bool = False, readonly: bool = False
) -> SqliteRegistry:
    """The registry for a CLI command; `readonly` for commands that only read it.

    A read-only open writes nothing (no schema, no migration, no WAL switch), so it works on
    a read-only file or file system.
    """
    path = Path(state_dir)
    if not create and not (path / "registry.sqlite3").exists():
        raise CliError(f"no registry in {path}: is that the server's --state-dir?")
    try:
        return SqliteRegistry(path, readonly=readonly)
    except RegistryError as exc:
        raise CliError(str(exc)) from None


def machines_by_uuid(registry: SqliteRegistry, node_uuid: str) -> list[MachineRecord]:
    wanted = node_uuid.strip().lower()
    return [m for m in registry.machines() if m.node_uuid.lower() == wanted]


def fail(command: str, message: str) -> int:
    print(f"gatekeeper {command}: {message}", file=sys.stderr)
    return 1
