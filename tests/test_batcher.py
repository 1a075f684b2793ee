"""The Provision batcher's hand-back to the event loop (no network: the batch's work is a
stand-in; what is tested is how its answers reach the loop's callers)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

import pytest
from prometheus_client import generate_latest

from gatekeeper.server.batcher import BUSY, SETTLE_CHUNK, Outcome, ProvisionBatcher
from gatekeeper.server.metrics import ServerMetrics
from gatekeeper.server.provision_rules import Code
from gatekeeper.server.provisioning import ProvisionInput, ProvisionOutput, Rejected


def _input(n: int) -> ProvisionInput:
    return ProvisionInput(
        node_uuid=f"uuid-{n}",
        node_public_key="k",
        join_token=None,
        unique_token=None,
        talos_version=None,
        wants_tunnel=False,
        peer="ipv6:[::1]:1",
    )


def _output(n: int) -> ProvisionOutput:
    return ProvisionOutput(
        server_endpoints=(f"[::1]:{n}",),
        server_public_key="s",
        node_address_prefix=f"fd00::{n:x}/64",
        server_address="fd00::1",
        grpc_peer_addr_port="",
    )


class Gate:
    """Holds the first batch until every request is queued, so they form one batch."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.sizes: list[int] = []

    def provision_batch(self, reqs: Sequence[ProvisionInput]) -> list[Outcome]:
        self.open.wait(10)
        self.sizes.append(len(reqs))
        out: list[Outcome] = []
        for r in reqs:
            n = int(r.node_uuid.split("-")[1])
            out.append(Rejected(Code.PERMISSION_DENIED, "no") if n % 7 == 0 else _output(n))
        return out


def test_a_big_batch_is_answered_a_few_at_a_time_with_the_loop_free_between() -> None:
    """A batch's answers resume at most SETTLE_CHUNK handlers per turn of the loop, so a
    datagram that arrives meanwhile (here: a callback from another thread, as the tunnel's
    I/O comes) runs before the whole batch is answered; every caller still gets its own."""

    async def main() -> tuple[list[int], list[object], list[int]]:
        gate = Gate()
        batcher = ProvisionBatcher(gate)
        resumed: list[int] = []
        seen_by_io: list[int] = []

        async def call(n: int) -> object:
            try:
                out = await batcher.provision(_input(n))
            except Rejected as exc:
                resumed.append(n)
                return exc.code
            resumed.append(n)
            return out.server_endpoints[0]

        tasks = [asyncio.create_task(call(n)) for n in range(1, 201)]
        await asyncio.sleep(0.05)  # all 200 queued behind the held batch
        loop = asyncio.get_running_loop()
        gate.open.set()

        # "I/O" arriving from another thread once the answers start coming.
        def io_arrives() -> None:
            seen_by_io.append(len(resumed))

        while not resumed:
            await asyncio.sleep(0)
        threading.Thread(target=loop.call_soon_threadsafe, args=(io_arrives,)).start()
        results = await asyncio.gather(*tasks)
        batcher.close()
        return gate.sizes, results, seen_by_io

    sizes, results, seen_by_io = asyncio.run(main())
    assert sum(sizes) == 200 and max(sizes) >= 199
    for n, result in enumerate(results, start=1):
        assert result == (Code.PERMISSION_DENIED if n % 7 == 0 else f"[::1]:{n}")
    # The other thread's callback ran while most of the batch was still unanswered.
    assert seen_by_io and seen_by_io[0] < 200 - 4 * SETTLE_CHUNK, seen_by_io


def test_a_flood_beyond_the_waiting_bound_is_refused_at_once_and_served_again_after() -> None:

    async def main() -> tuple[list[object], list[object], int]:
        gate = Gate()
        batcher = ProvisionBatcher(
            gate, max_waiting=10, on_busy=metrics.provisions.labels("busy").inc
        )

        async def call(n: int) -> object:
            try:
                return (await batcher.provision(_input(n))).server_endpoints[0]
            except Rejected as exc:
                return (exc.code, exc.message)

        flood = [asyncio.create_task(call(n)) for n in range(1, 16)]
        await asyncio.sleep(0.05)
        refused_while_held = [t.result() for t in flood if t.done()]
        gate.open.set()
        first = await asyncio.gather(*flood)
        after = await call(50)  # room again: served
        waiting = batcher.waiting
        batcher.close()
        return refused_while_held, [*first, after], waiting

    metrics = ServerMetrics()
    refused_while_held, results, waiting = asyncio.run(main())
    busy = (Code.RESOURCE_EXHAUSTED, BUSY)
    # What an operator's dashboard sees: each refusal counted.
    scraped = generate_latest(metrics.registry).decode()
    assert 'gatekeeper_provisions_total{outcome="busy"} 5.0' in scraped
    # The five beyond the bound were answered at once, without waiting for the held batch.
    assert refused_while_held == [busy] * 5
    assert results[10:15] == [busy] * 5
    assert results[:10] == [
        (Code.PERMISSION_DENIED, "no") if n % 7 == 0 else f"[::1]:{n}" for n in range(1, 11)
    ]
    assert results[15] == "[::1]:50"
    assert waiting == 0


class Slow(Gate):
    """Decides 8 at a time, 2 ms a batch: slower than the flood arrives."""

    def provision_batch(self, reqs: Sequence[ProvisionInput]) -> list[Outcome]:
        time.sleep(0.002)
        return super().provision_batch(reqs)


def test_a_sustained_flood_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[int, int]:
        gate = Slow()
        gate.open.set()
        batcher = ProvisionBatcher(gate, max_waiting=40, max_batch=8)
        refused = 0

        async def call(n: int) -> None:
            nonlocal refused
            try:
                await batcher.provision(_input(n))
            except Rejected as exc:
                refused += exc.message == BUSY

        tasks: list[asyncio.Task[None]] = []
        # For a second, 20 new calls every millisecond: the queue stays at its bound, and
        # room for a few opens with every batch answered.
        for turn in range(1000):
            tasks += [asyncio.create_task(call(10 * turn + k)) for k in range(20)]
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
        batcher.close()
        return batcher.waiting, refused

    with caplog.at_level(logging.WARNING, logger="gatekeeper.server.batcher"):
        waiting, refused = asyncio.run(main())
    assert waiting == 0 and refused > 1000
    lines = [r.getMessage() for r in caplog.records]
    starts = [line for line in lines if "refusing new ones" in line]
    ends = [line for line in lines if "accepted again" in line]
    assert len(starts) == len(ends) and 1 <= len(starts) <= 2, lines[:6]


def test_a_caller_that_went_away_is_not_decided_and_frees_its_place() -> None:
    async def main() -> tuple[list[str], int, object]:
        gate = Gate()
        seen: list[str] = []
        real = gate.provision_batch

        def recording(reqs: Sequence[ProvisionInput]) -> list[Outcome]:
            out = real(reqs)
            seen.extend(r.node_uuid for r in reqs)
            return out

        gate.provision_batch = recording  # type: ignore[method-assign]
        batcher = ProvisionBatcher(gate, max_waiting=3)
        first = asyncio.create_task(batcher.provision(_input(1)))  # held in the gate
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(batcher.provision(_input(2)))
        stays = asyncio.create_task(batcher.provision(_input(3)))
        await asyncio.sleep(0.05)
        gone.cancel()  # its deadline passed
        gate.open.set()
        await first
        answer = (await stays).server_endpoints[0]
        batcher.close()
        return seen, batcher.waiting, answer

    seen, waiting, answer = asyncio.run(main())
    assert seen == ["uuid-1", "uuid-3"] and waiting == 0 and answer == "[::1]:3"


def test_an_outcome_a_future_refuses_still_answers_its_caller_and_the_rest() -> None:
    class Odd(Gate):
        def provision_batch(self, reqs: Sequence[ProvisionInput]) -> list[Outcome]:
            out = super().provision_batch(reqs)
            out[0] = StopIteration()  # a future refuses this exception (TypeError)
            return out

    async def main() -> tuple[list[object], int]:
        gate = Odd()
        batcher = ProvisionBatcher(gate)

        async def call(n: int) -> object:
            try:
                return (await batcher.provision(_input(n))).server_endpoints[0]
            except Rejected as exc:
                return exc.code

        tasks = [asyncio.create_task(call(n)) for n in range(1, 21)]
        await asyncio.sleep(0.05)
        gate.open.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        batcher.close()
        return results, batcher.waiting

    results, waiting = asyncio.run(main())
    assert waiting == 0
    assert Code.INTERNAL in results
    assert sum(isinstance(r, str) for r in results) >= 20 - 1 - 20 // 7
