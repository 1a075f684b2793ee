"""The Provision batcher's hand-back to the event loop (no network: the batch's work is a
stand-in; what is tested is how its answers reach the loop's callers)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from gatekeeper.server.batcher import SETTLE_CHUNK, Outcome, ProvisionBatcher
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
    from gatekeeper.server.batcher import BUSY

    async def main() -> tuple[list[object], list[object], int]:
        gate = Gate()
        batcher = ProvisionBatcher(gate, max_waiting=10)

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

    refused_while_held, results, waiting = asyncio.run(main())
    busy = (Code.RESOURCE_EXHAUSTED, BUSY)
    # The five beyond the bound were answered at once, without waiting for the held batch.
    assert refused_while_held == [busy] * 5
    assert results[10:15] == [busy] * 5
    assert results[:10] == [
        (Code.PERMISSION_DENIED, "no") if n % 7 == 0 else f"[::1]:{n}" for n in range(1, 11)
    ]
    assert results[15] == "[::1]:50"
    assert waiting == 0
