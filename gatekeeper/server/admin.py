"""The server's local admin socket: live peer data and peer removal for the CLI.

Why the CLI reads and writes the registry directly but asks the running server for these two
things: the registry is the source of truth and SQLite is safe across processes, so
`gatekeeper token ...` and `gatekeeper machines` work whether or not a server runs, and need
no admin network API to secure (the state directory's permissions are the access control).
What only the running process knows is its WireGuard device: the live handshake times and
endpoints, and which peers it holds. Rather than have the server copy every peer's counters
into the registry on a timer (per-peer work while idle, and stale data), it answers on demand
here. The socket lives in the state directory (mode 0600), so whoever may read the registry
may ask.

Protocol: one JSON object per line each way. `{"op": "peers"}` ->
`{"ok": true, "peers": [{public_key, endpoint, last_handshake, rx_bytes, tx_bytes}]}`;
`{"op": "forget", "public_keys": [...], "addresses": [...]}` removes those peers, and ends the
tunnel streams of those overlay addresses -> `{"ok": true}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatekeeper.wireguard.backend import Device, WireGuardError
from gatekeeper.wireguard.keys import InvalidKey, PublicKey

log = logging.getLogger(__name__)

SOCKET_NAME = "admin.sock"
MAX_REQUEST = 1 << 20


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class AdminServer:
    def __init__(
        self,
        state_dir: Path,
        device: Device,
        forget_address: Callable[[ipaddress.IPv6Address], None] | None = None,
    ) -> None:
        self.path = socket_path(state_dir)
        self.device = device
        # What else a removed machine leaves behind (its tunnel stream), by overlay address.
        self.forget_address = forget_address
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if admin_request(self.path.parent, {"op": "ping"}, timeout=1.0) is not None:
            raise OSError(f"another gatekeeper server is using {self.path.parent}")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        # Root only from the first moment: the socket can remove machines.
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(raw)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                reply = await self.answer(request)
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            except (WireGuardError, InvalidKey) as exc:
                reply = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "peers":
            stats = await asyncio.to_thread(self.device.peers)
            return {
                "ok": True,
                "peers": [
                    {
                        "public_key": s.public_key.base64(),
                        "endpoint": s.endpoint,
                        "last_handshake": s.last_handshake,
                        "rx_bytes": s.rx_bytes,
                        "tx_bytes": s.tx_bytes,
                    }
                    for s in stats
                ],
            }
        if op == "forget":
            keys = [PublicKey.from_base64(str(k)) for k in request["public_keys"]]
            for key in keys:
                await asyncio.to_thread(self.device.remove_peer, key)
                log.info("peer %s removed on request", key.fingerprint())
            if self.forget_address is not None:
                for address in request.get("addresses", []):
                    self.forget_address(ipaddress.IPv6Address(str(address)))
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")


def admin_request(
    state_dir: Path, request: dict[str, Any], *, timeout: float = 10.0
) -> dict[str, Any] | None:
    """Ask the server running on `state_dir`; None when none is running there."""
    path = socket_path(state_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError as exc:
        raise OSError(f"the server's admin socket {path} did not answer: {exc}") from None
    reply: dict[str, Any] = json.loads(data)
    return reply
