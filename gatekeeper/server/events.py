"""`events.EventSinkService/Publish`: machine events, attributed by source address, stored.

Listens on the server's overlay address only (see fleet.py). A caller that is not a
registered machine on the overlay gets PERMISSION_DENIED and nothing is stored. The event's
payload is an `Any`: well-known types (our agent sends `google.protobuf.Struct`) are stored as
JSON, anything else (Talos's own event types) as its type URL and base64 bytes.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError, EncodeError

from gatekeeper.pb.events import events_pb2, events_pb2_grpc
from gatekeeper.server.attribution import Attributor, grpc_peer_address
from gatekeeper.server.audit import rfc3339
from gatekeeper.server.metrics import ServerMetrics
from gatekeeper.server.registry import MachineRecord, RegistryError
from gatekeeper.server.telemetry import TelemetrySink

log = logging.getLogger(__name__)

EVENTS_JOURNAL = "events"
# What Go gRPC servers (and so Omni and the reference) accept by default: Talos may send events
# with large payloads (docs/compatibility.md).
MAX_EVENT_BYTES = 4 << 20
# A bounded total per machine on top of that: a burst of 16 MiB, then 1 MiB/s. Beyond it
# Publish answers RESOURCE_EXHAUSTED and nothing is stored. With at most 4 calls in flight per
# connection, one connection holds at most 16 MiB of requests at a time.
MACHINE_BURST_BYTES = 16 << 20
MACHINE_BYTES_PER_SECOND = 1 << 20
MAX_CALLS_PER_CONNECTION = 4
MAX_ID = 128
STRUCT_URL = "type.googleapis.com/google.protobuf.Struct"


class BadEvent(ValueError):
    """The event cannot be stored as sent; the message is safe to send back."""


class ByteBudget:
    """Bytes per second with a burst allowance: `take` says yes (and counts) or no (and not)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None

    def take(self, n: int, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if n > self._tokens:
            return False
        self._tokens -= n
        return True


def event_entry(request: events_pb2.EventRequest, node_uuid: str, address: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "time": rfc3339(time.time()),
        "machine": node_uuid,
        "address": address,
        "id": request.id[:MAX_ID],
        "actor_id": request.actor_id[:MAX_ID],
        "type": request.data.type_url[:MAX_ID],
    }
    if request.data.type_url == STRUCT_URL:
        payload = struct_pb2.Struct()
        try:
            unpacked = request.data.Unpack(payload)
            data = json.loads(json_format.MessageToJson(payload))
        except (DecodeError, EncodeError, ValueError, RecursionError):
            # Bytes that are no Struct, or one nested past protobuf's recursion limit.
            raise BadEvent("data is not a valid google.protobuf.Struct") from None
        if unpacked:
            entry["data"] = data
            return entry
    entry["data_base64"] = base64.b64encode(request.data.value).decode()
    return entry


class EventSinkService(events_pb2_grpc.EventSinkServiceServicer):
    def __init__(
        self,
        attributor: Attributor,
        sink: TelemetrySink,
        metrics: ServerMetrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attributor = attributor
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        # machine key -> its byte budget (a few hundred bytes per registered machine).
        self._budgets: dict[str, ByteBudget] = {}

    async def Publish(
        self, request: events_pb2.EventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> events_pb2.EventResponse:
        address = grpc_peer_address(context.peer())
        machine = await self._machine(address, context)
        budget = self._budgets.get(machine.machine_key)
        if budget is None:
            budget = ByteBudget(MACHINE_BYTES_PER_SECOND, MACHINE_BURST_BYTES)
            self._budgets[machine.machine_key] = budget
        if not budget.take(request.ByteSize(), self.clock()):
            if self.metrics:
                self.metrics.telemetry_refused.labels("events").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"event budget exceeded ({MACHINE_BURST_BYTES >> 20} MiB, then "
                f"{MACHINE_BYTES_PER_SECOND >> 20} MiB/s per machine); slow down",
            )
        try:
            entry = event_entry(request, machine.node_uuid, str(address))
        except BadEvent as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.sink.append(EVENTS_JOURNAL, [entry])
        if self.metrics:
            self.metrics.events.inc()
        return events_pb2.EventResponse()

    async def _machine(
        self,
        address: ipaddress.IPv6Address | None,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> MachineRecord:
        try:
            machine = await self.attributor.machine(address)
        except RegistryError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the server's registry is unreachable: try again"
            )
        if machine is None:
            if self.metrics:
                self.metrics.telemetry_refused.labels("events").inc()
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "events are accepted only from machines"
            )
        assert machine is not None
        return machine

    async def publish_bytes(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> events_pb2.EventResponse:
        """Publish from raw bytes: who sends is checked first, then what they sent parses."""
        await self._machine(grpc_peer_address(context.peer()), context)
        try:
            request = events_pb2.EventRequest.FromString(raw)
        except (DecodeError, RecursionError):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid EventRequest"
            )
        return await self.Publish(request, context)


def events_server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_EVENT_BYTES),
        ("grpc.max_concurrent_streams", MAX_CALLS_PER_CONNECTION),
    ]


def add_event_sink(server: grpc.aio.Server, service: EventSinkService) -> None:
    """Publish taking raw bytes, so that undecodable input is INVALID_ARGUMENT, not UNKNOWN."""
    handler = grpc.unary_unary_rpc_method_handler(
        service.publish_bytes,
        request_deserializer=None,
        response_serializer=events_pb2.EventResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("events.EventSinkService", {"Publish": handler}),)
    )
