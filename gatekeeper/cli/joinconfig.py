"""`gatekeeper join-config`: what a machine needs to join this server.

Prints the three kernel arguments Omni's join config has (`siderolink.api=`,
`talos.events.sink=`, `talos.logging.kernel=`) or the equivalent documents (SideroLinkConfig,
EventSinkConfig, KmsgLogConfig), built from what the server recorded at its start
(STATE_DIR/server.json: the API address and TLS choice, the overlay sinks).

This command prints a join token on purpose: the one you give it. Join tokens are stored
hashed, so an existing token cannot be printed again: pass it back with --token-file (the
server's --join-token-file, or a token saved from `token create`), or mint a new one with
--create-token. Treat the output like the token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from gatekeeper.agent.telemetry import EVENTS_SINK, KERNEL_LOGS
from gatekeeper.cli.fleetstate import CliError, add_state_dir, fail, open_registry
from gatekeeper.cli.token import create_token, duration_arg, uses_arg
from gatekeeper.config.cmdline import SIDEROLINK_API
from gatekeeper.config.documents import API_VERSION, SIDEROLINK_KIND
from gatekeeper.server.joininfo import INFO_NAME, JoinInfo, read_join_info
from gatekeeper.server.tokens import TokenState, hash_secret, split_token

KMSG_LOG_NAME = "gatekeeper-kmsg"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "join-config",
        help="print the kernel arguments (or documents) that join a machine to this server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the join token from this file ('-': standard input); it is printed",
    )
    which.add_argument(
        "--create-token",
        action="store_true",
        help="create a new join token (see token create) and print it in the config",
    )
    parser.add_argument("--name", default="", help="with --create-token: the token's label")
    parser.add_argument(
        "--expires-in",
        type=duration_arg,
        metavar="DURATION",
        help="with --create-token: no new machines after this long (90m, 12h, 7d)",
    )
    parser.add_argument(
        "--max-uses", type=uses_arg, metavar="N", help="with --create-token: at most N machines"
    )
    parser.add_argument(
        "--tunnel",
        action="store_true",
        help="ask for WireGuard over gRPC (grpc_tunnel=true), for machines without UDP",
    )
    parser.add_argument(
        "--api-url",
        metavar="URL",
        help="the API address machines dial, as grpc://HOST:PORT or https://HOST:PORT "
        "(default: what the server recorded: its --listen host, or its first --endpoint's "
        "host for a wildcard listen)",
    )
    parser.add_argument(
        "--format",
        choices=["cmdline", "yaml"],
        default="cmdline",
        help="kernel arguments on one line (default), or YAML documents for --config",
    )
    parser.add_argument("--json", action="store_true", help="print the parts as JSON")
    add_state_dir(parser)
    parser.set_defaults(func=cmd_join_config)


def api_with_query(base: str, token: str | None, *, tunnel: bool) -> str:
    query = []
    if token:
        query.append(f"jointoken={quote(token, safe='')}")
    if tunnel:
        query.append("grpc_tunnel=true")
    return base + ("?" + "&".join(query) if query else "")


def sinks(info: JoinInfo) -> tuple[str | None, str | None]:
    """(events sink host:port, kernel log URL) on the server's overlay address; None when off."""
    host = f"[{info.server_address}]"
    events = f"{host}:{info.events_port}" if info.events_port else None
    logs = f"tcp://{host}:{info.logs_port}" if info.logs_port else None
    return events, logs


def kernel_args(api: str, events: str | None, logs: str | None) -> list[str]:
    args = [f"{SIDEROLINK_API}={api}"]
    if events:
        args.append(f"{EVENTS_SINK}={events}")
    if logs:
        args.append(f"{KERNEL_LOGS}={logs}")
    return args


def documents(api: str, events: str | None, logs: str | None) -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": API_VERSION, "kind": SIDEROLINK_KIND, "apiUrl": api},
    ]
    if events:
        docs.append({"apiVersion": API_VERSION, "kind": "EventSinkConfig", "endpoint": events})
    if logs:
        docs.append(
            {"apiVersion": API_VERSION, "kind": "KmsgLogConfig", "name": KMSG_LOG_NAME, "url": logs}
        )
    return yaml.safe_dump_all(docs, sort_keys=False, explicit_start=False)


def _check_api_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("grpc", "https") or not rest or any(c in rest for c in "/?#"):
        raise CliError(f"--api-url {url[:80]!r} is not grpc://HOST:PORT or https://HOST:PORT")
    return url


def _read_token(path: str) -> str:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the token file: {exc}") from None
    token = text.strip()
    if not token or not token.isprintable() or " " in token:
        raise CliError(f"{path} does not hold a join token (one line, no spaces)")
    return token


def _checked_token(state_dir: str, info: JoinInfo, token: str) -> None:
    """Refuse a token this server would refuse, so the config does not fail at boot."""
    parts = split_token(token)
    with open_registry(state_dir) as registry:
        record = registry.token(parts[0]) if parts else None
    if parts and record is not None:
        if hash_secret(parts[1]) != record.secret_hash:
            raise CliError(f"the token file's secret does not match token {record.token_id}")
        state = record.state(time.time())
        if state is not TokenState.ACTIVE:
            raise CliError(f"token {record.label} is {state.value}: new machines cannot use it")
    elif not info.fixed_token:
        raise CliError("that token is neither the server's fixed token nor one of its tokens")


def _create_token(args: argparse.Namespace) -> str:
    text, record = create_token(
        args, name=args.name, expires_in=args.expires_in, max_uses=args.max_uses
    )
    print(f"token {record.token_id} created for this join config", file=sys.stderr)
    return text


def _token(args: argparse.Namespace, info: JoinInfo) -> str | None:
    if not args.create_token and (args.name or args.expires_in or args.max_uses):
        raise CliError("--name, --expires-in and --max-uses go with --create-token")
    if args.create_token:
        return _create_token(args)
    if args.token_file:
        token = _read_token(args.token_file)
        _checked_token(args.state_dir, info, token)
        return token
    with open_registry(args.state_dir) as registry:
        has_tokens = bool(registry.tokens())
    if info.fixed_token or has_tokens:
        raise CliError(
            "this server requires a join token: pass --token-file PATH or --create-token"
        )
    return None  # an open server: no token at all


def cmd_join_config(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    try:
        try:
            info = read_join_info(state_dir)
        except FileNotFoundError:
            raise CliError(
                f"no {INFO_NAME} in {state_dir}: start `gatekeeper server --state-dir "
                f"{state_dir}` once (it records its API address there)"
            ) from None
        except ValueError as exc:
            raise CliError(str(exc)) from None
        base = _check_api_url(args.api_url) if args.api_url else info.api_url
        token = _token(args, info)
    except CliError as exc:
        return fail("join-config", str(exc))
    api = api_with_query(base, token, tunnel=args.tunnel)
    events, logs = sinks(info)
    if args.json:
        doc = {
            "api_url": api,
            "events_sink": events,
            "kernel_logs": logs,
            "tls": base.startswith("https://"),
            "tunnel": args.tunnel,
            "kernel_args": kernel_args(api, events, logs),
        }
        print(json.dumps(doc, indent=2))
    elif args.format == "yaml":
        print(documents(api, events, logs), end="")
    else:
        print(" ".join(kernel_args(api, events, logs)))
    return 0
