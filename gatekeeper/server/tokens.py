"""Join tokens with a lifecycle: creation, the stored (hashed) form, and the admission rules.

A token reads `<id>.<secret>`. The id is a lookup key and may be shown (lists, audit lines);
the secret has 256 random bits, is shown once at creation and is stored only as its SHA-256.
A fast hash is enough because the secret is random, not a password: nobody can search the
space. The presented secret's hash is compared with `hmac.compare_digest`, so the time a
refusal takes does not depend on how much of the secret was right.

Rules (the registry enforces the counting part in the same write as the claim):
- an unknown token, or none when one is required: refused (`invalid join token`);
- revoked: refused for everyone;
- expired or used up: refused for a new machine. A machine that joined with this very token
  may still re-provision: machines generate a new WireGuard key at every boot and present the
  token from their kernel command line again, so a one-use or short-lived token would
  otherwise lock out every machine at its first reboot. Revoke the token to stop that.
- a use is one new machine joining; re-provisions do not count.

The single fixed token of `--join-token-file` keeps working beside the registry's tokens.
No token at all (no fixed token, none ever created) leaves the server open, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

ID_BYTES = 6
SECRET_BYTES = 32
MAX_TOKEN_LENGTH = 256
MAX_NAME_LENGTH = 64


class TokenState(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"
    USED_UP = "used up"


@dataclass(frozen=True)
class TokenRecord:
    """A token as stored: never the secret, only its hash."""

    token_id: str
    name: str
    secret_hash: str
    created: float
    expires: float | None = None
    max_uses: int | None = None
    uses: int = 0
    revoked: float | None = None

    def state(self, now: float) -> TokenState:
        if self.revoked is not None:
            return TokenState.REVOKED
        if self.expires is not None and now >= self.expires:
            return TokenState.EXPIRED
        if self.max_uses is not None and self.uses >= self.max_uses:
            return TokenState.USED_UP
        return TokenState.ACTIVE

    def columns(self) -> tuple[str, str, str, float, float | None, int | None, int, float | None]:
        """The stored row, in the registries' token column order (both backends use it)."""
        return (
            self.token_id,
            self.name,
            self.secret_hash,
            self.created,
            self.expires,
            self.max_uses,
            self.uses,
            self.revoked,
        )

    @property
    def label(self) -> str:
        return f"{self.token_id} ({self.name})" if self.name else self.token_id


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(presented: str) -> tuple[str, str] | None:
    """(id, secret) of a token in our format, None for anything else."""
    token_id, dot, secret = presented.partition(".")
    if not dot or len(token_id) != 2 * ID_BYTES or not secret:
        return None
    if any(c not in "0123456789abcdef" for c in token_id):
        return None
    return token_id, secret


def new_token(
    *,
    name: str,
    now: float,
    expires_in: float | None = None,
    max_uses: int | None = None,
) -> tuple[str, TokenRecord]:
    """A fresh token: the text to show once, and the record to store."""
    if len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise ValueError(f"token name must be at most {MAX_NAME_LENGTH} printable characters")
    if expires_in is not None and expires_in <= 0:
        raise ValueError("--expires-in must be positive")
    if max_uses is not None and max_uses < 1:
        raise ValueError("--max-uses must be at least 1")
    token_id = secrets.token_hex(ID_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    record = TokenRecord(
        token_id=token_id,
        name=name,
        secret_hash=hash_secret(secret),
        created=now,
        expires=None if expires_in is None else now + expires_in,
        max_uses=max_uses,
    )
    return f"{token_id}.{secret}", record


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `7d` -> seconds; one clear error otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    body, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(body)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (examples: 3600, 90m, 12h, 7d)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"duration {text!r} must be positive")
    return value * units[unit]


@dataclass(frozen=True)
class Admission:
    """What a presented token allows.

    `refusal` is set when the token is known but may no longer admit NEW machines (expired,
    used up): the provisioner still lets a machine that joined with `token_id` back in.
    """

    token_id: str | None
    label: str
    refusal: TokenState | None = None

    def allows_existing(self, joined_with: str | None) -> bool:
        return self.refusal is None or (self.token_id is not None and joined_with == self.token_id)


class TokenDenied(Exception):
    """The token admits nobody; the message is safe to send to the caller."""


_DUMMY_HASH = hash_secret("")


class TokenPolicy:
    """Decides admissions from the fixed token and the registry's tokens.

    `lookup` and `listing` read the registry at every call (no cache): a revocation made by
    `gatekeeper token revoke` in another process applies to the very next request.
    """

    def __init__(
        self,
        fixed: str | None,
        lookup: Callable[[str], TokenRecord | None],
        listing: Callable[[], Sequence[TokenRecord]],
        clock: Callable[[], float],
    ) -> None:
        self._fixed = fixed.encode() if fixed else None
        self._lookup = lookup
        self._listing = listing
        self._clock = clock

    def open(self) -> bool:
        """True when nobody needs a token (no fixed token and none ever created)."""
        return self._fixed is None and not self._listing()

    def admit(self, presented: str | None) -> Admission:
        text = presented or ""
        if len(text) > MAX_TOKEN_LENGTH:
            raise TokenDenied("invalid join token")
        if self._fixed is not None and hmac.compare_digest(self._fixed, text.encode()):
            return Admission(token_id=None, label="fixed")
        parts = split_token(text)
        record = self._lookup(parts[0]) if parts else None
        # Hash even when the id is unknown, so both refusals cost the same.
        digest = hash_secret(parts[1]) if parts else _DUMMY_HASH
        if record is not None and hmac.compare_digest(record.secret_hash, digest):
            state = record.state(self._clock())
            if state is TokenState.REVOKED:
                raise TokenDenied("join token revoked")
            refusal = None if state is TokenState.ACTIVE else state
            return Admission(token_id=record.token_id, label=record.label, refusal=refusal)
        if self.open():
            return Admission(token_id=None, label="none (open server)")
        raise TokenDenied("invalid join token")

    def describe(self, presented: str | None) -> str:
        """A secret-free label of a presented token, for audit lines."""
        text = presented or ""
        if not text:
            return "none"
        if self._fixed is not None and hmac.compare_digest(self._fixed, text.encode()):
            return "fixed"
        parts = split_token(text)
        record = self._lookup(parts[0]) if parts else None
        if parts and record and hmac.compare_digest(record.secret_hash, hash_secret(parts[1])):
            return record.label
        return "unknown"
