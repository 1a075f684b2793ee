"""Turn the desired ruleset into libnftables JSON.

Address and port lists of more than one element go into named sets, shared by every rule that
uses the same list (a document's ports serve both chains and both families). The kernel's cost
per set grows with the number of sets already in the table, so anonymous sets per rule would
make 1000 documents take seconds to load; named, shared sets keep it well under half a second.

The transaction touches only `table inet gatekeeper`: add it (so the delete cannot fail when it
is absent), delete it, and build it again, all in one command list, which libnftables sends as
one netlink batch. The kernel applies the batch whole or not at all, so a rejected policy
leaves the previous one in force and no packet ever sees a half-built table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gatekeeper.firewall.policy import Network, PortRange
from gatekeeper.firewall.ruleset import (
    L4PROTO_NUMBERS,
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


class NamedSets:
    """Named interval sets of the table, one per distinct element list."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, str], str] = {}
        # id(the rule value a list was made from) -> (that value, its reference). Prerouting
        # repeats the document rules with the very same tuples, so each list of thousands of
        # elements is converted and compared once; by identity, because hashing a tuple of
        # networks costs as much as converting it. The value is kept so its id stays unique.
        self._seen: dict[tuple[str, int], tuple[object, Any]] = {}
        self.objects: list[JSON] = []

    def value_of(
        self, set_type: str | list[str], source: object, items: Callable[[], list[Any]]
    ) -> Any:
        """`value(set_type, items())` for the list made from `source`, made once per source."""
        key = (str(set_type), id(source))
        found = self._seen.get(key)
        if found is None:
            found = self._seen[key] = (source, self.value(set_type, items()))
        return found[1]

    def value(self, set_type: str | list[str], items: list[Any]) -> Any:
        if len(items) == 1 and isinstance(set_type, str):
            return items[0]
        key = (json.dumps(set_type), json.dumps(items, sort_keys=True))
        name = self._names.get(key)
        if name is None:
            name = f"gk{len(self.objects)}"
            self._names[key] = name
            self.objects.append(
                {
                    "set": {
                        **_TABLE_REF,
                        "name": name,
                        "type": set_type,
                        "flags": ["interval"],
                        "elem": items,
                    }
                }
            )
        return f"@{name}"


def rule_expr(rule: Rule, sets: NamedSets | None = None) -> list[JSON]:
    """The rule's statements; lists go to `sets` when given, else inline anonymous sets."""

    def listed(set_type: str | list[str], source: object, make: Callable[[], list[Any]]) -> Any:
        if sets is not None:
            return sets.value_of(set_type, source, make)
        items = make()
        return {"set": items} if isinstance(set_type, list) else _value(items)

    expr: list[JSON] = []
    if rule.iifnames:
        expr.append(
            _match(
                {"meta": {"key": "iifname"}},
                _value(list(rule.iifnames)),
                "!=" if rule.iifnames_negate else "==",
            )
        )
    if rule.fib_daddr_not_local:
        expr.append(_match({"fib": {"result": "type", "flags": ["daddr"]}}, "local", "!="))
    if rule.ct_states:
        expr.append(_match({"ct": {"key": "state"}}, _value(list(rule.ct_states))))
    if rule.daddr:
        expr.append(
            _match(
                {"payload": {"protocol": "ip6", "field": "daddr"}},
                listed("ipv6_addr", rule.daddr, lambda: [_prefix(n) for n in rule.daddr]),
            )
        )
    if rule.saddr:
        proto = "ip" if rule.family is Family.IPV4 else "ip6"
        expr.append(
            _match(
                {"payload": {"protocol": proto, "field": "saddr"}},
                listed(
                    "ipv4_addr" if rule.family is Family.IPV4 else "ipv6_addr",
                    rule.saddr,
                    lambda: [_prefix(n) for n in rule.saddr],
                ),
                "!=" if rule.saddr_negate else "==",
            )
        )
    elif (
        rule.family is not None
        and not rule.daddr
        and not rule.saddr_dport
        and rule.l4proto not in ("icmp", "ipv6-icmp")
    ):
        # ICMP and ICMPv6 name their family already; nft lists the pair without nfproto.
        expr.append(_match({"meta": {"key": "nfproto"}}, rule.family.value))
    if rule.dports:
        assert rule.l4proto in ("tcp", "udp")
        expr.append(
            _match(
                {"payload": {"protocol": rule.l4proto, "field": "dport"}},
                listed("inet_service", rule.dports, lambda: [_port(p) for p in rule.dports]),
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
    elif rule.l4proto is not None and not rule.saddr_dport:
        # A number, not the name (L4PROTO_NUMBERS: why).
        expr.append(_match({"meta": {"key": "l4proto"}}, L4PROTO_NUMBERS[rule.l4proto]))
    if rule.saddr_dport:
        ip = "ip" if rule.family is Family.IPV4 else "ip6"
        left = {
            "concat": [
                {"payload": {"protocol": ip, "field": "saddr"}},
                {"payload": {"protocol": rule.l4proto, "field": "dport"}},
            ]
        }
        addr_type = "ipv4_addr" if rule.family is Family.IPV4 else "ipv6_addr"
        expr.append(
            _match(
                left,
                listed(
                    [addr_type, "inet_service"],
                    rule.saddr_dport,
                    lambda: [{"concat": [_prefix(n), _port(p)]} for n, p in rule.saddr_dport],
                ),
                "!=" if rule.saddr_dport_negate else "==",
            )
        )
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


def rule_object(chain: Chain, rule: Rule, sets: NamedSets | None = None) -> JSON:
    return {
        **_TABLE_REF,
        "chain": chain.name,
        "expr": rule_expr(rule, sets),
        "comment": rule.comment,
    }


def table_objects(ruleset: Ruleset) -> list[JSON]:
    """The table as `nft -j list table` would show it (without handles and counters)."""
    sets = NamedSets()
    rules = [{"rule": rule_object(c, r, sets)} for c in ruleset.chains for r in c.rules]
    objs: list[JSON] = [{"table": dict(_TABLE)}]
    objs += sets.objects
    objs += [{"chain": chain_object(c)} for c in ruleset.chains]
    return objs + rules


def _metainfo() -> JSON:
    return {"metainfo": {"json_schema_version": 1}}


def replace_commands(ruleset: Ruleset) -> JSON:
    """One transaction: our table, and only it, replaced by the desired one."""
    return replace_commands_for(table_objects(ruleset))


def replace_commands_for(objects: list[JSON]) -> JSON:
    """`replace_commands` for objects already rendered by `table_objects`."""
    cmds: list[JSON] = [
        _metainfo(),
        {"add": {"table": dict(_TABLE)}},
        {"delete": {"table": dict(_TABLE)}},
    ]
    cmds += [{"add": obj} for obj in objects]
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
