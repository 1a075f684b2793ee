"""The server's registry: the one narrow interface every storage backend implements.

SQLite (`sqlite_registry.py`) is the embedded default. The interface is shaped so that a
replicated store (etcd) can implement it for several servers sharing one fleet: every write is
one compare-and-set style operation (`claim` fails on an address another machine holds), there
are no cross-call transactions and no in-process caches the caller relies on.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gatekeeper.wireguard.keys import PrivateKey


class RegistryError(RuntimeError):
    pass


class AddressTaken(RegistryError):
    """The address is held by another machine (lost a race with another server)."""


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


def machine_key(node_uuid: str, unique_token: str | None) -> str:
    material = node_uuid.lower().encode() + b"\0" + (unique_token or "").encode()
    return hashlib.sha256(material).hexdigest()


class Registry(Protocol):
    def identity(self, create: Callable[[], ServerIdentity]) -> ServerIdentity:
        """The stored identity, or `create()`'s result stored atomically on first start."""
        ...

    def get(self, machine_key: str) -> MachineRecord | None: ...

    def by_address(self, address: ipaddress.IPv6Address) -> MachineRecord | None: ...

    def claim(self, record: MachineRecord) -> None:
        """Insert or replace the machine's record, durably, before the caller answers.

        Raises AddressTaken when another machine holds `record.address`.
        """
        ...

    def update_endpoints(self, endpoints: Mapping[str, str]) -> None:
        """Record the last seen endpoint per machine key (unknown keys are ignored)."""
        ...

    def machines(self) -> list[MachineRecord]: ...

    def remove(self, machine_key: str) -> bool: ...

    def close(self) -> None: ...
