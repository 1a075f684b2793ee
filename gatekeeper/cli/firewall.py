"""`gatekeeper firewall`: check, apply, show and explain the ingress firewall.

Documents come from -c/--config (files or directories, repeatable); without it, the documents
the running agent uses (its status file names them), or else the defaults shipped in the
package (gatekeeper/rules/*.yaml). The link state (WireGuard listen port, extra
trusted interfaces) comes from flags, or else from the live table, so `show` and `apply` keep
whatever port the agent opened.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from gatekeeper.agent.status_file import read_status
from gatekeeper.cli.argtypes import seconds_in, whole_in
from gatekeeper.firewall import render
from gatekeeper.firewall.apply import FirewallApplyError, FirewallUnavailable, Nftables
from gatekeeper.firewall.documents import FirewallDocumentError, PolicyBuilder, expand_paths
from gatekeeper.firewall.explain import Packet, PacketError, explain
from gatekeeper.firewall.policy import FirewallPolicy, LinkState
from gatekeeper.firewall.ruleset import build_ruleset
from gatekeeper.firewall.show import link_from_live, show_report


def default_document_texts() -> list[tuple[str, str]]:
    """The packaged default documents as (name, text), in name order."""
    root = resources.files("gatekeeper").joinpath("rules")
    if not root.is_dir():
        return []
    docs = [
        (f"gatekeeper/rules/{entry.name}", entry.read_text(encoding="utf-8"))
        for entry in root.iterdir()
        if entry.name.endswith((".yaml", ".yml"))
    ]
    return sorted(docs)


def agent_document_paths(run_dir: str) -> list[str] | None:
    """The document paths of the agent running with this run dir, when there is one."""
    try:
        paths = read_status(Path(run_dir)).get("firewall_paths")
    except (OSError, ValueError):
        return None
    return [str(p) for p in paths] if isinstance(paths, list) else None


def load_documents(paths: list[str] | None, run_dir: str | None = None) -> FirewallPolicy:
    builder = PolicyBuilder()
    if not paths and run_dir is not None:
        paths = agent_document_paths(run_dir)
        if paths == []:
            return builder.build()  # the agent runs on the built-in default (accept)
    if not paths:
        for name, text in default_document_texts():
            builder.add_text(text, name)
        return builder.build()
    for path in expand_paths(paths):
        builder.add_file(path)
    return builder.build()


def _ipv6(text: str) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv6 address") from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is out of range 1-65535")
    return value


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)


def _fail(args: argparse.Namespace, message: str, code: int = 1) -> int:
    if args.json:
        json.dump({"ok": False, "error": message}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"gatekeeper firewall: {message}", file=sys.stderr)
    return code


def _link(args: argparse.Namespace, live: list[dict[str, Any]] | None) -> LinkState:
    inferred = link_from_live(live)
    ports = tuple(args.wireguard_port or ())
    trusted = tuple(args.trust or ())
    if not ports and inferred is not None:
        ports = inferred.wireguard_ports
    if not trusted and inferred is not None:
        trusted = inferred.extra_trusted
    overlay = tuple(args.overlay_address or ())
    if not overlay and inferred is not None:
        overlay = inferred.overlay_addresses
    return LinkState(wireguard_ports=ports, extra_trusted=trusted, overlay_addresses=overlay)


def _policy_summary(policy: FirewallPolicy) -> dict[str, Any]:
    return {
        "default_action": policy.default_action.value,
        "rules": [
            {
                "name": r.name,
                "protocol": r.protocol.value,
                "ports": [p.short() for p in r.ports],
                "ingress": [
                    {"subnet": str(i.subnet), "except": str(i.except_) if i.except_ else None}
                    for i in r.ingress
                ],
            }
            for r in policy.rules
        ],
    }


def run_check(args: argparse.Namespace) -> int:
    try:
        policy = load_documents(list(args.files) + list(args.config or []))
    except FirewallDocumentError as exc:
        return _fail(args, str(exc))
    summary = _policy_summary(policy)
    n = len(policy.rules)
    _emit(
        args,
        {"ok": True, **summary},
        f"ok: default action {policy.default_action.value}, {n} rule{'s' if n != 1 else ''}",
    )
    return 0


def run_apply(args: argparse.Namespace) -> int:
    try:
        policy = load_documents(list(args.files) + list(args.config or []))
        nft = Nftables()
        live = nft.list_table()
        link = _link(args, live)
        ruleset = build_ruleset(policy, link)
        nft.apply(render.replace_commands(ruleset))
    except (FirewallDocumentError, FirewallUnavailable, FirewallApplyError) as exc:
        return _fail(args, str(exc))
    rules = sum(len(c.rules) for c in ruleset.chains)
    ports = ", ".join(map(str, link.wireguard_ports)) or "none"
    _emit(
        args,
        {
            "ok": True,
            "nft_rules": rules,
            "wireguard_ports": list(link.wireguard_ports),
            **_policy_summary(policy),
        },
        f"applied: table inet gatekeeper, default action {policy.default_action.value}, "
        f"{rules} nftables rules, WireGuard port(s) {ports}",
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    try:
        policy = load_documents(args.config, args.run_dir)
        live = Nftables().list_table()
    except (FirewallDocumentError, FirewallUnavailable, FirewallApplyError) as exc:
        return _fail(args, str(exc))
    report = show_report(build_ruleset(policy, _link(args, live)), live)
    _emit(args, {"ok": True, **report.as_dict()}, report.text())
    return 0 if report.in_sync or not args.exit_code else 3


def run_explain(args: argparse.Namespace) -> int:
    try:
        policy = load_documents(args.config, args.run_dir)
        packet = Packet.make(args.iif, args.src, args.proto, args.dport, args.state, dst=args.dst)
    except (FirewallDocumentError, PacketError) as exc:
        return _fail(args, str(exc))
    live: list[dict[str, Any]] | None = None
    if not args.wireguard_port:
        try:
            live = Nftables().list_table()
        except (FirewallUnavailable, FirewallApplyError):
            live = None  # explain works on the model; the live table only lends the port
    result = explain(build_ruleset(policy, _link(args, live)), packet)
    _emit(args, {"ok": True, **result.as_dict()}, result.text())
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from gatekeeper.firewall.trace import TracedPacket, TraceFilter, TraceFilterError
    from gatekeeper.firewall.tracer import run_trace as trace

    try:
        flt = TraceFilter.make(args.iif, args.src, args.proto, args.dport)
    except TraceFilterError as exc:
        return _fail(args, str(exc))

    def ready() -> None:
        print(f"tracing for {args.seconds:g} s (Ctrl-C stops)", file=sys.stderr, flush=True)

    def packet(traced: TracedPacket) -> None:
        if args.json:
            print(json.dumps(traced.as_dict()), flush=True)
        else:
            print(traced.text() + "\n", flush=True)

    try:
        seen = trace(flt, seconds=args.seconds, count=args.count, on_ready=ready, on_packet=packet)
    except (FirewallUnavailable, FirewallApplyError) as exc:
        return _fail(args, str(exc))
    except KeyboardInterrupt:
        return 130
    if not seen:
        print("no matching packet reached table inet gatekeeper", file=sys.stderr)
    return 0 if seen else 3


def run_remove(args: argparse.Namespace) -> int:
    try:
        Nftables().apply(render.remove_commands())
    except (FirewallUnavailable, FirewallApplyError) as exc:
        return _fail(args, str(exc))
    _emit(args, {"ok": True}, "removed: table inet gatekeeper")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `firewall` and its subcommands on an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        action="append",
        metavar="FILE",
        help="firewall documents (file or directory, repeatable); default: the running "
        "agent's documents (show, explain), else the packaged rules",
    )
    common.add_argument(
        "--run-dir",
        default="/run/gatekeeper",
        help="the agent's run dir, whose status names its documents (default /run/gatekeeper)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    link = argparse.ArgumentParser(add_help=False)
    link.add_argument(
        "--wireguard-port",
        action="append",
        type=_port,
        metavar="N",
        help="WireGuard listen port to admit (repeatable); default: the one in the live table",
    )
    link.add_argument(
        "--trust",
        action="append",
        metavar="IFACE",
        help="extra trusted interface (lo, siderolink and siderolinktun always are)",
    )
    link.add_argument(
        "--overlay-address",
        action="append",
        type=_ipv6,
        metavar="ADDR",
        help="the machine's overlay address, reachable only via the overlay links "
        "(repeatable); default: the one in the live table",
    )

    fw = subparsers.add_parser("firewall", help="inspect and explain the ingress firewall")
    sub = fw.add_subparsers(dest="firewall_command", required=True, metavar="COMMAND")

    show = sub.add_parser("show", parents=[common, link], help="live policy, desired, diff")
    show.add_argument("--exit-code", action="store_true", help="exit 3 when the live table differs")
    show.set_defaults(func=run_show)

    exp = sub.add_parser("explain", parents=[common, link], help="verdict for one packet")
    exp.add_argument("--iif", required=True, metavar="IFACE", help="input interface")
    exp.add_argument("--src", required=True, metavar="ADDR", help="source address")
    exp.add_argument(
        "--dst",
        metavar="ADDR",
        help="destination address (default: a non-overlay address of this machine)",
    )
    exp.add_argument("--proto", required=True, choices=["tcp", "udp", "icmp", "icmpv6"])
    exp.add_argument("--dport", type=int, metavar="N", help="destination port (tcp, udp)")
    exp.add_argument("--state", default="new", choices=["new", "established", "related", "invalid"])
    exp.set_defaults(func=run_explain)

    trace = sub.add_parser(
        "trace",
        help="follow real packets through the live table (nftrace)",
        description="Mark matching packets with meta nftrace (in a table of its own, removed "
        "at the end) and print, per packet, the rules of table inet gatekeeper it passed and "
        "its verdict, named as `firewall explain` names them. Exit 0 when a packet was "
        "traced, 3 when none matched in time, 1 on errors. Needs root (nft monitor).",
    )
    trace.add_argument("--iif", metavar="IFACE", help="only packets arriving on this interface")
    trace.add_argument("--src", metavar="ADDR[/LEN]", help="only packets from this source")
    trace.add_argument("--proto", choices=["tcp", "udp", "icmp", "icmpv6"])
    trace.add_argument("--dport", type=int, metavar="N", help="destination port (tcp, udp)")
    trace.add_argument(
        "--seconds", type=seconds_in(0, 86400), default=10.0, help="how long to trace (default 10)"
    )
    trace.add_argument(
        "--count", type=whole_in(1, 1_000_000), metavar="N", help="stop after N packets"
    )
    trace.add_argument("--json", action="store_true", help="one JSON object per packet")
    trace.set_defaults(func=run_trace)

    check = sub.add_parser("check", parents=[common], help="validate documents, touch nothing")
    check.add_argument("files", nargs="*", metavar="FILE")
    check.set_defaults(func=run_check)

    apply = sub.add_parser("apply", parents=[common, link], help="apply documents now")
    apply.add_argument("files", nargs="*", metavar="FILE")
    apply.set_defaults(func=run_apply)

    remove = sub.add_parser("remove", parents=[common], help="remove table inet gatekeeper")
    remove.set_defaults(func=run_remove)
