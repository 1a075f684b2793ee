"""The ProvisionService over gRPC: wire messages in, `Provisioner` decisions out."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gatekeeper.overlay import swap_endpoints
from gatekeeper.pb.siderolink import provision_pb2, provision_pb2_grpc
from gatekeeper.server.batcher import BUSY, BatchProvisions, ProvisionBatcher
from gatekeeper.server.escape import shown
from gatekeeper.server.guard import RATE_LIMITED
from gatekeeper.server.metrics import ServerMetrics
from gatekeeper.server.provisioning import Code, ProvisionInput, Rejected
from gatekeeper.server.registry import RegistryError, RegistryUnavailable

log = logging.getLogger(__name__)

_STATUS = {
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


def request_input(request: provision_pb2.ProvisionRequest, peer: str) -> ProvisionInput:
    return ProvisionInput(
        node_uuid=request.node_uuid,
        node_public_key=request.node_public_key,
        join_token=request.join_token if request.HasField("join_token") else None,
        unique_token=(request.node_unique_token if request.HasField("node_unique_token") else None),
        talos_version=request.talos_version if request.HasField("talos_version") else None,
        wants_tunnel=request.wireguard_over_grpc,
        peer=peer,
    )


class ProvisionService(provision_pb2_grpc.ProvisionServiceServicer):
    def __init__(self, provisioner: BatchProvisions, metrics: ServerMetrics | None = None) -> None:
        """`provisioner`: the Provisioner, or the guard that audits and rate-limits it.
        `metrics`: where Provisions refused as busy or undecodable are counted (they never
        reach the guard)."""
        # Store calls (an fsync per SQLite commit, a PostgreSQL round trip), UAPI writes and
        # the audit line block: never on the loop that also relays every tunnelled datagram.
        # They run in the batcher's one thread, many Provisions per commit in a storm.
        busy = metrics.provisions.labels("busy").inc if metrics is not None else None
        self.batcher = ProvisionBatcher(provisioner, on_busy=busy)
        # Undecodable requests never reach the guard either: counted here, not logged (a
        # flood of garbage would be a flood of lines).
        self._undecodable = metrics.provisions.labels("invalid") if metrics is not None else None

    def close(self) -> None:
        self.batcher.close()

    async def Provision(
        self, request: provision_pb2.ProvisionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> provision_pb2.ProvisionResponse:
        req = request_input(request, context.peer())
        try:
            out = await self.batcher.provision(req)
        except Rejected as exc:
            if exc.message not in (RATE_LIMITED, BUSY):  # a flood is logged once, not per call
                log.warning(
                    "provision from %s (node %s) rejected: %s",
                    shown(req.peer),
                    shown(req.node_uuid, 64) or "-",
                    exc.message,
                )
            await context.abort(_STATUS[exc.code], exc.message)
        except RegistryUnavailable as exc:
            # The store is down or restarting: the caller should retry, and will.
            log.error("provision from %s failed: %s", shown(req.peer), exc)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the server's registry is unreachable: try again"
            )
        except RegistryError as exc:
            # A full disk or a broken registry file: one line that says which, no traceback.
            log.error("provision from %s failed: %s", shown(req.peer), exc)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        except Exception:
            # Internals stay in our log; the caller learns only that it was not its fault.
            log.exception("provision from %s failed", shown(req.peer))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        return provision_pb2.ProvisionResponse(
            server_endpoint=swap_endpoints(list(out.server_endpoints)),
            server_public_key=out.server_public_key,
            node_address_prefix=out.node_address_prefix,
            server_address=out.server_address,
            grpc_peer_addr_port=out.grpc_peer_addr_port,
        )

    async def provision_bytes(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> provision_pb2.ProvisionResponse:
        try:
            request = provision_pb2.ProvisionRequest.FromString(raw)
        except DecodeError:
            if self._undecodable is not None:
                self._undecodable.inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid ProvisionRequest"
            )
        return await self.Provision(request, context)


def add_provision_service(server: grpc.aio.Server, service: ProvisionService) -> None:
    """Register Provision taking raw bytes, so that undecodable input is INVALID_ARGUMENT.

    (The generated helper decodes first and answers UNKNOWN with the parser's own words.)
    """
    handler = grpc.unary_unary_rpc_method_handler(
        service.provision_bytes,
        request_deserializer=None,
        response_serializer=provision_pb2.ProvisionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "sidero.link.ProvisionService", {"Provision": handler}
            ),
        )
    )
