"""`gatekeeper`: one command, a subcommand per role."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from gatekeeper import __version__
from gatekeeper.cli.argtypes import seconds_in
from gatekeeper.cli.examples import add_examples
from gatekeeper.config.talos_version import DEFAULT_TALOS_VERSION, check_talos_version

# Subcommands that live in their own modules, in the order --help lists them. Their modules
# import the server, firewall and gRPC client code they run, so they are imported only when
# the parser must know them: `gatekeeper agent` on a machine loads none of them (about 20 MB
# and, under emulation, seconds of start-up).
PLUGINS = (
    "ping", "netcheck", "joinconfig", "firewall", "maint", "token", "machines", "instances", "logs",
    "completion",
)  # fmt: skip
# Subcommands defined here, whose handlers import what they run.
BUILTIN = frozenset({"agent", "server", "status", "demo"})


def _plugin(name: str) -> ModuleType:
    return importlib.import_module(f"gatekeeper.cli.{name}")


def _duration_arg(text: str) -> float:
    from gatekeeper.cli.token import duration_arg

    return duration_arg(text)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _port_or_zero(text: str) -> int:
    """A port, or 0 where the option gives 0 a meaning (random, off)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 0-65535")
    return port


def _port(text: str) -> int:
    port = _port_or_zero(text)
    if port == 0:
        raise argparse.ArgumentTypeError("port 0 is not allowed here: use 1-65535")
    return port


def _size(text: str) -> int:
    """`4096`, `512K`, `2M`, `1G` (powers of 1024) -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    body, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in units else (text, "")
    try:
        value = int(body) * units.get(unit, 1)
    except ValueError:
        example = "examples: 65536, 512K, 2M"
        raise argparse.ArgumentTypeError(f"{text!r} is not a size ({example})") from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"size {text!r} is below 1K")
    return value


def _talos_version(text: str) -> str:
    try:
        return check_talos_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_agent(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gatekeeper.agent.daemon import AgentOptions, AgentStartError, run_agent
    from gatekeeper.agent.unique_token import TOKEN_NAME
    from gatekeeper.link.lifecycle import Timing, TunnelPreference

    options = AgentOptions(
        cmdline=Path(args.cmdline),
        config=Path(args.config) if args.config else None,
        node_uuid=args.node_uuid,
        listen_port=args.listen_port,
        run_dir=Path(args.run_dir),
        backend=args.wireguard_backend,
        network_timeout=args.network_timeout,
        maintenance_port=args.maintenance_port,
        timing=Timing.for_link_timeout(args.link_timeout),
        tunnel_preference=TunnelPreference(args.tunnel),
        firewall_paths=None if args.no_firewall else [Path(p) for p in args.firewall_config],
        unique_token_file=Path(args.unique_token_file or Path(args.state_dir) / TOKEN_NAME),
        talos_version=args.talos_version,
    )
    try:
        asyncio.run(run_agent(options))
    except AgentStartError as exc:
        print(f"gatekeeper agent: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_token(args: argparse.Namespace) -> str | None:
    if args.join_token_file:
        with open(args.join_token_file) as f:
            return f.read().strip() or None
    return args.join_token or os.environ.get("GATEKEEPER_JOIN_TOKEN") or None


def _instance_name(text: str) -> str:
    from gatekeeper.server.instances import check_instance_name

    try:
        return check_instance_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_server(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gatekeeper.server.app import ServerError, ServerOptions, serve
    from gatekeeper.server.fleet import FleetOptions
    from gatekeeper.server.instances import default_instance
    from gatekeeper.tunnel.peers import TunnelMode

    try:
        token = _read_token(args)
    except OSError as exc:
        print(f"gatekeeper server: cannot read the join token file: {exc}", file=sys.stderr)
        return 2
    options = ServerOptions(
        state_dir=Path(args.state_dir),
        listen=args.listen,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        join_token=token,
        installation_id=args.installation_id,
        wireguard_interface=args.wireguard_interface,
        wireguard_port=args.wireguard_port,
        endpoints=args.endpoint,
        backend=args.wireguard_backend,
        fleet=FleetOptions(
            max_machines=args.max_machines,
            metrics_listen=args.metrics_listen,
            events_port=args.events_port,
            logs_port=args.logs_port,
            isolation=not args.no_isolation,
            logs_max_bytes=args.logs_max_bytes_per_machine,
            logs_max_age=args.logs_max_age,
            events_max_bytes=args.events_max_bytes,
            events_max_age=args.events_max_age,
        ),
        tunnel_mode=TunnelMode(args.tunnel_mode),
        restore_last_endpoint=not args.disable_last_endpoint,
        instance=args.instance or default_instance(),
        registry=args.registry,
        registry_password_file=(
            Path(args.registry_password_file) if args.registry_password_file else None
        ),
    )
    try:
        asyncio.run(serve(options))
    except ServerError as exc:
        print(f"gatekeeper server: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gatekeeper.cli.status import print_status

    try:
        return print_status(
            Path(args.run_dir),
            Path(args.cmdline),
            as_json=args.json,
            watch=args.watch,
            interval=args.interval,
        )
    except KeyboardInterrupt:
        return 0  # the way out of --watch


def _cmd_demo(args: argparse.Namespace) -> int:
    from gatekeeper.cli.demo import run_demo

    return run_demo(timeout=args.timeout, keep_logs=args.keep_logs)


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The whole command line; without `plugins`, only the subcommands defined here."""
    parser = argparse.ArgumentParser(
        prog="gatekeeper",
        description="SideroLink in Python: the machine agent, the API server and their tools.",
    )
    parser.add_argument("--version", action="version", version=f"gatekeeper {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser(
        "agent",
        help="run the machine-side daemon",
        description="Join the SideroLink server named by siderolink.api= on the kernel command "
        "line (or a SideroLinkConfig document, which wins) and keep the link up.",
    )
    agent.add_argument("--cmdline", default="/proc/cmdline", help="kernel command line file")
    agent.add_argument(
        "--config",
        "-c",
        help="YAML file with a SideroLinkConfig document (firewall documents may share it); "
        "re-read every 2 s",
    )
    agent.add_argument("--node-uuid", help="override /sys/class/dmi/id/product_uuid")
    agent.add_argument(
        "--listen-port",
        type=_port_or_zero,
        default=51821,
        help="fixed WireGuard listen port (default 51821; 0 picks a random one)",
    )
    agent.add_argument(
        "--run-dir", default="/run/gatekeeper", help="where status.json goes (gatekeeper status)"
    )
    agent.add_argument(
        "--wireguard-backend", default="auto", choices=["auto", "kernel", "userspace"]
    )
    agent.add_argument(
        "--network-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a route to the API before trying anyway",
    )
    agent.add_argument(
        "--maintenance-port",
        type=_port,
        default=50000,
        help="maintenance API port, served only on the SideroLink address (default 50000)",
    )
    agent.add_argument(
        "--link-timeout",
        type=float,
        default=45.0,
        help="seconds without any answer from the server (despite probes) before the link is "
        "declared down and the next endpoint tried (default 45)",
    )
    agent.add_argument(
        "--tunnel",
        default="auto",
        choices=["auto", "on", "off"],
        help="WireGuard over gRPC: auto = UDP first, ask for the tunnel when no handshake "
        "succeeds over UDP and try UDP again later (default); on = always ask; off = only "
        "when the API URL has grpc_tunnel=true. The server decides in the end.",
    )
    agent.add_argument(
        "--firewall-config",
        action="append",
        default=[],
        metavar="PATH",
        help="NetworkDefaultActionConfig/NetworkRuleConfig documents (file or folder; repeat); "
        "the --config file is read for them too. The overlay links and the WireGuard port are "
        "always admitted.",
    )
    agent.add_argument(
        "--no-firewall",
        action="store_true",
        help="no document policy (ingress accept); the rule that keeps the overlay address "
        "reachable only through the overlay links stays",
    )
    agent.add_argument(
        "--state-dir",
        default="/var/lib/gatekeeper-agent",
        help="where the machine's unique token is kept across restarts (default "
        "/var/lib/gatekeeper-agent)",
    )
    agent.add_argument(
        "--unique-token-file",
        metavar="PATH",
        help="the unique token file (default STATE_DIR/unique-token, generated on first start, "
        "mode 0600); a SideroLinkConfig document's uniqueToken wins over it",
    )
    agent.add_argument(
        "--talos-version",
        type=_talos_version,
        default=DEFAULT_TALOS_VERSION,
        help="the Talos API level sent in Provision's talos_version (a semantic version; "
        f"default {DEFAULT_TALOS_VERSION}); the Version API reports gatekeeper's own version",
    )
    agent.set_defaults(func=_cmd_agent)

    server = sub.add_parser(
        "server",
        help="run the SideroLink API server",
        description="Serve ProvisionService, hand out overlay addresses and keep the WireGuard "
        "peers. The join token is read from --join-token-file, or the environment variable "
        "GATEKEEPER_JOIN_TOKEN, or --join-token (visible in ps: avoid on shared hosts).",
    )
    server.add_argument(
        "--state-dir",
        default="/var/lib/gatekeeper",
        help="the registry (unless --registry), audit log, journals and admin socket",
    )
    server.add_argument(
        "--registry",
        metavar="URL",
        help="where the fleet is stored: sqlite:///FILE, or PostgreSQL "
        "postgresql://USER@HOST:PORT/DB (socket: postgresql://USER@/DB?host=/run/postgresql) "
        "to share one fleet between servers; default: SQLite in --state-dir",
    )
    server.add_argument(
        "--registry-password-file",
        metavar="FILE",
        help="PostgreSQL password (else PGPASSWORD or ~/.pgpass; a password in the URL is "
        "refused: ps shows it)",
    )
    server.add_argument(
        "--instance",
        type=_instance_name,
        default=None,
        metavar="NAME",
        help="this server's name among several on one --registry (default: the host name); "
        "each needs its own (docs/registry.md, Owners and failover)",
    )
    server.add_argument("--listen", default="[::]:8090", help="gRPC listen address")
    server.add_argument("--tls-cert", help="PEM certificate (enables TLS, with --tls-key)")
    server.add_argument("--tls-key", help="PEM private key")
    server.add_argument(
        "--join-token", help="the fixed join token (visible in ps: prefer the file or variable)"
    )
    server.add_argument("--join-token-file", help="file holding the fixed join token")
    server.add_argument(
        "--installation-id",
        default="",
        help="derives the overlay prefix (docs/compatibility.md, Addresses)",
    )
    server.add_argument("--wireguard-interface", default="siderolink")
    server.add_argument(
        "--wireguard-port",
        type=_port,
        default=51820,
        help="UDP port of the server's WireGuard link (what --endpoint advertises)",
    )
    server.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="WireGuard endpoint advertised to machines, IPv6 as [addr]:port "
        "(repeat for several, in order)",
    )
    server.add_argument(
        "--wireguard-backend", default="auto", choices=["auto", "kernel", "userspace"]
    )
    server.add_argument(
        "--tunnel-mode",
        default="allow",
        choices=["off", "allow", "always"],
        help="WireGuard over gRPC: allow = for machines that ask (grpc_tunnel=true, or an "
        "agent falling back when UDP fails; the default); always = for every machine (when "
        "UDP to --wireguard-port is blocked); off = never",
    )
    server.add_argument(
        "--max-machines",
        type=int,
        metavar="N",
        help="registration limit: new machines beyond N get RESOURCE_EXHAUSTED",
    )
    server.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics here"
    )
    server.add_argument(
        "--events-port",
        type=_port_or_zero,
        default=8090,
        help="EventSinkService port on the overlay address (0: off; default 8090)",
    )
    server.add_argument(
        "--logs-port",
        type=_port_or_zero,
        default=8092,
        help="machine log receiver (JSON lines over TCP) on the overlay address (0: off; "
        "default 8092)",
    )
    server.add_argument(
        "--logs-max-bytes-per-machine",
        type=_size,
        default=2 << 20,
        metavar="SIZE",
        help="space for each machine's logs (65536, 512K, 2M; default 2M), in the state "
        "dir's journals or the PostgreSQL registry; the oldest lines go first",
    )
    server.add_argument(
        "--logs-max-age",
        type=_duration_arg,
        metavar="DURATION",
        help="drop machine log lines older than this (90m, 12h, 7d; default: size only); "
        "each line is kept at least this long and gone within about twice it",
    )
    server.add_argument(
        "--events-max-bytes",
        type=_size,
        default=16 << 20,
        metavar="SIZE",
        help="space for the events of all machines (default 16M), in the state dir's "
        "journals or the PostgreSQL registry",
    )
    server.add_argument(
        "--events-max-age",
        type=_duration_arg,
        metavar="DURATION",
        help="drop events older than this (default: size only)",
    )
    server.add_argument(
        "--no-isolation",
        action="store_true",
        help="do not install the nftables table that stops machine-to-machine traffic",
    )
    server.add_argument(
        "--disable-last-endpoint",
        action="store_true",
        help="after a restart, do not handshake machines at their last known endpoint; wait "
        "for them to come (behind a load balancer the old source port's reply is dropped)",
    )
    server.set_defaults(func=_cmd_server)

    status = sub.add_parser(
        "status",
        help="show the agent's link status, with a health block",
        description="The agent's status (from --run-dir), with a health block first: link "
        "and backend, path and why, last handshake, rx/tx, RTT to the server, firewall, "
        "maintenance API, telemetry sinks, the last path changes. Exit 0 when connected, 3 "
        "when not, 1 without an agent status.",
    )
    status.add_argument("--run-dir", default="/run/gatekeeper")
    status.add_argument(
        "--cmdline",
        default="/proc/cmdline",
        help="kernel command line naming the telemetry sinks (as the agent's --cmdline)",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the status document with a health object as JSON (one line per update "
        "with --watch)",
    )
    status.add_argument("--watch", "-w", action="store_true", help="print again until Ctrl-C")
    status.add_argument(
        "--interval",
        type=seconds_in(0.1, 3600),
        default=2.0,
        help="seconds between updates with --watch (default 2)",
    )
    status.set_defaults(func=_cmd_status)

    demo = sub.add_parser(
        "demo",
        help="build a two-namespace lab, join it, ping over the overlay, tear it down",
        description="Needs root (network namespaces) and wireguard-go.",
    )
    demo.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the link")
    demo.add_argument("--keep-logs", help="copy the server and agent logs to this folder")
    demo.set_defaults(func=_cmd_demo)

    for name in PLUGINS if plugins else ():
        _plugin(name).add_parser(sub)
    add_examples(parser)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv`, None when an option (--help, --version) comes first."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
        elif not word.startswith("--log-level="):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(plugins=_command(words) not in BUILTIN)
    args = parser.parse_args(words)
    setup_logging(args.log_level)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
