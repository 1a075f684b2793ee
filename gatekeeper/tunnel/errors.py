"""The two stream endings the spec calls fatal, shared by both ends (sans-I/O)."""

from __future__ import annotations

PEER_NOT_ALLOWED = ("PERMISSION_DENIED", "peer not allowed")
PEER_REPLACED = ("ABORTED", "peer replaced")
FATAL = frozenset({PEER_NOT_ALLOWED, PEER_REPLACED})


def is_fatal(code: str, details: str | None) -> bool:
    """Whether a stream that ended with this status must not be reopened as it is.

    `peer not allowed`: the server no longer knows this tunnel peer, so the machine has to
    provision again. `peer replaced`: another stream now carries this peer; reopening would
    steal it back and the two would replace each other forever.
    """
    return (code, (details or "").strip()) in FATAL
