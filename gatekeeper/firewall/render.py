"""Turn the desired ruleset into libnftables JSON.

The transaction touches only `table inet gatekeeper`: add it (so the delete cannot fail when it
is absent), delete it, and build it again, all in one command list, which libnftables sends as
one netlink batch. The kernel applies the batch whole or not at all, so a rejected policy
leaves the previous one in force and no packet ever sees a half-built table.
"""

from __future__ import annotations

from typing import Any

from gatekeeper.firewall.policy import Network, PortRange
from gatekeeper.firewall.ruleset import (
    TABLE_FAMILY,
    TABLE_NAME,
    Chain,
    Family,
    Rule,
    Ruleset,
)

JSON = dict[str, Any]
_TABLE: JSON = {"family": TABLE_FAMILY, "name": TABLE_NAME}


def _value(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else {"set": items}


def _match(left: JSON, right: Any, op: str = "==") -> JSON:
    return {"match": {"op": op, "left": left, "right": right}}


def _prefix(net: Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _port(pr: PortRange) -> Any:
    return pr.lo if pr.lo == pr.hi else {"range": [pr.lo, pr.hi]}


def rule_expr(rule: Rule) -> list[JSON]:
    expr: list[JSON] = []
    if rule.iifnames:
        expr.append(_match({"meta": {"key": "iifname"}}, _value(list(rule.iifnames))))
    if rule.fib_daddr_not_local:
        expr.append(_match({"fib": {"result": "type", "flags": ["daddr"]}}, "local", "!="))
    if rule.ct_states:
        expr.append(_match({"ct": {"key": "state"}}, _value(list(rule.ct_states))))
    if rule.saddr:
        proto = "ip" if rule.family is Family.IPV4 else "ip6"
        expr.append(
            _match(
                {"payload": {"protocol": proto, "field": "saddr"}},
                _value([_prefix(n) for n in rule.saddr]),
                "!=" if rule.saddr_negate else "==",
            )
        )
    elif rule.family is not None and rule.l4proto not in ("icmp", "ipv6-icmp"):
        # ICMP and ICMPv6 name their family already; nft lists the pair without nfproto.
        expr.append(_match({"meta": {"key": "nfproto"}}, rule.family.value))
    if rule.dports:
        assert rule.l4proto in ("tcp", "udp")
        expr.append(
            _match(
                {"payload": {"protocol": rule.l4proto, "field": "dport"}},
                _value([_port(p) for p in rule.dports]),
            )
        )
    elif rule.icmp_types:
        expr.append(
            _match(
                {"payload": {"protocol": "icmp", "field": "type"}}, _value(list(rule.icmp_types))
            )
        )
    elif rule.icmpv6_types:
        expr.append(
            _match(
                {"payload": {"protocol": "icmpv6", "field": "type"}},
                _value(list(rule.icmpv6_types)),
            )
        )
    elif rule.l4proto is not None:
        expr.append(_match({"meta": {"key": "l4proto"}}, rule.l4proto))
    if rule.limit is not None:
        rate, burst = rule.limit
        expr.append({"limit": {"rate": rate, "burst": burst, "per": "second"}})
    expr.append({"counter": {"packets": 0, "bytes": 0}})
    expr.append({rule.verdict.value: None})
    return expr


def chain_object(chain: Chain) -> JSON:
    return {
        **_TABLE_REF,
        "name": chain.name,
        "type": "filter",
        "hook": chain.hook,
        "prio": chain.priority,
        "policy": chain.policy.value,
    }


_TABLE_REF: JSON = {"family": TABLE_FAMILY, "table": TABLE_NAME}


def rule_object(chain: Chain, rule: Rule) -> JSON:
    return {**_TABLE_REF, "chain": chain.name, "expr": rule_expr(rule), "comment": rule.comment}


def table_objects(ruleset: Ruleset) -> list[JSON]:
    """The table as `nft -j list table` would show it (without handles and counters)."""
    objs: list[JSON] = [{"table": dict(_TABLE)}]
    objs += [{"chain": chain_object(c)} for c in ruleset.chains]
    objs += [{"rule": rule_object(c, r)} for c in ruleset.chains for r in c.rules]
    return objs


def _metainfo() -> JSON:
    return {"metainfo": {"json_schema_version": 1}}


def replace_commands(ruleset: Ruleset) -> JSON:
    """One transaction: our table, and only it, replaced by the desired one."""
    cmds: list[JSON] = [
        _metainfo(),
        {"add": {"table": dict(_TABLE)}},
        {"delete": {"table": dict(_TABLE)}},
    ]
    cmds += [{"add": obj} for obj in table_objects(ruleset)]
    return {"nftables": cmds}


def remove_commands() -> JSON:
    """Remove our table if present (add-then-delete never fails on absence)."""
    return {
        "nftables": [
            _metainfo(),
            {"add": {"table": dict(_TABLE)}},
            {"delete": {"table": dict(_TABLE)}},
        ]
    }


def list_command() -> JSON:
    return {"nftables": [{"list": {"table": dict(_TABLE)}}]}
