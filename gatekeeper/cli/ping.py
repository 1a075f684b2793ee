"""`gatekeeper ping`: the machine pings the server over the overlay and names the path.

Reads the running agent's status (its run dir) for the server's overlay address and the path
WireGuard uses (UDP to an endpoint, or the gRPC tunnel), then sends ICMPv6 echoes to the
server's overlay address. Exit 0 when the server answered at least once, 1 when it did not
(or there is no link to ping over), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gatekeeper.agent.status_file import DEFAULT_RUN_DIR, read_status
from gatekeeper.cli.argtypes import seconds_in, whole_in
from gatekeeper.cli.echo import EchoError, echo


class NoLink(RuntimeError):
    """Nothing to ping over; the message says why in one line."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ping",
        help="ping the server over the overlay, naming the path (UDP or the gRPC tunnel)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--count", "-c", type=whole_in(1, 1000), default=3, help="echoes (default 3)"
    )
    parser.add_argument(
        "--timeout",
        type=seconds_in(0, 60),
        default=2.0,
        help="seconds to wait for each reply (default 2)",
    )
    parser.add_argument(
        "--interval",
        type=seconds_in(0, 60),
        default=0.5,
        help="seconds between echoes (default 0.5)",
    )
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="the agent's run dir")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=cmd_ping)


def api_address(doc: dict[str, Any]) -> tuple[str, int, bool] | None:
    """(host, port, TLS) of the API from the status (its URL is stored with the token
    redacted); None when the agent has no configuration."""
    api = doc.get("api")
    if not isinstance(api, str) or not api:
        return None
    url = urlsplit(api if "://" in api else f"grpc://{api}")
    try:
        port = url.port
    except ValueError:
        return None
    if not url.hostname:
        return None
    tls = url.scheme != "grpc"  # docs/compatibility.md: every other scheme means TLS
    return url.hostname, port or 443, tls


def show_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def link_path(doc: dict[str, Any]) -> tuple[str, str]:
    """("udp" or "tunnel", the words for it) from a status document."""
    if doc.get("tunnel"):
        api = api_address(doc)
        to = f" to {show_host(api[0], api[1])}" if api else ""
        return "tunnel", f"via the gRPC tunnel{to}"
    return "udp", f"via UDP {doc.get('endpoint') or '(no endpoint)'}"


def overlay_target(doc: dict[str, Any]) -> ipaddress.IPv6Address:
    server = doc.get("server_address")
    if not server:
        error = doc.get("last_error")
        raise NoLink(
            f"no link to the server (agent state {doc.get('state', '?')})"
            + (f": {error}" if error else "")
        )
    try:
        return ipaddress.IPv6Address(str(server))
    except ValueError:
        raise NoLink(f"the status names no valid server address: {str(server)[:60]!r}") from None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def cmd_ping(args: argparse.Namespace) -> int:
    try:
        doc = read_status(Path(args.run_dir))
        target = overlay_target(doc)
    except (FileNotFoundError, ValueError, NoLink) as exc:
        print(f"gatekeeper ping: {exc}", file=sys.stderr)
        return 1
    path, via = link_path(doc)
    link = doc.get("link_name") or "?"
    if not args.json:
        print(f"PING {target} (the server) over {link}, {via}", flush=True)
    rtts: list[float | None] = []
    for seq in range(1, args.count + 1):
        if seq > 1:
            time.sleep(args.interval)
        try:
            rtt = echo(target, seq, timeout=args.timeout)
        except EchoError as exc:
            print(f"gatekeeper ping: {exc}", file=sys.stderr)
            return 1
        rtts.append(rtt)
        if not args.json:
            if rtt is None:
                print(f"no reply from {target}: seq {seq} (waited {args.timeout:g} s)", flush=True)
            else:
                print(f"reply from {target}: seq {seq} time {_ms(rtt):.2f} ms", flush=True)
    got = [r for r in rtts if r is not None]
    if args.json:
        print(
            json.dumps(
                {
                    "server": str(target),
                    "link": link,
                    "path": path,
                    "via": via,
                    "sent": len(rtts),
                    "received": len(got),
                    "rtt_ms": [None if r is None else _ms(r) for r in rtts],
                },
                indent=2,
            )
        )
    else:
        loss = 100 * (len(rtts) - len(got)) // len(rtts)
        summary = f"{len(rtts)} sent, {len(got)} received, {loss}% loss"
        if got:
            low, mean, high = min(got), sum(got) / len(got), max(got)
            summary += f", rtt min/avg/max {_ms(low):.2f}/{_ms(mean):.2f}/{_ms(high):.2f} ms"
        print(summary)
    if not got:
        print(
            f"gatekeeper ping: the server did not answer over the overlay ({via})", file=sys.stderr
        )
        return 1
    return 0
