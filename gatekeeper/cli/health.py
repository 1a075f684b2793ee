"""The health block of `gatekeeper status`: the agent's own report next to what can be seen.

The status file says what the agent believes; each line here is checked where it can be:
the WireGuard device through `wg show IFACE dump` (netlink for the kernel module, the UAPI
socket for wireguard-go), the firewall through libnftables, the maintenance API's listening
socket in /proc/net/tcp6, the telemetry sinks by connecting to them, and the round trip to
the server by one ICMPv6 echo over the overlay. What cannot be observed (not root, no tool)
says so instead of guessing.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gatekeeper.agent.telemetry import sinks_from_cmdline
from gatekeeper.cli.echo import EchoError, echo
from gatekeeper.cli.ping import link_path
from gatekeeper.config.cmdline import read_cmdline
from gatekeeper.config.errors import ConfigError
from gatekeeper.firewall.ruleset import INGRESS_CHAIN

DEFAULT_MAINTENANCE_PORT = 50000  # the agent's --maintenance-port default
CONNECT_TIMEOUT = 1.0
TCP_LISTEN = "0A"
PROC_TCP6 = Path("/proc/net/tcp6")


@dataclass(frozen=True)
class Device:
    endpoint: str | None
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int


def read_device(ifname: str) -> Device | str:
    """The server peer's live counters, or why they cannot be read."""
    wg = shutil.which("wg")
    if wg is None:
        return "wg not found (Debian package wireguard-tools)"
    done = subprocess.run(
        [wg, "show", ifname, "dump"], capture_output=True, text=True, timeout=5, check=False
    )
    if done.returncode != 0:
        return " ".join(done.stderr.split())[:120] or f"wg show {ifname} failed"
    peers = [line.split("\t") for line in done.stdout.splitlines()[1:]]
    if not peers or len(peers[0]) < 7:
        return "the device has no peer"
    fields = peers[0]
    handshake = int(fields[4])
    return Device(
        endpoint=None if fields[2] == "(none)" else fields[2],
        last_handshake=float(handshake) if handshake else None,
        rx_bytes=int(fields[5]),
        tx_bytes=int(fields[6]),
    )


def read_firewall() -> str:
    from gatekeeper.firewall.apply import FirewallApplyError, FirewallUnavailable, Nftables

    try:
        objects = Nftables().list_table()
    except (FirewallUnavailable, FirewallApplyError) as exc:
        return f"unknown: {exc}"
    if objects is None:
        return "table inet gatekeeper not loaded: nothing filtered"
    rules = sum(1 for o in objects if "rule" in o)
    policy = next(
        (
            o["chain"].get("policy")
            for o in objects
            if o.get("chain", {}).get("name") == INGRESS_CHAIN
        ),
        None,
    )
    return f"table inet gatekeeper, ingress policy {policy or '?'}, {rules} rules"


def listening(
    address: ipaddress.IPv6Address, port: int, tcp6: Path = Path("/proc/net/tcp6")
) -> bool:
    """A TCP socket listens on [address]:port (or on every address) in this namespace."""
    try:
        lines = tcp6.read_text().splitlines()[1:]
    except OSError:
        return False
    wildcard = ipaddress.IPv6Address("::")
    for line in lines:
        fields = line.split()
        local, state = fields[1], fields[3]
        hex_addr, hex_port = local.split(":")
        if state != TCP_LISTEN or int(hex_port, 16) != port:
            continue
        # /proc prints the address as four host-order 32-bit words.
        raw = b"".join(bytes.fromhex(hex_addr[i : i + 8])[::-1] for i in range(0, 32, 8))
        if ipaddress.IPv6Address(raw) in (address, wildcard):
            return True
    return False


def reachable(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return "reachable"
    except TimeoutError:
        return "not reachable: timed out"
    except OSError as exc:
        return f"not reachable: {exc.strerror or exc}"


def _ago(ts: float | None) -> str:
    return "never" if not ts else f"{max(0.0, time.time() - ts):.0f} s ago"


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


@dataclass(frozen=True)
class Health:
    link: str
    path: str
    handshake: str
    traffic: str
    rtt: str
    firewall: str
    maintenance: str
    events_sink: str
    kernel_logs: str
    path_changes: tuple[str, ...]

    def rows(self) -> list[tuple[str, str]]:
        rows = [(k.replace("_", " "), v) for k, v in asdict(self).items() if k != "path_changes"]
        changes = list(self.path_changes) or ["-"]
        rows.append(("path changes", changes[0]))
        rows += [("", line) for line in changes[1:]]
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path_changes": list(self.path_changes)}


def _change_line(entry: dict[str, Any]) -> str:
    at = entry.get("at")
    stamp = time.strftime("%H:%M:%S", time.localtime(at)) if at else "--:--:--"
    if not entry.get("connected"):
        what = "down"
    elif entry.get("path") == "tunnel":
        what = "gRPC tunnel"
    else:
        what = f"UDP {entry.get('endpoint') or '?'}"
    reason = entry.get("path_reason")
    return f"{stamp} {what}" + (f" ({reason})" if reason else "")


def observe(doc: dict[str, Any], cmdline: Path) -> Health:
    connected = bool(doc.get("connected"))
    ifname = doc.get("link_name")
    backend = doc.get("backend") or "?"
    why = doc.get("backend_reason")
    state = str(doc.get("state", "?"))
    link = f"up, {ifname}" if connected else f"down ({state}), {ifname or 'no link'}"
    link += f", backend {backend}" + (f" ({why})" if why else "")

    _, via = link_path(doc)
    reason = doc.get("path_reason")
    path = (via + (f": {reason}" if reason else "")) if doc.get("server_address") else "-"

    handshake = _ago(doc.get("last_handshake"))
    traffic = f"rx {_size(int(doc.get('rx_bytes') or 0))} (agent's report)"
    if ifname:
        device = read_device(str(ifname))
        if isinstance(device, Device):
            handshake = _ago(device.last_handshake) + " (device)"
            traffic = f"rx {_size(device.rx_bytes)}, tx {_size(device.tx_bytes)} (device)"
        else:
            traffic += f"; device: {device}"

    rtt = "-"
    server = doc.get("server_address")
    if connected and server:
        try:
            took = echo(ipaddress.IPv6Address(str(server)), 1, timeout=1.0)
            rtt = "no answer within 1 s" if took is None else f"{took * 1000:.1f} ms"
        except (EchoError, ValueError) as exc:
            rtt = f"unknown: {exc}"

    firewall = "off (agent runs with --no-firewall)"
    if doc.get("firewall") != "off":
        firewall = read_firewall()
        if doc.get("firewall_error"):
            firewall += f"; the agent reports: {doc['firewall_error']}"

    port = int(doc.get("maintenance_port") or DEFAULT_MAINTENANCE_PORT)
    maintenance = "-"
    node = str(doc.get("node_address") or "").split("/")[0]
    if node:
        address = ipaddress.IPv6Address(node)
        where = f"[{address}]:{port}"
        state = "listening" if listening(address, port) else "not listening"
        maintenance = f"{state} on {where}"

    events = logs = "not configured"
    try:
        sinks, problems = sinks_from_cmdline(read_cmdline(cmdline))
    except ConfigError as exc:
        events = logs = f"unknown: {exc}"
    else:
        if sinks.events:
            host, _, port_text = sinks.events.rpartition(":")
            events = f"{sinks.events} {reachable(host.strip('[]'), int(port_text))}"
        if sinks.kernel_logs:
            host, log_port = sinks.kernel_logs
            shown = f"[{host}]" if ":" in host else host
            logs = f"tcp://{shown}:{log_port} {reachable(host, log_port)}"
        for problem in problems:
            events += f" ({problem})"

    changes = tuple(_change_line(e) for e in (doc.get("path_history") or [])[-5:])
    return Health(link, path, handshake, traffic, rtt, firewall, maintenance, events, logs, changes)
