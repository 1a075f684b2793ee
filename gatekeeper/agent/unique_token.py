"""The machine's unique token: generated once, kept in a 0600 file, sent with every Provision.

Talos generates a token on first boot and keeps it in its META partition, so it survives
reboots; Omni keys machines by it and otherwise mixes up machines that share an SMBIOS UUID
(see docs/compatibility.md). The agent keeps its token in a file in its state directory
instead. A SideroLinkConfig document's `uniqueToken` still wins over the file.

The token is a secret: it never goes to logs, the status file or the maintenance API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/gatekeeper-agent")
TOKEN_NAME = "unique-token"
# Printable and URL-safe, like Talos's (it goes into a protobuf string field).
_TOKEN_BYTES = 32
_MAX_LENGTH = 256  # what the server accepts for node_unique_token


class UniqueTokenError(RuntimeError):
    """The token file cannot be read or written; the message names the file, never the token."""


def _valid(token: str) -> bool:
    return 0 < len(token) <= _MAX_LENGTH and token.isascii() and token.isprintable()


def load_or_create(path: Path) -> str:
    """The token in `path`, created (0600, atomically) when the file does not exist yet.

    Two agents starting at once on the same file end up with the same token: the file is
    linked into place only if no other one appeared first.
    """
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = None
    except OSError as exc:
        raise UniqueTokenError(
            f"cannot read the unique token file {path}: {exc.strerror}"
        ) from None
    if token is not None:
        if not _valid(token):
            raise UniqueTokenError(
                f"the unique token file {path} does not hold a token (1-{_MAX_LENGTH} printable "
                "ASCII characters); remove it to have a new one generated"
            )
        return token
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails when another process created the file meanwhile
        except FileExistsError:
            return load_or_create(path)
    except OSError as exc:
        raise UniqueTokenError(
            f"cannot create the unique token file {path}: {exc.strerror}"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    log.info("generated this machine's unique token in %s", path)
    return token


class UniqueTokenStore:
    """The token for the agent's Provision calls, read once and then kept in memory.

    A file that cannot be read or written is reported once per distinct problem and retried at
    the next call (the agent calls at every config poll); meanwhile no token is sent, which is
    what the agent did before it had one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._token: str | None = None
        self._last_error: str | None = None

    def token(self) -> str | None:
        if self._token is None:
            try:
                self._token = load_or_create(self.path)
            except UniqueTokenError as exc:
                if str(exc) != self._last_error:
                    log.error("%s; provisioning without a unique token meanwhile", exc)
                    self._last_error = str(exc)
                return None
            self._last_error = None
        return self._token
