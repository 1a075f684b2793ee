"""Benchmark: maintenance API Watch latency, and how fast a (re)bound listener answers.

Real TLS gRPC on loopback, one process: the server runs in the asyncio loop (as in the agent),
the client is the sync gRPC client in another thread. Figures:

- watch latency: store.put() of a SideroLink status change -> the UPDATED event in the client;
- apply -> answering: apply(ListenOn(addr)) (new certificate, bind, start) and then a fresh
  client connection (certificate fetch, TLS handshake, Version call), alternating between
  127.0.0.1 and 127.0.0.2 on one port, which is also what a listener move costs.

No target is set for these (docs name none): the verdicts are figures (ok=None), the median of
each. `python bench/bench_maintenance.py [--events N] [--moves N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import socket
import statistics
import threading
import time

import grpc
from verdict import Verdict, emit  # bench/ is on sys.path: the script's own directory

from gatekeeper.maintenance import catalog, client
from gatekeeper.maintenance.binding import ListenOn
from gatekeeper.maintenance.server import MaintenanceService
from gatekeeper.pb.cosi import state_pb2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return (
        f"median {statistics.median(values) * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} ms, "
        f"min {ordered[0] * 1e3:.2f} ms, max {ordered[-1] * 1e3:.2f} ms (n={len(values)})"
    )


def _watcher(
    port: int, fingerprint: str, out: queue.Queue[float | None], ready: threading.Event
) -> None:
    with client.connect("127.0.0.1", port, fingerprint=fingerprint) as conn:
        try:
            for event in client.watch(conn, "config", catalog.SIDEROLINK_STATUS.type):
                if event.event_type == state_pb2.BOOTSTRAPPED:
                    ready.set()
                elif event.event_type == state_pb2.UPDATED:
                    out.put(time.perf_counter())
        except grpc.RpcError:
            pass  # the server closing at the end of the run


async def watch_latency(events: int) -> list[float]:
    store = catalog.new_store()
    catalog.publish_siderolink_status(
        store, host="h:443", connected=True, link_name="l", tunnel=False
    )
    svc = MaintenanceService(store, port=0)
    await svc.apply(ListenOn("127.0.0.1"))
    received: queue.Queue[float | None] = queue.Queue()
    ready = threading.Event()
    thread = threading.Thread(
        target=_watcher, args=(svc.bound_port, svc.fingerprint, received, ready), daemon=True
    )
    thread.start()
    await asyncio.to_thread(ready.wait, 10)
    samples = []
    try:
        for i in range(events):
            sent = time.perf_counter()
            catalog.publish_siderolink_status(
                store, host="h:443", connected=i % 2 == 1, link_name="l", tunnel=False
            )
            got = await asyncio.to_thread(received.get, True, 10)
            assert got is not None
            samples.append(got - sent)
            await asyncio.sleep(0.005)
    finally:
        await svc.close()
    return samples


async def apply_to_answer(moves: int) -> tuple[list[float], list[float]]:
    store = catalog.new_store()
    svc = MaintenanceService(store, port=_free_port(), stop_grace=0.1)
    applies, answers = [], []
    try:
        for i in range(moves):
            addr = "127.0.0.1" if i % 2 == 0 else "127.0.0.2"
            t0 = time.perf_counter()
            await svc.apply(ListenOn(addr))
            t1 = time.perf_counter()

            def ask(host: str = addr) -> None:
                with client.connect(host, svc.port) as conn:
                    client.version(conn)

            await asyncio.to_thread(ask)
            t2 = time.perf_counter()
            applies.append(t1 - t0)
            answers.append(t2 - t0)
    finally:
        await svc.close()
    return applies, answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200, help="status changes to time")
    parser.add_argument("--moves", type=int, default=20, help="listener (re)binds to time")
    args = parser.parse_args()
    samples = asyncio.run(watch_latency(args.events))
    print(f"watch latency (put -> UPDATED event, TLS, loopback): {_ms(samples)}")
    applies, answers = asyncio.run(apply_to_answer(args.moves))
    print(f"apply(ListenOn) (cert + bind + start, incl. stopping the old): {_ms(applies)}")
    print(f"apply -> first Version answered on a new connection:        {_ms(answers)}")
    emit(
        "maintenance",
        [
            Verdict("watch: put -> UPDATED event, median", "", statistics.median(samples), "s"),
            Verdict(
                "apply(ListenOn) -> Version on a new connection, median",
                "",
                statistics.median(answers),
                "s",
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
