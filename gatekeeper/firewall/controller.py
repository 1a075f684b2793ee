"""The firewall as the agent drives it: keep the kernel table equal to documents + link state.

The agent calls `reconcile(link)` whenever the overlay interface or the WireGuard listen port
changes (and may call it periodically: an unchanged table is left alone). A policy the kernel
rejects, or documents that fail validation, never replace the ruleset in force.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gatekeeper.firewall import listing, render
from gatekeeper.firewall.apply import FirewallApplyError, FirewallUnavailable, Nftables
from gatekeeper.firewall.documents import FirewallDocumentError, load_policy
from gatekeeper.firewall.policy import FirewallPolicy, LinkState
from gatekeeper.firewall.ruleset import Ruleset, build_ruleset


@dataclass(frozen=True)
class ReconcileResult:
    changed: bool  # a transaction was committed
    in_force: bool  # the kernel table now equals the desired one
    error: str | None = None  # why the desired ruleset is not in force


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

    def reconcile(self, link: LinkState) -> ReconcileResult:
        ruleset = self.desired(link)
        want = listing.table_view(render.table_objects(ruleset)).lines()
        try:
            nft = self._kernel()
            live = nft.list_table()
            if live is not None and listing.table_view(live).lines() == want:
                return ReconcileResult(changed=False, in_force=True)
            nft.apply(render.replace_commands(ruleset))
        except (FirewallApplyError, FirewallUnavailable) as exc:
            return ReconcileResult(changed=False, in_force=False, error=str(exc))
        return ReconcileResult(changed=True, in_force=True)

    def remove(self) -> None:
        remove_table(self._kernel())
