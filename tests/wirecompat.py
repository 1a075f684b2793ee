"""Test-only SideroLink wire peers built from field numbers written here, not from proto/.

The message classes below come from a FileDescriptorProto assembled by hand in
a private descriptor pool, so a test that talks to Gatekeeper through them
checks the wire format against these numbers (the reference's), not against
whatever gatekeeper/pb happens to contain. Nothing here imports gatekeeper.

- raw_provision(): one Provision call, the response as a dict.
- MinimalProvisionServer: a bare gRPC server answering Provision with fixed
  fields (server_endpoint sent exactly as given) and CreateStream by echoing.
- open_raw_stream(): a CreateStream call with the x-siderolink-ipv6-addr header.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

PROVISION_METHOD = "/sidero.link.ProvisionService/Provision"
CREATE_STREAM_METHOD = "/sidero.link.WireGuardOverGRPCService/CreateStream"
PEER_HEADER = "x-siderolink-ipv6-addr"

_F = descriptor_pb2.FieldDescriptorProto
STRING, BOOL, BYTES = int(_F.TYPE_STRING), int(_F.TYPE_BOOL), int(_F.TYPE_BYTES)
SINGLE, REPEATED = int(_F.LABEL_OPTIONAL), int(_F.LABEL_REPEATED)
FieldSpec = tuple[str, int, int, int, bool]

# (name, number, type, label, proto3 optional) -- the reference wire contract.
PROVISION_REQUEST_FIELDS: list[FieldSpec] = [
    ("node_uuid", 1, STRING, SINGLE, False),
    ("node_public_key", 2, STRING, SINGLE, False),
    ("join_token", 3, STRING, SINGLE, True),
    ("node_unique_token", 4, STRING, SINGLE, True),
    ("talos_version", 5, STRING, SINGLE, True),
    ("wireguard_over_grpc", 6, BOOL, SINGLE, True),
]
PROVISION_RESPONSE_FIELDS: list[FieldSpec] = [
    ("server_endpoint", 1, STRING, REPEATED, False),
    ("server_public_key", 3, STRING, SINGLE, False),
    ("node_address_prefix", 4, STRING, SINGLE, False),
    ("server_address", 5, STRING, SINGLE, False),
    ("grpc_peer_addr_port", 6, STRING, SINGLE, False),
]
PEER_PACKET_FIELDS: list[FieldSpec] = [
    ("Data", 2, BYTES, SINGLE, False),
    # Gatekeeper's batching extension; a reference peer does not know it.
    ("batch", 3, BYTES, REPEATED, False),
]


def _message(name: str, fields: list[FieldSpec]) -> Any:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for field_name, number, ftype, label, optional in fields:
        f = msg.field.add(name=field_name, number=number, type=ftype, label=label)
        f.json_name = field_name
        if optional:
            # proto3 `optional` is a field in a synthetic one-field oneof.
            f.proto3_optional = True
            f.oneof_index = len(msg.oneof_decl)
            msg.oneof_decl.add(name=f"_{field_name}")
    return msg


def _build_classes() -> dict[str, type[Message]]:
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="wirecompat/siderolink_compat.proto", package="sidero.link", syntax="proto3"
    )
    file_proto.message_type.extend(
        [
            _message("ProvisionRequest", PROVISION_REQUEST_FIELDS),
            _message("ProvisionResponse", PROVISION_RESPONSE_FIELDS),
            _message("PeerPacket", PEER_PACKET_FIELDS),
        ]
    )
    # A private pool: the same full names as the generated modules, no clash.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"sidero.link.{name}"))
        for name in ("ProvisionRequest", "ProvisionResponse", "PeerPacket")
    }


_CLASSES = _build_classes()
# Classes made at run time from the descriptors above: their fields are unknown to mypy.
ProvisionRequest: Any = _CLASSES["ProvisionRequest"]
ProvisionResponse: Any = _CLASSES["ProvisionResponse"]
PeerPacket: Any = _CLASSES["PeerPacket"]


def message_to_dict(msg: Message) -> dict[str, Any]:
    """Fields as on the wire: singular fields only when present/non-default, lists as lists."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            out[field.name] = list(value)
        elif field.has_presence:
            if msg.HasField(field.name):
                out[field.name] = value
        else:
            out[field.name] = value
    return out


def _channel(target: str, tls: bool, root_certificates: bytes | None) -> grpc.Channel:
    if tls:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.secure_channel(target, creds)
    return grpc.insecure_channel(target)


def raw_provision(
    target: str,
    *,
    node_uuid: str,
    node_public_key: str,
    join_token: str | None = None,
    node_unique_token: str | None = None,
    talos_version: str | None = None,
    wireguard_over_grpc: bool | None = None,
    timeout: float = 10,
    tls: bool = False,
    root_certificates: bytes | None = None,
) -> dict[str, Any]:
    """Call Provision; optional fields are sent only when not None. Raises grpc.RpcError.

    The result holds every response field; ``server_endpoint`` is the list
    exactly as on the wire (first and last still swapped).
    """
    request = ProvisionRequest(node_uuid=node_uuid, node_public_key=node_public_key)
    optionals = {
        "join_token": join_token,
        "node_unique_token": node_unique_token,
        "talos_version": talos_version,
        "wireguard_over_grpc": wireguard_over_grpc,
    }
    for name, value in optionals.items():
        if value is not None:
            setattr(request, name, value)
    with _channel(target, tls, root_certificates) as channel:
        call = channel.unary_unary(
            PROVISION_METHOD,
            request_serializer=ProvisionRequest.SerializeToString,
            response_deserializer=ProvisionResponse.FromString,
        )
        response = call(request, timeout=timeout)
    return message_to_dict(response)


class RawStream:
    """One CreateStream call: send() datagrams, recv() what the server sends back."""

    _END = object()

    def __init__(
        self,
        target: str,
        header_value: str | None,
        *,
        timeout: float | None = 30,
        tls: bool = False,
        root_certificates: bytes | None = None,
        extra_metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._channel = _channel(target, tls, root_certificates)
        self._outgoing: queue.Queue[object] = queue.Queue()
        self._incoming: queue.Queue[object] = queue.Queue()
        metadata: list[tuple[str, str | bytes]] = list(extra_metadata)
        if header_value is not None:
            metadata.append((PEER_HEADER, header_value))
        stub = self._channel.stream_stream(
            CREATE_STREAM_METHOD,
            request_serializer=PeerPacket.SerializeToString,
            response_deserializer=PeerPacket.FromString,
        )
        self.call = stub(self._requests(), metadata=tuple(metadata), timeout=timeout)
        self._reader = threading.Thread(target=self._read, name="wirecompat-stream", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[Message]:
        while True:
            item = self._outgoing.get()
            if item is self._END:
                return
            assert isinstance(item, Message)
            yield item

    def _read(self) -> None:
        try:
            for packet in self.call:
                self._incoming.put(packet)
        except grpc.RpcError as exc:
            self._incoming.put(exc)
        else:
            self._incoming.put(self._END)

    def send(self, data: bytes | None = None, *, batch: Sequence[bytes] = ()) -> None:
        packet = PeerPacket(batch=list(batch))
        if data is not None:
            packet.Data = data
        self._outgoing.put(packet)

    def recv_packet(self, timeout: float = 5) -> dict[str, Any]:
        """The next PeerPacket as a dict; raises the call's RpcError, EOFError at a clean end."""
        item = self._incoming.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            self._incoming.put(item)  # later calls see the same end
            raise item
        if item is self._END:
            self._incoming.put(item)
            raise EOFError("stream ended")
        assert isinstance(item, Message)
        return message_to_dict(item)

    def recv(self, timeout: float = 5) -> bytes:
        """The Data of the next PeerPacket."""
        data = self.recv_packet(timeout)["Data"]
        assert isinstance(data, bytes)
        return data

    def wait_end(self, timeout: float = 5) -> tuple[grpc.StatusCode, str]:
        """Wait for the server to end the call; (code, details)."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise TimeoutError("stream still open")
        return self.call.code(), self.call.details() or ""

    def close(self) -> None:
        self._outgoing.put(self._END)
        self.call.cancel()  # type: ignore[no-untyped-call]
        self._reader.join(5)
        self._channel.close()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_raw_stream(
    target: str,
    header_value: str | None,
    *,
    timeout: float | None = 30,
    tls: bool = False,
    root_certificates: bytes | None = None,
    extra_metadata: Sequence[tuple[str, str]] = (),
) -> RawStream:
    """Open CreateStream with ``x-siderolink-ipv6-addr: header_value`` (None: no header)."""
    return RawStream(
        target,
        header_value,
        timeout=timeout,
        tls=tls,
        root_certificates=root_certificates,
        extra_metadata=extra_metadata,
    )


class MinimalProvisionServer:
    """A bare SideroLink server on loopback built only from the hand-written messages.

    Every Provision gets the fields given here (``server_endpoint`` exactly as
    given: the test decides whether it is swapped) or, with ``abort``, that
    status. Requests are recorded as dicts in ``.requests`` (optional fields
    present only when sent). CreateStream echoes each packet back when the
    header is in ``stream_peers`` (or always, when that is None), otherwise it
    ends with PERMISSION_DENIED "peer not allowed"; headers seen go to
    ``.stream_headers``.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        server_endpoint: Sequence[str] = (),
        server_public_key: str = "",
        node_address_prefix: str = "",
        server_address: str = "",
        grpc_peer_addr_port: str = "",
        abort: tuple[grpc.StatusCode, str] | None = None,
        stream_peers: Sequence[str] | None = None,
    ) -> None:
        self.address = address
        self.response = ProvisionResponse(
            server_endpoint=list(server_endpoint),
            server_public_key=server_public_key,
            node_address_prefix=node_address_prefix,
            server_address=server_address,
            grpc_peer_addr_port=grpc_peer_addr_port,
        )
        self.abort = abort
        self.stream_peers = None if stream_peers is None else set(stream_peers)
        self.requests: list[dict[str, Any]] = []
        self.stream_headers: list[str | None] = []
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def target(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def _provision(self, request: Message, context: grpc.ServicerContext) -> Message:
        self.requests.append(message_to_dict(request))
        if self.abort is not None:
            context.abort(*self.abort)
        response: Message = self.response
        return response

    def _create_stream(
        self, packets: Iterator[Message], context: grpc.ServicerContext
    ) -> Iterator[Message]:
        header = dict(context.invocation_metadata()).get(PEER_HEADER)
        self.stream_headers.append(header if isinstance(header, str) else None)
        if self.stream_peers is not None and header not in self.stream_peers:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "peer not allowed")
        yield from packets

    def start(self) -> MinimalProvisionServer:
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.method_handlers_generic_handler(
            "sidero.link.ProvisionService",
            {
                "Provision": grpc.unary_unary_rpc_method_handler(
                    self._provision,
                    request_deserializer=ProvisionRequest.FromString,
                    response_serializer=ProvisionResponse.SerializeToString,
                )
            },
        )
        tunnel = grpc.method_handlers_generic_handler(
            "sidero.link.WireGuardOverGRPCService",
            {
                "CreateStream": grpc.stream_stream_rpc_method_handler(
                    self._create_stream,
                    request_deserializer=PeerPacket.FromString,
                    response_serializer=PeerPacket.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler, tunnel))
        self.port = server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> MinimalProvisionServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
