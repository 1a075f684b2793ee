"""WireGuard keys (X25519). Private keys live in memory only and never print themselves.

X25519 itself is OpenSSL's (gatekeeper/libcrypto.py), not the `cryptography` package's: the
agent needs only this one operation and the package's extension costs it about 11 MB."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field

from gatekeeper.libcrypto import X25519_LEN, x25519_public_key

KEY_LEN = X25519_LEN


class InvalidKey(ValueError):
    """A key that is not 32 bytes of base64."""


def _decode(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey(f"{what} is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise InvalidKey(f"{what} must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @classmethod
    def from_base64(cls, text: str, what: str = "public key") -> PublicKey:
        return cls(_decode(text, what))

    @classmethod
    def from_hex(cls, text: str, what: str = "public key") -> PublicKey:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise InvalidKey(f"{what} is not valid hex") from None
        if len(raw) != KEY_LEN:
            raise InvalidKey(f"{what} must be {KEY_LEN} bytes, got {len(raw)}")
        return cls(raw)

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def hex(self) -> str:
        return self.raw.hex()

    def fingerprint(self) -> str:
        """A short, non-secret label for logs: the first 8 hex digits of sha256(key)."""
        return hashlib.sha256(self.raw).hexdigest()[:8]

    def __str__(self) -> str:
        return self.base64()


@dataclass(frozen=True)
class PrivateKey:
    raw: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> PrivateKey:
        """32 random bytes, clamped as RFC 7748 (and `wg genkey`) clamp an X25519 scalar."""
        raw = bytearray(os.urandom(KEY_LEN))
        raw[0] &= 248
        raw[31] = (raw[31] & 127) | 64
        return cls(bytes(raw))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(_decode(text, "private key"))

    def public_key(self) -> PublicKey:
        return PublicKey(x25519_public_key(self.raw))

    def base64(self) -> str:
        """The secret itself: only for the server's registry and for UAPI/netlink."""
        return base64.b64encode(self.raw).decode()

    def hex(self) -> str:
        return self.raw.hex()

    def __repr__(self) -> str:
        return f"PrivateKey(<redacted>, public={self.public_key().fingerprint()})"

    __str__ = __repr__
