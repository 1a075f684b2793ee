"""The firewall as the agent drives it: keep the kernel table equal to documents + link state.

The agent calls `reconcile(link)` whenever the overlay interface or the WireGuard listen port
changes (and may call it periodically: an unchanged table is left alone). A policy the kernel
rejects, or documents that fail validation, never replace the ruleset in force.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatekeeper.firewall import render
from gatekeeper.firewall.apply import FirewallApplyError, FirewallUnavailable, Nftables
from gatekeeper.firewall.documents import FirewallDocumentError, load_policy
from gatekeeper.firewall.policy import FirewallPolicy, LinkState
from gatekeeper.firewall.ruleset import Ruleset, build_ruleset


@dataclass(frozen=True)
class ReconcileResult:
    changed: bool  # a transaction was committed
    in_force: bool  # the kernel table now equals the desired one
    error: str | None = None  # why the desired ruleset is not in force
    # The policy this call reconciled to: the caller's current one may have moved on since.
    policy: FirewallPolicy | None = None


JSON = dict[str, Any]


def fingerprint(objects: list[JSON]) -> str:
    """The listing as one string, without the counters that traffic moves."""
    out = []
    for obj in objects:
        rule = obj.get("rule")
        if isinstance(rule, dict):
            exprs = [
                e for e in rule.get("expr", []) if not (isinstance(e, dict) and "counter" in e)
            ]
            obj = {"rule": {**{k: v for k, v in rule.items() if k != "handle"}, "expr": exprs}}
        out.append(json.dumps(obj, sort_keys=True))
    return "\n".join(out)


def _lines(objects: list[JSON]) -> list[str]:
    # The normalised listing is needed only to compare a table found in the kernel: not on
    # a fresh boot's first apply, so its module (about 0.17 s of the VM guest's start-up
    # under emulation) is imported then.
    from gatekeeper.firewall import listing

    return listing.table_view(objects).lines()


def remove_table(nft: Nftables | None = None) -> None:
    (nft or Nftables()).apply(render.remove_commands())


class FirewallController:
    def __init__(
        self,
        policy: FirewallPolicy | None = None,
        *,
        paths: Sequence[str | Path] = (),
        nft: Nftables | None = None,
    ) -> None:
        self._paths = list(paths)
        self._policy = (
            policy
            if policy is not None
            else (load_policy(self._paths) if self._paths else FirewallPolicy())
        )
        self._nft = nft
        # (policy, link) -> rendered objects, and their normalised lines (made on demand).
        self._desired: tuple[tuple[FirewallPolicy, LinkState], list[JSON], list[str] | None] | None
        self._desired = None
        # What the kernel was last seen or made to hold, and its listing's fingerprint.
        self._applied: tuple[FirewallPolicy, LinkState] | None = None
        self._applied_mark: str | None = None

    @property
    def policy(self) -> FirewallPolicy:
        return self._policy

    def _kernel(self) -> Nftables:
        if self._nft is None:
            self._nft = Nftables()
        return self._nft

    def reload(self) -> str | None:
        """Re-read the document files; on an invalid document keep the current policy.

        Returns the one-line error, or None when the new documents were taken.
        """
        try:
            self._policy = load_policy(self._paths)
        except FirewallDocumentError as exc:
            return str(exc)
        return None

    def set_policy(self, policy: FirewallPolicy) -> None:
        self._policy = policy

    def desired(self, link: LinkState) -> Ruleset:
        return build_ruleset(self._policy, link)

    def _desired_objects(self, key: tuple[FirewallPolicy, LinkState]) -> list[render.JSON]:
        if self._desired is None or self._desired[0] != key:
            self._desired = (key, render.table_objects(build_ruleset(*key)), None)
        return self._desired[1]

    def _desired_lines(self) -> list[str]:
        assert self._desired is not None
        key, objects, lines = self._desired
        if lines is None:
            lines = _lines(objects)
            self._desired = (key, objects, lines)
        return lines

    def reconcile(self, link: LinkState, *, verify: bool = False) -> ReconcileResult:
        """Make the kernel table equal the policy for `link`.

        The ruleset is rendered once per (policy, link); a change is applied at once, without
        reading the kernel first. The kernel is read back only on the first call (a table left
        by an earlier identical run is kept as it is) and with `verify`, for a periodic check
        that nobody changed the table: then a fingerprint of the listing (without counters)
        is compared first, and the full normalised comparison runs only when it differs.
        """
        key = (self._policy, link)
        objects = self._desired_objects(key)
        try:
            nft = self._kernel()
            if key == self._applied and not verify:
                return ReconcileResult(changed=False, in_force=True)
            if key == self._applied or self._applied is None:
                live = nft.list_table()
                if live is not None:
                    mark = fingerprint(live)
                    if key == self._applied and mark == self._applied_mark:
                        return ReconcileResult(changed=False, in_force=True)
                    if _lines(live) == self._desired_lines():
                        self._applied, self._applied_mark = key, mark
                        return ReconcileResult(changed=False, in_force=True)
            nft.apply(render.replace_commands_for(objects))
        except (FirewallApplyError, FirewallUnavailable) as exc:
            return ReconcileResult(changed=False, in_force=False, error=str(exc))
        self._applied, self._applied_mark = key, None
        return ReconcileResult(changed=True, in_force=True, policy=key[0])

    def remove(self) -> None:
        remove_table(self._kernel())
