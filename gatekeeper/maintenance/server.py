"""The maintenance gRPC server (grpc.aio): Talos's Version, COSI's read-only State, TLS.

`MaintenanceService` is a small controller the agent drives with bind targets (see
binding.py). grpc servers cannot change their ports once started, so moving to a new address
starts a new server and then stops the old one; when a wildcard is involved on either side
the old one stops first (a specific address cannot be bound while the wildcard on the same
port is listening, and a wildcard must never outlive the switch to SideroLink).

Authorization is evaluated per call from the peer's source address against the current
overlay prefix: inside it the caller is an admin, otherwise a reader. Sensitive types are
admin-only; writes are refused to everyone; unknown methods get UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import platform
import re
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import empty_pb2

import gatekeeper
from gatekeeper.maintenance import catalog, policy
from gatekeeper.maintenance.binding import (
    DEFAULT_PORT,
    BindTarget,
    ListenAll,
    ListenOn,
    NotListening,
)
from gatekeeper.maintenance.policy import IPAddress, IPNetwork, Role
from gatekeeper.maintenance.resources import (
    Event,
    EventType,
    InvalidRequest,
    NotFound,
    Resource,
    ResourceDefinition,
    ResourceError,
    ResourceStore,
    WatchOverflow,
)
from gatekeeper.maintenance.streams import StreamBudget, StreamLimits
from gatekeeper.maintenance.tls import ServerIdentity, local_addresses
from gatekeeper.maintenance.wire import to_proto
from gatekeeper.pb.common import common_pb2
from gatekeeper.pb.cosi import resource_pb2, state_pb2, state_pb2_grpc
from gatekeeper.pb.machine import machine_pb2, machine_pb2_grpc

log = logging.getLogger(__name__)

# Requests are a few hundred bytes; anything large is abuse.
MAX_REQUEST_BYTES = 64 * 1024
# A backstop only, far above what the Watch budgets (streams.py) let anyone hold open: at
# this cap grpc refuses every call, the admin's included, so readers must never reach it.
MAX_CONCURRENT_RPCS = 1024
WATCH_CLOSED = "the maintenance API listener is closing (moved or stopped); watch again"

HANDSHAKE_TIMEOUT_MS = 10_000

_GO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class MaintenanceBindError(RuntimeError):
    """The requested listener could not be (or must not be) started."""


@dataclass(frozen=True)
class BuildInfo:
    """What Version reports. Defaults describe this process."""

    tag: str = f"v{gatekeeper.__version__}"
    sha: str = field(default_factory=lambda: os.environ.get("GATEKEEPER_BUILD_SHA", ""))
    built: str = field(default_factory=lambda: os.environ.get("GATEKEEPER_BUILD_TIME", ""))
    runtime_version: str = field(default_factory=catalog.runtime_version)
    os: str = field(default_factory=lambda: platform.system().lower())
    arch: str = field(
        default_factory=lambda: _GO_ARCH.get(platform.machine().lower(), platform.machine())
    )
    platform_name: str = field(default_factory=lambda: _detect_platform())
    platform_mode: str = field(default_factory=lambda: _detect_platform())


def _detect_platform() -> str:
    """Talos's platform names: "container" inside a container, "metal" otherwise."""
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return "container"
    return "metal"


@dataclass
class _Listener:
    server: grpc.aio.Server
    state: _StateServicer
    target: ListenOn | ListenAll
    port: int
    address: str  # host:port as bound

    @property
    def wildcard(self) -> bool:
        return isinstance(self.target, ListenAll)


class MaintenanceService:
    """The maintenance API as a controller: `apply` a bind target, `close` at the end.

    Construct it inside the running event loop. `store` is read live, `overlay_prefix` may
    change at any time and applies to the next call; `port` applies at the next `apply`
    (0 picks a free port, see `bound_port`).
    """

    def __init__(
        self,
        store: ResourceStore,
        *,
        port: int = DEFAULT_PORT,
        overlay_prefix: IPNetwork | str | None = None,
        build: BuildInfo | None = None,
        hostname: str | None = None,
        extra_sans: Sequence[IPAddress | str] = (),
        stop_grace: float = 0.5,
        stream_limits: StreamLimits | None = None,
    ) -> None:
        self.store = store
        self.port = port
        self.overlay_prefix = overlay_prefix
        self.build = build or BuildInfo()
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self.extra_sans = [ipaddress.ip_address(str(a)) for a in extra_sans]
        self.stop_grace = stop_grace
        self.identity = ServerIdentity()
        # One budget for the service, so a move to a new address does not reset it.
        self.streams = StreamBudget(stream_limits)
        self._listener: _Listener | None = None
        self._applied: tuple[BindTarget, int] = (NotListening(), port)
        self._lock = asyncio.Lock()
        self._closed = False

    # -- configuration ---------------------------------------------------------------------

    @property
    def overlay_prefix(self) -> IPNetwork | None:
        return self._overlay_prefix

    @overlay_prefix.setter
    def overlay_prefix(self, value: IPNetwork | str | None) -> None:
        self._overlay_prefix = (
            None if value is None else ipaddress.ip_network(str(value), strict=False)
        )

    @property
    def target(self) -> BindTarget:
        """What the service currently does (NotListening after a failed wildcard switch)."""
        return self._applied[0]

    @property
    def bound_address(self) -> str | None:
        """'[addr]:port' / '[::]:port' of the live listener, None when not listening."""
        return self._listener.address if self._listener else None

    @property
    def bound_port(self) -> int | None:
        return self._listener.port if self._listener else None

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the service's public key (stable across moves); for `--fingerprint`."""
        return self.identity.spki_fingerprint

    # -- binding ---------------------------------------------------------------------------

    async def apply(self, target: BindTarget) -> None:
        """Make the listener match `target`; a no-op when it already does.

        Raises MaintenanceBindError when the address cannot be bound (the previous listener,
        if it was on a specific address, keeps running) or when ListenAll is asked for while
        an overlay prefix is set (SideroLink configured: never a wildcard).
        """
        async with self._lock:
            if self._closed:
                raise MaintenanceBindError("the maintenance service is closed")
            if isinstance(target, ListenAll) and self._overlay_prefix is not None:
                raise MaintenanceBindError(
                    "refusing to listen on all addresses while SideroLink is configured "
                    f"(overlay prefix {self._overlay_prefix}); pass ListenOn(<SideroLink address>)"
                )
            wanted = (target, self.port)
            if wanted == self._applied:
                return
            old = self._listener
            if isinstance(target, NotListening):
                self._listener = None
                self._applied = wanted
                if old:
                    await self._stop(old)
                log.info("maintenance API: not listening")
                return
            stop_first = old is not None and (old.wildcard or isinstance(target, ListenAll))
            if old is not None and stop_first:
                self._listener = None
                self._applied = (NotListening(), self.port)
                await self._stop(old)
            new = await self._start(target)
            self._listener = new
            self._applied = wanted
            if old is not None and not stop_first:
                await self._stop(old)
            log.info("maintenance API: listening on %s", new.address)

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            old, self._listener = self._listener, None
            self._applied = (NotListening(), self.port)
            if old:
                await self._stop(old)

    async def _stop(self, listener: _Listener) -> None:
        # Open watches end first, with a status a client can act on; cancelling them inside
        # server.stop() instead would only leave tracebacks behind.
        await listener.state.close_watches()
        await listener.server.stop(self.stop_grace)

    async def _start(self, target: ListenOn | ListenAll) -> _Listener:
        if isinstance(target, ListenOn):
            sans = [target.address, *self.extra_sans]
            candidates = [target.hostport(self.port)]
        else:
            try:
                # A dump of every address: keep it off the loop that serves the API.
                sans = [*(await asyncio.to_thread(local_addresses)), *self.extra_sans]
            except Exception as exc:  # the SANs are informative: never fail a bind over them
                log.warning("maintenance API: could not list local addresses: %s", exc)
                sans = list(self.extra_sans)
            # Dual-stack wildcard first; an IPv4-only host falls back to 0.0.0.0.
            candidates = [f"[::]:{self.port}", f"0.0.0.0:{self.port}"]
        creds = grpc.ssl_server_credentials(
            [(self.identity.key_pem, self.identity.certificate_pem(sans))],
            require_client_auth=False,
        )
        errors = []
        for address in candidates:
            server, state = self._new_server()
            try:
                port = server.add_secure_port(address, creds)
            except RuntimeError as exc:
                port, reason = 0, str(exc)
            else:
                reason = "bind failed"
            if port:
                await server.start()
                host = address.rsplit(":", 1)[0]
                return _Listener(server, state, target, port, f"{host}:{port}")
            errors.append(f"{address}: {reason}")
            await server.stop(None)
        raise MaintenanceBindError(
            f"cannot listen on {' or '.join(candidates)} "
            f"(address not configured on this machine, or port in use): {'; '.join(errors)}"
        )

    def _new_server(self) -> tuple[grpc.aio.Server, _StateServicer]:
        server = grpc.aio.server(
            options=[
                # Nobody else may bind our port alongside us.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        machine_pb2_grpc.add_MachineServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _MachineServicer(self), server
        )
        state = _StateServicer(self)
        state_pb2_grpc.add_StateServicer_to_server(state, server)  # type: ignore[no-untyped-call]
        server.add_generic_rpc_handlers((_CatchAll(),))
        return server, state

    # -- per-call helpers --------------------------------------------------------------------

    def role(self, context: grpc.aio.ServicerContext[Any, Any]) -> Role:
        return policy.role_for(context.peer(), self._overlay_prefix)

    @property
    def overlay_only(self) -> bool:
        """Bound to the SideroLink address: only peers on the overlay are served at all."""
        return (
            self._applied is not None
            and isinstance(self._applied[0], ListenOn)
            and self._overlay_prefix is not None
        )

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Refuse a peer from outside the overlay while bound to the overlay address.

        Such a peer reached the address through the underlay (Linux accepts packets for a
        local address on any interface); the firewall's overlay guard should have dropped
        it. This check holds even while that rule is missing (no nftables, a flushed
        ruleset): docs/security.md, "Overlay-only services".
        """
        if self.overlay_only and self.role(context) is not Role.ADMIN:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, policy.OVERLAY_ONLY)

    @contextlib.asynccontextmanager
    async def watch_slot(self, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        """Hold one Watch slot of the caller's budget; RESOURCE_EXHAUSTED when it is spent."""
        peer = context.peer()
        address = policy.peer_address(peer)
        key = str(address) if address is not None else peer
        role = policy.role_for(peer, self._overlay_prefix)
        refusal = self.streams.acquire(role, key)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            yield
        finally:
            self.streams.release(role, key)

    def version_response(self) -> machine_pb2.VersionResponse:
        b = self.build
        return machine_pb2.VersionResponse(
            messages=[
                machine_pb2.Version(
                    metadata=common_pb2.Metadata(hostname=self.hostname),
                    version=machine_pb2.VersionInfo(
                        tag=b.tag,
                        sha=b.sha,
                        built=b.built,
                        go_version=b.runtime_version,
                        os=b.os,
                        arch=b.arch,
                    ),
                    platform=machine_pb2.PlatformInfo(name=b.platform_name, mode=b.platform_mode),
                    features=machine_pb2.FeaturesInfo(rbac=True),
                )
            ]
        )


async def _abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: ResourceError) -> NoReturn:
    if isinstance(exc, InvalidRequest):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, NotFound):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, WatchOverflow):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        code = grpc.StatusCode.INTERNAL
    await context.abort(code, str(exc))
    raise AssertionError("unreachable")  # context.abort always raises


_EVENT_TYPES = {
    EventType.CREATED: state_pb2.CREATED,
    EventType.UPDATED: state_pb2.UPDATED,
    EventType.DESTROYED: state_pb2.DESTROYED,
}


class _MachineServicer(machine_pb2_grpc.MachineServiceServicer):
    def __init__(self, service: MaintenanceService) -> None:
        self._service = service

    async def Version(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> machine_pb2.VersionResponse:
        await self._service.admit(context)
        return self._service.version_response()


def _label_filter(queries: Iterable[resource_pb2.LabelQuery]) -> Callable[[Resource], bool]:
    """COSI label queries: terms AND-ed within a query, queries OR-ed (none = everything)."""
    compiled = [list(q.terms) for q in queries]
    if not compiled:
        return lambda r: True

    def term_ok(r: Resource, t: resource_pb2.LabelTerm) -> bool:
        if t.op == resource_pb2.LabelTerm.EQUAL:
            return r.labels.get(t.key) == t.value
        if t.op == resource_pb2.LabelTerm.EXISTS:
            return t.key in r.labels
        if t.op == resource_pb2.LabelTerm.NOT_EXISTS:
            return t.key not in r.labels
        raise InvalidRequest(f"unsupported label query operator {t.op}")

    return lambda r: any(all(term_ok(r, t) for t in terms) for terms in compiled)


def _id_filter(query: resource_pb2.IDQuery | None) -> Callable[[Resource], bool]:
    if query is None or not query.regexp:
        return lambda r: True
    try:
        pattern = re.compile(query.regexp)
    except re.error as exc:
        raise InvalidRequest(f"id query regexp {query.regexp!r} is invalid: {exc}") from None
    return lambda r: pattern.search(r.id) is not None


class _StateServicer(state_pb2_grpc.StateServicer):
    def __init__(self, service: MaintenanceService) -> None:
        self._service = service
        self._closing = asyncio.Event()
        self._open_watches = 0
        self._no_watches = asyncio.Event()
        self._no_watches.set()

    async def close_watches(self, timeout: float = 1.0) -> None:
        """End every open Watch on this listener (UNAVAILABLE) and wait until they are gone."""
        self._closing.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_watches.wait(), timeout)

    async def _until_closed(self, events: AsyncIterator[Event]) -> AsyncIterator[Event | None]:
        """The store's events, then one None when the listener is closing."""
        closing = asyncio.ensure_future(self._closing.wait())
        self._open_watches += 1
        self._no_watches.clear()
        try:
            while True:
                nxt = asyncio.ensure_future(anext(events))
                await asyncio.wait({nxt, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await nxt
                    yield None
                    return
                try:
                    event = nxt.result()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            closing.cancel()
            self._open_watches -= 1
            if not self._open_watches:
                self._no_watches.set()

    async def _authorize_read(
        self, context: grpc.aio.ServicerContext[Any, Any], namespace: str, type_name: str
    ) -> tuple[str, ResourceDefinition]:
        await self._service.admit(context)
        try:
            ns, rd = self._service.store.resolve(namespace, type_name)
        except ResourceError as exc:
            await _abort_for(context, exc)
        if rd.sensitive and self._service.role(context) is not Role.ADMIN:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, policy.NOT_AUTHORIZED)
        return ns, rd

    def _wire(self, r: Resource) -> resource_pb2.Resource:
        try:
            rd: ResourceDefinition | None = self._service.store.definition(r.type)
        except ResourceError:
            rd = None
        return to_proto(r, rd)

    async def Get(
        self, request: state_pb2.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb2.GetResponse:
        ns, rd = await self._authorize_read(context, request.namespace, request.type)
        try:
            r = self._service.store.get(ns, rd.type, request.id)
        except ResourceError as exc:
            await _abort_for(context, exc)
        return state_pb2.GetResponse(resource=self._wire(r))

    async def List(
        self, request: state_pb2.ListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[state_pb2.ListResponse]:
        ns, rd = await self._authorize_read(context, request.namespace, request.type)
        try:
            by_label = _label_filter(request.options.label_query)
            by_id = _id_filter(
                request.options.id_query if request.options.HasField("id_query") else None
            )
            items = [r for r in self._service.store.list(ns, rd.type) if by_label(r) and by_id(r)]
        except ResourceError as exc:
            await _abort_for(context, exc)
        for r in items:
            yield state_pb2.ListResponse(resource=self._wire(r))

    async def Watch(
        self, request: state_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[state_pb2.WatchResponse]:
        ns, rd = await self._authorize_read(context, request.namespace, request.type)
        opts = request.options
        if opts.tail_events > 0:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "tail events are not kept here")
        if opts.HasField("start_from_bookmark") or opts.bootstrap_bookmark:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "watch bookmarks are not supported")
        single_id = request.id if request.HasField("id") else None
        if single_id is not None and opts.bootstrap_contents:
            # COSI answers the same way: bootstrap is a kind-watch option.
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "bootstrap contents is not implemented for resource watch",
            )
        try:
            by_label = _label_filter(opts.label_query)
            by_id = _id_filter(opts.id_query if opts.HasField("id_query") else None)
        except ResourceError as exc:
            await _abort_for(context, exc)
        async with (
            self._service.watch_slot(context),
            contextlib.aclosing(self._watch(context, ns, rd, request, by_label, by_id)) as stream,
        ):
            async for response in stream:
                yield response

    async def _watch(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        ns: str,
        rd: ResourceDefinition,
        request: state_pb2.WatchRequest,
        by_label: Callable[[Resource], bool],
        by_id: Callable[[Resource], bool],
    ) -> AsyncGenerator[state_pb2.WatchResponse, None]:
        opts = request.options
        single_id = request.id if request.HasField("id") else None
        events = self._service.store.watch(
            ns, rd.type, single_id, bootstrap=opts.bootstrap_contents
        )
        # An empty response first tells the client the watch is established (as COSI does).
        yield state_pb2.WatchResponse()
        # Aggregated kind watches get the whole bootstrap (up to BOOTSTRAPPED) in one response.
        bootstrapping = opts.aggregated and single_id is None and opts.bootstrap_contents
        batch: list[state_pb2.Event] = []
        try:
            async with contextlib.aclosing(events):
                async for event in self._until_closed(events):
                    if event is None:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, WATCH_CLOSED)
                    msg = self._event(event, request.api_version, by_label, by_id)
                    if bootstrapping:
                        if msg is not None:
                            batch.append(msg)
                        if event.type is EventType.BOOTSTRAPPED:
                            bootstrapping = False
                            if batch:
                                yield state_pb2.WatchResponse(event=batch)
                            batch = []
                    elif msg is not None:
                        yield state_pb2.WatchResponse(event=[msg])
        except ResourceError as exc:
            await _abort_for(context, exc)

    def _event(
        self,
        event: Any,
        api_version: int,
        by_label: Callable[[Resource], bool],
        by_id: Callable[[Resource], bool],
    ) -> state_pb2.Event | None:
        if event.type is EventType.BOOTSTRAPPED:
            if api_version < 1:
                return None
            return state_pb2.Event(event_type=state_pb2.BOOTSTRAPPED)
        r = event.resource
        if r is None or not (by_label(r) and by_id(r)):
            return None
        msg = state_pb2.Event(event_type=_EVENT_TYPES[event.type], resource=self._wire(r))
        if event.old is not None:
            msg.old.CopyFrom(self._wire(event.old))
        return msg

    async def _refuse_write(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, policy.WRITE_DENIED)
        raise AssertionError("unreachable")

    async def Create(self, request: Any, context: Any) -> Any:
        await self._refuse_write(context)

    async def Update(self, request: Any, context: Any) -> Any:
        await self._refuse_write(context)

    async def Destroy(self, request: Any, context: Any) -> Any:
        await self._refuse_write(context)

    async def Teardown(self, request: Any, context: Any) -> Any:
        await self._refuse_write(context)

    async def TeardownAndDestroy(self, request: Any, context: Any) -> Any:
        await self._refuse_write(context)


if TYPE_CHECKING:
    _GenericRpcHandler = grpc.GenericRpcHandler[Any, Any]
else:  # the runtime class is not subscriptable
    _GenericRpcHandler = grpc.GenericRpcHandler


class _CatchAll(_GenericRpcHandler):
    """Every method the servicers do not register: write-like ones are refused, others unknown.

    A stream-stream handler fits any call shape; the request bytes are never parsed.
    """

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method

        async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
            if policy.classify(method) is policy.MethodClass.WRITE:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, policy.WRITE_DENIED)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, policy.unimplemented_message(method))
            raise AssertionError("unreachable")

        return grpc.stream_stream_rpc_method_handler(refuse)
