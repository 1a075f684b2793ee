"""What a machine needs to join this server, as the running server knows it.

The server writes `STATE_DIR/server.json` once it listens: the API address machines should
dial, the TLS choice, the overlay addresses of its event and log sinks. `gatekeeper
join-config` turns it into kernel arguments or documents. A file rather than an admin-socket
question so that join-config also works while the server is stopped (after a first start),
as the other fleet commands do. It holds no secret: whether a fixed join token is configured,
never the token.

The API host: the `--listen` host when it is a specific address; for a wildcard listen
(`[::]`, `0.0.0.0`) the host of the first `--endpoint`, the address machines already reach
the server's WireGuard port on. `join-config --api-url` overrides it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gatekeeper.overlay import split_endpoint

INFO_NAME = "server.json"
_WILDCARDS = {"", "::", "0.0.0.0", "[::]", "*"}


@dataclass(frozen=True)
class JoinInfo:
    api_url: str  # scheme://host:port, no path, no query
    tls: bool
    server_address: str  # the server's overlay address (prefix ::1)
    events_port: int  # 0: no event sink
    logs_port: int  # 0: no log receiver
    tunnel_mode: str
    fixed_token: bool  # --join-token(-file) is configured: a token is needed


def api_url(listen: str, endpoints: list[str], port: int, *, tls: bool) -> str:
    host, _, _ = listen.rpartition(":")
    if host in _WILDCARDS:
        host, _ = split_endpoint(endpoints[0])
    host = host.strip("[]")
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'grpc'}://{shown}:{port}"


def write_join_info(state_dir: Path, info: JoinInfo) -> None:
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".server.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(info), f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, state_dir / INFO_NAME)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_join_info(state_dir: Path) -> JoinInfo:
    """The recorded facts; FileNotFoundError before the server's first start, ValueError if bad."""
    doc = json.loads((state_dir / INFO_NAME).read_text())
    try:
        return JoinInfo(**doc)
    except TypeError as exc:
        raise ValueError(
            f"{state_dir / INFO_NAME} is not what this version writes: {exc}"
        ) from None
