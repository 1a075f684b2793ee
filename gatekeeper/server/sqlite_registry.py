"""The embedded registry on SQLite, under the server's state directory.

Every SQLite failure becomes one `RegistryError` line that names the file and what to do
(a full disk, a corrupt file, a read-only file), never a traceback. `readonly=True` opens the
file without writing anything to it, so `gatekeeper machines` works on a read-only copy or
file system too.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path

from gatekeeper.netaddr import ip_text, parse_ipv6
from gatekeeper.server.registry import (
    ANYTHING,
    INSTANCE_STALE_AFTER,
    MAX_CHANGED_KEYS,
    AddressTaken,
    Changes,
    Claim,
    InstanceInUse,
    InstanceRecord,
    KeyTaken,
    MachineRecord,
    RegistrationLimit,
    RegistryError,
    ServerIdentity,
    TokenRefused,
    parse_endpoints,
)
from gatekeeper.server.tokens import TokenRecord, TokenState
from gatekeeper.wireguard.keys import PrivateKey

SCHEMA = """
CREATE TABLE IF NOT EXISTS identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    private_key TEXT NOT NULL,
    installation_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS machines (
    machine_key TEXT PRIMARY KEY,
    node_uuid TEXT NOT NULL,
    address TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    endpoint TEXT,
    tunnel INTEGER NOT NULL DEFAULT 0,
    talos_version TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS machine_change_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    public_key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    endpoints TEXT NOT NULL,
    run_id TEXT NOT NULL,
    started REAL NOT NULL,
    seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    max_uses INTEGER,
    uses INTEGER NOT NULL DEFAULT 0,
    revoked REAL
);
"""
# One public key names one machine: a unique index, so no sequence of writes (nor a crash
# between two of them) can leave two records pointing at one WireGuard peer.
_KEY_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS machines_public_key_unique ON machines (public_key)"

# Every change to a machine's peer is logged with the public key(s) it touches (OLD and NEW
# of a re-key), in the writer's transaction: SqliteChangeFeed reads the log from where it
# left off, and a pass then reads only those machines. SQLite has one writer at a time, so
# seq follows commit order. The log keeps its last LOG_KEEP entries or more; a reader that
# fell further behind sees the gap and reads everything. One transaction, so no writer in
# another process runs between dropping the counter's triggers (before the log) and these.
LOG_KEEP = 10000
_TRIGGERS = f"""
BEGIN IMMEDIATE;
DROP TRIGGER IF EXISTS machines_added;
DROP TRIGGER IF EXISTS machines_removed;
DROP TRIGGER IF EXISTS machines_changed;
DROP TABLE IF EXISTS machine_changes;
CREATE TRIGGER IF NOT EXISTS machines_logged_insert AFTER INSERT ON machines
    BEGIN INSERT INTO machine_change_log (public_key) VALUES (NEW.public_key); END;
CREATE TRIGGER IF NOT EXISTS machines_logged_delete AFTER DELETE ON machines
    BEGIN INSERT INTO machine_change_log (public_key) VALUES (OLD.public_key); END;
CREATE TRIGGER IF NOT EXISTS machines_logged_update
    AFTER UPDATE OF public_key, address, tunnel, owner ON machines
    BEGIN
        INSERT INTO machine_change_log (public_key) VALUES (OLD.public_key);
        INSERT INTO machine_change_log (public_key)
            SELECT NEW.public_key WHERE NEW.public_key IS NOT OLD.public_key;
    END;
CREATE TRIGGER IF NOT EXISTS machine_change_log_pruned
    AFTER INSERT ON machine_change_log WHEN NEW.seq % 1000 = 0
    BEGIN DELETE FROM machine_change_log WHERE seq <= NEW.seq - {LOG_KEEP}; END;
COMMIT;
"""


# Columns added after the first release, applied to registries that lack them.
_MIGRATIONS = (
    ("machines", "join_token_id", "TEXT"),
    ("machines", "conflict_time", "REAL"),
    ("machines", "conflict_from", "TEXT"),
    ("machines", "provisions", "INTEGER NOT NULL DEFAULT 0"),
    ("machines", "remote_address", "TEXT"),
    ("machines", "owner", "TEXT"),
)

_COLUMN_NAMES = (
    "machine_key",
    "node_uuid",
    "address",
    "public_key",
    "endpoint",
    "tunnel",
    "talos_version",
    "created",
    "updated",
    "join_token_id",
    "conflict_time",
    "conflict_from",
    "provisions",
    "remote_address",
    "owner",
)
_COLUMNS = ", ".join(_COLUMN_NAMES)
# What a claim writes: the conflict columns are set by record_conflict alone.
_WRITTEN = ", ".join((*_COLUMN_NAMES[:10], "provisions", "remote_address", "owner"))
_TOKEN_COLUMNS = "token_id, name, secret_hash, created, expires, max_uses, uses, revoked"


def _record(row: tuple[object, ...]) -> MachineRecord:
    (
        key, uuid, address, public_key, endpoint, tunnel, version, created, updated, token_id,
        conflict_time, conflict_from, provisions, remote, owner,
    ) = row  # fmt: skip
    return MachineRecord(
        machine_key=str(key),
        node_uuid=str(uuid),
        address=parse_ipv6(str(address)),
        public_key=str(public_key),
        endpoint=None if endpoint is None else str(endpoint),
        tunnel=bool(tunnel),
        talos_version=str(version),
        created=float(created),  # type: ignore[arg-type]
        updated=float(updated),  # type: ignore[arg-type]
        join_token_id=None if token_id is None else str(token_id),
        conflict_time=None if conflict_time is None else float(conflict_time),  # type: ignore[arg-type]
        conflict_from=None if conflict_from is None else str(conflict_from),
        provisions=int(provisions or 0),  # type: ignore[call-overload]
        remote_address=None if remote is None else str(remote),
        owner=None if owner is None else str(owner),
    )


def _no_space(path: Path) -> bool:
    """An I/O error on a file system with no block left: SQLite says "disk I/O error" when a
    write-ahead log append hits ENOSPC."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 << 10


def explain(path: Path, exc: sqlite3.Error | OSError) -> str:
    """One line for an SQLite (or file) failure on the registry: what it means, what to do."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return f"the disk holding the registry {path} is full: free some space and try again"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"the registry {path} is read-only: this command needs to write to it"
        return f"cannot open the registry {path}: {exc.strerror or exc}"
    name = getattr(exc, "sqlite_errorname", "")
    text = str(exc)
    if (
        name == "SQLITE_FULL"
        or "disk is full" in text
        or (name.startswith("SQLITE_IOERR") and _no_space(path))
    ):
        return f"the disk holding the registry {path} is full: free some space and try again"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text:
        return (
            f"the registry {path} is corrupt ({text}): restore it from a backup "
            "(sqlite3's .recover can salvage what is left)"
        )
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return f"the registry {path} is read-only: this command needs to write to it"
    if name.startswith("SQLITE_CANTOPEN"):
        return f"cannot open the registry {path}: {text} (missing, or no permission)"
    if name == "SQLITE_BUSY" or "locked" in text:
        return f"the registry {path} is locked by another process: try again"
    return f"registry {path}: {text}"


def _token(row: tuple[object, ...]) -> TokenRecord:
    token_id, name, secret_hash, created, expires, max_uses, uses, revoked = row
    return TokenRecord(
        token_id=str(token_id),
        name=str(name),
        secret_hash=str(secret_hash),
        created=float(created),  # type: ignore[arg-type]
        expires=None if expires is None else float(expires),  # type: ignore[arg-type]
        max_uses=None if max_uses is None else int(max_uses),  # type: ignore[call-overload]
        uses=int(uses),  # type: ignore[call-overload]
        revoked=None if revoked is None else float(revoked),  # type: ignore[arg-type]
    )


# Every instance row, in the order heartbeat and instances() both return them.
_INSTANCE_ROWS = "SELECT name, endpoints, run_id, started, seen FROM instances ORDER BY name"


def _instance(row: tuple[object, ...]) -> InstanceRecord:
    name, endpoints, run_id, started, seen = row
    return InstanceRecord(
        name=str(name),
        endpoints=parse_endpoints(endpoints),
        run_id=str(run_id),
        started=float(started),  # type: ignore[arg-type]
        seen=float(seen),  # type: ignore[arg-type]
    )


class SqliteChangeFeed:
    """What changed in `machines`, written by any connection or process: the triggers' log
    (machine_change_log), read from the last seq seen on a connection of its own every POLL
    seconds. SQLite has no notification across processes; `PRAGMA data_version` (which moves
    with every commit) first tells whether reading the log is needed. Endpoint updates,
    heartbeats and tokens are not logged, so they wake nobody.
    """

    POLL = 0.2
    MAX_KEYS = MAX_CHANGED_KEYS

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._data_version = -1
        self._seq: int | None = None  # None: nothing read yet, so everything is news

    def _read(self) -> Changes | None:
        if self._db is None:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._data_version = -1
        version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        if version == self._data_version and self._seq is not None:
            return None
        self._data_version = version
        if self._seq is None:
            row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM machine_change_log")
            self._seq = int(row.fetchone()[0])
            return ANYTHING
        rows = self._db.execute(
            "SELECT seq, public_key FROM machine_change_log WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._seq, self.MAX_KEYS + 1),
        ).fetchall()
        if not rows:
            newest = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM machine_change_log")
            if int(newest.fetchone()[0]) < self._seq:  # another registry file took its place
                self._seq = None
                return self._read()
            return None
        gap = int(rows[0][0]) != self._seq + 1  # pruned before this reader saw it
        if gap or len(rows) > self.MAX_KEYS:
            self._seq = None
            self._read()  # on from the newest entry
            return ANYTHING
        self._seq = int(rows[-1][0])
        return Changes(frozenset(str(row[1]) for row in rows))

    def wait(self, timeout: float) -> Changes | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                changes = self._read()
            except sqlite3.Error:
                self.close()  # reopened next time; the caller reads everything meanwhile
                self._seq = None
                time.sleep(min(self.POLL, timeout))
                return ANYTHING
            if changes is not None:
                return changes
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(self.POLL, left))

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


class SqliteRegistry:
    """One connection guarded by a lock; every write commits (fsync) before it returns."""

    def __init__(
        self, state_dir: str | Path, *, readonly: bool = False, filename: str = "registry.sqlite3"
    ) -> None:
        self.path = Path(state_dir) / filename
        self.readonly = readonly
        # A read-only view of a WAL file whose last writer died leaves out what is still in
        # its write-ahead log (see _open_readonly): the CLI says so.
        self.stale_wal = False
        self._lock = threading.Lock()
        if readonly:
            self._open_readonly()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The file holds the server's private key. SQLite gives its -wal and -shm files the
            # database file's mode, so that mode must be right before SQLite first writes.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{self.path}{suffix}", 0o600)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an answered Provision must survive a power cut or SIGKILL.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
            self._migrate()
            self._db.executescript(_TRIGGERS)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(explain(self.path, exc)) from None
        self._select = _COLUMNS

    def _open_readonly(self) -> None:
        try:
            try:
                self._db = self._connect_ro("mode=ro")
            except sqlite3.OperationalError:
                # A WAL file on a read-only file system cannot be opened even for reading
                # (SQLite needs its -shm index); as an immutable file it can.
                self._db = self._connect_ro("mode=ro&immutable=1")
                wal = Path(f"{self.path}-wal")
                self.stale_wal = wal.exists() and wal.stat().st_size > 0
            have = {row[1] for row in self._db.execute("PRAGMA table_info(machines)")}
            if not have:
                raise sqlite3.DatabaseError("no machines table: not a gatekeeper registry")
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(explain(self.path, exc)) from None
        # An older registry lacks the newer columns, and read-only it cannot be migrated.
        self._select = ", ".join(c if c in have else "NULL" for c in _COLUMN_NAMES)

    def _connect_ro(self, flags: str) -> sqlite3.Connection:
        db = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?{flags}",
            uri=True,
            check_same_thread=False,
            isolation_level=None,
        )
        try:
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock; SQLite failures come out as one RegistryError line."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise RegistryError(explain(self.path, exc)) from None

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """A read transaction (under WAL: one snapshot for its statements). Hold _locked."""
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        for table, column, decl in _MIGRATIONS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        indexes = {row[1] for row in self._db.execute("PRAGMA index_list(machines)")}
        if "machines_public_key_unique" in indexes:
            return
        # Older registries had a plain index, and a crash between the two writes of an
        # identity replacement could leave two rows with one key. Keep the newest such row
        # (the identity that last claimed the key), then make the key unique.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "DELETE FROM machines WHERE rowid NOT IN ("
                "SELECT rowid FROM (SELECT rowid, row_number() OVER ("
                "PARTITION BY public_key ORDER BY updated DESC, rowid DESC) AS n FROM machines) "
                "WHERE n = 1)"
            )
            self._db.execute("DROP INDEX IF EXISTS machines_public_key")
            self._db.execute(_KEY_INDEX)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def identity(self, create: Callable[[], ServerIdentity]) -> ServerIdentity:
        with self._locked():
            row = self._db.execute(
                "SELECT private_key, installation_id FROM identity WHERE id = 1"
            ).fetchone()
            if row is not None:
                return ServerIdentity(PrivateKey.from_base64(row[0]), row[1])
            fresh = create()
            self._db.execute(
                "INSERT INTO identity (id, private_key, installation_id) VALUES (1, ?, ?)",
                (fresh.private_key.base64(), fresh.installation_id),
            )
            return fresh

    def get(self, machine_key: str) -> MachineRecord | None:
        with self._locked():
            row = self._db.execute(
                f"SELECT {self._select} FROM machines WHERE machine_key = ?", (machine_key,)
            ).fetchone()
        return None if row is None else _record(row)

    def by_address(self, address: ipaddress.IPv6Address) -> MachineRecord | None:
        with self._locked():
            row = self._db.execute(
                f"SELECT {self._select} FROM machines WHERE address = ?", (ip_text(address),)
            ).fetchone()
        return None if row is None else _record(row)

    def by_public_key(self, public_key: str) -> MachineRecord | None:
        with self._locked():
            row = self._db.execute(
                f"SELECT {self._select} FROM machines WHERE public_key = ?", (public_key,)
            ).fetchone()
        return None if row is None else _record(row)

    def claim(
        self,
        record: MachineRecord,
        *,
        token_id: str | None = None,
        max_machines: int | None = None,
        now: float | None = None,
        replaces: str | None = None,
    ) -> None:
        (refused,) = self.claim_many([Claim(record, token_id, max_machines, replaces)], now=now)
        if refused is not None:
            raise refused

    def claim_many(
        self, claims: Sequence[Claim], *, now: float | None = None
    ) -> list[RegistryError | None]:
        now = time.time() if now is None else now
        out: list[RegistryError | None] = []
        with self._locked():
            # IMMEDIATE takes the write lock up front: the checks below and the writes are one
            # transaction even against `gatekeeper token revoke` in another process.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for claim in claims:
                    # A savepoint per claim: a refused one is undone alone.
                    self._db.execute("SAVEPOINT claim")
                    try:
                        gone = claim.replaces
                        if gone is not None and gone != claim.record.machine_key:
                            self._db.execute("DELETE FROM machines WHERE machine_key = ?", (gone,))
                        self._claim(claim.record, claim.token_id, claim.max_machines, now)
                    except (AddressTaken, KeyTaken, RegistrationLimit, TokenRefused) as exc:
                        self._db.execute("ROLLBACK TO claim")
                        out.append(exc)
                    else:
                        out.append(None)
                    self._db.execute("RELEASE claim")
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        return out

    def _claim(
        self, record: MachineRecord, token_id: str | None, max_machines: int | None, now: float
    ) -> None:
        known = self._db.execute(
            "SELECT 1 FROM machines WHERE machine_key = ?", (record.machine_key,)
        ).fetchone()
        if known is None:
            if max_machines is not None:
                (count,) = self._db.execute("SELECT count(*) FROM machines").fetchone()
                if count >= max_machines:
                    raise RegistrationLimit(f"registration limit of {max_machines} reached")
            if token_id is not None:
                row = self._db.execute(
                    f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
                ).fetchone()
                if row is None:
                    raise TokenRefused(None)
                state = _token(row).state(now)
                if state is not TokenState.ACTIVE:
                    raise TokenRefused(state)
                self._db.execute(
                    "UPDATE tokens SET uses = uses + 1 WHERE token_id = ?", (token_id,)
                )
        try:
            self._db.execute(
                f"INSERT INTO machines ({_WRITTEN}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?) "
                "ON CONFLICT(machine_key) DO UPDATE SET node_uuid = excluded.node_uuid, "
                "address = excluded.address, public_key = excluded.public_key, "
                "endpoint = excluded.endpoint, tunnel = excluded.tunnel, "
                "talos_version = excluded.talos_version, updated = excluded.updated, "
                "provisions = machines.provisions + 1, remote_address = excluded.remote_address, "
                "owner = excluded.owner",
                (
                    record.machine_key,
                    record.node_uuid,
                    ip_text(record.address),
                    record.public_key,
                    record.endpoint,
                    int(record.tunnel),
                    record.talos_version,
                    record.created or now,
                    now,
                    token_id if known is None and token_id else record.join_token_id,
                    record.remote_address,
                    record.owner,
                ),
            )
        except sqlite3.IntegrityError as exc:
            if "public_key" in str(exc):
                raise KeyTaken("the public key belongs to another machine") from None
            raise AddressTaken(f"{record.address} belongs to another machine") from None

    def record_conflict(self, machine_key: str, when: float, source: str) -> None:
        with self._locked():
            self._db.execute(
                "UPDATE machines SET conflict_time = ?, conflict_from = ? WHERE machine_key = ?",
                (when, source, machine_key),
            )

    def update_endpoints(self, endpoints: Mapping[str, str]) -> None:
        if not endpoints:
            return
        with self._locked():
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "UPDATE machines SET endpoint = ? WHERE machine_key = ?",
                    [(endpoint, key) for key, endpoint in endpoints.items()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def machines(self) -> list[MachineRecord]:
        with self._locked():
            rows = self._db.execute(
                f"SELECT {self._select} FROM machines ORDER BY created"
            ).fetchall()
        return [_record(row) for row in rows]

    def machine_count(self) -> int:
        with self._locked():
            (count,) = self._db.execute("SELECT count(*) FROM machines").fetchone()
        return int(count)

    def machines_matching(
        self, *, machine_keys: Collection[str] = (), public_keys: Collection[str] = ()
    ) -> list[MachineRecord]:
        found: dict[str, MachineRecord] = {}
        # One read transaction: every statement sees the same snapshot, even when another
        # process commits in between. Chunks stay below SQLite's limit on bound parameters
        # (32766; 999 before 3.32).
        with self._locked(), self._snapshot():
            for column, values in (("machine_key", machine_keys), ("public_key", public_keys)):
                wanted = list(values)
                for i in range(0, len(wanted), 900):
                    chunk = wanted[i : i + 900]
                    for row in self._db.execute(
                        f"SELECT {self._select} FROM machines WHERE {column} IN "
                        f"({', '.join('?' * len(chunk))})",
                        chunk,
                    ):
                        record = _record(row)
                        found[record.machine_key] = record
        return list(found.values())

    def remove(self, machine_key: str) -> bool:
        with self._locked():
            cur = self._db.execute("DELETE FROM machines WHERE machine_key = ?", (machine_key,))
        return cur.rowcount > 0

    def set_owner(self, machine_key: str, instance: str) -> bool:
        with self._locked():
            cur = self._db.execute(
                "UPDATE machines SET owner = ? WHERE machine_key = ? AND owner IS NOT ?",
                (instance, machine_key, instance),
            )
        return cur.rowcount > 0

    def heartbeat(
        self, me: InstanceRecord, *, take_over: bool, replaces: str | None = None
    ) -> list[InstanceRecord]:
        stale = me.seen - INSTANCE_STALE_AFTER
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO instances (name, endpoints, run_id, started, seen) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "endpoints = excluded.endpoints, run_id = excluded.run_id, "
                    "started = excluded.started, seen = excluded.seen "
                    "WHERE instances.run_id IN (excluded.run_id, ?) OR instances.seen < ?",
                    (
                        me.name,
                        json.dumps(me.endpoints),
                        me.run_id,
                        me.started,
                        me.seen,
                        replaces or me.run_id,
                        stale,
                    ),
                )
                if cur.rowcount == 0:
                    (holder,) = self._db.execute(
                        "SELECT run_id FROM instances WHERE name = ?", (me.name,)
                    ).fetchone()
                    raise InstanceInUse(me.name, str(holder))
                if take_over:
                    self._db.execute(
                        "UPDATE machines SET owner = ? WHERE owner IS NULL OR owner NOT IN "
                        "(SELECT name FROM instances WHERE seen >= ?)",
                        (me.name, stale),
                    )
                rows = self._db.execute(_INSTANCE_ROWS).fetchall()
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        return [_instance(row) for row in rows]

    def instances(self, now: float) -> list[InstanceRecord]:
        # One host, one clock: `seen` is already on the caller's.
        with self._locked():
            if not self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'instances'"
            ).fetchone():
                return []  # a registry from before instances, opened read only
            rows = self._db.execute(_INSTANCE_ROWS).fetchall()
        return [_instance(row) for row in rows]

    def leave(self, me: InstanceRecord) -> None:
        with self._locked():
            self._db.execute(
                "DELETE FROM instances WHERE name = ? AND run_id = ?", (me.name, me.run_id)
            )

    def change_feed(self) -> SqliteChangeFeed:
        return SqliteChangeFeed(self.path)

    def add_token(self, token: TokenRecord) -> None:
        with self._locked():
            self._db.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                token.columns(),
            )

    def token(self, token_id: str) -> TokenRecord | None:
        with self._locked():
            row = self._db.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
            ).fetchone()
        return None if row is None else _token(row)

    def tokens(self) -> list[TokenRecord]:
        with self._locked():
            rows = self._db.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created"
            ).fetchall()
        return [_token(row) for row in rows]

    def revoke_token(self, token_id: str, when: float) -> bool:
        with self._locked():
            cur = self._db.execute(
                "UPDATE tokens SET revoked = ? WHERE token_id = ? AND revoked IS NULL",
                (when, token_id),
            )
        return cur.rowcount > 0

    def integrity_check(self) -> str:
        with self._locked():
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
