"""`gatekeeper maint`: talk to a machine's maintenance API the way `talosctl --insecure` does.

    gatekeeper maint version -n fdae:41e4:649b:9303::7081
    gatekeeper maint get siderolinkstatus -n fdae:41e4:649b:9303::7081
    gatekeeper maint get links -o yaml --watch

TLS is not verified (self-signed server), unless --fingerprint pins the server's certificate
or public key (SHA-256, as `gatekeeper maint version` prints it). Type names resolve through
the machine's ResourceDefinitions, so any alias talosctl accepts works here too.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
import yaml

from gatekeeper import __version__
from gatekeeper.maintenance import client, output
from gatekeeper.maintenance.binding import DEFAULT_PORT
from gatekeeper.maintenance.tls import (
    certificate_fingerprint,
    normalize_fingerprint,
    spki_fingerprint_of,
)
from gatekeeper.pb.cosi import state_pb2

_EVENT_NAMES = {
    state_pb2.CREATED: "created",
    state_pb2.UPDATED: "updated",
    state_pb2.DESTROYED: "destroyed",
}


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 1-65535")
    return port


def _fingerprint(text: str) -> str:
    try:
        return normalize_fingerprint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n",
        "--nodes",
        dest="node",
        default="127.0.0.1",
        metavar="ADDR",
        help="the machine's address (its SideroLink address when it has one)",
    )
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="API port (default 50000)")
    p.add_argument(
        "--fingerprint",
        type=_fingerprint,
        metavar="SHA256",
        help="pin the server's certificate or public-key SHA-256 (hex, colons allowed)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    maint = subparsers.add_parser(
        "maint",
        help="query a machine's maintenance API (Version, resources)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = maint.add_subparsers(dest="maint_command", required=True, metavar="COMMAND")

    version = sub.add_parser("version", help="show the machine's version and TLS fingerprints")
    _common(version)
    version.set_defaults(func=cmd_version)

    get = sub.add_parser("get", help="get, list or watch resources (talosctl get)")
    get.add_argument("type", metavar="TYPE", help="resource type or alias, e.g. siderolinkstatus")
    get.add_argument("id", metavar="ID", nargs="?", help="one resource id (default: all)")
    get.add_argument("--namespace", help="namespace (default: the type's default namespace)")
    get.add_argument(
        "-o", "--output", choices=("table", "yaml", "json"), default="table", help="output format"
    )
    get.add_argument("-w", "--watch", action="store_true", help="keep printing changes")
    _common(get)
    get.set_defaults(func=cmd_get)


def _node(args: argparse.Namespace) -> str:
    node: str = args.node.strip()
    return node[1:-1] if node.startswith("[") and node.endswith("]") else node


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def cmd_version(args: argparse.Namespace) -> int:
    node = _node(args)
    try:
        with client.connect(
            node, args.port, fingerprint=args.fingerprint, timeout=args.timeout
        ) as conn:
            reply = client.version(conn, timeout=args.timeout)
            der = conn.certificate
    except client.ClientError as exc:
        return _fail(str(exc))
    except grpc.RpcError as exc:
        return _fail(client.describe_rpc_error(exc))
    print("Client:")
    print(f"\tTag:         v{__version__}")
    for msg in reply.messages:
        v, p = msg.version, msg.platform
        print("Server:")
        print(f"\tNODE:        {msg.metadata.hostname or node}")
        print(f"\tTag:         {v.tag}")
        print(f"\tSHA:         {v.sha}")
        print(f"\tBuilt:       {v.built}")
        print(f"\tGo version:  {v.go_version}")
        print(f"\tOS/Arch:     {v.os}/{v.arch}")
        print(f"\tPlatform:    {p.name} ({p.mode})")
        if msg.features.rbac:
            print("\tEnabled:     RBAC")
    print("TLS:")
    print(f"\tCertificate SHA-256: {certificate_fingerprint(der)}")
    print(f"\tPublic key SHA-256:  {spki_fingerprint_of(der)}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    node = _node(args)
    try:
        with client.connect(
            node, args.port, fingerprint=args.fingerprint, timeout=args.timeout
        ) as conn:
            info = client.resolve_type(conn, args.type, timeout=args.timeout)
            namespace = args.namespace or info.default_namespace
            if args.watch:
                return _watch(conn, node, info, namespace, args.id, args.output)
            if args.id is not None:
                items = [client.get(conn, namespace, info.type, args.id, timeout=args.timeout)]
            else:
                items = client.list_resources(conn, namespace, info.type, timeout=args.timeout)
    except client.ClientError as exc:
        return _fail(str(exc))
    except grpc.RpcError as exc:
        return _fail(client.describe_rpc_error(exc))
    try:
        if args.output == "table":
            text = output.table(node, info, items)
        elif args.output == "yaml":
            text = output.yaml_documents(node, items)
        else:
            text = output.json_documents(node, items)
    except client.ClientError as exc:  # a spec the bounded YAML reader refused
        return _fail(str(exc))
    sys.stdout.write(text)
    return 0


def _watch(
    conn: client.Connection,
    node: str,
    info: client.TypeInfo,
    namespace: str,
    id: str | None,
    fmt: str,
) -> int:
    header = True
    for event in client.watch(conn, namespace, info.type, id):
        if event.event_type not in _EVENT_NAMES:
            continue  # BOOTSTRAPPED and friends: markers, not rows
        if fmt == "table":
            mark = output.EVENT_MARKS[event.event_type]
            sys.stdout.write(
                output.table(node, info, [event.resource], marks=[mark], header=header)
            )
            header = False
        else:
            doc: dict[str, Any] = {
                "event": _EVENT_NAMES[event.event_type],
                **output.document(node, event.resource),
            }
            if fmt == "yaml":
                sys.stdout.write("---\n" + yaml.safe_dump(doc, sort_keys=False, indent=4))
            else:
                sys.stdout.write(json.dumps(doc, indent=4) + "\n")
        sys.stdout.flush()
    return 0
