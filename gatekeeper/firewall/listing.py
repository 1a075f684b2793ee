"""Readable, comparable text for nftables JSON rules and chains (ours or the kernel's).

The kernel lists a rule differently from how it was written: one-element sets become plain
values, adjacent prefixes become ranges, `==` becomes `in` for bitmask keys, set elements are
reordered. Both sides are therefore normalised to merged intervals and sorted names before they
are printed, so the desired and the live table print the same lines exactly when they filter
the same way, and `show` can diff them line by line.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gatekeeper.firewall.ruleset import L4PROTO_NAMES

JSON = dict[str, Any]
_VERDICTS = ("accept", "drop", "reject", "continue", "return", "jump", "goto", "queue")


@dataclass(frozen=True)
class RuleLine:
    chain: str
    text: str  # canonical match and verdict, without counters
    comment: str
    packets: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class ChainInfo:
    name: str
    hook: str | None
    priority: int | None
    policy: str | None

    def header(self) -> str:
        if self.hook is None:
            return f"chain {self.name}"
        return (
            f"chain {self.name} (hook {self.hook}, priority {self.priority}, policy {self.policy})"
        )


@dataclass(frozen=True)
class TableView:
    chains: tuple[ChainInfo, ...]
    rules: tuple[RuleLine, ...]

    def chain_rules(self, name: str) -> list[RuleLine]:
        return [r for r in self.rules if r.chain == name]

    def lines(self) -> list[str]:
        """The comparable form: chain headers and rule texts with comments, in order."""
        out: list[str] = []
        for chain in self.chains:
            out.append(chain.header())
            for rule in self.chain_rules(chain.name):
                suffix = f"  # {rule.comment}" if rule.comment else ""
                out.append(f"  {rule.text}{suffix}")
        return out


def _left_text(left: Any) -> str:
    if isinstance(left, dict):
        if "concat" in left and isinstance(left["concat"], list):
            return " . ".join(_left_text(part) for part in left["concat"])
        if "meta" in left:
            key = left["meta"].get("key", "?")
            return key if key in ("iifname", "oifname") else f"meta {key}"
        if "ct" in left:
            return f"ct {left['ct'].get('key', '?')}"
        if "payload" in left:
            pl = left["payload"]
            if "protocol" in pl:
                return f"{pl['protocol']} {pl.get('field', '?')}"
        if "fib" in left:
            fib = left["fib"]
            return f"fib {' . '.join(fib.get('flags', []))} {fib.get('result', '?')}"
    return json.dumps(left, sort_keys=True, separators=(",", ":"))


def set_elements(right: Any) -> list[Any]:
    if isinstance(right, dict) and "set" in right:
        items = right["set"]
        return list(items) if isinstance(items, list) else [items]
    return [right]


def as_interval(item: Any) -> tuple[int, int, int] | None:
    """(version or 0 for ports, lo, hi) for addresses, prefixes, ranges and numbers."""
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        return (0, item, item)
    if isinstance(item, str):
        try:
            addr = ipaddress.ip_address(item)
        except ValueError:
            return None
        return (addr.version, int(addr), int(addr))
    if isinstance(item, dict) and "prefix" in item:
        pfx = item["prefix"]
        try:
            net = ipaddress.ip_network(f"{pfx['addr']}/{pfx['len']}", strict=False)
        except (ValueError, KeyError, TypeError):
            return None
        return (net.version, int(net.network_address), int(net.broadcast_address))
    if isinstance(item, dict) and "range" in item:
        rng = item["range"]
        if isinstance(rng, list) and len(rng) == 2:
            lo, hi = as_interval(rng[0]), as_interval(rng[1])
            if lo is not None and hi is not None and lo[0] == hi[0]:
                return (lo[0], lo[1], hi[2])
    return None


def _interval_text(version: int, lo: int, hi: int) -> list[str]:
    if version == 0:
        return [str(lo) if lo == hi else f"{lo}-{hi}"]
    first: ipaddress.IPv4Address | ipaddress.IPv6Address
    last: ipaddress.IPv4Address | ipaddress.IPv6Address
    if version == 4:
        first, last = ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi)
    else:
        first, last = ipaddress.IPv6Address(lo), ipaddress.IPv6Address(hi)
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = list(
        ipaddress.summarize_address_range(first, last)
    )
    if len(nets) == 1:
        net = nets[0]
        return [str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)]
    return [f"{first}-{last}"]


def _concat_key(item: Any) -> tuple[tuple[int, int, int], ...] | None:
    if not (isinstance(item, dict) and isinstance(item.get("concat"), list)):
        return None
    parts = [as_interval(p) for p in item["concat"]]
    if any(p is None for p in parts):
        return None
    return tuple(p for p in parts if p is not None)


def _right_text(right: Any) -> str:
    items = set_elements(right)
    keys = [_concat_key(i) for i in items]
    if items and all(k is not None for k in keys):
        words = [
            " . ".join(" ".join(_interval_text(*part)) for part in key)
            for key in sorted(k for k in keys if k is not None)
        ]
        return words[0] if len(words) == 1 else "{ " + ", ".join(words) + " }"
    intervals = [as_interval(i) for i in items]
    if items and all(iv is not None for iv in intervals):
        merged: list[tuple[int, int, int]] = []
        for version, lo, hi in sorted(iv for iv in intervals if iv is not None):
            if merged and merged[-1][0] == version and lo <= merged[-1][2] + 1:
                prev = merged[-1]
                merged[-1] = (version, prev[1], max(prev[2], hi))
            else:
                merged.append((version, lo, hi))
        words = [w for v, lo, hi in merged for w in _interval_text(v, lo, hi)]
    elif all(isinstance(i, str) for i in items):
        words = sorted(f'"{i}"' if not i.replace("-", "").isalnum() else str(i) for i in items)
    else:
        words = [json.dumps(i, sort_keys=True, separators=(",", ":")) for i in items]
    if len(words) == 1:
        return words[0]
    return "{ " + ", ".join(words) + " }"


_L4PROTO = {"meta": {"key": "l4proto"}}


def expr_text(expr: Sequence[JSON]) -> tuple[str, int | None, int | None]:
    """Canonical text of a rule's expressions, and its counter (packets, bytes) if any."""
    parts: list[str] = []
    packets: int | None = None
    nbytes: int | None = None
    for stmt in expr:
        if not isinstance(stmt, dict) or len(stmt) != 1:
            parts.append(json.dumps(stmt, sort_keys=True, separators=(",", ":")))
            continue
        ((key, value),) = stmt.items()
        if key == "match" and isinstance(value, dict):
            op = value.get("op", "==")
            op = "==" if op in ("==", "in") else op
            left = _left_text(value.get("left"))
            raw = value.get("right")
            if value.get("left") == _L4PROTO and isinstance(raw, int):
                # The ruleset is sent with numbers (ruleset.L4PROTO_NUMBERS); the kernel lists
                # names where /etc/protocols has them: the view shows names either way.
                raw = L4PROTO_NAMES.get(raw, raw)
            right = _right_text(raw)
            parts.append(f"{left} {right}" if op == "==" else f"{left} {op} {right}")
        elif key == "counter":
            if isinstance(value, dict):
                packets = int(value.get("packets", 0))
                nbytes = int(value.get("bytes", 0))
        elif key == "limit" and isinstance(value, dict):
            text = f"limit rate {value.get('rate')}/{value.get('per', 'second')}"
            burst = value.get("burst")
            parts.append(f"{text} burst {burst} packets" if burst else text)
        elif key in _VERDICTS:
            target = value.get("target") if isinstance(value, dict) else None
            parts.append(f"{key} {target}" if target else key)
        else:
            parts.append(f"{key} {json.dumps(value, sort_keys=True, separators=(',', ':'))}")
    return " ".join(parts), packets, nbytes


def _resolve_sets(expr: list[Any], named: dict[str, Any]) -> list[Any]:
    """Put named sets' elements in place of `@name`, so the text shows what is matched."""
    out: list[Any] = []
    for stmt in expr:
        match = stmt.get("match") if isinstance(stmt, dict) else None
        if isinstance(match, dict):
            right = match.get("right")
            if isinstance(right, str) and right in named:
                stmt = {"match": {**match, "right": named[right]}}
        out.append(stmt)
    return out


def table_view(objects: Iterable[JSON]) -> TableView:
    """Index a `list table` answer (or our desired objects) into chains and rule lines."""
    objects = list(objects)
    named: dict[str, Any] = {}
    for obj in objects:
        if "set" in obj and isinstance(obj["set"], dict):
            named[f"@{obj['set'].get('name')}"] = {"set": obj["set"].get("elem", [])}
    chains: list[ChainInfo] = []
    rules: list[RuleLine] = []
    for obj in objects:
        if "chain" in obj:
            c = obj["chain"]
            chains.append(ChainInfo(c["name"], c.get("hook"), c.get("prio"), c.get("policy")))
        elif "rule" in obj:
            r = obj["rule"]
            text, packets, nbytes = expr_text(_resolve_sets(r.get("expr", []), named))
            rules.append(RuleLine(r["chain"], text, r.get("comment", ""), packets, nbytes))
    return TableView(tuple(chains), tuple(rules))


def diff_lines(desired: TableView, live: TableView | None) -> list[str]:
    """A unified diff from the desired table to the live one; empty when they agree."""
    live_lines = live.lines() if live is not None else []
    return list(
        difflib.unified_diff(
            desired.lines(), live_lines, "desired (documents)", "live (kernel)", lineterm="", n=1
        )
    )


def format_table(view: TableView, *, counters: bool = True) -> str:
    """One readable table per chain: number (as `explain` counts), packets, bytes, rule."""
    out: list[str] = []
    for chain in view.chains:
        out.append(chain.header())
        rows = view.chain_rules(chain.name)
        if not rows:
            out.append("  (no rules)")
        elif counters:
            out.append(f"  {'#':>3} {'PACKETS':>8} {'BYTES':>10} RULE")
        for i, rule in enumerate(rows, start=1):
            count = ""
            if counters:
                packets = "-" if rule.packets is None else str(rule.packets)
                nbytes = "-" if rule.bytes is None else str(rule.bytes)
                count = f"{packets:>8} {nbytes:>10} "
            note = f"  [{rule.comment}]" if rule.comment else ""
            out.append(f"  {i:>3} {count}{rule.text}{note}")
        out.append("")
    return "\n".join(out).rstrip("\n")
