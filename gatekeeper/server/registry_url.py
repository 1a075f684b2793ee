"""`--registry URL`: which store holds the fleet (docs/registry.md).

- none: SQLite in the state directory (`STATE_DIR/registry.sqlite3`), as always;
- `sqlite:///PATH`: SQLite in the file PATH;
- `postgresql://USER@HOST:PORT/DB` or `postgresql://USER@/DB?host=/run/postgresql`: PostgreSQL.

A password never comes from the URL (argv is visible in ps): libpq reads `PGPASSWORD` and
`~/.pgpass` itself, and `--registry-password-file` names a file holding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from gatekeeper.server.registry import RegistryError
from gatekeeper.server.sqlite_registry import SqliteRegistry

if TYPE_CHECKING:
    # Imported where a postgresql:// registry is opened: psycopg (and libpq) are needed only
    # then, never by the machine agent, which shares the CLI's entry point.
    from gatekeeper.server.pg_registry import PostgresRegistry

USAGE = "use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"


@dataclass(frozen=True)
class RegistryTarget:
    kind: str  # "sqlite" or "postgresql"
    # The SQLite file, or the libpq URL (without a password).
    where: str


def parse_registry_url(url: str | None, state_dir: Path) -> RegistryTarget:
    if not url:
        return RegistryTarget("sqlite", str(state_dir / "registry.sqlite3"))
    if url.startswith("sqlite:"):
        parts = urlsplit(url)
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/") or parts.query or path.endswith("/"):
            raise RegistryError(f"--registry {url!r}: a SQLite registry is sqlite:///ABSOLUTE/FILE")
        return RegistryTarget("sqlite", path)
    if url.startswith(("postgresql://", "postgres://")):
        # Before psycopg: this needs none, and matters more than a missing libpq.
        if _has_password(url):
            raise RegistryError(NO_PASSWORD)
        conninfo = _conninfo()
        try:
            params = conninfo.conninfo_to_dict(url)
        except Exception as exc:  # psycopg.ProgrammingError, and libpq's own parse errors
            reason = " ".join(str(exc).split())
            raise RegistryError(f"--registry: not a valid PostgreSQL URL ({reason})") from None
        if params.get("password") is not None:  # ?password=...
            raise RegistryError(NO_PASSWORD)
        return RegistryTarget("postgresql", url)
    # Only the scheme: the rest may hold a password meant for some other store.
    scheme = url.partition(":")[0][:20]
    shown = scheme if scheme.isprintable() and scheme else "?"
    raise RegistryError(f"--registry: unknown kind of registry {shown!r}: {USAGE}")


def _conninfo() -> ModuleType:
    """psycopg's conninfo module; psycopg that cannot load libpq says so in one line."""
    try:
        from psycopg import conninfo
    except ImportError as exc:
        # psycopg's own message spans lines, one per implementation it tried (the last one
        # says why the system's libpq would not do): all of them, on one line.
        parts = [line.strip(" -").rstrip(".") for line in str(exc).splitlines()]
        said = "; ".join(p for p in parts if p and p != "Attempts made:") or type(exc).__name__
        raise RegistryError(
            f"--registry: PostgreSQL needs psycopg with libpq: install psycopg[binary] (pip) "
            f"or the system's libpq (Debian: libpq5); psycopg said: {said}"
        ) from None
    return conninfo


NO_PASSWORD = (
    "--registry: no password in the URL (ps shows it): use PGPASSWORD, ~/.pgpass or "
    "--registry-password-file"
)


def _has_password(url: str) -> bool:
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def read_password_file(path: Path) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise RegistryError(f"cannot read --registry-password-file {path}: {reason}") from None
    password = text.rstrip("\r\n")
    if not password:
        raise RegistryError(f"--registry-password-file {path} is empty")
    return password


def open_registry(
    url: str | None,
    state_dir: Path,
    *,
    readonly: bool = False,
    password_file: Path | None = None,
) -> SqliteRegistry | PostgresRegistry:
    """The registry `--registry` names (SQLite in `state_dir` without one)."""
    target = parse_registry_url(url, state_dir)
    if target.kind == "sqlite":
        if password_file is not None:
            raise RegistryError("--registry-password-file is for a postgresql:// registry")
        path = Path(target.where)
        return SqliteRegistry(path.parent, readonly=readonly, filename=path.name)
    from gatekeeper.server.pg_registry import PostgresRegistry

    password = read_password_file(password_file) if password_file is not None else None
    return PostgresRegistry(target.where, shown=target.where, password=password, readonly=readonly)
