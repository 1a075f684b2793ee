"""A boot storm of simulated machines: real keys, real Provision calls, many at once.

Run as a script (usually inside a lab namespace):

    python bench/storm_client.py TARGET --count 1000 --concurrency 1000 --token T [--out F]

Every machine has its own UUID and a fresh X25519 key. Each answered Provision is appended to
`--out` as one JSON line (uuid, key, address) and flushed before the next, so a crash test
knows exactly which provisions the server answered. Prints a JSON summary on stdout: total
seconds, latency percentiles, outcomes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from typing import IO, Any

import grpc

from gatekeeper.pb.siderolink import provision_pb2, provision_pb2_grpc
from gatekeeper.wireguard.keys import PrivateKey


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def storm(
    target: str,
    count: int,
    concurrency: int,
    token: str | None,
    out: IO[str] | None,
    channels: int,
) -> dict[str, Any]:
    keys = [PrivateKey.generate().public_key().base64() for _ in range(count)]
    pool = [grpc.aio.insecure_channel(target) for _ in range(max(1, channels))]
    stubs = [provision_pb2_grpc.ProvisionServiceStub(c) for c in pool]  # type: ignore[no-untyped-call]
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    outcomes: dict[str, int] = {}

    async def one(i: int) -> None:
        request = provision_pb2.ProvisionRequest(
            node_uuid=str(uuid.uuid4()),
            node_public_key=keys[i],
            node_unique_token="",
            talos_version="storm",
        )
        if token:
            request.join_token = token
        async with gate:
            start = time.perf_counter()
            try:
                reply = await stubs[i % len(stubs)].Provision(request, timeout=60)
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] = outcomes.get(exc.code().name, 0) + 1
                return
            latencies.append(time.perf_counter() - start)
        outcomes["OK"] = outcomes.get("OK", 0) + 1
        if out is not None:
            line = {
                "uuid": request.node_uuid,
                "key": keys[i],
                "address": reply.node_address_prefix.split("/")[0],
            }
            out.write(json.dumps(line) + "\n")
            out.flush()

    for channel in pool:
        await channel.channel_ready()
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    total = time.perf_counter() - started
    for channel in pool:
        await channel.close(None)
    return {
        "count": count,
        "concurrency": concurrency,
        "total_s": round(total, 3),
        "per_s": round(len(latencies) / total, 1) if total else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else 0.0,
        "outcomes": outcomes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=8, help="HTTP/2 connections to spread on")
    parser.add_argument("--token")
    parser.add_argument("--out")
    args = parser.parse_args()
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    try:
        summary = asyncio.run(
            storm(args.target, args.count, args.concurrency, args.token, out, args.channels)
        )
    finally:
        if out is not None:
            out.close()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
