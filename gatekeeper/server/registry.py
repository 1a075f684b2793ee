"""The server's registry: the one narrow interface every storage backend implements.

SQLite (`sqlite_registry.py`) is the embedded default; PostgreSQL (`pg_registry.py`) lets
several servers share one fleet (`registry_url.py` picks one from `--registry`). Every write is
one compare-and-set style operation (`claim` fails on an address another machine holds), there
are no cross-call transactions and no in-process caches the caller relies on.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gatekeeper.server.tokens import TokenRecord, TokenState
from gatekeeper.wireguard.keys import PrivateKey


class RegistryError(RuntimeError):
    pass


class RegistryUnavailable(RegistryError):
    """The store cannot be reached right now (a PostgreSQL down or restarting): try again."""


class AddressTaken(RegistryError):
    """The address is held by another machine (lost a race with another server)."""


class KeyTaken(RegistryError):
    """The WireGuard public key is held by another machine's record."""


class RegistrationLimit(RegistryError):
    """A new machine would exceed the server's registration limit."""


class TokenRefused(RegistryError):
    """The join token cannot admit a new machine (any more): revoked, expired, used up, gone."""

    def __init__(self, state: TokenState | None) -> None:
        super().__init__(f"join token {state.value if state else 'unknown'}")
        self.state = state


@dataclass(frozen=True)
class ServerIdentity:
    private_key: PrivateKey
    installation_id: str


@dataclass(frozen=True)
class MachineRecord:
    # sha256 over node UUID and unique token: stable across re-provisions, and the unique
    # token (a secret) is never stored.
    machine_key: str
    node_uuid: str
    address: ipaddress.IPv6Address
    public_key: str
    endpoint: str | None = None
    tunnel: bool = False
    talos_version: str = ""
    created: float = 0.0
    updated: float = 0.0
    # The registry token the machine first joined with (None: fixed token or open server).
    join_token_id: str | None = None
    # The last refused newcomer claiming this identity while it was connected (a duplicate
    # SMBIOS UUID, a clone): when, and from which address. None: never.
    conflict_time: float | None = None
    conflict_from: str | None = None
    # How many Provisions the registry recorded for this machine (the claim counts them), and
    # where the last one came from (the gRPC peer, `[addr]:port`), for `gatekeeper machines`.
    provisions: int = 0
    remote_address: str | None = None
    # The server instance that holds the machine's link now (`--instance`): the only one that
    # sends to the machine first (docs/registry.md, "Owners"). None: written before owners.
    owner: str | None = None


# An instance that has not refreshed its row for this long is gone (killed, cut off from the
# store): its name may be taken again, and a survivor takes over the machines it held.
INSTANCE_STALE_AFTER = 15.0


@dataclass(frozen=True)
class InstanceRecord:
    """One running `gatekeeper server` of the fleet, as its heartbeat last wrote it."""

    name: str
    # The WireGuard endpoints it advertises (`--endpoint`), in its preference order.
    endpoints: tuple[str, ...]
    # Random per process: a second process under the same name is refused while the first lives.
    run_id: str
    started: float
    seen: float

    def live(self, now: float) -> bool:
        return now - self.seen < INSTANCE_STALE_AFTER


def parse_endpoints(stored: object) -> tuple[str, ...]:
    """An instance row's endpoints (JSON, written by another instance, maybe another version):
    whatever is not a list of short host:port strings is left out, never a crash."""
    try:
        value = json.loads(stored) if isinstance(stored, str | bytes) else None
    except ValueError:
        return ()
    if not isinstance(value, list):
        return ()
    return tuple(e for e in value[:16] if isinstance(e, str) and 0 < len(e) <= 262 and ":" in e)


class InstanceInUse(RegistryError):
    """Another live process already runs under this instance name."""

    def __init__(self, name: str, holder: str) -> None:
        super().__init__(
            f"another server runs as instance {name!r} on this registry (its heartbeat is less "
            f"than {INSTANCE_STALE_AFTER:g} s old): give each server its own --instance"
        )
        # The run_id of the row's writer: the caller may know it is dead (instances.py).
        self.holder = holder


@dataclass(frozen=True)
class Changes:
    """What a change feed saw: the public keys (base64) of the machines whose peer may have
    changed (added, re-keyed, moved, removed, a new owner), or `keys` None: anything may
    have (the first wait, a lost connection, a gap in the log), so read every record."""

    keys: frozenset[str] | None

    def __or__(self, other: Changes) -> Changes:
        if self.keys is None or other.keys is None:
            return ANYTHING
        return Changes(self.keys | other.keys)


ANYTHING = Changes(None)
# More changed machines than this since the last wait: a feed answers ANYTHING, since reading
# every record is as cheap as naming them (and a flood of notifications stays bounded).
MAX_CHANGED_KEYS = 5000


class ChangeFeed(Protocol):
    """Wakes a peer reconciler when machine records may have changed (any instance, any
    process), and says which. It may name a key that did not change; it never leaves out one
    that did, and never sleeps through a change for longer than the timeout a caller gives."""

    def wait(self, timeout: float) -> Changes | None:
        """What changed since the last wait, or None after `timeout` seconds of quiet."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Claim:
    """One machine's claim, as `Registry.claim` takes it (see there)."""

    record: MachineRecord
    token_id: str | None = None
    max_machines: int | None = None
    replaces: str | None = None


def machine_key(node_uuid: str, unique_token: str | None) -> str:
    material = node_uuid.lower().encode() + b"\0" + (unique_token or "").encode()
    return hashlib.sha256(material).hexdigest()


class Registry(Protocol):
    def identity(self, create: Callable[[], ServerIdentity]) -> ServerIdentity:
        """The stored identity, or `create()`'s result stored atomically on first start."""
        ...

    def get(self, machine_key: str) -> MachineRecord | None: ...

    def by_address(self, address: ipaddress.IPv6Address) -> MachineRecord | None: ...

    def by_public_key(self, public_key: str) -> MachineRecord | None: ...

    def claim(
        self,
        record: MachineRecord,
        *,
        token_id: str | None = None,
        max_machines: int | None = None,
        now: float | None = None,
        replaces: str | None = None,
    ) -> None:
        """Insert or replace the machine's record, durably, before the caller answers.

        Raises AddressTaken when another machine holds `record.address`, KeyTaken when
        another machine holds `record.public_key` (a public key names one machine only).
        When the record is new (no row for its machine key), in the same compare-and-set
        write: RegistrationLimit if `max_machines` machines exist already; with `token_id`,
        one use of that token is consumed, or TokenRefused when at `now` it is revoked,
        expired or used up. With `replaces`, that machine key's row is deleted in the same
        write (an identity handing its key to its successor): no crash can leave both.
        """
        ...

    def claim_many(
        self, claims: Sequence[Claim], *, now: float | None = None
    ) -> list[RegistryError | None]:
        """Several claims in ONE transaction (one commit), in order: each sees the ones before
        it (token uses, the registration count, addresses). Each claim's own refusal
        (AddressTaken, KeyTaken, RegistrationLimit, TokenRefused) is its entry in the result
        and undoes only that claim; a failure of the store itself raises, and then nothing
        was written.
        """
        ...

    def record_conflict(self, machine_key: str, when: float, source: str) -> None:
        """Note that a newcomer claiming this identity was refused (see MachineRecord)."""
        ...

    def add_token(self, token: TokenRecord) -> None: ...

    def token(self, token_id: str) -> TokenRecord | None: ...

    def tokens(self) -> list[TokenRecord]: ...

    def revoke_token(self, token_id: str, when: float) -> bool:
        """Mark a token revoked; False when there is no such token or it was revoked already."""
        ...

    def update_endpoints(self, endpoints: Mapping[str, str]) -> None:
        """Record the last seen endpoint per machine key (unknown keys are ignored)."""
        ...

    def machines(self) -> list[MachineRecord]: ...

    def machine_count(self) -> int:
        """How many machines are registered, counted by the store (a metrics scrape at 10,000
        machines would otherwise decode every record)."""
        ...

    def machines_matching(
        self, *, machine_keys: Collection[str] = (), public_keys: Collection[str] = ()
    ) -> list[MachineRecord]:
        """The records with one of these machine keys or public keys (base64), in one read,
        in no particular order."""
        ...

    def remove(self, machine_key: str) -> bool: ...

    def set_owner(self, machine_key: str, instance: str) -> bool:
        """Make `instance` the machine's owner; False when there is no such machine or it is
        owned by `instance` already."""
        ...

    def heartbeat(
        self, me: InstanceRecord, *, take_over: bool, replaces: str | None = None
    ) -> list[InstanceRecord]:
        """Write this instance's row and read every instance's, in one transaction.

        Who is stale is decided on the store's clock (PostgreSQL: the database server's;
        SQLite: the one host's, `me.seen`); the rows come back with `seen` on the caller's
        clock, `me.seen`. Raises InstanceInUse when a live row of the same name has another
        run_id, unless that run_id is `replaces` (a writer the caller knows is dead). With
        `take_over`, every machine whose owner is not a live instance (stale, gone, renamed,
        or none: written before owners existed) becomes `me`'s; the store picks the one
        survivor that gets each.
        """
        ...

    def leave(self, me: InstanceRecord) -> None:
        """A clean stop: this instance's row goes, and survivors take its machines over at
        their next heartbeat instead of after the stale window."""
        ...

    def instances(self, now: float) -> list[InstanceRecord]:
        """Every instance's row, by name, read only (`gatekeeper instances`); `seen` on the
        caller's clock `now`, as heartbeat returns it."""
        ...

    def change_feed(self) -> ChangeFeed: ...

    def close(self) -> None: ...
