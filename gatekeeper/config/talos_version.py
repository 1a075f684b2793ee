"""The `talos_version` the agent sends in Provision (sans-I/O, cheap to import for --help)."""

from __future__ import annotations

import re

# What goes in `talos_version`: the Talos API level this agent speaks, not our own version
# (that is the Version API's tag). Omni parses the field as semver and fails a Provision it
# cannot parse; in its strict join-token mode it refuses Talos before 1.6. Talos 1.9 is the
# release whose SideroLink wire facts (unique token, gRPC tunnel, SideroLink resources) we
# match; see docs/compatibility.md.
DEFAULT_TALOS_VERSION = "v1.9.0"
_SEMVER = re.compile(
    r"^v?(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
)


def check_talos_version(text: str) -> str:
    """`text` when it is a semantic version (`v1.9.0`, `1.10.2-beta.0`); ValueError otherwise."""
    if len(text) > 64 or not _SEMVER.match(text):
        raise ValueError(
            f"talos version {text[:64]!r} is not a semantic version such as {DEFAULT_TALOS_VERSION}"
        )
    return text
