"""The maintenance API's self-signed TLS identity, and certificate fingerprints.

One key per service for its whole life; the certificate is reissued when the listening
addresses change (its SANs name them), so a client pinning the public key (SPKI) fingerprint
keeps working across address moves. Clients do not verify the chain, as talosctl --insecure.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gatekeeper.maintenance.policy import IPAddress

COMMON_NAME = "maintenance-service.talos.dev"
LOOPBACKS: tuple[IPAddress, ...] = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
VALIDITY = datetime.timedelta(days=365)


class ServerIdentity:
    """An in-memory EC P-256 key (never written anywhere) and certificates issued for it."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    @property
    def key_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def spki_fingerprint(self) -> str:
        """Hex SHA-256 of the public key (SubjectPublicKeyInfo DER): stable for the key's life."""
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).hexdigest()

    def certificate_pem(self, addresses: Iterable[IPAddress]) -> bytes:
        """Self-signed, CN maintenance-service.talos.dev, SANs = these addresses + loopback."""
        ips = list(dict.fromkeys([*addresses, *LOOPBACKS]))
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate client clock skew
            .not_valid_after(now + VALIDITY)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(COMMON_NAME), *(x509.IPAddress(ip) for ip in ips)]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def certificate_fingerprint(der: bytes) -> str:
    """Hex SHA-256 of a DER certificate (what `openssl x509 -fingerprint -sha256` shows)."""
    return hashlib.sha256(der).hexdigest()


def spki_fingerprint_of(der: bytes) -> str:
    """Hex SHA-256 of a DER certificate's public key."""
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


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
