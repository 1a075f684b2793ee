"""WireGuard keys and the maintenance API's certificate, made by OpenSSL through ctypes and a
small DER writer (gatekeeper/libcrypto.py, gatekeeper/maintenance/der.py), checked by an
independent implementation: the `cryptography` package (the server still depends on it) and
Python's ssl module for a real TLS handshake against the certificate."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.maintenance import der
from gatekeeper.maintenance.tls import (
    COMMON_NAME,
    ServerIdentity,
    certificate_fingerprint,
    spki_fingerprint_of,
)
from gatekeeper.wireguard.keys import PrivateKey


@given(st.binary(min_size=32, max_size=32))
def test_public_keys_are_what_another_x25519_gives(raw: bytes) -> None:
    other = X25519PrivateKey.from_private_bytes(raw).public_key()
    expected = other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert PrivateKey(raw).public_key().raw == expected


def test_generated_keys_are_clamped_distinct_scalars() -> None:
    keys = {PrivateKey.generate().raw for _ in range(64)}
    assert len(keys) == 64
    for raw in keys:
        assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40


def test_the_certificate_says_what_clients_expect() -> None:
    identity = ServerIdentity()
    overlay = ipaddress.ip_address("fdae:41e4:649b:9303::5")
    cert = x509.load_pem_x509_certificate(identity.certificate_pem([overlay]))

    assert cert.version == x509.Version.v3
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == COMMON_NAME
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [COMMON_NAME]
    assert san.get_values_for_type(x509.IPAddress) == [
        overlay,
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=364)
    assert cert.serial_number > 0

    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))

    key = serialization.load_pem_private_key(identity.key_pem, None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == public.public_bytes(
        serialization.Encoding.DER, spki
    )


def test_the_public_key_fingerprint_survives_reissue_and_matches_any_parser() -> None:
    identity = ServerIdentity()
    first = ssl.PEM_cert_to_DER_cert(identity.certificate_pem([]).decode())
    second = ssl.PEM_cert_to_DER_cert(
        identity.certificate_pem([ipaddress.ip_address("10.5.0.2")]).decode()
    )
    assert first != second
    assert spki_fingerprint_of(first) == spki_fingerprint_of(second) == identity.spki_fingerprint
    # The same bytes another parser takes for the public key.
    other = x509.load_der_x509_certificate(first)
    spki = other.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki_fingerprint_of(first) == hashlib.sha256(spki).hexdigest()


def test_the_public_key_is_found_in_certificates_written_elsewhere() -> None:
    """`gatekeeper maint --fingerprint` pins keys of servers it did not start (Talos's)."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "talos")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, None)
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der_bytes = cert.public_bytes(serialization.Encoding.DER)
    assert spki_fingerprint_of(der_bytes) == hashlib.sha256(spki).hexdigest()


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x05\x02\x01", b"\x04\x00", b"\x30\x00"])
def test_bytes_that_are_not_a_certificate_are_one_clear_error(data: bytes) -> None:
    with pytest.raises(der.DerError):
        spki_fingerprint_of(data)


def test_a_tls_client_completes_a_handshake_with_the_certificate(tmp_path: Path) -> None:
    identity = ServerIdentity()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(identity.certificate_pem([]))
    key.write_bytes(identity.key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))  # trusts exactly this one

    async def scenario() -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="127.0.0.1"
            )
            line = await reader.readline()
            writer.close()
            return line.decode()

    assert asyncio.run(scenario()) == "hello\n"


def test_openssl_cli_reads_the_certificate(tmp_path: Path) -> None:
    """What an operator runs to look at it: the fingerprint the CLI prints is openssl's."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary")
    identity = ServerIdentity()
    pem = identity.certificate_pem([])
    cert = tmp_path / "cert.pem"
    cert.write_bytes(pem)
    out = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256", "-subject"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert COMMON_NAME in out.stdout
    want = certificate_fingerprint(ssl.PEM_cert_to_DER_cert(pem.decode()))
    got = out.stdout.split("=", 1)[1].splitlines()[0].replace(":", "").lower()
    assert got == want
