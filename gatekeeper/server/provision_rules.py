"""The provisioning rules as a pure decision: who may join, and what one Provision writes.

No store, no device, no clock here. The provisioner (`provisioning.py`) reads what the rules
need (the token's admission, the machine's record, the record holding the key, the live
sessions of both, a free address) into `Facts`, and `decide` answers `Rejected` or a `Plan`:
the record to claim in ONE store operation and the identity it replaces. So every refusal and
every success is tested without root or network (tests/test_provisioning_rules.py).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum

from gatekeeper.server.escape import shown
from gatekeeper.server.identity import Host, host_of, is_low_order
from gatekeeper.server.ratelimit import peer_address
from gatekeeper.server.registry import MachineRecord, machine_key
from gatekeeper.server.tokens import Admission, TokenDenied
from gatekeeper.tunnel.peers import TunnelMode
from gatekeeper.wireguard.keys import InvalidKey, PublicKey

MAX_FIELD = 256
# An SMBIOS product UUID as Talos sends it (8-4-4-4-12 hex digits, either case).
UUID_PATTERN = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
KEY_ELSEWHERE = "node_public_key belongs to another machine"
DUPLICATE = (
    "node_uuid is in use by another connected machine (duplicate SMBIOS UUID?): set "
    "a unique token on this machine"
)


class Code(StrEnum):
    """The gRPC status names the spec prescribes, without importing grpc."""

    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    # A second machine claiming a connected machine's identity (a duplicate SMBIOS UUID).
    ALREADY_EXISTS = "ALREADY_EXISTS"
    INTERNAL = "INTERNAL"


class Rejected(Exception):
    def __init__(
        self, code: Code, message: str, *, conflict: Conflict | None = None, **audit: str
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # What the audit line should say beyond the message (never sent to the caller).
        self.audit = audit
        # A refused clone: the provisioner notes it on the connected machine's record.
        self.conflict = conflict


@dataclass(frozen=True)
class Conflict:
    machine_key: str
    node_uuid: str
    source: str  # where the refused newcomer came from
    connected_from: Host | None


@dataclass(frozen=True)
class ProvisionInput:
    node_uuid: str
    node_public_key: str
    join_token: str | None = field(default=None, repr=False)
    unique_token: str | None = field(default=None, repr=False)
    talos_version: str | None = None
    wants_tunnel: bool = False
    peer: str = ""


@dataclass(frozen=True)
class Checked:
    """A request whose own fields passed: its parsed key and its machine key."""

    key: PublicKey
    machine_key: str
    admission: Admission


@dataclass(frozen=True)
class Session:
    """What the device (or the tunnel hub) says about a key's WireGuard session."""

    live: bool = False
    host: Host | None = None


NO_SESSION = Session()


@dataclass(frozen=True)
class Facts:
    """What the store and the device said, read just before the decision."""

    existing: MachineRecord | None  # the record under the request's machine key
    holder: MachineRecord | None  # the record holding the request's public key
    existing_session: Session = NO_SESSION
    holder_session: Session = NO_SESSION
    # A free address drawn for a new machine; None: the address space is exhausted.
    free_address: ipaddress.IPv6Address | None = None


@dataclass(frozen=True)
class Plan:
    """What one Provision writes: `record`, in one store operation with its token use."""

    record: MachineRecord
    key: PublicKey
    token_id: str | None
    previous: MachineRecord | None  # the machine's record before (None: a new machine)
    # The machine's former identity whose key moves here (deleted in the same write).
    replaces: MachineRecord | None = None


@dataclass(frozen=True)
class Rules:
    tunnel_mode: TunnelMode = TunnelMode.OFF
    # The instance answering: a machine is owned by the one it last provisioned through.
    instance: str | None = None


def check_request(req: ProvisionInput, admission: Admission | TokenDenied) -> Checked | Rejected:
    """The checks that need nothing but the request (and the token's admission)."""
    if isinstance(admission, TokenDenied):
        return Rejected(Code.PERMISSION_DENIED, str(admission))
    try:
        key = PublicKey.from_base64(req.node_public_key, "node_public_key")
    except InvalidKey as exc:
        return Rejected(Code.INVALID_ARGUMENT, f"invalid WireGuard public key: {exc}")
    if is_low_order(key):
        # Every session with such a key has a known shared secret: no authentication.
        return Rejected(
            Code.INVALID_ARGUMENT, "invalid WireGuard public key: node_public_key is a "
            "low-order point (no secure session is possible with it)"
        )  # fmt: skip
    uuid = req.node_uuid
    if not uuid:
        return Rejected(Code.INVALID_ARGUMENT, "node_uuid is required")
    if not UUID_PATTERN.fullmatch(uuid):
        return Rejected(
            Code.INVALID_ARGUMENT,
            f"node_uuid '{shown(uuid, 64)}' is not a UUID (8-4-4-4-12 hex digits)",
        )
    for name, value in (
        ("node_unique_token", req.unique_token or ""),
        ("talos_version", req.talos_version or ""),
    ):
        if len(value) > MAX_FIELD:
            return Rejected(Code.INVALID_ARGUMENT, f"{name} is longer than {MAX_FIELD} bytes")
    if not (req.talos_version or "").isprintable():
        return Rejected(Code.INVALID_ARGUMENT, "talos_version holds control characters")
    return Checked(key=key, machine_key=machine_key(uuid, req.unique_token), admission=admission)


def decide(
    req: ProvisionInput, checked: Checked, facts: Facts, rules: Rules, now: float
) -> Plan | Rejected:
    """The store-dependent rules; nothing is written before every one of them passed."""
    mkey = checked.machine_key
    key = checked.key.base64()
    existing = facts.existing
    source = host_of(req.peer)
    # The key may be registered under another identity. Only that identity's own machine may
    # move it here: the same node UUID (a machine whose unique token changed keeps its key)
    # AND the request comes from the address WireGuard authenticated for that key. Anyone
    # else (who merely knows the UUID and the public key) would be re-pointing a connected
    # machine's peer, cutting it off: refused.
    holder = facts.holder
    if holder is not None and holder.machine_key != mkey:
        session = facts.holder_session
        from_holder = session.live and session.host is not None and session.host == source
        if holder.node_uuid.lower() != req.node_uuid.lower() or not from_holder:
            return Rejected(Code.INVALID_ARGUMENT, KEY_ELSEWHERE, conflict_with=str(holder.address))
    else:
        holder = None
    admission = checked.admission
    if admission.refusal and not (existing and admission.allows_existing(existing.join_token_id)):
        return Rejected(Code.PERMISSION_DENIED, f"join token {admission.refusal.value}")
    if existing is not None and existing.public_key != key:
        # The same machine restarting (a new key at every boot) provisions from the address
        # its old session came from, or after that session died: a replacement. A second
        # machine with the same UUID and unique token (a cloned VM, firmware that gives
        # every board one UUID) comes from another address while the first is connected:
        # refused, and the connected machine keeps its peer.
        session = facts.existing_session
        if session.live and not (session.host is not None and session.host == source):
            where = str(source) if source is not None else shown(req.peer, 64)
            return Rejected(
                Code.ALREADY_EXISTS,
                DUPLICATE,
                conflict=Conflict(existing.machine_key, existing.node_uuid, where, session.host),
                conflict_with=str(existing.address),
            )
    address = existing.address if existing else facts.free_address
    if address is None:
        return Rejected(Code.RESOURCE_EXHAUSTED, "no free overlay address")
    record = MachineRecord(
        machine_key=mkey,
        node_uuid=req.node_uuid,
        address=address,
        public_key=key,
        endpoint=existing.endpoint if existing and not existing.tunnel else None,
        tunnel=rules.tunnel_mode.decide(req.wants_tunnel),
        talos_version=req.talos_version or "",
        created=existing.created if existing else now,
        join_token_id=existing.join_token_id if existing else admission.token_id,
        remote_address=peer_address(req.peer),
        owner=rules.instance,
    )
    return Plan(
        record=record,
        key=checked.key,
        token_id=admission.token_id,
        previous=existing,
        replaces=holder,
    )
