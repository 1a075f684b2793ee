"""Watch budgets: a reader cannot pin the maintenance API's capacity; admins keep theirs.

Real TLS gRPC on loopback (one source address, so the roles are switched with the overlay
prefix); the same in namespaces with separate admin and reader addresses is in
test_maintenance_netns.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from test_maintenance_api import channel, stubs

from gatekeeper.maintenance import catalog
from gatekeeper.maintenance.binding import ListenOn
from gatekeeper.maintenance.policy import Role
from gatekeeper.maintenance.server import MaintenanceService
from gatekeeper.maintenance.streams import StreamBudget, StreamLimits
from gatekeeper.pb.cosi import state_pb2

STATUS = catalog.SIDEROLINK_STATUS.type


def test_budget_per_reader_address_all_readers_and_admins() -> None:
    budget = StreamBudget(StreamLimits(per_reader=2, readers=3, admins=2))
    assert budget.acquire(Role.READER, "10.0.0.1") is None
    assert budget.acquire(Role.READER, "10.0.0.1") is None
    assert "from this address (2 at most per reader)" in (
        budget.acquire(Role.READER, "10.0.0.1") or ""
    )
    assert budget.acquire(Role.READER, "10.0.0.2") is None
    assert "from readers (3 at most in total)" in (budget.acquire(Role.READER, "10.0.0.3") or "")
    # Readers have spent everything; admins have not lost a slot.
    assert budget.acquire(Role.ADMIN, "fdae::1") is None
    assert budget.acquire(Role.ADMIN, "fdae::1") is None
    assert "from admins (2 at most)" in (budget.acquire(Role.ADMIN, "fdae::1") or "")
    budget.release(Role.READER, "10.0.0.1")
    assert budget.acquire(Role.READER, "10.0.0.3") is None
    assert budget.open(Role.READER) == 3 and budget.open(Role.ADMIN) == 2


@pytest.fixture
async def service() -> AsyncIterator[MaintenanceService]:
    store = catalog.new_store()
    catalog.publish_version(store, "v0.1.0")
    catalog.publish_siderolink_status(
        store, host="sl.example:443", connected=True, link_name="siderolink", tunnel=False
    )
    limits = StreamLimits(per_reader=4, readers=8, admins=6)
    svc = MaintenanceService(store, port=0, stop_grace=0.1, stream_limits=limits)
    await svc.apply(ListenOn("127.0.0.1"))
    try:
        yield svc
    finally:
        await svc.close()


def _watch(state: Any) -> Any:
    return state.Watch(state_pb2.WatchRequest(namespace="config", type=STATUS, api_version=1))


async def _open(state: Any, n: int) -> list[Any]:
    calls = [_watch(state) for _ in range(n)]
    for call in calls:
        await asyncio.wait_for(call.read(), 5)  # the empty "established" response
    return calls


async def test_a_reader_flood_is_refused_and_admins_are_still_served(
    service: MaintenanceService,
) -> None:
    async with channel("127.0.0.1", service.bound_port or 0) as ch:
        machine, state = stubs(ch)
        held = await _open(state, 4)
        extra = _watch(state)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(extra.read(), 5)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == (
            "too many open watches from this address (4 at most per reader); "
            "close some and watch again"
        )
        # The same address as an admin (in the overlay prefix) has its own budget.
        service.overlay_prefix = "127.0.0.0/8"
        admin = await _open(state, 6)
        assert (await machine.Version(empty_pb2.Empty(), timeout=5)).messages
        got = await state.Get(
            state_pb2.GetRequest(namespace="config", type=STATUS, id="siderolink-status"),
            timeout=5,
        )
        assert got.resource.metadata.id == "siderolink-status"
        for call in admin:
            call.cancel()
        service.overlay_prefix = None
        # Closed streams give their slots back: the reader can watch again.
        for call in held:
            call.cancel()
        await _wait_until(lambda: service.streams.open(Role.READER) == 0)
        again = await _open(state, 4)
        for call in again:
            call.cancel()


async def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "the slots were not given back"
        await asyncio.sleep(0.02)
