"""The Provision call from the machine: a fresh gRPC channel per attempt, 30 s deadline."""

from __future__ import annotations

import grpc

from gatekeeper.config.siderolink import ApiEndpoint
from gatekeeper.config.talos_version import DEFAULT_TALOS_VERSION
from gatekeeper.link.lifecycle import Identity, Provisioned
from gatekeeper.link.reply import parse_reply
from gatekeeper.pb.siderolink import provision_pb2, provision_pb2_grpc
from gatekeeper.wireguard.keys import PublicKey

PROVISION_DEADLINE = 30.0


class ProvisionError(RuntimeError):
    pass


def open_channel(api: ApiEndpoint) -> grpc.aio.Channel:
    """A fresh channel: the API's name is resolved again at every attempt (talos#12580).

    gRPC honours `https_proxy` / `http_proxy` / `grpc_proxy` and `no_proxy` from the
    environment and then tunnels through HTTP CONNECT, as Talos's dialer does for Provision
    (talos#11703); the tunnel client's channel does the same (docs/compatibility.md).
    """
    if api.tls:
        return grpc.aio.secure_channel(api.target(), grpc.ssl_channel_credentials())
    return grpc.aio.insecure_channel(api.target())


def build_request(
    identity: Identity,
    public_key: PublicKey,
    api: ApiEndpoint,
    tunnel: bool,
    talos_version: str = DEFAULT_TALOS_VERSION,
) -> provision_pb2.ProvisionRequest:
    request = provision_pb2.ProvisionRequest(
        node_uuid=identity.node_uuid,
        node_public_key=public_key.base64(),
        # Talos always sends the unique token (possibly empty) and the join token only when set.
        node_unique_token=identity.unique_token or "",
        talos_version=talos_version,
    )
    if api.join_token:
        request.join_token = api.join_token
    if tunnel:
        request.wireguard_over_grpc = True
    return request


async def provision(
    api: ApiEndpoint,
    identity: Identity,
    public_key: PublicKey,
    *,
    tunnel: bool,
    talos_version: str = DEFAULT_TALOS_VERSION,
    deadline: float = PROVISION_DEADLINE,
) -> Provisioned:
    request = build_request(identity, public_key, api, tunnel, talos_version)
    async with open_channel(api) as channel:
        stub = provision_pb2_grpc.ProvisionServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = await stub.Provision(request, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            detail = (exc.details() or "").splitlines()[0:1]
            raise ProvisionError(
                f"{api.target()}: {exc.code().name}{': ' + detail[0] if detail else ''}"
            ) from None
    return parse_reply(
        server_endpoint=list(reply.server_endpoint),
        server_public_key=reply.server_public_key,
        node_address_prefix=reply.node_address_prefix,
        server_address=reply.server_address,
        grpc_peer_addr_port=reply.grpc_peer_addr_port,
    )
