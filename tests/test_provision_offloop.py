"""Provision runs off the event loop: a slow store does not pause the loop that relays
tunnelled traffic."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import grpc
from loopbeat import heartbeat

from gatekeeper.pb.siderolink import provision_pb2, provision_pb2_grpc
from gatekeeper.server.provisioning import ProvisionInput, ProvisionOutput
from gatekeeper.server.service import ProvisionService, add_provision_service


class SlowStore:
    """Stands in for a store that takes a second to answer (a PostgreSQL behind a lost
    network, a disk stalled on fsync), which cannot be produced on demand here; everything
    else (gRPC, sockets, the loop) is real."""

    def __init__(self) -> None:
        self.thread: str | None = None

    def provision_batch(
        self, reqs: Sequence[ProvisionInput]
    ) -> list[ProvisionOutput | BaseException]:
        self.thread = threading.current_thread().name
        time.sleep(1.0)
        return [
            ProvisionOutput(
                server_endpoints=("[2001:db8::1]:51820",),
                server_public_key="k",
                node_address_prefix="fdae::2/64",
                server_address="fdae::1",
            )
            for _ in reqs
        ]


async def _run() -> tuple[float, SlowStore, provision_pb2.ProvisionResponse]:
    store = SlowStore()
    service = ProvisionService(store)
    server = grpc.aio.server()
    add_provision_service(server, service)
    port = server.add_insecure_port("[::1]:0")
    await server.start()
    try:
        async with heartbeat() as gaps, grpc.aio.insecure_channel(f"[::1]:{port}") as channel:
            stub = provision_pb2_grpc.ProvisionServiceStub(channel)  # type: ignore[no-untyped-call]
            reply = await stub.Provision(
                provision_pb2.ProvisionRequest(node_uuid="u", node_public_key="k"), timeout=10
            )
    finally:
        await server.stop(None)
        service.close()
    return max(gaps), store, reply


def test_slow_store_does_not_pause_the_loop() -> None:
    worst, store, reply = asyncio.run(_run())
    assert reply.node_address_prefix == "fdae::2/64"
    assert store.thread is not None and store.thread.startswith("provision")
    # On the loop, the one-second store call would have held the heartbeat for a second.
    assert worst < 0.5, f"the event loop paused {worst:.3f} s during a Provision"
