"""The WireGuard device interface that every backend implements.

The link lifecycle and the server speak only to `Backend` and `Device`; whether the device is
wireguard-go behind a UAPI socket or the kernel behind netlink is an adapter detail chosen at
start-up (see `select_backend`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gatekeeper.wireguard.keys import PrivateKey, PublicKey

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class WireGuardError(RuntimeError):
    """A device operation failed; the message says what to install or grant when that is why."""


IFNAME_MAX = 15
MIN_MTU = 1280  # below it the kernel turns IPv6 off on the link, and the overlay is IPv6
MAX_MTU = 65535


def check_ifname(ifname: str) -> None:
    """The kernel's rules for interface names, as one clear error."""
    if not isinstance(ifname, str) or not 0 < len(ifname.encode()) <= IFNAME_MAX:
        raise WireGuardError(f"interface name {ifname!r} must be 1 to {IFNAME_MAX} bytes long")
    if ifname in (".", "..") or any(c in ifname for c in "/:% ") or not ifname.isprintable():
        raise WireGuardError(
            f"interface name {ifname!r} may not be '.' or '..' nor contain '/', ':', '%', "
            "spaces or control characters"
        )


@dataclass(frozen=True)
class PeerConfig:
    public_key: PublicKey
    allowed_ips: tuple[IPNetwork, ...]
    # "host:port" or "[v6]:port", already resolved to an IP literal by the caller.
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    # Change the peer only if the device still has it; never (re)create it. For updates that
    # race with a removal (an administrator removing a machine while its keepalive is set).
    update_only: bool = False


@dataclass(frozen=True)
class PeerStats:
    public_key: PublicKey
    endpoint: str | None
    # Unix time of the last completed handshake, None when none happened yet.
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    allowed_ips: tuple[IPNetwork, ...] = ()
    # Seconds; None when keepalives are off.
    persistent_keepalive: int | None = None


class Device(Protocol):
    """One WireGuard interface that this process created and owns."""

    @property
    def name(self) -> str: ...

    def configure(
        self,
        private_key: PrivateKey,
        listen_port: int | None,
        peers: Sequence[PeerConfig],
        *,
        replace_peers: bool = True,
    ) -> None:
        """Set the key and listen port; with replace_peers the device ends with exactly `peers`."""
        ...

    def set_peer(self, peer: PeerConfig) -> None:
        """Add or update one peer (its allowed IPs and keepalive are replaced)."""
        ...

    def set_peers(self, peers: Sequence[PeerConfig]) -> None:
        """set_peer for many peers in one device operation (bulk restore); others stay."""
        ...

    def remove_peer(self, public_key: PublicKey) -> None:
        """Remove one peer; removing a peer the device does not have is a no-op."""
        ...

    def peers(self) -> list[PeerStats]: ...

    def last_handshakes(self) -> list[float | None]:
        """Each peer's last completed handshake (Unix time, at least to the second; None:
        none yet), in no particular order: what a count of live sessions needs, without
        peers()'s decoding of every field (a metrics scrape at 10,000 peers)."""
        ...

    def listen_port(self) -> int:
        """The UDP port actually bound (read back, so a random port shows its real value)."""
        ...

    def set_addresses(self, addresses: Sequence[IPInterface]) -> None:
        """Make these the only addresses of the link (and bring it up)."""
        ...

    def failure(self) -> str | None:
        """Why the device no longer works (its process exited, its link vanished), or None.

        Cheap and non-blocking enough to be asked every second by the device supervisor.
        """
        ...

    def close(self) -> None:
        """Remove the link and stop whatever runs it."""
        ...


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    def create(self, ifname: str, *, mtu: int = 1280) -> Device:
        """Create (or take over a stale) interface `ifname` in the current network namespace."""
        ...
