"""Facts about the machine the agent runs on: its UUID and whether the network is usable."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from pathlib import Path

from gatekeeper.wireguard import rtnl

PRODUCT_UUID = Path("/sys/class/dmi/id/product_uuid")


class MachineError(RuntimeError):
    pass


def node_uuid(override: str | None = None, path: Path = PRODUCT_UUID) -> str:
    """The SMBIOS product UUID, as Talos reports it (lowercase, canonical)."""
    text = override
    if text is None:
        try:
            text = path.read_text().strip()
        except PermissionError:
            raise MachineError(
                f"cannot read {path}: it is readable by root only; run as root or pass --node-uuid"
            ) from None
        except OSError:
            raise MachineError(
                f"{path} does not exist (no SMBIOS on this machine); pass --node-uuid"
            ) from None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise MachineError(f"node UUID {text[:64]!r} is not a UUID") from None


def _has_route(host: str) -> bool:
    """True when the kernel has a route to the API host (or a default route for a name)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None:
        return rtnl.has_route(addr)
    return rtnl.has_default_route(socket.AF_INET) or rtnl.has_default_route(socket.AF_INET6)


async def wait_for_network(host: str, timeout: float, poll: float = 0.5) -> bool:
    """Wait until the API host is routable; False when `timeout` ran out (we try anyway)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await asyncio.to_thread(_has_route, host):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(poll)
