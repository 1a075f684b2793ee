"""Shared by the fleet commands: opening the server's registry from the CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gatekeeper.server.registry import MachineRecord, RegistryError
from gatekeeper.server.registry_url import open_registry as open_registry_url
from gatekeeper.server.sqlite_registry import SqliteRegistry

if TYPE_CHECKING:
    from gatekeeper.server.pg_registry import PostgresRegistry

DEFAULT_STATE_DIR = "/var/lib/gatekeeper"


class CliError(RuntimeError):
    """One line for stderr, exit status 1."""


def add_state_dir(
    parser: argparse.ArgumentParser, *, nested: bool = False, registry: bool = False
) -> None:
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
    if not registry:
        return
    parser.add_argument(
        "--registry",
        metavar="URL",
        default=argparse.SUPPRESS if nested else None,
        help="the server's --registry: sqlite:///FILE or postgresql://USER@HOST:PORT/DB "
        "(default: SQLite in --state-dir)",
    )
    parser.add_argument(
        "--registry-password-file",
        metavar="FILE",
        default=argparse.SUPPRESS if nested else None,
        help="PostgreSQL password (else PGPASSWORD or ~/.pgpass; never in the URL)",
    )


def open_registry(
    state_dir: str,
    *,
    create: bool = False,
    readonly: bool = False,
    registry: str | None = None,
    password_file: str | None = None,
) -> SqliteRegistry | PostgresRegistry:
    """The registry for a CLI command; `readonly` for commands that only read it.

    A read-only open writes nothing (no schema, no migration, no WAL switch), so it works on
    a read-only file or file system. `registry` is a `--registry` URL (docs/registry.md).
    """
    path = Path(state_dir)
    if registry is None and not create and not (path / "registry.sqlite3").exists():
        raise CliError(f"no registry in {path}: is that the server's --state-dir?")
    if registry is not None and registry.startswith("sqlite:") and not create:
        file = Path(registry.removeprefix("sqlite://"))
        if file.is_absolute() and not file.exists():
            raise CliError(f"no registry at {file}: is that the server's --registry?")
    try:
        return open_registry_url(
            registry,
            path,
            readonly=readonly,
            password_file=Path(password_file) if password_file else None,
        )
    except RegistryError as exc:
        raise CliError(str(exc)) from None


def open_registry_for(
    args: argparse.Namespace, *, create: bool = False, readonly: bool = False
) -> SqliteRegistry | PostgresRegistry:
    """`open_registry` with a command's --state-dir, --registry and --registry-password-file."""
    return open_registry(
        args.state_dir,
        create=create,
        readonly=readonly,
        registry=getattr(args, "registry", None),
        password_file=getattr(args, "registry_password_file", None),
    )


def machines_by_uuid(
    registry: SqliteRegistry | PostgresRegistry, node_uuid: str
) -> list[MachineRecord]:
    wanted = node_uuid.strip().lower()
    return [m for m in registry.machines() if m.node_uuid.lower() == wanted]


def duration(seconds: float) -> str:
    """A span as people read it in a table: 40s, 5m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(0.0, seconds):.0f}s"


def fail(command: str, message: str) -> int:
    print(f"gatekeeper {command}: {message}", file=sys.stderr)
    return 1
