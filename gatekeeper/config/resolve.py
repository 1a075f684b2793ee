"""Which SideroLink configuration applies: a SideroLinkConfig document beats the kernel argument."""

from __future__ import annotations

from pathlib import Path

from gatekeeper.config.cmdline import read_cmdline, siderolink_api_from_cmdline
from gatekeeper.config.documents import load_documents
from gatekeeper.config.siderolink import SideroLinkConfig, parse_api_url


def resolve_config(
    cmdline_path: str | Path | None, config_path: str | Path | None
) -> SideroLinkConfig | None:
    """The machine's SideroLink settings, or None when neither source configures SideroLink.

    A config file that does not exist counts as absent (the agent passes its
    default path whether or not one was written); any other problem with
    either source raises ConfigError. When the file has a SideroLinkConfig the
    kernel command line is not read at all, as in Talos.
    """
    if config_path is not None and Path(config_path).exists():
        found = load_documents(config_path)
        if found is not None:
            return found
    if cmdline_path is None:
        return None
    url = siderolink_api_from_cmdline(read_cmdline(cmdline_path))
    if not url:
        # Talos treats an empty "siderolink.api=" as not configured.
        return None
    source = f"kernel command line {cmdline_path}"
    api = parse_api_url(url, f"{source} (siderolink.api)")
    return SideroLinkConfig(api=api, unique_token=None, source=source)
