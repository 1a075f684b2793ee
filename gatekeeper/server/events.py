"""`events.EventSinkService/Publish`: machine events, attributed by source address, stored.

Listens on the server's overlay address only (see fleet.py). A caller that is not a
registered machine on the overlay gets PERMISSION_DENIED and nothing is stored. The event's
payload is an `Any`: well-known types (our agent sends `google.protobuf.Struct`) are stored as
JSON, anything else (Talos's own event types) as its type URL and base64 bytes.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from gatekeeper.pb.events import events_pb2, events_pb2_grpc
from gatekeeper.server.attribution import Attributor, grpc_peer_address
from gatekeeper.server.audit import rfc3339
from gatekeeper.server.journal import Journal
from gatekeeper.server.metrics import ServerMetrics

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
        if request.data.Unpack(payload):
            entry["data"] = json.loads(json_format.MessageToJson(payload))
            return entry
    entry["data_base64"] = base64.b64encode(request.data.value).decode()
    return entry


class EventSinkService(events_pb2_grpc.EventSinkServiceServicer):
    def __init__(
        self,
        attributor: Attributor,
        journal: Journal,
        metrics: ServerMetrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attributor = attributor
        self.journal = journal
        self.metrics = metrics
        self.clock = clock
        # machine key -> its byte budget (a few hundred bytes per registered machine).
        self._budgets: dict[str, ByteBudget] = {}

    async def Publish(
        self, request: events_pb2.EventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> events_pb2.EventResponse:
        address = grpc_peer_address(context.peer())
        machine = self.attributor.machine(address)
        if machine is None:
            if self.metrics:
                self.metrics.telemetry_refused.labels("events").inc()
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "events are accepted only from machines"
            )
        assert machine is not None
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
        self.journal.append(EVENTS_JOURNAL, [event_entry(request, machine.node_uuid, str(address))])
        if self.metrics:
            self.metrics.events.inc()
        return events_pb2.EventResponse()


def events_server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_EVENT_BYTES),
        ("grpc.max_concurrent_streams", MAX_CALLS_PER_CONNECTION),
    ]


def add_event_sink(server: grpc.aio.Server, service: EventSinkService) -> None:
    events_pb2_grpc.add_EventSinkServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
