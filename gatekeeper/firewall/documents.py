"""Parse and validate NetworkDefaultActionConfig and NetworkRuleConfig documents.

The messages after the location are Talos's own (`name is required`, `invalid port range: …`,
`… overlaps with …`, `invalid subnet: …`, `invalid except: …`, `X does not belong to Protocol
values`), so an operator moving documents between Talos and Gatekeeper sees the same words.
Every error is one line: file, document number (1-based), kind and name, field, message.

The YAML envelope (mapping, kind, apiVersion v1alpha1) is checked by gatekeeper.config.documents,
shared with the other document readers; other kinds (SideroLinkConfig, …) are skipped here.
"""

from __future__ import annotations

import ipaddress
import json
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatekeeper.config.documents import parse_documents, read_text
from gatekeeper.config.errors import ConfigError
from gatekeeper.firewall.policy import (
    DefaultAction,
    FirewallPolicy,
    IngressRule,
    Network,
    NetworkRule,
    PortRange,
    Protocol,
)

DEFAULT_ACTION_KIND = "NetworkDefaultActionConfig"
RULE_KIND = "NetworkRuleConfig"

_RULE_FIELDS = {"apiVersion", "kind", "name", "portSelector", "ingress"}
_DEFAULT_ACTION_FIELDS = {"apiVersion", "kind", "ingress"}
_PORT_SELECTOR_FIELDS = {"ports", "protocol"}
_INGRESS_FIELDS = {"subnet", "except"}


class FirewallDocumentError(ConfigError):
    """A firewall document is invalid; the message is one line naming where and what."""


@dataclass(frozen=True)
class _Where:
    source: str
    index: int
    kind: str
    name: str | None = None

    def fail(self, at_field: str | None, message: str) -> FirewallDocumentError:
        what = self.kind if self.name is None else f"{self.kind} {_go_quote(self.name)}"
        at = f"{at_field}: " if at_field else ""
        return FirewallDocumentError(
            f"{at}{message}", f"{self.source} document {self.index} ({what})"
        )


_MAX_SHOWN = 64
# Bounded formatting of non-string values: str() of a list walks all of it, and a document's
# values may be large (up to the reader's bounds), so an error must never format them whole.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 20, 20


def _shown(value: object) -> str:
    """A value as an error message shows it: strings as they are, others as Python prints
    them; at most _MAX_SHOWN characters either way."""
    text = value if isinstance(value, str) else _SHORT.repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _go_quote(value: object) -> str:
    # Talos formats unparsable ranges with Go's %q; JSON string quoting is the same for ASCII.
    return json.dumps(_shown(value), ensure_ascii=False)


def split_documents(text: str, source: str) -> list[tuple[int, dict[str, Any]]]:
    """The YAML documents of one file with their 1-based numbers (the shared envelope check:
    every document a mapping with kind and apiVersion v1alpha1)."""
    try:
        return parse_documents(text, source)
    except FirewallDocumentError:
        raise
    except ConfigError as exc:
        raise FirewallDocumentError(exc.message, exc.where) from None


def _check_fields(where: _Where, doc: Mapping[Any, Any], allowed: set[str], prefix: str) -> None:
    for key in doc:
        if key not in allowed:
            raise where.fail(f"{prefix}{_shown(key)}", f'unknown field "{_shown(key)}"')


def parse_port_range(value: object) -> PortRange:
    """One `ports` entry: an integer port or an inclusive "lo-hi" string."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 65535:
            return PortRange(value, value)
        raise ValueError(f"invalid port range: {_go_quote(value)}")
    if isinstance(value, str):
        lo, sep, hi = value.partition("-")
        if sep and _is_port(lo) and _is_port(hi):
            return PortRange(int(lo), int(hi))
    raise ValueError(f"invalid port range: {_go_quote(value)}")


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= 65535


def validate_port_ranges(ranges: Iterable[PortRange]) -> None:
    """Talos's check: every range ordered and no two ranges overlapping (sorted by start)."""
    ordered = sorted(ranges, key=lambda r: r.lo)
    for i, pr in enumerate(ordered):
        if pr.lo > pr.hi:
            raise ValueError(f"invalid port range: {pr}")
        if i > 0 and pr.lo <= ordered[i - 1].hi:
            raise ValueError(f"invalid port range: {pr}, overlaps with {ordered[i - 1]}")


def _parse_prefix(value: object) -> Network:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError
    # Host bits are allowed (netip.ParsePrefix keeps them, nftables masks them).
    return ipaddress.ip_network(value.strip(), strict=False)


def parse_rule(where: _Where, doc: Mapping[Any, Any]) -> NetworkRule:
    _check_fields(where, doc, _RULE_FIELDS, "")
    name = doc.get("name")
    if name is not None and not isinstance(name, str):
        raise where.fail("name", f"name must be a string, got {_go_quote(name)}")
    if not name:
        raise where.fail("name", "name is required")
    where = _Where(where.source, where.index, where.kind, name)

    selector = doc.get("portSelector")
    if selector is None:
        selector = {}
    if not isinstance(selector, dict):
        raise where.fail("portSelector", "portSelector must be a mapping")
    _check_fields(where, selector, _PORT_SELECTOR_FIELDS, "portSelector.")
    raw_ports = selector.get("ports")
    if raw_ports is None or raw_ports == []:
        raise where.fail("portSelector.ports", "portSelector.ports is required")
    if not isinstance(raw_ports, list):
        raw_ports = [raw_ports]
    ports: list[PortRange] = []
    for i, raw in enumerate(raw_ports):
        try:
            ports.append(parse_port_range(raw))
        except ValueError as exc:
            raise where.fail(f"portSelector.ports[{i}]", str(exc)) from None
    try:
        validate_port_ranges(ports)
    except ValueError as exc:
        raise where.fail("portSelector.ports", str(exc)) from None

    raw_protocol = selector.get("protocol")
    if raw_protocol is None or raw_protocol == "":
        raise where.fail("portSelector.protocol", "portSelector.protocol is required")
    try:
        protocol = Protocol(raw_protocol if isinstance(raw_protocol, str) else "")
    except ValueError:
        raise where.fail(
            "portSelector.protocol", f"{_shown(raw_protocol)} does not belong to Protocol values"
        ) from None

    raw_ingress = doc.get("ingress")
    if raw_ingress is None:
        raw_ingress = []
    if not isinstance(raw_ingress, list):
        raise where.fail("ingress", "ingress must be a list of {subnet, except}")
    ingress: list[IngressRule] = []
    for i, entry in enumerate(raw_ingress):
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise where.fail(f"ingress[{i}]", "ingress entries must be mappings")
        _check_fields(where, entry, _INGRESS_FIELDS, f"ingress[{i}].")
        subnet_raw = entry.get("subnet")
        if subnet_raw is None or subnet_raw == "":
            raise where.fail(f"ingress[{i}].subnet", "invalid subnet: invalid Prefix")
        try:
            subnet = _parse_prefix(subnet_raw)
        except ValueError:
            raise where.fail(
                f"ingress[{i}].subnet", f"invalid subnet: {_shown(subnet_raw)}"
            ) from None
        except_: Network | None = None
        except_raw = entry.get("except")
        if except_raw is not None and except_raw != "":
            try:
                except_ = _parse_prefix(except_raw)
            except ValueError:
                raise where.fail(
                    f"ingress[{i}].except", f"invalid except: {_shown(except_raw)}"
                ) from None
        ingress.append(IngressRule(subnet, except_))

    return NetworkRule(
        name=name,
        ports=tuple(ports),
        protocol=protocol,
        ingress=tuple(ingress),
        origin=f"{where.source} document {where.index}",
    )


def parse_default_action(where: _Where, doc: Mapping[Any, Any]) -> DefaultAction:
    _check_fields(where, doc, _DEFAULT_ACTION_FIELDS, "")
    raw = doc.get("ingress")
    if raw is None:
        return DefaultAction.ACCEPT
    try:
        return DefaultAction(raw if isinstance(raw, str) else "")
    except ValueError:
        raise where.fail(
            "ingress", f"{_shown(raw)} does not belong to DefaultAction values"
        ) from None


@dataclass
class PolicyBuilder:
    """Collects documents from several files into one policy, rejecting duplicates."""

    default_action: DefaultAction | None = None
    default_action_origin: str = ""
    rules: dict[str, NetworkRule] = field(default_factory=dict)

    def add_text(self, text: str, source: str) -> None:
        for index, doc in split_documents(text, source):
            kind = doc.get("kind")
            if kind == RULE_KIND:
                where = _Where(source, index, RULE_KIND)
                rule = parse_rule(where, doc)
                previous = self.rules.get(rule.name)
                if previous is not None:
                    raise _Where(source, index, RULE_KIND, rule.name).fail(
                        "name", f"duplicate name, already defined in {previous.origin}"
                    )
                self.rules[rule.name] = rule
            elif kind == DEFAULT_ACTION_KIND:
                where = _Where(source, index, DEFAULT_ACTION_KIND)
                action = parse_default_action(where, doc)
                if self.default_action is not None:
                    raise where.fail(
                        None, f"duplicate document, already defined in {self.default_action_origin}"
                    )
                self.default_action = action
                self.default_action_origin = f"{source} document {index}"
            # Any other kind belongs to another reader.

    def add_file(self, path: Path) -> None:
        try:
            text = read_text(path)  # bounded: see gatekeeper.config.documents
        except ConfigError as exc:
            raise FirewallDocumentError(exc.message, exc.where) from None
        self.add_text(text, str(path))

    def build(self) -> FirewallPolicy:
        return FirewallPolicy(
            default_action=self.default_action or DefaultAction.ACCEPT,
            rules=tuple(self.rules.values()),
        )


def parse_policy_text(text: str, source: str = "<text>") -> FirewallPolicy:
    builder = PolicyBuilder()
    builder.add_text(text, source)
    return builder.build()


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a directory means its *.yaml and *.yml files in name order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            out.append(path)
    return out


def load_policy(paths: Iterable[str | Path]) -> FirewallPolicy:
    builder = PolicyBuilder()
    for path in expand_paths(paths):
        builder.add_file(path)
    return builder.build()
