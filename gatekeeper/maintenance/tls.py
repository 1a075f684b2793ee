"""The maintenance API's self-signed TLS identity, and certificate fingerprints.

One key per service for its whole life; the certificate is reissued when the listening
addresses change (its SANs name them), so a client pinning the public key (SPKI) fingerprint
keeps working across address moves. Clients do not verify the chain, as talosctl --insecure.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import secrets
from collections.abc import Iterable

from gatekeeper.libcrypto import EcKey
from gatekeeper.maintenance import der
from gatekeeper.maintenance.policy import IPAddress

COMMON_NAME = "maintenance-service.talos.dev"
LOOPBACKS: tuple[IPAddress, ...] = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
VALIDITY = datetime.timedelta(days=365)

_ECDSA_WITH_SHA256 = der.sequence(der.oid("1.2.840.10045.4.3.2"))
_NAME = der.sequence(
    der.tlv(
        der.SET, der.sequence(der.oid("2.5.4.3"), der.tlv(der.UTF8_STRING, COMMON_NAME.encode()))
    )
)
_SUBJECT_ALT_NAME = "2.5.29.17"
_BASIC_CONSTRAINTS = "2.5.29.19"
_EXTENDED_KEY_USAGE = "2.5.29.37"
_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"


def _pem(label: str, data: bytes) -> bytes:
    body = base64.b64encode(data)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        b"\n".join([f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode()])
        + b"\n"
    )


def _extension(name: str, value: bytes, critical: bool = False) -> bytes:
    return der.sequence(
        der.oid(name), *([der.boolean(True)] if critical else []), der.tlv(der.OCTET_STRING, value)
    )


class ServerIdentity:
    """An in-memory EC P-256 key (never written anywhere) and certificates issued for it.

    The key and signatures are OpenSSL's (gatekeeper/libcrypto.py); the certificate's DER is
    written here: one fixed shape, so a few lines of encoder cost less than a library."""

    def __init__(self) -> None:
        self._key = EcKey()
        self._spki = self._key.spki_der()

    @property
    def key_pem(self) -> bytes:
        return _pem("PRIVATE KEY", self._key.pkcs8_der())

    @property
    def spki_fingerprint(self) -> str:
        """Hex SHA-256 of the public key (SubjectPublicKeyInfo DER): stable for the key's life."""
        return hashlib.sha256(self._spki).hexdigest()

    def certificate_pem(self, addresses: Iterable[IPAddress]) -> bytes:
        """Self-signed X.509 v3, CN maintenance-service.talos.dev, SANs = these addresses +
        loopback, not a CA, for server authentication, valid for a year."""
        ips = list(dict.fromkeys([*addresses, *LOOPBACKS]))
        now = datetime.datetime.now(datetime.UTC)
        names = [der.implicit(2, COMMON_NAME.encode())] + [der.implicit(7, ip.packed) for ip in ips]
        tbs = der.sequence(
            der.explicit(0, der.integer(2)),  # v3
            der.integer(secrets.randbits(159) | 1),  # positive, at most 20 bytes (RFC 5280)
            _ECDSA_WITH_SHA256,
            _NAME,
            der.sequence(
                der.time(now - datetime.timedelta(minutes=5)),  # tolerate client clock skew
                der.time(now + VALIDITY),
            ),
            _NAME,
            self._spki,
            der.explicit(
                3,
                der.sequence(
                    _extension(_SUBJECT_ALT_NAME, der.sequence(*names)),
                    _extension(_BASIC_CONSTRAINTS, der.sequence(), critical=True),
                    _extension(_EXTENDED_KEY_USAGE, der.sequence(der.oid(_SERVER_AUTH))),
                ),
            ),
        )
        signature = self._key.sign_sha256(tbs)
        return _pem("CERTIFICATE", der.sequence(tbs, _ECDSA_WITH_SHA256, der.bit_string(signature)))


def certificate_fingerprint(der_bytes: bytes) -> str:
    """Hex SHA-256 of a DER certificate (what `openssl x509 -fingerprint -sha256` shows)."""
    return hashlib.sha256(der_bytes).hexdigest()


def spki_fingerprint_of(der_bytes: bytes) -> str:
    """Hex SHA-256 of a DER certificate's public key (its SubjectPublicKeyInfo, as encoded).

    Raises der.DerError for bytes that are not a certificate."""
    tag, certificate, _ = der.read(der_bytes)
    tbs = der.elements(certificate)[0] if tag == der.SEQUENCE and certificate else None
    if tbs is None or tbs[0] != der.SEQUENCE:
        raise der.DerError("not an X.509 certificate")
    fields = der.elements(tbs[1])
    # version [0] is optional (v1 omits it); then serial, signature, issuer, validity,
    # subject, subjectPublicKeyInfo.
    index = 6 if fields and fields[0][0] == 0xA0 else 5
    if len(fields) <= index or fields[index][0] != der.SEQUENCE:
        raise der.DerError("X.509 certificate without a public key")
    return hashlib.sha256(fields[index][2]).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept 'AB:CD:..', 'abcd..' or 'sha256:abcd..'; return lowercase hex, or raise ValueError."""
    value = text.strip().lower()
    value = value.removeprefix("sha256:").removeprefix("sha256/")
    value = value.replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"fingerprint {text!r} is not a SHA-256 hex digest (64 hex digits)")
    return value


def local_addresses() -> list[IPAddress]:
    """Every address configured in this network namespace (for the SANs of ListenAll)."""
    from gatekeeper.wireguard import rtnl

    return [found.interface.ip for found in rtnl.addresses()]
