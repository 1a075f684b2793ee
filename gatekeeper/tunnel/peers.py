"""What the provisioning core needs from the tunnel: admit and forget peers (no I/O here)."""

from __future__ import annotations

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
