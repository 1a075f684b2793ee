"""What the provisioning core needs from the tunnel: admit and forget peers (no I/O here)."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class TunnelPeers(Protocol):
    def allow(self, virtual_addr_port: str) -> str:
        """Admit streams for `virtual_addr_port` (canonical `[addr]:port`).

        Returns the `host:port` the WireGuard device must use as that peer's endpoint. Calling
        it again for an admitted peer keeps its stream and returns the same endpoint.
        """
        ...

    def revoke(self, virtual_addr_port: str) -> None:
        """Forget the peer: its stream ends, later streams get `peer not allowed`."""
        ...

    def stream_source(self, virtual_addr_port: str) -> str | None:
        """Where the peer's current stream comes from (gRPC peer string); None: no stream."""
        ...


class TunnelMode(StrEnum):
    """Who gets the tunnel (docs/compatibility.md: the server decides)."""

    OFF = "off"  # never: every machine uses direct UDP, whatever it asks
    ALLOW = "allow"  # machines that ask for it (the wireguard_over_grpc hint)
    ALWAYS = "always"  # every machine, asked or not

    def decide(self, wants_tunnel: bool) -> bool:
        if self is TunnelMode.ALWAYS:
            return True
        return self is TunnelMode.ALLOW and wants_tunnel
