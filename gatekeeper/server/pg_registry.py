"""The registry on PostgreSQL, for several servers sharing one fleet (docs/registry.md).

The store decides what must hold across servers: unique constraints on the address, the
public key and the machine key; a token use is one conditional UPDATE; the order of machines
and tokens is a store-assigned sequence (the schema and its migrations: `pg_schema.py`).
Every operation is one transaction, so a dropped connection leaves nothing half-written, and
one that failed because the connection broke is retried once on a fresh connection (how a
server rides out a PostgreSQL restart).

One connection per registry, guarded by a lock, as with SQLite: the server's store calls are
few and short, and one connection per server keeps a fleet of servers far below PostgreSQL's
connection limit. A store that cannot be
reached is `RegistryUnavailable` (the server answers UNAVAILABLE); everything else is one
`RegistryError` line naming the registry, never the password.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors

from gatekeeper.netaddr import ip_text, parse_ipv6
from gatekeeper.server import pg_schema
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
    RegistryUnavailable,
    ServerIdentity,
    TokenRefused,
    parse_endpoints,
)
from gatekeeper.server.tokens import TokenRecord, TokenState
from gatekeeper.wireguard.keys import PrivateKey

# pg_advisory_xact_lock key for --max-machines counts ("gk" in the top bytes).
_REGISTRATION_LOCK = 0x676B_0000_0002

_COLUMNS = (
    "machine_key, node_uuid, address, public_key, endpoint, tunnel, talos_version, created, "
    "updated, join_token_id, conflict_time, conflict_from, provisions, remote_address, owner"
)
_TOKEN_COLUMNS = "token_id, name, secret_hash, created, expires, max_uses, uses, revoked"

T = TypeVar("T")


def _record(row: tuple[Any, ...]) -> MachineRecord:
    (
        key, uuid, address, public_key, endpoint, tunnel, version, created, updated, token_id,
        conflict_time, conflict_from, provisions, remote, owner,
    ) = row  # fmt: skip
    return MachineRecord(
        machine_key=key,
        node_uuid=uuid,
        address=parse_ipv6(address),
        public_key=public_key,
        endpoint=endpoint,
        tunnel=bool(tunnel),
        talos_version=version,
        created=float(created),
        updated=float(updated),
        join_token_id=token_id,
        conflict_time=None if conflict_time is None else float(conflict_time),
        conflict_from=conflict_from,
        provisions=int(provisions),
        remote_address=remote,
        owner=owner,
    )


def _token(row: tuple[Any, ...]) -> TokenRecord:
    token_id, name, secret_hash, created, expires, max_uses, uses, revoked = row
    return TokenRecord(
        token_id=token_id,
        name=name,
        secret_hash=secret_hash,
        created=float(created),
        expires=None if expires is None else float(expires),
        max_uses=max_uses,
        uses=int(uses),
        revoked=None if revoked is None else float(revoked),
    )


def _first_line(exc: BaseException) -> str:
    """libpq's messages span lines (a hint after a tab): one line, whitespace collapsed."""
    return " ".join(str(exc).split()) or type(exc).__name__


# Every instance row, in the order heartbeat and instances() both return them.
_INSTANCE_ROWS = "SELECT name, endpoints, run_id, started, seen FROM instances ORDER BY name"


def _instance(row: tuple[Any, ...]) -> InstanceRecord:
    name, endpoints, run_id, started, seen = row
    return InstanceRecord(
        name=str(name),
        endpoints=parse_endpoints(endpoints),
        run_id=str(run_id),
        started=float(started),
        seen=float(seen),
    )


class PostgresChangeFeed:
    """LISTENs on the machines' change channel (pg_schema.CHANGE_CHANNEL) on a connection of
    its own. After the connection was lost (a PostgreSQL restart), notifications sent
    meanwhile are gone: the first wait on the new connection answers True, so the reconciler
    reads everything once, which catches up whatever happened."""

    MAX_KEYS = MAX_CHANGED_KEYS

    def __init__(self, conninfo: str, password: str | None, *, shown: str) -> None:
        self._conninfo = conninfo
        self._password = password
        self.shown = shown
        self._db: psycopg.Connection[tuple[Any, ...]] | None = None
        self.failure: str | None = None

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        kwargs: dict[str, Any] = {
            "connect_timeout": 3,
            "autocommit": True,
            "application_name": "gatekeeper-reconciler",
            # This connection only listens: a PostgreSQL host that vanished without a reset
            # (a failover, a lost host) would leave it waiting forever with nothing to say so.
            # TCP keepalives and a user timeout make such a connection break within ~15 s.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": 15000,
        }
        if self._password is not None:
            kwargs["password"] = self._password
        db = psycopg.connect(self._conninfo, **kwargs)
        db.execute(f"LISTEN {pg_schema.CHANGE_CHANNEL}")
        return db

    def wait(self, timeout: float) -> Changes | None:
        if self._db is None or self._db.closed or self._db.broken:
            self.close()
            try:
                self._db = self._connect()
            except psycopg.Error as exc:
                self.failure = _first_line(exc)
                time.sleep(timeout)
                return ANYTHING
            self.failure = None
            return ANYTHING  # what was sent while nobody listened is gone: read everything
        try:
            # Every notification that is already there, then back: one reconcile for many.
            keys: set[str] = set()
            got = False
            for note in self._db.notifies(timeout=timeout, stop_after=1):
                got = True
                keys.add(note.payload)
            # Bounded: a flood that never pauses still ends this wait (the rest is read by
            # the next one, after the pass).
            while got and len(keys) <= self.MAX_KEYS:
                more = list(self._db.notifies(timeout=0.0))
                if not more:
                    break
                keys.update(note.payload for note in more)
        except psycopg.Error as exc:
            self.failure = _first_line(exc)
            self.close()
            return ANYTHING
        if not got:
            return None
        # An empty payload comes from a trigger of the first version-4 release: it names no
        # machine.
        if "" in keys or len(keys) > self.MAX_KEYS:
            return ANYTHING
        return Changes(frozenset(keys))

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None


class _Retry(Exception):
    """The connection broke under an operation that may be run again on a fresh one."""


class PostgresRegistry:
    """`conninfo` is a libpq URL without a password; `password` from a file, if any."""

    def __init__(
        self,
        conninfo: str,
        *,
        shown: str,
        password: str | None = None,
        readonly: bool = False,
        connect_timeout: float = 3.0,
        statement_timeout: float = 5.0,
        answer_within: float = 6.0,
    ) -> None:
        self.shown = shown
        self.readonly = readonly
        self._conninfo = conninfo
        self._password = password
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._answer_within = answer_within
        self._lock = threading.Lock()
        self._db: psycopg.Connection[tuple[Any, ...]] | None = None
        # The operation in flight: since when, on which connection (see _watch).
        self._busy: tuple[float, psycopg.Connection[tuple[Any, ...]]] | None = None
        self._busy_lock = threading.Lock()
        self._expired = False
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="registry-watchdog", daemon=True)
        self._watchdog.start()
        try:
            self._run(self._check_version if readonly else self._migrate)
        except BaseException:
            self.close()
            raise

    # -- connections ---------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._db is not None and not self._db.closed and not self._db.broken:
            return self._db
        self._drop()
        kwargs: dict[str, Any] = {
            "connect_timeout": max(1, round(self._connect_timeout)),
            "autocommit": True,
            "application_name": "gatekeeper",
            # Bounded waits: a Provision must answer within its deadline, also on a store
            # that hangs or a lock held by a stuck transaction.
            "options": f"-c statement_timeout={int(self._statement_timeout * 1000)} "
            f"-c lock_timeout={int(self._statement_timeout * 1000)}",
        }
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            self._db = psycopg.connect(self._conninfo, **kwargs)
        except psycopg.Error as exc:
            raise self._connect_error(exc) from None
        return self._db

    def _connect_error(self, exc: psycopg.Error) -> RegistryError:
        """A login refused or a database missing stays so (fix the configuration); anything
        else is the store being away, which passes (RegistryUnavailable)."""
        text = _first_line(exc)
        if "password authentication failed" in text or "no password supplied" in text:
            return RegistryError(
                f"the registry {self.shown} refused the login: {text} (the password comes "
                "from PGPASSWORD, ~/.pgpass or --registry-password-file)"
            )
        if "does not exist" in text:
            return RegistryError(f"the registry {self.shown} cannot be used: {text}")
        if not isinstance(exc, psycopg.OperationalError):
            return RegistryError(f"registry {self.shown}: {text}")
        return RegistryUnavailable(self._unreachable(exc))

    def _unreachable(self, exc: BaseException) -> str:
        return f"the registry {self.shown} is unreachable: {_first_line(exc)}"

    def _drop(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
        self._db = None

    def _watch(self) -> None:
        """Cut the connection of an operation that took too long.

        statement_timeout is enforced by the PostgreSQL server; a server that is frozen (a
        stopped VM, a hung disk) or a network that drops packets enforces nothing, and libpq
        would wait for its answer forever, holding the Provision that waits on it. Shutting
        the socket down makes that wait end now, as a broken connection.
        """
        period = min(0.25, self._answer_within / 4)
        while not self._closed.wait(period):
            with self._busy_lock:
                busy = self._busy
                if busy is None or time.monotonic() - busy[0] < self._answer_within:
                    continue
                self._expired = True
                with contextlib.suppress(OSError, psycopg.Error):
                    fd = os.dup(busy[1].fileno())
                    with socket.socket(fileno=fd) as sock:
                        sock.shutdown(socket.SHUT_RDWR)

    def _run_once(self, op: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        db = self._connection()
        with self._busy_lock:
            self._busy = (time.monotonic(), db)
        try:
            return op(db)
        except (RegistryError, TokenRefused):
            raise
        except pgerrors.TransactionRollback as exc:
            # A deadlock or serialization failure: PostgreSQL rolled the transaction back,
            # so running it again is safe (once, as for a broken connection).
            raise _Retry(self._error(exc).args[0]) from None
        except psycopg.OperationalError as exc:
            if db.broken or db.closed:
                self._drop()
                raise _Retry(self._unreachable(exc)) from None
            raise self._error(exc) from None
        except psycopg.Error as exc:
            raise self._error(exc) from None
        finally:
            with self._busy_lock:
                self._busy = None

    def _error(self, exc: psycopg.Error) -> RegistryError:
        if isinstance(exc, pgerrors.UndefinedTable):
            return RegistryError(
                f"{self.shown} holds no gatekeeper registry (start a server on it first)"
            )
        if isinstance(exc, pgerrors.InsufficientPrivilege):
            return RegistryError(f"the registry {self.shown} refused: {_first_line(exc)}")
        if isinstance(exc, pgerrors.QueryCanceled | pgerrors.LockNotAvailable):
            return RegistryUnavailable(
                f"the registry {self.shown} did not answer in time: {_first_line(exc)}"
            )
        return RegistryError(f"registry {self.shown}: {_first_line(exc)}")

    def _run(self, op: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        """One operation (one transaction), retried once when the connection had broken:
        the server rolled the transaction back, so running it again is safe."""
        with self._lock:
            self._expired = False
            try:
                return self._run_once(op)
            except _Retry as exc:
                if self._expired:
                    # Not again: a store that did not answer would make the caller wait twice.
                    raise RegistryUnavailable(self._too_slow()) from exc
            try:
                return self._run_once(op)
            except _Retry as exc:
                if self._expired:
                    raise RegistryUnavailable(self._too_slow()) from exc
                raise RegistryUnavailable(str(exc)) from None

    def _too_slow(self) -> str:
        return f"the registry {self.shown} did not answer within {self._answer_within:g} s"

    @contextlib.contextmanager
    def _transaction(
        self, db: psycopg.Connection[tuple[Any, ...]]
    ) -> Iterator[psycopg.Cursor[Any]]:
        with db.transaction(), db.cursor() as cur:
            yield cur

    # -- schema (pg_schema.py) ----------------------------------------------------------

    def _migrate(self, db: psycopg.Connection[tuple[Any, ...]]) -> None:
        with self._transaction(db) as cur:
            pg_schema.migrate(cur, self.shown)

    def _check_version(self, db: psycopg.Connection[tuple[Any, ...]]) -> None:
        with self._transaction(db) as cur:
            pg_schema.check_version(cur, self.shown)

    # -- the Registry interface ----------------------------------------------------------

    def identity(self, create: Callable[[], ServerIdentity]) -> ServerIdentity:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> ServerIdentity:
            with self._transaction(db) as cur:
                fresh = create()
                # The first server to commit wins; every other one reads what it stored.
                cur.execute(
                    "INSERT INTO identity (id, private_key, installation_id) "
                    "VALUES (1, %s, %s) ON CONFLICT (id) DO NOTHING",
                    (fresh.private_key.base64(), fresh.installation_id),
                )
                cur.execute("SELECT private_key, installation_id FROM identity WHERE id = 1")
                row = cur.fetchone()
            assert row is not None
            return ServerIdentity(PrivateKey.from_base64(row[0]), row[1])

        return self._run(op)

    def _one(self, where: str, value: str) -> MachineRecord | None:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> MachineRecord | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM machines WHERE {where} = %s", (value,))
            found = row.fetchone()
            return None if found is None else _record(found)

        return self._run(op)

    def get(self, machine_key: str) -> MachineRecord | None:
        return self._one("machine_key", machine_key)

    def by_address(self, address: ipaddress.IPv6Address) -> MachineRecord | None:
        return self._one("address", ip_text(address))

    def by_public_key(self, public_key: str) -> MachineRecord | None:
        return self._one("public_key", public_key)

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
        when = time.time() if now is None else now

        def one(db: psycopg.Connection[tuple[Any, ...]], claim: Claim) -> RegistryError | None:
            try:
                # A savepoint per claim (a nested transaction block): a refused one is
                # undone alone, the others commit together.
                with db.transaction(), db.cursor() as cur:
                    self._claim(
                        cur, claim.record, claim.token_id, claim.max_machines, when, claim.replaces
                    )
            except pgerrors.UniqueViolation as exc:
                constraint = exc.diag.constraint_name or ""
                if "public_key" in constraint:
                    return KeyTaken("the public key belongs to another machine")
                if "address" in constraint:
                    return AddressTaken(f"{claim.record.address} belongs to another machine")
                raise
            except (RegistrationLimit, TokenRefused) as exc:
                return exc
            return None

        keys = sorted(
            {c.record.machine_key for c in claims} | {c.replaces for c in claims if c.replaces}
        )

        def op(db: psycopg.Connection[tuple[Any, ...]]) -> list[RegistryError | None]:
            with db.transaction():
                # Every machine's lock up front, in one order for all servers: two batches
                # sharing machines then wait for each other instead of deadlocking.
                db.execute(
                    "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT "
                    "hashtextextended(k, 0) AS h FROM unnest(%s::text[]) AS k ORDER BY h) AS s",
                    (keys,),
                )
                return [one(db, claim) for claim in claims]

        return self._run(op)

    def _claim(
        self,
        cur: psycopg.Cursor[Any],
        record: MachineRecord,
        token_id: str | None,
        max_machines: int | None,
        now: float,
        replaces: str | None,
    ) -> None:
        # Claims of one identity through two servers at once run one after the other, so a
        # new machine consumes one token use, not two.
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (record.machine_key,))
        if replaces is not None and replaces != record.machine_key:
            cur.execute("DELETE FROM machines WHERE machine_key = %s", (replaces,))
        cur.execute("SELECT 1 FROM machines WHERE machine_key = %s", (record.machine_key,))
        known = cur.fetchone() is not None
        if not known:
            if max_machines is not None:
                # The count and the insert must not interleave with another server's.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_REGISTRATION_LOCK,))
                cur.execute("SELECT count(*) FROM machines")
                row = cur.fetchone()
                if row is not None and int(row[0]) >= max_machines:
                    raise RegistrationLimit(f"registration limit of {max_machines} reached")
            if token_id is not None:
                self._use_token(cur, token_id, now)
        cur.execute(
            f"INSERT INTO machines ({_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, NULL, 1, %s, %s) "
            "ON CONFLICT (machine_key) DO UPDATE SET node_uuid = excluded.node_uuid, "
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
                record.tunnel,
                record.talos_version,
                record.created or now,
                now,
                token_id if not known and token_id else record.join_token_id,
                record.remote_address,
                record.owner,
            ),
        )

    def _use_token(self, cur: psycopg.Cursor[Any], token_id: str, now: float) -> None:
        # One conditional update: the row lock makes concurrent uses through any number of
        # servers count exactly, and a revocation committed first is seen.
        cur.execute(
            "UPDATE tokens SET uses = uses + 1 WHERE token_id = %s AND revoked IS NULL "
            "AND (expires IS NULL OR expires > %s) AND (max_uses IS NULL OR uses < max_uses)",
            (token_id, now),
        )
        if cur.rowcount == 1:
            return
        cur.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = %s", (token_id,))
        row = cur.fetchone()
        state = None if row is None else _token(row).state(now)
        raise TokenRefused(state if state is not TokenState.ACTIVE else TokenState.USED_UP)

    def record_conflict(self, machine_key: str, when: float, source: str) -> None:
        self._run(
            lambda db: db.execute(
                "UPDATE machines SET conflict_time = %s, conflict_from = %s WHERE machine_key = %s",
                (when, source, machine_key),
            )
        )

    def update_endpoints(self, endpoints: Mapping[str, str]) -> None:
        if not endpoints:
            return

        def op(db: psycopg.Connection[tuple[Any, ...]]) -> None:
            with self._transaction(db) as cur:
                cur.executemany(
                    "UPDATE machines SET endpoint = %s WHERE machine_key = %s",
                    [(endpoint, key) for key, endpoint in endpoints.items()],
                )

        self._run(op)

    def machines(self) -> list[MachineRecord]:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> list[MachineRecord]:
            rows = db.execute(f"SELECT {_COLUMNS} FROM machines ORDER BY seq").fetchall()
            return [_record(row) for row in rows]

        return self._run(op)

    def machine_count(self) -> int:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> int:
            row = db.execute("SELECT count(*) FROM machines").fetchone()
            return int(row[0]) if row else 0

        return self._run(op)

    def machines_matching(
        self, *, machine_keys: Collection[str] = (), public_keys: Collection[str] = ()
    ) -> list[MachineRecord]:
        by_machine, by_public = list(machine_keys), list(public_keys)

        def op(db: psycopg.Connection[tuple[Any, ...]]) -> list[MachineRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM machines "
                "WHERE machine_key = ANY(%s) OR public_key = ANY(%s)",
                (by_machine, by_public),
            ).fetchall()
            return [_record(row) for row in rows]

        return self._run(op)

    def remove(self, machine_key: str) -> bool:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> bool:
            cur = db.execute("DELETE FROM machines WHERE machine_key = %s", (machine_key,))
            return cur.rowcount > 0

        return self._run(op)

    def set_owner(self, machine_key: str, instance: str) -> bool:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> bool:
            cur = db.execute(
                "UPDATE machines SET owner = %s WHERE machine_key = %s "
                "AND owner IS DISTINCT FROM %s",
                (instance, machine_key, instance),
            )
            return cur.rowcount > 0

        return self._run(op)

    def heartbeat(
        self, me: InstanceRecord, *, take_over: bool, replaces: str | None = None
    ) -> list[InstanceRecord]:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> list[InstanceRecord]:
            with self._transaction(db) as cur:
                # The database server's clock decides who is stale: the instances' hosts may
                # disagree by seconds (an NTP step), and one clock for all cannot.
                cur.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
                clock = cur.fetchone()
                assert clock is not None  # a SELECT without FROM answers one row
                now = float(clock[0])
                stale = now - INSTANCE_STALE_AFTER
                cur.execute(
                    "INSERT INTO instances (name, endpoints, run_id, started, seen) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                    "endpoints = excluded.endpoints, run_id = excluded.run_id, "
                    "started = excluded.started, seen = excluded.seen "
                    "WHERE instances.run_id IN (excluded.run_id, %s) OR instances.seen < %s",
                    (
                        me.name,
                        json.dumps(me.endpoints),
                        me.run_id,
                        me.started,
                        now,
                        replaces or me.run_id,
                        stale,
                    ),
                )
                if cur.rowcount == 0:
                    cur.execute("SELECT run_id FROM instances WHERE name = %s", (me.name,))
                    row = cur.fetchone()
                    raise InstanceInUse(me.name, str(row[0]) if row else "")
                if take_over:
                    # Row locks decide: of two survivors taking over at once, each machine
                    # goes to the first to commit; the second finds it owned by a live one.
                    cur.execute(
                        "UPDATE machines SET owner = %s WHERE owner IS NULL OR owner NOT IN "
                        "(SELECT name FROM instances WHERE seen >= %s)",
                        (me.name, stale),
                    )
                cur.execute(_INSTANCE_ROWS)
                rows = cur.fetchall()
            # `seen` back on the caller's clock, so that InstanceRecord.live(its now) holds.
            return [
                dataclasses.replace(i, seen=i.seen - now + me.seen) for i in map(_instance, rows)
            ]

        return self._run(op)

    def instances(self, now: float) -> list[InstanceRecord]:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> list[InstanceRecord]:
            clock = db.execute(
                "SELECT extract(epoch FROM clock_timestamp())::float8, to_regclass('instances')"
            ).fetchone()
            assert clock is not None  # a SELECT without FROM answers one row
            if clock[1] is None:
                return []  # a registry from before instances, opened read only
            rows = db.execute(_INSTANCE_ROWS).fetchall()
            # From the database server's clock, which wrote `seen`, to the caller's.
            return [
                dataclasses.replace(i, seen=i.seen - float(clock[0]) + now)
                for i in map(_instance, rows)
            ]

        return self._run(op)

    def leave(self, me: InstanceRecord) -> None:
        self._run(
            lambda db: db.execute(
                "DELETE FROM instances WHERE name = %s AND run_id = %s", (me.name, me.run_id)
            )
        )

    def change_feed(self) -> PostgresChangeFeed:
        return PostgresChangeFeed(self._conninfo, self._password, shown=self.shown)

    def add_token(self, token: TokenRecord) -> None:
        self._run(
            lambda db: db.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                token.columns(),
            )
        )

    def token(self, token_id: str) -> TokenRecord | None:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> TokenRecord | None:
            row = db.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = %s", (token_id,)
            ).fetchone()
            return None if row is None else _token(row)

        return self._run(op)

    def tokens(self) -> list[TokenRecord]:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> list[TokenRecord]:
            rows = db.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY seq").fetchall()
            return [_token(row) for row in rows]

        return self._run(op)

    def revoke_token(self, token_id: str, when: float) -> bool:
        def op(db: psycopg.Connection[tuple[Any, ...]]) -> bool:
            cur = db.execute(
                "UPDATE tokens SET revoked = %s WHERE token_id = %s AND revoked IS NULL",
                (when, token_id),
            )
            return cur.rowcount > 0

        return self._run(op)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._drop()

    def __enter__(self) -> PostgresRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
