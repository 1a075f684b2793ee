"""The libnftables adapter: apply, read and remove `table inet gatekeeper`, nothing else.

Runs in the caller's network namespace (the lab runs it under `ip netns exec`).
"""

from __future__ import annotations

from typing import Any

from gatekeeper.firewall import render

JSON = dict[str, Any]


class FirewallUnavailable(RuntimeError):
    """libnftables cannot be used here (missing library or missing privilege)."""


class FirewallApplyError(RuntimeError):
    """The kernel rejected the new ruleset; the previous one is still in force."""


_PRIVILEGE_HINT = "needs root or CAP_NET_ADMIN (run with sudo)"


def _privilege_error(text: str) -> bool:
    lowered = text.lower()
    return "operation not permitted" in lowered or "permission denied" in lowered


class Nftables:
    """A libnftables context, speaking JSON."""

    def __init__(self) -> None:
        try:
            import nftables  # the pip-nftables ctypes binding over libnftables.so.1
        except ImportError:
            raise FirewallUnavailable(
                "the Python nftables binding is missing: pip install pip-nftables"
            ) from None
        try:
            self._nft: Any = nftables.Nftables()
        except OSError as exc:
            raise FirewallUnavailable(
                f"libnftables cannot be loaded ({exc}): install the Debian package libnftables1"
            ) from None
        self._nft.set_json_output(True)

    def _run(self, commands: JSON) -> tuple[int, Any, str]:
        rc, output, error = self._nft.json_cmd(commands)
        return int(rc), output, str(error or "")

    def apply(self, commands: JSON) -> None:
        """Run one transaction; on failure nothing changed and the message says why."""
        rc, _, error = self._run(commands)
        if rc != 0:
            detail = " ".join(error.split()) or f"libnftables returned {rc}"
            if _privilege_error(error):
                raise FirewallUnavailable(f"nftables {_PRIVILEGE_HINT}: {detail}")
            raise FirewallApplyError(f"nftables rejected the ruleset, previous one kept: {detail}")

    def list_table(self) -> list[JSON] | None:
        """Our table as the kernel lists it, or None when it does not exist."""
        rc, output, error = self._run(render.list_command())
        if rc != 0:
            if "no such file or directory" in error.lower():
                return None
            if _privilege_error(error):
                raise FirewallUnavailable(f"nftables {_PRIVILEGE_HINT}: {error.strip()}")
            raise FirewallApplyError(f"cannot list table inet gatekeeper: {error.strip()}")
        if not isinstance(output, dict):
            return None
        objects = output.get("nftables", [])
        return [o for o in objects if isinstance(o, dict) and "metainfo" not in o]
