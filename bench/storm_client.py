"""A boot storm of simulated machines: real keys, real Provision calls, many at once.

Run as a script (usually inside a lab namespace):

    python bench/storm_client.py TARGET --count 1000 --concurrency 1000 --token-file F [--out F]

Every machine has its own UUID and a fresh X25519 key (made before the clock starts). The
gRPC connections (`--channels`, default one per machine, as real machines have) are opened
after the clock starts, so connection set-up counts. Each answered Provision is appended to
`--out` as one JSON line (uuid, key, address) and flushed before the next, so a crash test
knows exactly which provisions the server answered. Prints a JSON summary on stdout: total
seconds, latency percentiles, outcomes.

`--coordinated` (bench_storm.py, several client processes starting at one moment): the
process makes its keys, prints `READY`, then for every line `GO TARGET T0 [METHOD]` on stdin
(T0: the shared start, time.monotonic(), which is system-wide on Linux) runs one storm against
TARGET and prints one JSON line with every machine's latency from T0 and per call; then
`READY` again for the next line, until stdin closes. METHOD (a full gRPC method path) sends
the same requests to that method instead of Provision: a path the server does not serve is
answered UNIMPLEMENTED inside grpc.aio, with none of the server's own code run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
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
    *,
    keys: list[str] | None = None,
    started: float | None = None,
    raw: bool = False,
    method: str | None = None,
) -> dict[str, Any]:
    keys = keys or make_keys(count)
    # From the clock's start: connections are part of what is measured.
    started = time.monotonic() if started is None else started
    pool = [grpc.aio.insecure_channel(target) for _ in range(max(1, min(channels, count)))]
    if method is None:
        stubs = [provision_pb2_grpc.ProvisionServiceStub(c) for c in pool]  # type: ignore[no-untyped-call]
        calls_of = [stub.Provision for stub in stubs]
    else:
        calls_of = [
            c.unary_unary(
                method,
                request_serializer=provision_pb2.ProvisionRequest.SerializeToString,
                response_deserializer=provision_pb2.ProvisionResponse.FromString,
            )
            for c in pool
        ]
    gate = asyncio.Semaphore(concurrency)
    from_start: list[float] = []
    calls: list[float] = []
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
            start = time.monotonic()
            try:
                reply = await calls_of[i % len(calls_of)](request, timeout=60)
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] = outcomes.get(exc.code().name, 0) + 1
                return
            now = time.monotonic()
            calls.append(now - start)
            from_start.append(now - started)
        outcomes["OK"] = outcomes.get("OK", 0) + 1
        if out is not None:
            line = {
                "uuid": request.node_uuid,
                "key": keys[i],
                "address": reply.node_address_prefix.split("/")[0],
            }
            out.write(json.dumps(line) + "\n")
            out.flush()

    await asyncio.gather(*(one(i) for i in range(count)))
    ended = time.monotonic()
    total = ended - started
    for channel in pool:
        await channel.close(None)
    summary: dict[str, Any] = {
        "count": count,
        "concurrency": concurrency,
        "channels": len(pool),
        "total_s": round(total, 3),
        "per_s": round(len(calls) / total, 1) if total else 0.0,
        "p50_ms": round(percentile(from_start, 50) * 1000, 1),
        "p99_ms": round(percentile(from_start, 99) * 1000, 1),
        "call_p99_ms": round(percentile(calls, 99) * 1000, 1),
        "mean_ms": round(statistics.fmean(calls) * 1000, 1) if calls else 0.0,
        "outcomes": outcomes,
    }
    if raw:
        summary["ended"] = ended
        summary["from_start_s"] = from_start
        summary["call_s"] = calls
    return summary


def make_keys(count: int) -> list[str]:
    return [PrivateKey.generate().public_key().base64() for _ in range(count)]


def coordinated(args: argparse.Namespace) -> int:
    while True:
        keys = make_keys(args.count)
        print("READY", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        _, target, t0, *method = line.split()
        summary = asyncio.run(
            storm(
                target, args.count, args.concurrency, args.token, None, args.channels,
                keys=keys, started=float(t0), raw=True, method=method[0] if method else None,
            )
        )  # fmt: skip
        print(json.dumps(summary), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument(
        "--channels",
        type=int,
        default=0,
        help="HTTP/2 connections to spread on (default: one per machine)",
    )
    parser.add_argument(
        "--token-file", help="a file holding the join token (not argv: `ps` shows that)"
    )
    parser.add_argument("--out")
    parser.add_argument("--coordinated", action="store_true", help="see the module's doc")
    args = parser.parse_args()
    args.channels = args.channels or args.count
    args.token = None
    if args.token_file:
        try:
            args.token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            parser.error(f"--token-file {args.token_file}: {exc.strerror}")
        if not args.token:
            parser.error(f"--token-file {args.token_file}: the file is empty")
    if args.coordinated:
        return coordinated(args)
    if not args.target:
        parser.error("TARGET is needed (or --coordinated)")
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
