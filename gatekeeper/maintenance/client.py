"""A client for the maintenance API, connecting the way `talosctl --insecure` does.

gRPC's Python TLS has no "skip verification" switch, so we fetch the server's certificate in
a first TLS handshake, optionally check it against a pinned SHA-256 fingerprint, and then
trust exactly that certificate for the gRPC channel. Without a pin this is as (un)safe as
talosctl --insecure; with a pin it is safe against an active attacker.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import empty_pb2

from gatekeeper.config.documents import load_yaml
from gatekeeper.config.errors import ConfigError
from gatekeeper.maintenance.binding import DEFAULT_PORT
from gatekeeper.maintenance.resources import META_NAMESPACE, RESOURCE_DEFINITION_TYPE
from gatekeeper.maintenance.tls import (
    COMMON_NAME,
    certificate_fingerprint,
    normalize_fingerprint,
    spki_fingerprint_of,
)
from gatekeeper.pb.cosi import meta_pb2, resource_pb2, state_pb2, state_pb2_grpc
from gatekeeper.pb.machine import machine_pb2, machine_pb2_grpc


class ClientError(Exception):
    """Anything the user should see as one line (connection, pinning, resolution)."""


class FingerprintMismatch(ClientError):
    pass


def fetch_certificate(host: str, port: int, *, timeout: float = 5.0) -> bytes:
    """The server's leaf certificate (DER), read without verifying anything."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            ctx.wrap_socket(sock) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(
            f"cannot reach the maintenance API at {_target(host, port)}: {exc}"
        ) from None
    if not der:
        raise ClientError(f"{_target(host, port)} presented no certificate")
    return der


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_fingerprint(der: bytes, pinned: str) -> None:
    """Pass when `pinned` is the SHA-256 of the certificate or of its public key."""
    want = normalize_fingerprint(pinned)
    if want not in (certificate_fingerprint(der), spki_fingerprint_of(der)):
        raise FingerprintMismatch(
            f"server certificate does not match the pinned fingerprint {want[:16]}... "
            f"(certificate {certificate_fingerprint(der)[:16]}..., "
            f"public key {spki_fingerprint_of(der)[:16]}...)"
        )


@dataclass
class Connection:
    channel: grpc.Channel
    machine: machine_pb2_grpc.MachineServiceStub
    state: state_pb2_grpc.StateStub
    certificate: bytes
    node: str

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    host: str, port: int = DEFAULT_PORT, *, fingerprint: str | None = None, timeout: float = 5.0
) -> Connection:
    der = fetch_certificate(host, port, timeout=timeout)
    if fingerprint:
        check_fingerprint(der, fingerprint)
    creds = grpc.ssl_channel_credentials(root_certificates=ssl.DER_cert_to_PEM_cert(der).encode())
    channel = grpc.secure_channel(
        _target(host, port),
        creds,
        # The certificate names the service, not whatever address we dialled.
        options=[("grpc.ssl_target_name_override", COMMON_NAME)],
    )
    return Connection(
        channel,
        machine_pb2_grpc.MachineServiceStub(channel),  # type: ignore[no-untyped-call]
        state_pb2_grpc.StateStub(channel),  # type: ignore[no-untyped-call]
        der,
        host,
    )


def version(conn: Connection, *, timeout: float = 10.0) -> machine_pb2.VersionResponse:
    reply: machine_pb2.VersionResponse = conn.machine.Version(empty_pb2.Empty(), timeout=timeout)
    return reply


@dataclass(frozen=True)
class TypeInfo:
    """What a client learns from a ResourceDefinition."""

    type: str
    display_type: str
    default_namespace: str
    print_columns: tuple[tuple[str, str], ...]
    sensitive: bool
    names: tuple[str, ...]  # the definition id and every alias a user may type


def definitions(conn: Connection, *, timeout: float = 10.0) -> list[TypeInfo]:
    """Every ResourceDefinition, decoded from proto_spec as talosctl does."""
    out = []
    request = state_pb2.ListRequest(namespace=META_NAMESPACE, type=RESOURCE_DEFINITION_TYPE)
    for item in conn.state.List(request, timeout=timeout):
        spec = meta_pb2.ResourceDefinitionSpec.FromString(item.resource.spec.proto_spec)
        out.append(
            TypeInfo(
                type=spec.resource_type,
                display_type=spec.display_type,
                default_namespace=spec.default_namespace,
                print_columns=tuple((c.name, c.json_path) for c in spec.print_columns),
                sensitive=spec.sensitivity == meta_pb2.ResourceDefinitionSpec.SENSITIVE,
                names=(item.resource.metadata.id, *spec.all_aliases),
            )
        )
    return out


def resolve_type(conn: Connection, name: str, *, timeout: float = 10.0) -> TypeInfo:
    """talosctl's rule: the definition whose id or any alias equals `name`, ignoring case."""
    matched = [
        info
        for info in definitions(conn, timeout=timeout)
        if any(a.casefold() == name.casefold() for a in info.names)
    ]
    if len(matched) > 1:
        names = ", ".join(m.type for m in matched)
        raise ClientError(f"resource type {name!r} is ambiguous: {names}")
    if not matched:
        raise ClientError(
            f"resource {name!r} is not registered (try: get rd, to list resource types)"
        )
    return matched[0]


def get(
    conn: Connection, namespace: str, type_name: str, id: str, *, timeout: float = 10.0
) -> resource_pb2.Resource:
    reply = conn.state.Get(
        state_pb2.GetRequest(namespace=namespace, type=type_name, id=id), timeout=timeout
    )
    resource: resource_pb2.Resource = reply.resource
    return resource


def list_resources(
    conn: Connection, namespace: str, type_name: str, *, timeout: float = 10.0
) -> list[resource_pb2.Resource]:
    request = state_pb2.ListRequest(namespace=namespace, type=type_name)
    return [item.resource for item in conn.state.List(request, timeout=timeout)]


def watch(
    conn: Connection, namespace: str, type_name: str, id: str | None = None
) -> Iterator[state_pb2.Event]:
    """Events until the caller stops iterating; the kind form bootstraps with the contents."""
    request = state_pb2.WatchRequest(namespace=namespace, type=type_name, api_version=1)
    if id is not None:
        request.id = id
    else:
        request.options.bootstrap_contents = True
    call = conn.state.Watch(request)
    try:
        for response in call:
            yield from response.event
    finally:
        call.cancel()


def spec_dict(resource: resource_pb2.Resource) -> Any:
    """The spec as data, from yaml_spec (what generic clients print).

    The machine is not trusted with our memory: the YAML goes through the product's bounded
    reader (size, alias expansion); ClientError when it is refused.
    """
    text = resource.spec.yaml_spec
    if not text:
        return None
    try:
        return load_yaml(text, f"resource {resource.metadata.id[:64]!r} yaml_spec")
    except ConfigError as exc:
        raise ClientError(str(exc)) from None


def describe_rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {details}"
