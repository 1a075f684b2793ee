"""Provisioning decisions: who may join, which address it gets, which peer the device holds.

No gRPC here: the service adapter (`service.py`) turns requests into `ProvisionInput` and
`Rejected` into status codes, so the rules are tested without a network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gatekeeper.netaddr import host_network, ip_text
from gatekeeper.overlay import server_address
from gatekeeper.server.addressing import AddressSpaceExhausted, allocate_node_address
from gatekeeper.server.escape import shown
from gatekeeper.server.identity import LivePeers, host_of
from gatekeeper.server.provision_rules import (
    KEY_ELSEWHERE,
    NO_SESSION,
    Checked,
    Code,
    Conflict,
    Facts,
    Plan,
    ProvisionInput,
    Rejected,
    Rules,
    Session,
    check_request,
    decide,
)
from gatekeeper.server.registry import (
    AddressTaken,
    Claim,
    KeyTaken,
    MachineRecord,
    RegistrationLimit,
    Registry,
    RegistryError,
    TokenRefused,
)
from gatekeeper.server.tokens import Admission, TokenDenied, TokenPolicy
from gatekeeper.tunnel.header import tunnel_addr_port, tunnel_prefix_for
from gatekeeper.tunnel.peers import TunnelMode, TunnelPeers
from gatekeeper.wireguard.backend import Device, PeerConfig
from gatekeeper.wireguard.keys import PublicKey

log = logging.getLogger(__name__)

T = TypeVar("T")

# The server keeps every peer alive, as the reference server and Omni do (25 s), from the
# moment it has somewhere to send to: a keepalive on a peer without an endpoint does nothing
# on the wire but makes wireguard-go spin (measured: 6.4% CPU idle with 2,000 such peers, 22%
# with 10,000, 0% without). So a new peer gets it when the device learns its endpoint (the
# machine's first handshake, see sync_endpoints), a restored one at once. After a restart this
# is also what brings machines back in milliseconds: turning keepalive on makes WireGuard send
# at once, so the server handshakes with every restored peer at its last endpoint (the
# machine's fixed listen port) instead of waiting for the machine to notice the lost session
# (15 s or more). See docs/compatibility.md.
SERVER_KEEPALIVE = 25


@dataclass(frozen=True)
class ProvisionOutput:
    # In preference order; the wire adapter applies the first/last swap.
    server_endpoints: tuple[str, ...]
    server_public_key: str
    node_address_prefix: str
    server_address: str
    grpc_peer_addr_port: str = ""


def _outcome(fn: Callable[..., T], *args: object) -> T | BaseException:
    try:
        return fn(*args)
    except Exception as exc:
        log.exception("provision: a step after the claim failed")
        return exc


def _refusal(why: RegistryError) -> Rejected | RegistryError:
    """What a caller is told when the store refused its claim."""
    if isinstance(why, AddressTaken):
        return Rejected(Code.INTERNAL, "address allocation raced; try again")
    if isinstance(why, KeyTaken):
        return Rejected(Code.INVALID_ARGUMENT, KEY_ELSEWHERE)
    if isinstance(why, TokenRefused):
        return Rejected(Code.PERMISSION_DENIED, str(why))
    if isinstance(why, RegistrationLimit):
        return Rejected(Code.RESOURCE_EXHAUSTED, "registration limit reached")
    return why


@dataclass(frozen=True)
class Known:
    """The store's records that one round of a batch names."""

    by_machine: Mapping[str, MachineRecord]
    by_public: Mapping[str, MachineRecord]


class Provisioner:
    def __init__(
        self,
        *,
        registry: Registry,
        device: Device,
        prefix: ipaddress.IPv6Network,
        server_public_key: PublicKey,
        endpoints: Sequence[str],
        tokens: TokenPolicy,
        max_machines: int | None = None,
        tunnel_mode: TunnelMode = TunnelMode.OFF,
        tunnels: TunnelPeers | None = None,
        tunnel_secret: bytes | None = None,
        restore_last_endpoint: bool = True,
        instance: str,
    ) -> None:
        self.registry = registry
        self.device = device
        self.prefix = prefix
        self.server_address = server_address(prefix)
        self.server_public_key = server_public_key
        self.endpoints = tuple(endpoints)
        # This server's --instance: the owner its Provisions write (docs/registry.md, "Owners").
        self.instance = instance
        # The other live instances' endpoints, kept by the heartbeat (app.py), never read from
        # the store during a Provision: listed after ours, so a machine that loses this
        # instance walks on to a survivor without provisioning again.
        self.fleet_endpoints: tuple[str, ...] = ()
        self.tokens = tokens
        self.max_machines = max_machines
        # Tunnel peers need somewhere to relay to: without a hub the mode is off.
        self.tunnel_mode = tunnel_mode if tunnels is not None else TunnelMode.OFF
        self.tunnels = tunnels
        self.tunnel_prefix = tunnel_prefix_for(prefix)
        self.rules = Rules(tunnel_mode=self.tunnel_mode, instance=instance)
        self.live = LivePeers(device)
        # Names tunnel streams unguessably (tunnel/header.py); the server derives it from its
        # key so that names survive restarts. A throwaway one only where no key is given.
        self.tunnel_secret = tunnel_secret or secrets.token_bytes(32)
        # omni#2730's disableLastEndpoint: behind a load balancer a restarted server must not
        # handshake the old source port first (the reply is dropped); the machine comes to us.
        self.restore_last_endpoint = restore_last_endpoint
        # overlay address -> virtual [addr]:port of machines admitted to the tunnel, so that
        # `machines remove` (which knows the address) can end the stream.
        self._virtuals: dict[ipaddress.IPv6Address, str] = {}
        # The loop that owns the tunnel hub: Provision runs in a worker thread (the service
        # keeps store and device calls off the loop that carries tunnelled traffic), and the
        # hub's sockets and readers may only be touched from their loop.
        self.loop: asyncio.AbstractEventLoop | None = None
        # Held while a batch's peers and claims are applied. The peer reconciler
        # (peer_reconciler.py) takes it for each pass: it then never sees a peer whose claim is
        # about to commit (and would take it away), nor a claim whose peer is not set yet.
        self.device_lock = threading.Lock()

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """`fn()` on the hub's loop, waited for; directly when already there (or no loop)."""
        loop = self.loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop:
            return fn()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result()

    def provision_batch(
        self, reqs: Sequence[ProvisionInput]
    ) -> list[ProvisionOutput | BaseException]:
        """Provisions that arrived together, answered as one: each is decided in order, then
        their peers go to the device in ONE UAPI set and their claims to the store in ONE
        transaction (one commit). What each caller gets is what it would have got alone: a
        request that touches a machine or key another one in the batch touches is decided
        after that one has settled (in the next round).
        """
        results: list[ProvisionOutput | BaseException | None] = [None] * len(reqs)
        checked: dict[int, Checked] = {}
        for i, req in enumerate(reqs):
            # Order matters: nothing is touched (device or registry) before every check passed.
            try:
                checked[i] = self._check(req)
            except BaseException as exc:
                results[i] = exc
        # Rounds: each request is checked once and decided once, in its round; one that
        # touches what an earlier one of its round touches waits for the next round (many
        # requests for one machine cost one round each, not a new check of all the others).
        pending = list(checked)
        while pending:
            plans: list[tuple[int, Plan]] = []
            later: list[int] = []
            names: set[str] = set()  # machine keys and public keys this round writes
            addresses: set[ipaddress.IPv6Address] = set()
            try:
                known = self._known([checked[i] for i in pending])
            except BaseException as exc:
                for i in pending:
                    results[i] = exc
                break
            for i in pending:
                try:
                    plan = self._plan(reqs[i], checked[i], names, addresses, known)
                except BaseException as exc:
                    results[i] = exc
                    continue
                if plan is None:
                    later.append(i)
                else:
                    plans.append((i, plan))
            if plans:
                outcomes = self._apply_batch([p for _, p in plans])
                for (i, _), out in zip(plans, outcomes, strict=True):
                    results[i] = out
            pending = later
        return [r if r is not None else Rejected(Code.INTERNAL, "not decided") for r in results]

    def _check(self, req: ProvisionInput) -> Checked:
        """The checks that need only the request and its token (Rejected is raised)."""
        try:
            admission: Admission | TokenDenied = self.tokens.admit(req.join_token)
        except TokenDenied as exc:
            admission = exc
        checked = check_request(req, admission)
        if isinstance(checked, Rejected):
            raise checked
        return checked

    def _plan(
        self,
        req: ProvisionInput,
        checked: Checked,
        names: set[str],
        addresses: set[ipaddress.IPv6Address],
        known: Known,
    ) -> Plan | None:
        """The decision for one request (Rejected is raised); None when it must wait for
        another request of the round that touches the same machine or key."""
        if checked.machine_key in names or checked.key.base64() in names:
            return None
        plan = decide(req, checked, self._facts(checked, known, addresses), self.rules, time.time())
        if isinstance(plan, Rejected):
            if plan.conflict is not None:
                self._note_conflict(plan.conflict)
            raise plan
        touched = {plan.record.machine_key, plan.key.base64()}
        if plan.replaces is not None:
            touched |= {plan.replaces.machine_key, plan.replaces.public_key}
        if plan.previous is not None:
            touched.add(plan.previous.public_key)
        if touched & names:
            return None
        names |= touched
        addresses.add(plan.record.address)
        return plan

    def _apply_batch(self, plans: Sequence[Plan]) -> list[ProvisionOutput | BaseException]:
        with self.device_lock:
            return self._apply(plans)

    def _apply(self, plans: Sequence[Plan]) -> list[ProvisionOutput | BaseException]:
        # Keepalive (25 s, as the reference) is set once the peer's endpoint is known: on a
        # peer without one it only makes wireguard-go spin (see sync_endpoints).
        try:
            self.device.set_peers([self._peer(p.key, p.record.address) for p in plans])
        except BaseException as exc:
            for plan in plans:
                with contextlib.suppress(Exception):
                    self._give_back_plan(plan)
            return [exc] * len(plans)
        claims = [
            Claim(
                p.record,
                token_id=p.token_id,
                max_machines=self.max_machines,
                # The same write removes the machine's previous identity when the key moves
                # from it (the key index is unique).
                replaces=p.replaces.machine_key if p.replaces is not None else None,
            )
            for p in plans
        ]
        try:
            refused: Sequence[RegistryError | None] = self.registry.claim_many(claims)
        except BaseException as exc:
            for plan in plans:
                with contextlib.suppress(Exception):
                    self._give_back_plan(plan)
            return [exc] * len(plans)
        # From here on each plan's steps fail for that plan alone: a failure (no relay socket
        # left, a device call) must not turn the answers of the others, committed, into errors.
        answers: list[ProvisionOutput | BaseException | None] = []
        accepted: list[Plan] = []
        for plan, why in zip(plans, refused, strict=True):
            if why is None:
                accepted.append(plan)
                answers.append(None)
            else:
                with contextlib.suppress(Exception):
                    self._give_back_plan(plan)
                answers.append(_refusal(why))
        # Only a batch that changes the tunnel hub or its names goes to the loop: a storm of
        # machines on UDP then never waits for the loop that carries tunnelled traffic (a turn
        # of it takes tens of ms while a thousand calls arrive), one batch after another.
        settled = iter(
            self._on_loop(lambda: [_outcome(self._settle_tunnel, p) for p in accepted])
            if any(self._touches_tunnel(p) for p in accepted)
            else [""] * len(accepted)
        )
        out: list[ProvisionOutput | BaseException] = []
        for plan, answer in zip(plans, answers, strict=True):
            if answer is not None:
                out.append(answer)
                continue
            virtual = next(settled)
            out.append(
                virtual
                if isinstance(virtual, BaseException)
                else _outcome(self._settled, plan, virtual)
            )
        return out

    def _give_back_plan(self, plan: Plan) -> None:
        existing, key = plan.previous, plan.key
        held = existing if existing and existing.public_key == key.base64() else None
        self._give_back(key, plan.replaces or held)

    def _touches_tunnel(self, plan: Plan) -> bool:
        """Would `_settle_tunnel` change anything (else it answers "")? It reads the names the
        loop owns from the batch's thread. That is safe because names are only ever added
        under `device_lock`, which the caller holds (`_tunnel_peer`, waited for by this
        thread; `_restore_endpoint`, through the reconciler, which takes the lock), and only
        at a tunnel record's address; a name removed meanwhile (admin `forget`) leaves at most
        a no-op for the loop. An address checked here may be the record's or the identity
        it replaces: this hub may hold a name at either that the stored records no longer
        show (the machine went through another instance meanwhile). Keep any new caller of
        `reconcile_endpoints` under the lock."""
        if self.tunnels is None:
            return False
        if any(r is not None and r.tunnel for r in (plan.record, plan.previous, plan.replaces)):
            return True
        held = (plan.record, plan.replaces)
        return any(r is not None and r.address in self._virtuals for r in held)

    def _settle_tunnel(self, plan: Plan) -> str:
        """On the loop: end the stream of an identity this one replaced, and admit (or drop)
        this machine's tunnel stream; its virtual `[addr]:port` or ""."""
        holder = plan.replaces
        # Also when the stored holder is on UDP: it may be another instance's record while
        # this hub still holds the name it gave out at that address (see _tunnel_peer).
        if holder is not None and (holder.tunnel or holder.address in self._virtuals):
            self.forget_tunnel(holder.address)
        return self._tunnel_peer(plan.record, plan.key, previous=plan.previous)

    def _settled(self, plan: Plan, virtual: str) -> ProvisionOutput:
        record, existing, holder = plan.record, plan.previous, plan.replaces
        if holder is not None:
            log.info("machine %s replaced its identity at %s", record.node_uuid, holder.address)
        if existing and existing.public_key != record.public_key:
            # The machine came back with a new key (restart): its old peer must not linger.
            self.device.remove_peer(PublicKey.from_base64(existing.public_key))
        log.info(
            "provisioned machine %s at %s (key %s%s)",
            record.node_uuid,
            ip_text(record.address),
            plan.key.fingerprint(),
            ", again" if existing else "",
        )
        return ProvisionOutput(
            # In tunnel mode the reference and Omni answer exactly [grpc_peer_addr_port].
            server_endpoints=(virtual,) if virtual else self.reply_endpoints(),
            server_public_key=self.server_public_key.base64(),
            node_address_prefix=f"{ip_text(record.address)}/{self.prefix.prefixlen}",
            server_address=str(self.server_address),
            grpc_peer_addr_port=virtual,
        )

    def _live_host(
        self, record: MachineRecord
    ) -> tuple[bool, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
        """Whether the record's key has a live WireGuard session, and the host it comes from.

        A tunnel peer's device endpoint is our own relay socket: its host is that of the
        gRPC stream carrying it, and without a stream nothing reaches it (not live).
        """
        live, endpoint = self.live.session(record.public_key)
        if not live:
            return False, None
        if record.tunnel and self.tunnels is not None:
            # (Read from the provision thread: one dict lookup, at worst a moment stale.)
            source = self.tunnels.stream_source(self._virtual(record.public_key))
            return (source is not None), host_of(source or "")
        return True, host_of(endpoint or "")

    def _known(self, round_: Sequence[Checked]) -> Known:
        """The records a round's requests name (by machine key or by public key), in one read:
        nothing of the round is written before all of it is decided, so one read serves it."""
        records = self.registry.machines_matching(
            machine_keys={c.machine_key for c in round_},
            public_keys={c.key.base64() for c in round_},
        )
        return Known(
            by_machine={r.machine_key: r for r in records},
            by_public={r.public_key: r for r in records},
        )

    def _facts(
        self, checked: Checked, known: Known, batch: Collection[ipaddress.IPv6Address] = ()
    ) -> Facts:
        """What the rules need from the store and the device; `batch`: addresses earlier
        requests of this batch are about to claim."""
        existing = known.by_machine.get(checked.machine_key)
        holder = known.by_public.get(checked.key.base64())
        if holder is not None and holder.machine_key == checked.machine_key:
            holder = None
        free = None
        if existing is None:
            try:
                free = self._allocate(batch)
            except AddressSpaceExhausted:
                free = None
        # The device is read only where the rules look at a session: a key moving between
        # identities, or an identity coming with a new key.
        moved = existing is not None and existing.public_key != checked.key.base64()
        return Facts(
            existing=existing,
            holder=holder,
            existing_session=self._session(existing) if moved else NO_SESSION,
            holder_session=self._session(holder),
            free_address=free,
        )

    def _session(self, record: MachineRecord | None) -> Session:
        if record is None:
            return NO_SESSION
        live, host = self._live_host(record)
        return Session(live=live, host=host)

    def _note_conflict(self, conflict: Conflict) -> None:
        """A refused clone is noted on the connected machine's record (`gatekeeper machines`)."""
        self.registry.record_conflict(conflict.machine_key, time.time(), conflict.source)
        log.warning(
            "machine %s: a second machine from %s claims its identity while it is connected "
            "from %s: refused (duplicate node UUID? give each machine a unique token)",
            shown(conflict.node_uuid, 64),
            conflict.source,
            conflict.connected_from,
        )

    def _give_back(self, key: PublicKey, before: MachineRecord | None) -> None:
        """After a failed claim, the device's peer for `key` is whatever the registry says,
        or, when it cannot say (gone mid-Provision), what it held before: no peer without a
        record."""
        try:
            holder = self.registry.by_public_key(key.base64())
        except RegistryError:
            holder = before
        if holder is None:
            self.device.remove_peer(key)
        else:
            self.device.set_peer(self._peer(key, holder.address))

    def _virtual(self, public_key: str) -> str:
        return tunnel_addr_port(self.tunnel_prefix, self.tunnel_secret, public_key)

    def reply_endpoints(self) -> tuple[str, ...]:
        ours = self.endpoints
        return ours + tuple(e for e in self.fleet_endpoints if e not in ours)

    def _tunnel_peer(
        self, record: MachineRecord, key: PublicKey, *, previous: MachineRecord | None
    ) -> str:
        """Admit (or drop) the machine's tunnel stream; its virtual `[addr]:port` or "".

        In tunnel mode the device's endpoint for the machine is the hub's relay socket, so
        WireGuard's replies reach the machine's stream. The name follows the key: a machine
        back with a new key gets a new one, and the old one is forgotten.
        """
        virtual = self._virtual(record.public_key)
        if self.tunnels is None:
            return ""
        # What to let go: the name this hub holds for the address, and the stored record's.
        # Both are needed: with several instances the stored record may be another's (the
        # machine went to B on UDP and is back here before our reconciler ran) while this
        # hub still holds the name it gave out, whose relay socket would stay open.
        stale = {self._virtuals.pop(record.address, None)}
        if previous is not None and previous.tunnel:
            stale.add(self._virtual(previous.public_key))
        keep = virtual if record.tunnel else None
        for old in stale:
            if old is not None and old != keep:
                self.tunnels.revoke(old)
        if not record.tunnel:
            return ""
        relay = self.tunnels.allow(virtual)
        self._virtuals[record.address] = virtual
        self.device.set_peer(
            PeerConfig(
                public_key=key,
                allowed_ips=(host_network(record.address),),
                endpoint=relay,
                persistent_keepalive=SERVER_KEEPALIVE,
            )
        )
        return virtual

    def _restore_endpoint(self, record: MachineRecord) -> str | None:
        if not record.tunnel:
            return record.endpoint if self.restore_last_endpoint else None
        if self.tunnels is None or self.tunnel_mode is TunnelMode.OFF:
            return None  # its stream will be refused and the machine provisions again
        virtual = self._virtual(record.public_key)
        self._virtuals[record.address] = virtual
        return self.tunnels.allow(virtual)

    def reconcile_endpoints(self, records: Sequence[MachineRecord]) -> list[str | None]:
        """The endpoints reconciled (restored) peers get; callable from any thread, one trip
        to the loop for all (a take-over may add thousands)."""
        return self._on_loop(lambda: [self._restore_endpoint(r) for r in records])

    def forget_tunnels(self, addresses: Sequence[ipaddress.IPv6Address]) -> None:
        """forget_tunnel for each, from any thread, in one trip to the loop."""

        def forget() -> None:
            for address in addresses:
                self.forget_tunnel(address)

        self._on_loop(forget)

    def forget_tunnel(self, address: ipaddress.IPv6Address) -> None:
        """A removed machine's tunnel stream ends now rather than when the machine gives up."""
        virtual = self._virtuals.pop(address, None)
        if self.tunnels is not None and virtual is not None:
            self.tunnels.revoke(virtual)

    @staticmethod
    def _peer(key: PublicKey, address: ipaddress.IPv6Address) -> PeerConfig:
        """A machine's peer: its key, and its own /128 only (machines never reach each other).

        No keepalive yet: the peer has no endpoint until the machine's first handshake, and
        sync_endpoints turns it on then (SERVER_KEEPALIVE: why).
        """
        return PeerConfig(public_key=key, allowed_ips=(host_network(address),))

    def _allocate(self, batch: Collection[ipaddress.IPv6Address]) -> ipaddress.IPv6Address:
        return allocate_node_address(
            self.prefix, taken=lambda a: a in batch or self.registry.by_address(a) is not None
        )

    def sync_endpoints(self) -> int:
        """Store the endpoints the device has learned, so a restart can reach machines first.

        A peer that has an endpoint and no keepalive yet gets SERVER_KEEPALIVE here.
        """
        by_key = {r.public_key: r for r in self.registry.machines()}
        changed: dict[str, str] = {}
        keep_alive: list[PeerConfig] = []
        for stats in self.device.peers():
            record = by_key.get(stats.public_key.base64())
            if record and stats.endpoint and stats.persistent_keepalive != SERVER_KEEPALIVE:
                keep_alive.append(
                    PeerConfig(
                        public_key=stats.public_key,
                        allowed_ips=(host_network(record.address),),
                        persistent_keepalive=SERVER_KEEPALIVE,
                        # `machines remove` may have taken the peer away meanwhile.
                        update_only=True,
                    )
                )
            # A tunnel peer's endpoint is a relay socket of this process: not worth keeping.
            if (
                record
                and not record.tunnel
                and stats.endpoint
                and stats.endpoint != record.endpoint
            ):
                changed[record.machine_key] = stats.endpoint
        self.registry.update_endpoints(changed)
        if keep_alive:
            self.device.set_peers(keep_alive)
        return len(changed)


__all__ = ["Code", "ProvisionInput", "ProvisionOutput", "Provisioner", "Rejected"]
