"""The floor for the storm benchmark: a grpc.aio server answering Provision with a canned reply.

Same RPC, same message sizes, same gRPC stack and server options as `gatekeeper server`, but
no registry, no keys, no WireGuard: what Python gRPC alone costs per call on this machine.
`bench_storm.py` runs it as its own process and storms it with the same client processes.

    python bench/floor_server.py LISTEN      (e.g. [fd00::1]:8099)
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from gatekeeper.pb.siderolink import provision_pb2
from gatekeeper.server.app import GIL_SWITCH_INTERVAL_S
from gatekeeper.server.fleet import provision_server_options

REPLY = provision_pb2.ProvisionResponse(
    server_endpoint=["[fd00::1]:51820"],
    server_public_key="x" * 44,
    node_address_prefix="fdae:41e4:649b:9303::2/64",
    server_address="fdae:41e4:649b:9303::1",
)


async def provision_bytes(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    # Parsed as the real server parses it (service.add_provision_service takes raw bytes).
    provision_pb2.ProvisionRequest.FromString(raw)
    return REPLY


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=provision_server_options())
    handler = grpc.unary_unary_rpc_method_handler(
        provision_bytes,
        request_deserializer=None,
        response_serializer=provision_pb2.ProvisionResponse.SerializeToString,
    )
    service = grpc.method_handlers_generic_handler(
        "sidero.link.ProvisionService", {"Provision": handler}
    )
    server.add_generic_rpc_handlers((service,))
    if not server.add_insecure_port(listen):
        raise SystemExit(f"floor server: cannot listen on {listen}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as `gatekeeper server` sets it
    asyncio.run(serve(sys.argv[1]))
