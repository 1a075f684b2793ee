"""A reader that opens many Watch streams on a maintenance API and holds them (for tests).

    python tests/watch_flood.py HOST PORT COUNT

Prints one JSON line {"open": N, "refused": {CODE: count}, "details": [...]} once every stream
is either established or refused, then holds the open ones until a line arrives on stdin,
closes them, opens one more and prints {"reopened": true|CODE}; then exits.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import sys
from typing import Any

import grpc

from gatekeeper.maintenance import catalog, client
from gatekeeper.maintenance.tls import COMMON_NAME
from gatekeeper.pb.cosi import state_pb2, state_pb2_grpc


async def established(call: Any) -> str | None:
    try:
        await asyncio.wait_for(call.read(), 10)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return None


async def main(host: str, port: int, count: int) -> None:
    der = await asyncio.to_thread(client.fetch_certificate, host, port)
    creds = grpc.ssl_channel_credentials(ssl.DER_cert_to_PEM_cert(der).encode())
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = [("grpc.ssl_target_name_override", COMMON_NAME)]
    async with grpc.aio.secure_channel(target, creds, options=options) as ch:
        state = state_pb2_grpc.StateStub(ch)  # type: ignore[no-untyped-call]
        request = state_pb2.WatchRequest(
            namespace="config", type=catalog.SIDEROLINK_STATUS.type, api_version=1
        )
        calls = [state.Watch(request) for _ in range(count)]
        results = await asyncio.gather(*(established(c) for c in calls))
        refused = collections.Counter(r.split(":")[0] for r in results if r)
        details = sorted({r for r in results if r})
        print(json.dumps({"open": results.count(None), "refused": refused, "details": details}))
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.readline)
        for call in calls:
            call.cancel()
        await asyncio.sleep(0.5)
        again = await established(state.Watch(request))
        print(json.dumps({"reopened": again or True}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
