"""Machine isolation on the server: the second wall after WireGuard's allowed IPs.

Each machine's peer already accepts only its own /128 as a source. This table, in the
server's network namespace, adds what WireGuard cannot see: the kernel must not forward a
packet from one overlay address to another, so a machine that routes a neighbour's address
into its link by hand reaches nothing, whatever the host's forwarding setting. A packet that
claims an overlay source but arrives on any other interface than the WireGuard link (or lo)
is spoofed: it is dropped before it reaches the server's own overlay services.

Our own table (`inet gatekeeper-server`), replaced atomically in one transaction; other
tables, the machine-side `inet gatekeeper` included, are left alone.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from gatekeeper.firewall.apply import Nftables

TABLE = "gatekeeper-server"
FAMILY = "inet"
JSON = dict[str, Any]


def _prefix_match(field: str, prefix: ipaddress.IPv6Network) -> JSON:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip6", "field": field}},
            "right": {"prefix": {"addr": str(prefix.network_address), "len": prefix.prefixlen}},
        }
    }


def isolation_commands(prefix: ipaddress.IPv6Network, wg_interface: str) -> JSON:
    """The nftables JSON transaction that (re)creates the table."""
    table = {"family": FAMILY, "name": TABLE}
    chains = [
        {"name": "forward", "hook": "forward", "prio": -10},
        {"name": "input", "hook": "input", "prio": -10},
    ]
    rules: list[JSON] = [
        {
            "family": FAMILY,
            "table": TABLE,
            "chain": "forward",
            "comment": "no machine-to-machine traffic",
            "expr": [
                _prefix_match("saddr", prefix),
                _prefix_match("daddr", prefix),
                {"counter": None},
                {"drop": None},
            ],
        },
        {
            "family": FAMILY,
            "table": TABLE,
            "chain": "input",
            "comment": "overlay sources only from the WireGuard link",
            "expr": [
                {
                    "match": {
                        "op": "!=",
                        "left": {"meta": {"key": "iifname"}},
                        "right": {"set": ["lo", wg_interface]},
                    }
                },
                _prefix_match("saddr", prefix),
                {"counter": None},
                {"drop": None},
            ],
        },
    ]
    commands: list[JSON] = [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    for chain in chains:
        commands.append(
            {
                "add": {
                    "chain": {
                        "family": FAMILY,
                        "table": TABLE,
                        "name": chain["name"],
                        "type": "filter",
                        "hook": chain["hook"],
                        "prio": chain["prio"],
                        "policy": "accept",
                    }
                }
            }
        )
    commands.extend({"add": {"rule": rule}} for rule in rules)
    return {"nftables": commands}


def install_isolation(prefix: ipaddress.IPv6Network, wg_interface: str) -> None:
    """Raises FirewallUnavailable / FirewallApplyError with a one-line reason."""
    Nftables().apply(isolation_commands(prefix, wg_interface))


def remove_isolation() -> None:
    table = {"family": FAMILY, "name": TABLE}
    Nftables().apply({"nftables": [{"add": {"table": table}}, {"delete": {"table": table}}]})
