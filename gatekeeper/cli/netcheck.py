"""`gatekeeper netcheck`: can this machine reach its server, and how.

From the running agent's status (its run dir): the API address and the WireGuard endpoints of
the server's last reply. Checks, each with a one-line result:
- api: a TCP connection to the API, per address family the host resolves to;
- grpc: an HTTP/2 (gRPC) connection to it, over TLS for https:// with the roots gRPC (and so
  the agent) trusts: the system's, or GRPC_DEFAULT_SSL_ROOTS_FILE_PATH; a certificate
  problem shows here; a proxy from the environment (https_proxy, grpc_proxy) is
  named, since gRPC dials through it;
- udp: per WireGuard endpoint, whether there is a route, and for the endpoint in use the age
  of the last handshake (WireGuard answers nobody but its peers, so an endpoint not in use
  cannot be probed from here);
- overlay: an ICMPv6 echo to the server's overlay address, and one of 1280 bytes (the link
  MTU) that may not be fragmented.

Exit 0 when every check passed, 1 when the server cannot be reached (neither the API nor the
overlay answers), 3 when it can but a check failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from gatekeeper.agent.status_file import DEFAULT_RUN_DIR, read_status
from gatekeeper.cli.echo import EchoError, echo
from gatekeeper.cli.ping import NoLink, api_address, link_path, overlay_target, show_host
from gatekeeper.link.lifecycle import LINK_MTU
from gatekeeper.overlay import split_endpoint

TIMEOUT = 3.0
GRPC_ROOTS = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"
# What gRPC core reads, in its order (lower case only).
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")


@dataclass(frozen=True)
class Check:
    name: str  # api, grpc, udp, overlay, mtu
    target: str
    ok: bool
    detail: str


def _family(address: str) -> str:
    return "IPv6" if ipaddress.ip_address(address.split("%")[0]).version == 6 else "IPv4"


def check_api(host: str, port: int) -> list[Check]:
    target = show_host(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return [Check("api", target, False, f"{host} does not resolve: {exc.strerror}")]
    checks = []
    for family, kind, proto, _, sockaddr in infos:
        address = str(sockaddr[0])
        started = time.monotonic()
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(TIMEOUT)
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                why = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
                checks.append(Check("api", target, False, f"{_family(address)} {address}: {why}"))
                continue
        took = (time.monotonic() - started) * 1000
        checks.append(
            Check(
                "api", target, True, f"{_family(address)} {address}: TCP connects ({took:.1f} ms)"
            )
        )
    return checks


def proxy_seen() -> str | None:
    """The proxy gRPC dials through, from the variables it reads (in its order)."""
    for name in PROXY_VARIABLES:
        value = os.environ.get(name)
        if value:
            shown = urlsplit(value if "://" in value else f"http://{value}")
            # A proxy URL may carry a password: show where it goes, not who logs in.
            host = shown.hostname or "?"
            host = f"[{host}]" if ":" in host else host
            port = f":{shown.port}" if shown.port else ""
            exempt = os.environ.get("no_proxy")
            unless = f" (unless no_proxy={exempt} exempts it)" if exempt else ""
            return f"{name}={shown.scheme}://{host}{port}{unless}"
    return None


def check_grpc(host: str, port: int, *, tls: bool) -> Check:
    target = show_host(host, port)
    proxy = proxy_seen()
    via = f" through the proxy {proxy}" if proxy else ""
    if tls:
        # The TLS handshake by itself, so that a certificate problem is named precisely.
        try:
            with socket.create_connection((host, port), timeout=TIMEOUT) as raw:
                # The roots gRPC (so the agent) trusts: the system's, or its own variable's.
                context = ssl.create_default_context(cafile=os.environ.get(GRPC_ROOTS) or None)
                with context.wrap_socket(raw, server_hostname=host) as wrapped:
                    version = wrapped.version()
        except ssl.SSLCertVerificationError as exc:
            return Check("grpc", target, False, f"TLS certificate refused: {exc.verify_message}")
        except (OSError, ssl.SSLError) as exc:
            return Check("grpc", target, False, f"TLS handshake failed: {exc}")
    channel = (
        grpc.secure_channel(target, grpc.ssl_channel_credentials())
        if tls
        else grpc.insecure_channel(target)
    )
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        except grpc.FutureTimeoutError:
            return Check("grpc", target, False, f"no gRPC (HTTP/2) connection{via}")
    what = f"gRPC over {version}" if tls else "gRPC (plaintext h2c)"
    return Check("grpc", target, True, f"{what} connects{via}")


def check_udp(doc: dict[str, Any]) -> list[Check]:
    in_use = None if doc.get("tunnel") else doc.get("endpoint")
    checks = []
    for endpoint in doc.get("endpoints") or []:
        try:
            host, port = split_endpoint(str(endpoint))
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, sockaddr = infos[0]
            with socket.socket(family, kind, proto) as sock:
                sock.connect(sockaddr)  # UDP: only the route lookup, nothing is sent
        except (ValueError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            checks.append(Check("udp", str(endpoint), False, f"no route: {why}"))
            continue
        detail = f"{_family(str(sockaddr[0]))}, routed"
        if endpoint == in_use:
            handshake = doc.get("last_handshake")
            if not handshake:
                checks.append(Check("udp", str(endpoint), False, f"{detail}; in use, no handshake"))
                continue
            detail += f"; in use, handshake {max(0.0, time.time() - handshake):.0f} s ago"
        checks.append(Check("udp", str(endpoint), True, detail))
    return checks


def check_overlay(target: ipaddress.IPv6Address, via: str) -> list[Check]:
    checks = []
    for name, size in (("overlay", 64), ("mtu", LINK_MTU)):
        try:
            rtt = echo(target, 1, timeout=TIMEOUT, size=size, dont_fragment=True)
        except EchoError as exc:
            checks.append(Check(name, str(target), False, str(exc)))
            continue
        what = f"{size}-byte echo" if name == "mtu" else "echo"
        if rtt is None:
            checks.append(Check(name, str(target), False, f"{what} unanswered ({via})"))
        else:
            checks.append(
                Check(name, str(target), True, f"{what} answered in {rtt * 1000:.1f} ms ({via})")
            )
    return checks


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "netcheck",
        help="check the ways to the server: API, gRPC/TLS, UDP endpoints, overlay, MTU",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="the agent's run dir")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(func=cmd_netcheck)


def run_checks(doc: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    api = api_address(doc)
    if api is not None:
        host, port, tls = api
        checks += check_api(host, port)
        checks.append(check_grpc(host, port, tls=tls))
    checks += check_udp(doc)
    try:
        target = overlay_target(doc)
    except NoLink as exc:
        checks.append(Check("overlay", "-", False, str(exc)))
    else:
        checks += check_overlay(target, link_path(doc)[1])
    return checks


def verdict(checks: list[Check]) -> int:
    if all(c.ok for c in checks):
        return 0
    reachable = any(c.ok for c in checks if c.name in ("api", "overlay"))
    return 3 if reachable else 1


def cmd_netcheck(args: argparse.Namespace) -> int:
    try:
        doc = read_status(Path(args.run_dir))
    except (FileNotFoundError, ValueError) as exc:
        print(f"gatekeeper netcheck: {exc}", file=sys.stderr)
        return 1
    checks = run_checks(doc)
    code = verdict(checks)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "exit": code}, indent=2))
    else:
        width = max(len(c.target) for c in checks) if checks else 0
        for c in checks:
            print(f"{'ok' if c.ok else 'FAIL':<4}  {c.name:<7} {c.target:<{width}}  {c.detail}")
    if code == 1:
        print("gatekeeper netcheck: the server cannot be reached", file=sys.stderr)
    return code
