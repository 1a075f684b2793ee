"""WireGuard keys (X25519). Private keys live in memory only and never print themselves."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_LEN = 32


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
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(_decode(text, "private key"))

    def public_key(self) -> PublicKey:
        key = X25519PrivateKey.from_private_bytes(self.raw)
        return PublicKey(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def base64(self) -> str:
        """The secret itself: only for the server's registry and for UAPI/netlink."""
        return base64.b64encode(self.raw).decode()

    def hex(self) -> str:
        return self.raw.hex()

    def __repr__(self) -> str:
        return f"PrivateKey(<redacted>, public={self.public_key().fingerprint()})"

    __str__ = __repr__
