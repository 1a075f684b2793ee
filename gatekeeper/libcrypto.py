"""The few OpenSSL 3 calls the machine side needs: X25519 public keys, EC P-256 keys, signing.

Why not the `cryptography` package: mapping its Rust extension costs the agent about 11 MB
of RSS and tens of milliseconds of imports (several times that under emulation), for three
operations. Python's own `hashlib` already loads the system's libcrypto.so.3 into every
process, so calling it through ctypes adds no library; the key operations stay in OpenSSL's
constant-time code. Keys live in OpenSSL memory and are freed with their Python owner.
"""

from __future__ import annotations

import ctypes
from typing import Any

# NID_X25519 in OpenSSL's obj_mac.h (a stable public constant).
_NID_X25519 = 1034
X25519_LEN = 32


class CryptoError(RuntimeError):
    """libcrypto refused an operation (the message names which)."""


def _load() -> ctypes.CDLL:
    # hashlib has loaded it already: dlopen hands back that copy.
    try:
        return ctypes.CDLL("libcrypto.so.3")
    except OSError:
        from ctypes.util import find_library  # runs ldconfig: only when the soname is missing

        name = find_library("crypto")
        if name:
            return ctypes.CDLL(name)
    raise CryptoError("libcrypto (OpenSSL 3) not found")


_lib = _load()
_P = ctypes.c_void_p
_SZ = ctypes.c_size_t


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    func = getattr(_lib, name)
    func.restype = restype
    func.argtypes = list(argtypes)
    return func


_pkey_new_raw_private = _fn(
    "EVP_PKEY_new_raw_private_key", _P, ctypes.c_int, _P, ctypes.c_char_p, _SZ
)
_pkey_get_raw_public = _fn(
    "EVP_PKEY_get_raw_public_key", ctypes.c_int, _P, ctypes.c_char_p, ctypes.POINTER(_SZ)
)
_pkey_free = _fn("EVP_PKEY_free", None, _P)
_ctx_new_from_name = _fn("EVP_PKEY_CTX_new_from_name", _P, _P, ctypes.c_char_p, _P)
_ctx_free = _fn("EVP_PKEY_CTX_free", None, _P)
_keygen_init = _fn("EVP_PKEY_keygen_init", ctypes.c_int, _P)
_set_group_name = _fn("EVP_PKEY_CTX_set_group_name", ctypes.c_int, _P, ctypes.c_char_p)
_generate = _fn("EVP_PKEY_generate", ctypes.c_int, _P, ctypes.POINTER(_P))
_i2d_pubkey = _fn("i2d_PUBKEY", ctypes.c_int, _P, ctypes.POINTER(_P))
_pkey2pkcs8 = _fn("EVP_PKEY2PKCS8", _P, _P)
_i2d_pkcs8 = _fn("i2d_PKCS8_PRIV_KEY_INFO", ctypes.c_int, _P, ctypes.POINTER(_P))
_pkcs8_free = _fn("PKCS8_PRIV_KEY_INFO_free", None, _P)
_md_ctx_new = _fn("EVP_MD_CTX_new", _P)
_md_ctx_free = _fn("EVP_MD_CTX_free", None, _P)
_sha256 = _fn("EVP_sha256", _P)
_digest_sign_init = _fn("EVP_DigestSignInit", ctypes.c_int, _P, _P, _P, _P, _P)
_digest_sign = _fn(
    "EVP_DigestSign", ctypes.c_int, _P, ctypes.c_char_p, ctypes.POINTER(_SZ), ctypes.c_char_p, _SZ
)
_crypto_free = _fn("CRYPTO_free", None, _P, ctypes.c_char_p, ctypes.c_int)


def x25519_public_key(private: bytes) -> bytes:
    """The X25519 public key (32 bytes) of a 32-byte private scalar (clamped by X25519)."""
    if len(private) != X25519_LEN:
        raise ValueError(f"an X25519 private key is {X25519_LEN} bytes, got {len(private)}")
    pkey = _pkey_new_raw_private(_NID_X25519, None, private, X25519_LEN)
    if not pkey:
        raise CryptoError("libcrypto refused an X25519 private key")
    try:
        out = ctypes.create_string_buffer(X25519_LEN)
        size = _SZ(X25519_LEN)
        if _pkey_get_raw_public(pkey, out, ctypes.byref(size)) != 1 or size.value != X25519_LEN:
            raise CryptoError("libcrypto could not derive an X25519 public key")
        return out.raw
    finally:
        _pkey_free(pkey)


def _i2d(encode: Any, obj: int, what: str) -> bytes:
    """Run an OpenSSL i2d_* encoder that allocates its output, and copy the DER out."""
    out = _P()  # NULL: the encoder allocates
    size = encode(obj, ctypes.byref(out))
    if size <= 0 or not out.value:
        raise CryptoError(f"libcrypto could not encode {what}")
    try:
        return ctypes.string_at(out.value, size)
    finally:
        _crypto_free(out.value, None, 0)


class EcKey:
    """An EC P-256 key pair held by OpenSSL; the private half never leaves it except as
    PKCS#8 DER for a TLS stack in this process."""

    def __init__(self) -> None:
        self._pkey: int | None = None
        ctx = _ctx_new_from_name(None, b"EC", None)
        if not ctx:
            raise CryptoError("libcrypto has no EC key generator")
        try:
            pkey = _P()
            if (
                _keygen_init(ctx) != 1
                or _set_group_name(ctx, b"P-256") != 1
                or _generate(ctx, ctypes.byref(pkey)) != 1
                or not pkey.value
            ):
                raise CryptoError("libcrypto could not generate an EC P-256 key")
            self._pkey = pkey.value
        finally:
            _ctx_free(ctx)

    def __del__(self) -> None:
        if self._pkey:
            _pkey_free(self._pkey)
            self._pkey = None

    @property
    def _handle(self) -> int:
        assert self._pkey is not None
        return self._pkey

    def spki_der(self) -> bytes:
        """The public key as a DER SubjectPublicKeyInfo."""
        return _i2d(_i2d_pubkey, self._handle, "a public key")

    def pkcs8_der(self) -> bytes:
        """The private key as an unencrypted DER PKCS#8 PrivateKeyInfo."""
        info = _pkey2pkcs8(self._handle)
        if not info:
            raise CryptoError("libcrypto could not export the private key")
        try:
            return _i2d(_i2d_pkcs8, info, "the private key")
        finally:
            _pkcs8_free(info)

    def sign_sha256(self, data: bytes) -> bytes:
        """ECDSA with SHA-256 over data: the DER Ecdsa-Sig-Value X.509 wants."""
        ctx = _md_ctx_new()
        if not ctx:
            raise CryptoError("libcrypto could not allocate a digest context")
        try:
            size = _SZ(0)
            if (
                _digest_sign_init(ctx, None, _sha256(), None, self._handle) != 1
                or _digest_sign(ctx, None, ctypes.byref(size), data, len(data)) != 1
            ):
                raise CryptoError("libcrypto could not start an ECDSA signature")
            out = ctypes.create_string_buffer(size.value)
            if _digest_sign(ctx, out, ctypes.byref(size), data, len(data)) != 1:
                raise CryptoError("libcrypto could not sign")
            return out.raw[: size.value]
        finally:
            _md_ctx_free(ctx)
