"""The maintenance API over real TLS gRPC on loopback: calls, errors, authz, moves, abuse."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from google.protobuf import empty_pb2

from gatekeeper.maintenance import catalog, client
from gatekeeper.maintenance.binding import ListenAll, ListenOn, NotListening
from gatekeeper.maintenance.server import MaintenanceBindError, MaintenanceService
from gatekeeper.maintenance.tls import COMMON_NAME
from gatekeeper.pb.cosi import state_pb2, state_pb2_grpc
from gatekeeper.pb.machine import machine_pb2_grpc

STATUS = catalog.SIDEROLINK_STATUS.type
CONFIG = catalog.SIDEROLINK_CONFIG.type


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def service() -> AsyncIterator[MaintenanceService]:
    store = catalog.new_store()
    catalog.publish_version(store, "v0.1.0")
    catalog.publish_system_information(store, uuid="4c4c4544-0042-3510-8054-b7c04f4e3332")
    catalog.publish_siderolink_config(
        store,
        api_endpoint="https://sl.example/?jointoken=s3cret",
        host="sl.example:443",
        join_token="s3cret",
        insecure=False,
        tunnel=False,
    )
    catalog.publish_siderolink_status(
        store, host="sl.example:443", connected=True, link_name="siderolink", tunnel=False
    )
    catalog.publish_siderolink_tunnel(
        store,
        api_endpoint="https://sl.example/?jointoken=s3cret",
        link_name="siderolinktun",
        mtu=1280,
        node_address="[fdae:41e4:649b:9304::5]:50889",
    )
    svc = MaintenanceService(store, port=0, stop_grace=0.1)
    await svc.apply(ListenOn("127.0.0.1"))
    try:
        yield svc
    finally:
        await svc.close()


@contextlib.asynccontextmanager
async def channel(host: str, port: int) -> AsyncIterator[grpc.aio.Channel]:
    der = await asyncio.to_thread(client.fetch_certificate, host, port)
    creds = grpc.ssl_channel_credentials(ssl.DER_cert_to_PEM_cert(der).encode())
    ch = grpc.aio.secure_channel(
        f"{host}:{port}", creds, options=[("grpc.ssl_target_name_override", COMMON_NAME)]
    )
    try:
        yield ch
    finally:
        await ch.close(None)


def stubs(
    ch: grpc.aio.Channel,
) -> tuple[machine_pb2_grpc.MachineServiceStub, state_pb2_grpc.StateStub]:
    return machine_pb2_grpc.MachineServiceStub(ch), state_pb2_grpc.StateStub(ch)  # type: ignore[no-untyped-call]


def refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


async def test_version_reports_build_runtime_and_platform(service: MaintenanceService) -> None:
    async with channel("127.0.0.1", service.bound_port or 0) as ch:
        machine, _ = stubs(ch)
        reply = await machine.Version(empty_pb2.Empty(), timeout=5)
    (msg,) = reply.messages
    assert msg.version.tag == "v0.1.0"
    assert msg.version.go_version.startswith("CPython 3.")
    assert msg.version.os == "linux" and msg.version.arch
    assert msg.platform.name in ("metal", "container") and msg.platform.mode
    assert msg.features.rbac is True
    assert msg.metadata.hostname == socket.gethostname()


async def test_get_and_list_serve_yaml_and_metadata(service: MaintenanceService) -> None:
    async with channel("127.0.0.1", service.bound_port or 0) as ch:
        _, state = stubs(ch)
        got = await state.Get(
            state_pb2.GetRequest(namespace="config", type=STATUS, id="siderolink-status"), timeout=5
        )
        listed = [
            r.resource
            async for r in state.List(
                state_pb2.ListRequest(namespace="hardware", type=catalog.SYSTEM_INFORMATION.type)
            )
        ]
    md = got.resource.metadata
    assert (md.namespace, md.type, md.id, md.version, md.phase) == (
        "config",
        STATUS,
        "siderolink-status",
        "1",
        "running",
    )
    assert md.created.seconds > 0
    assert got.resource.spec.yaml_spec == (
        "host: sl.example:443\nconnected: true\nlinkName: siderolink\ngrpcTunnel: false\n"
    )
    assert [r.metadata.id for r in listed] == ["systeminformation"]
    assert "uuid: 4c4c4544-0042-3510-8054-b7c04f4e3332" in listed[0].spec.yaml_spec


async def test_watch_bootstraps_and_sees_a_status_change(service: MaintenanceService) -> None:
    async with channel("127.0.0.1", service.bound_port or 0) as ch:
        _, state = stubs(ch)
        request = state_pb2.WatchRequest(namespace="config", type=STATUS, api_version=1)
        request.options.bootstrap_contents = True
        call = state.Watch(request)
        responses = aiter(call)
        ready = await anext(responses)
        assert list(ready.event) == []  # "watch established" marker
        created = (await anext(responses)).event[0]
        marker = (await anext(responses)).event[0]
        assert created.event_type == state_pb2.CREATED
        assert marker.event_type == state_pb2.BOOTSTRAPPED
        catalog.publish_siderolink_status(
            service.store,
            host="sl.example:443",
            connected=False,
            link_name="siderolink",
            tunnel=False,
        )
        update = (await asyncio.wait_for(anext(responses), 5)).event[0]
        call.cancel()
    assert update.event_type == state_pb2.UPDATED
    assert "connected: false" in update.resource.spec.yaml_spec
    assert "connected: true" in update.old.spec.yaml_spec
    assert update.resource.metadata.version == "2"


async def test_old_clients_get_no_bootstrapped_marker(service: MaintenanceService) -> None:
    async with channel("127.0.0.1", service.bound_port or 0) as ch:
        _, state = stubs(ch)
        request = state_pb2.WatchRequest(namespace="config", type=STATUS)  # api_version 0
        request.options.bootstrap_contents = True
        call = state.Watch(request)
        responses = aiter(call)
        await anext(responses)
        assert (await anext(responses)).event[0].event_type == state_pb2.CREATED
        catalog.publish_siderolink_status(
            service.store, host="x", connected=False, link_name="siderolink", tunnel=False
        )
        # The next thing is the update: BOOTSTRAPPED was skipped.
        assert (await asyncio.wait_for(anext(responses), 5)).event[
            0
        ].event_type == state_pb2.UPDATED
        call.cancel()


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (
            state_pb2.GetRequest(namespace="config", type="Nope.x.dev", id="a"),
            grpc.StatusCode.NOT_FOUND,
            "not registered",
        ),
        (
            state_pb2.GetRequest(namespace="nowhere", type=STATUS, id="a"),
            grpc.StatusCode.NOT_FOUND,
            "namespace 'nowhere'",
        ),
        (
            state_pb2.GetRequest(namespace="config", type=STATUS, id=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "id is required",
        ),
        (
            state_pb2.GetRequest(namespace="config", type="", id="a"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "type is required",
        ),
        (
            state_pb2.GetRequest(namespace="config", type=STATUS, id="zz"),
            grpc.StatusCode.NOT_FOUND,
            "does not exist",
        ),
    ],
)
async def test_malformed_requests_get_clear_errors(
    service: MaintenanceService, request_: state_pb2.GetRequest, code: grpc.StatusCode, text: str
) -> None:
    async with channel("127.0.0.1", service.bound_port or 0) as ch:
        _, state = stubs(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await state.Get(request_, timeout=5)
    assert err.value.code() == code
    assert text in (err.value.details() or "")


async def test_readers_are_refused_sensitive_types_admins_are_not(
    service: MaintenanceService,
) -> None:
    get = state_pb2.GetRequest(namespace="config", type=CONFIG, id="siderolink")
    async with channel("127.0.0.1", service.bound_port or 0) as ch:
        _, state = stubs(ch)
        tunnel = state_pb2.GetRequest(
            namespace="config", type=catalog.SIDEROLINK_TUNNEL.type, id="siderolink-tunnel"
        )
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: state.Get(get, timeout=5),
            lambda: state.Get(tunnel, timeout=5),
            lambda: anext(
                aiter(state.List(state_pb2.ListRequest(namespace="config", type=CONFIG)))
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "not authorized"
        # The same caller inside the overlay prefix is an admin: it reads the config whole, as
        # Talos gives it to SideroLink peers (the join token included).
        service.overlay_prefix = "127.0.0.0/8"
        reply = await state.Get(get, timeout=5)
    assert "apiEndpoint: https://sl.example/?jointoken=s3cret\n" in reply.resource.spec.yaml_spec
    assert "joinToken: s3cret\n" in reply.resource.spec.yaml_spec


async def test_every_write_is_refused_and_unknown_methods_are_unimplemented(
    service: MaintenanceService,
) -> None:
    service.overlay_prefix = "127.0.0.0/8"  # even admins may not write
    async with channel("127.0.0.1", service.bound_port or 0) as ch:
        _, state = stubs(ch)
        writes = [
            state.Create(state_pb2.CreateRequest(), timeout=5),
            state.Update(state_pb2.UpdateRequest(), timeout=5),
            state.Destroy(
                state_pb2.DestroyRequest(namespace="config", type=STATUS, id="siderolink-status"),
                timeout=5,
            ),
            state.Teardown(state_pb2.TeardownRequest(), timeout=5),
            state.TeardownAndDestroy(state_pb2.TeardownAndDestroyRequest(), timeout=5),
            ch.unary_unary(
                "/machine.MachineService/Reboot",
                request_serializer=None,
                response_deserializer=None,
            )(b"", timeout=5),
        ]
        for call in writes:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "write access is not allowed"
        for method in ("/machine.MachineService/Logs", "/some.Other/Thing"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(method, request_serializer=None, response_deserializer=None)(
                    b"\x01\x02", timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert method in (err.value.details() or "")
    assert service.store.get("config", STATUS, "siderolink-status").version == 1


async def test_listener_moves_between_addresses_in_one_process(service: MaintenanceService) -> None:
    port = free_port()
    service.port = port
    await service.apply(ListenOn("127.0.0.1"))
    assert service.bound_address == f"127.0.0.1:{port}"
    await service.apply(ListenOn("127.0.0.2"))
    assert refused("127.0.0.1", port)
    async with channel("127.0.0.2", port) as ch:
        machine, _ = stubs(ch)
        assert (await machine.Version(empty_pb2.Empty(), timeout=5)).messages
    await service.apply(NotListening())
    assert service.bound_address is None
    assert refused("127.0.0.2", port) and refused("127.0.0.1", port)
    await service.apply(ListenAll())
    assert service.bound_address == f"[::]:{port}"
    assert not refused("127.0.0.1", port)
    # From the wildcard back to one address (stop first: the port is the same).
    await service.apply(ListenOn("127.0.0.1"))
    assert refused("127.0.0.3", port) and not refused("127.0.0.1", port)


async def test_bind_failures_and_wildcards_under_siderolink_are_refused(
    service: MaintenanceService,
) -> None:
    before = service.bound_address
    with pytest.raises(MaintenanceBindError, match="cannot listen on"):
        await service.apply(ListenOn("192.0.2.77"))  # not on this machine
    assert service.bound_address == before  # the old listener survives
    service.overlay_prefix = "fdae:41e4:649b:9303::/64"
    with pytest.raises(MaintenanceBindError, match="refusing to listen on all addresses"):
        await service.apply(ListenAll())
    assert service.bound_address == before


async def test_plaintext_and_garbage_clients_do_not_disturb_a_good_one(
    service: MaintenanceService,
) -> None:
    port = service.bound_port or 0
    async with channel("127.0.0.1", port) as ch:
        _, state = stubs(ch)
        request = state_pb2.WatchRequest(namespace="config", type=STATUS, api_version=1)
        request.options.bootstrap_contents = True
        watch = state.Watch(request)
        responses = aiter(watch)
        for _ in range(3):  # ready, created, bootstrapped
            await anext(responses)

        # A plaintext gRPC client cannot talk to the TLS port.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await plain.unary_unary(
                    "/machine.MachineService/Version",
                    request_serializer=None,
                    response_deserializer=None,
                )(b"", timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # Raw garbage, and garbage after a valid TLS handshake: both connections get dropped.
        def garbage() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(os.urandom(4096))
                raw_reply = _drain(raw)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"])
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
                ctx.wrap_socket(sock) as tls,
            ):
                tls.sendall(b"GET / HTTP/1.1\r\n\r\n" + os.urandom(1024))
                tls_reply = _drain(tls)
            return raw_reply, tls_reply

        await asyncio.to_thread(garbage)

        # The established watch still delivers, and new calls still work.
        catalog.publish_siderolink_status(
            service.store,
            host="sl.example:443",
            connected=False,
            link_name="siderolink",
            tunnel=False,
        )
        update = (await asyncio.wait_for(anext(responses), 5)).event[0]
        assert update.event_type == state_pb2.UPDATED
        got = await state.Get(
            state_pb2.GetRequest(namespace="config", type=STATUS, id="siderolink-status"), timeout=5
        )
        assert got.resource.metadata.version == "2"
        watch.cancel()


def _drain(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (it must, within the timeout)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data


def test_cli_client_pins_fingerprints_and_resolves_aliases() -> None:
    async def scenario() -> None:
        store = catalog.new_store()
        catalog.publish_siderolink_status(
            store, host="h:443", connected=True, link_name="siderolink", tunnel=True
        )
        svc = MaintenanceService(store, port=0)
        await svc.apply(ListenOn("127.0.0.1"))
        try:
            await asyncio.to_thread(check, svc.bound_port or 0, svc.fingerprint)
        finally:
            await svc.close()

    def check(port: int, fingerprint: str) -> None:
        with client.connect("127.0.0.1", port, fingerprint=fingerprint) as conn:
            for name in ("siderolinkstatus", "SiderolinkStatuses.siderolink.talos.dev", "SS"):
                info = client.resolve_type(conn, name)
                assert info.type == STATUS and info.default_namespace == "config"
            with pytest.raises(client.ClientError, match="not registered"):
                client.resolve_type(conn, "nope")
        with pytest.raises(client.FingerprintMismatch):
            client.connect("127.0.0.1", port, fingerprint="00" * 32)

    asyncio.run(scenario())


async def test_open_watches_end_with_unavailable_when_the_listener_moves(
    service: MaintenanceService,
) -> None:
    port = free_port()
    service.port = port
    await service.apply(ListenOn("127.0.0.1"))
    async with channel("127.0.0.1", port) as ch:
        _, state = stubs(ch)
        request = state_pb2.WatchRequest(namespace="config", type=STATUS, api_version=1)
        call = state.Watch(request)
        responses = aiter(call)
        await anext(responses)  # established
        await service.apply(ListenOn("127.0.0.2"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(anext(responses), 5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "watch again" in (err.value.details() or "")
    assert service.store.watcher_count == 0
