"""The server over TLS (`--tls-cert/--tls-key`) and an agent with an https:// API URL."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gatekeeper.lab.siderolink_lab import API_PORT, SideroLinkLab

pytestmark = pytest.mark.netns


@pytest.fixture
def sl() -> Iterator[SideroLinkLab]:
    with SideroLinkLab() as lab:
        yield lab


def self_signed(directory: Path, address: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gatekeeper test server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_agent_provisions_over_tls(sl: SideroLinkLab, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, sl.server_underlay)
    sl.start_server("--tls-cert", str(cert), "--tls-key", str(key))
    url = f"https://[{sl.server_underlay}]:{API_PORT}?jointoken={sl.join_token}"
    machine = sl.add_machine(api_url=url, start=False)
    # The agent trusts the system roots, as Talos does; gRPC's own variable adds our test CA.
    sl.start_agent(machine, env={"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert)})
    status = sl.wait_connected(machine)
    assert status["api"].startswith("https://") and sl.join_token not in status["api"]
    assert sl.ping(machine, status["server_address"])


def test_untrusted_certificate_is_refused_and_retried(sl: SideroLinkLab, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, sl.server_underlay)
    sl.start_server("--tls-cert", str(cert), "--tls-key", str(key))
    url = f"https://[{sl.server_underlay}]:{API_PORT}?jointoken={sl.join_token}"
    machine = sl.add_machine(api_url=url)
    status = sl.wait_status(machine, lambda s: s.get("state") == "backoff", 20, "backing off")
    assert "UNAVAILABLE" in status["last_error"] and not status["connected"]


def test_plaintext_agent_cannot_talk_to_a_tls_server(sl: SideroLinkLab, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, sl.server_underlay)
    sl.start_server("--tls-cert", str(cert), "--tls-key", str(key))
    machine = sl.add_machine()  # grpc:// (plaintext)
    status = sl.wait_status(machine, lambda s: s.get("state") == "backoff", 20, "backing off")
    assert not status["connected"]
