"""Checking a Provision reply before anything is configured from it (sans-I/O)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from gatekeeper.link.lifecycle import Provisioned
from gatekeeper.overlay import split_endpoint, swap_endpoints
from gatekeeper.wireguard.keys import InvalidKey, PublicKey


class BadReply(ValueError):
    """The server answered something we cannot configure a link from."""


def parse_reply(
    *,
    server_endpoint: Sequence[str],
    server_public_key: str,
    node_address_prefix: str,
    server_address: str,
    grpc_peer_addr_port: str = "",
) -> Provisioned:
    try:
        PublicKey.from_base64(server_public_key, "server_public_key")
    except InvalidKey as exc:
        raise BadReply(f"server sent an invalid public key: {exc}") from None
    try:
        node = ipaddress.IPv6Interface(node_address_prefix)
    except ValueError:
        raise BadReply(
            f"server sent an invalid node_address_prefix {node_address_prefix[:80]!r}"
        ) from None
    try:
        server = ipaddress.IPv6Address(server_address)
    except ValueError:
        raise BadReply(f"server sent an invalid server_address {server_address[:80]!r}") from None
    endpoints, ignored = [], []
    for endpoint in swap_endpoints(list(server_endpoint)):
        try:
            split_endpoint(endpoint)
        except ValueError:
            # One bad entry must not cost the machine the good ones.
            ignored.append(endpoint[:80])
        else:
            endpoints.append(endpoint)
    if not endpoints and not grpc_peer_addr_port:
        detail = f" (ignored invalid: {', '.join(map(repr, ignored))})" if ignored else ""
        raise BadReply(f"server sent no usable WireGuard endpoint{detail}")
    return Provisioned(
        server_public_key=server_public_key,
        node_address=node,
        server_address=server,
        endpoints=tuple(endpoints),
        grpc_peer_addr_port=grpc_peer_addr_port,
        ignored_endpoints=tuple(ignored),
    )
