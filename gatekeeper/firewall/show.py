"""`firewall show`: the live table next to the desired one, and the diff when they differ.

Sans-I/O: takes the kernel's listing (or None) and the desired ruleset, returns a report.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from gatekeeper.firewall import listing, render
from gatekeeper.firewall.policy import LOOPBACK, OVERLAY_INTERFACES, LinkState
from gatekeeper.firewall.ruleset import TAG_OVERLAY_GUARD, TAG_TRUSTED, TAG_WIREGUARD, Ruleset

JSON = dict[str, Any]


@dataclass(frozen=True)
class ShowReport:
    live: listing.TableView | None
    desired: listing.TableView
    diff: tuple[str, ...]

    @property
    def in_sync(self) -> bool:
        return not self.diff

    def text(self) -> str:
        out: list[str] = []
        if self.live is None:
            out.append("live: table inet gatekeeper is not loaded (nothing filtered by gatekeeper)")
        else:
            out.append("live: table inet gatekeeper (kernel)")
            out.append(listing.format_table(self.live))
        out.append("")
        if self.in_sync:
            out.append("desired (documents): identical to the live table")
        else:
            out.append("desired (documents):")
            out.append(listing.format_table(self.desired, counters=False))
            out.append("")
            out.append("DIFF: the live table differs from the documents (edited by hand?)")
            out.extend(self.diff)
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        def view(v: listing.TableView | None) -> Any:
            if v is None:
                return None
            return {
                "chains": [
                    {
                        "name": c.name,
                        "hook": c.hook,
                        "priority": c.priority,
                        "policy": c.policy,
                        "rules": [
                            {
                                "rule": r.text,
                                "comment": r.comment,
                                "packets": r.packets,
                                "bytes": r.bytes,
                            }
                            for r in v.chain_rules(c.name)
                        ],
                    }
                    for c in v.chains
                ]
            }

        return {
            "live": view(self.live),
            "desired": view(self.desired),
            "in_sync": self.in_sync,
            "diff": list(self.diff),
        }


def show_report(desired: Ruleset, live_objects: list[JSON] | None) -> ShowReport:
    desired_view = listing.table_view(render.table_objects(desired))
    live_view = listing.table_view(live_objects) if live_objects is not None else None
    return ShowReport(live_view, desired_view, tuple(listing.diff_lines(desired_view, live_view)))


def link_from_live(live_objects: list[JSON] | None) -> LinkState | None:
    """The link state the live table was rendered for, read back from our tagged rules.

    Lets `show` compare against the documents without being told the WireGuard port.
    """
    if not live_objects:
        return None
    ports: set[int] = set()
    trusted: list[str] = []
    overlay: set[ipaddress.IPv6Address] = set()
    for obj in live_objects:
        rule = obj.get("rule")
        if not isinstance(rule, dict):
            continue
        comment = rule.get("comment")
        for stmt in rule.get("expr", []):
            match = stmt.get("match") if isinstance(stmt, dict) else None
            if not isinstance(match, dict):
                continue
            items = listing.set_elements(match.get("right"))
            if comment == TAG_WIREGUARD and "payload" in (match.get("left") or {}):
                for item in items:
                    iv = listing.as_interval(item)
                    if iv is not None and iv[0] == 0:
                        ports.update(range(iv[1], iv[2] + 1))
            if comment == TAG_TRUSTED and "meta" in (match.get("left") or {}) and not trusted:
                trusted = [str(i) for i in items]
            if comment == TAG_OVERLAY_GUARD and "payload" in (match.get("left") or {}):
                for item in items:
                    with contextlib.suppress(ValueError):
                        overlay.add(ipaddress.IPv6Address(str(item)))
    base = {LOOPBACK, *OVERLAY_INTERFACES}
    return LinkState(
        wireguard_ports=tuple(sorted(ports)),
        extra_trusted=tuple(t for t in trusted if t not in base),
        overlay_addresses=tuple(sorted(overlay)),
    )
