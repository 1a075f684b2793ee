"""The few OpenSSL calls the machine side needs: X25519 public keys, EC P-256 keys, signing.

Why not the `cryptography` package: mapping its Rust extension costs the agent about 11 MB
of RSS and tens of milliseconds of imports (several times that under emulation), for three
operations. Python's own `hashlib` already loads the system's libcrypto into every process;
this module calls that same library through ctypes, so it adds none, and the key operations
stay in OpenSSL's constant-time code. Only calls OpenSSL 1.1.1 and 3.x both have are used
(Python 3.11 accepts either). Keys live in OpenSSL memory and are freed with their owner.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any

# Maps the libcrypto Python itself uses, for _load to find; a Python built without OpenSSL
# has no _hashlib, and then the usual sonames are tried.
with contextlib.suppress(ImportError):
    import _hashlib  # noqa: F401

# Public constants of OpenSSL's headers (obj_mac.h, evp.h, ec.h), the same in 1.1.1 and 3.x.
_NID_X25519 = 1034
_EVP_PKEY_EC = 408  # NID_X9_62_id_ecPublicKey
_NID_P256 = 415  # NID_X9_62_prime256v1
_EVP_PKEY_OP_KEYGEN = 1 << 2
_EVP_PKEY_OP_PARAMGEN = 1 << 1
_EVP_PKEY_CTRL_EC_PARAMGEN_CURVE_NID = 0x1000 + 1
X25519_LEN = 32


class CryptoError(RuntimeError):
    """libcrypto refused an operation (the message names which)."""


def _loaded_libcrypto() -> str | None:
    """The path of the libcrypto mapped into this process (by Python's _hashlib)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith("libcrypto.so"):
                    return path
    except OSError:
        pass
    return None


def _load() -> ctypes.CDLL:
    # The copy Python already uses (dlopen hands back its handle), or the usual sonames.
    for name in (_loaded_libcrypto(), "libcrypto.so.3", "libcrypto.so.1.1"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise CryptoError("libcrypto (OpenSSL) not found: Python's hashlib should have loaded it")


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
_ctx_new_id = _fn("EVP_PKEY_CTX_new_id", _P, ctypes.c_int, _P)
_ctx_free = _fn("EVP_PKEY_CTX_free", None, _P)
_ctx_ctrl = _fn(
    "EVP_PKEY_CTX_ctrl",
    ctypes.c_int,
    _P,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    _P,
)
_keygen_init = _fn("EVP_PKEY_keygen_init", ctypes.c_int, _P)
_keygen = _fn("EVP_PKEY_keygen", ctypes.c_int, _P, ctypes.POINTER(_P))
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
        ctx = _ctx_new_id(_EVP_PKEY_EC, None)
        if not ctx:
            raise CryptoError("libcrypto has no EC key generator")
        try:
            pkey = _P()
            # The curve is set on a context already made for key generation (as
            # EVP_PKEY_CTX_set_ec_paramgen_curve_nid does; a macro over this in 1.1.1).
            if (
                _keygen_init(ctx) != 1
                or _ctx_ctrl(
                    ctx,
                    _EVP_PKEY_EC,
                    _EVP_PKEY_OP_PARAMGEN | _EVP_PKEY_OP_KEYGEN,
                    _EVP_PKEY_CTRL_EC_PARAMGEN_CURVE_NID,
                    _NID_P256,
                    None,
                )
                <= 0
                or _keygen(ctx, ctypes.byref(pkey)) != 1
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
