"""Which SideroLink configuration applies: a SideroLinkConfig document beats the kernel argument."""

from __future__ import annotations

from pathlib import Path

from gatekeeper.config.cmdline import (
    SIDEROLINK_API,
    read_cmdline,
    siderolink_api_from_cmdline,
    split_cmdline,
)
from gatekeeper.config.documents import (
    load_documents,
    parse_documents,
    siderolink_from_documents,
)
from gatekeeper.config.errors import ConfigError
from gatekeeper.config.siderolink import SideroLinkConfig, parse_api_url

MSG_BARE_API = "siderolink.api has no value: write siderolink.api=<URL>, or remove the parameter"
MSG_EMPTY_API = (
    "siderolink.api is present but empty: give the SideroLink API URL, or remove the parameter"
)


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
    return from_cmdline(read_cmdline(cmdline_path), cmdline_path)


def from_cmdline(text: str, cmdline_path: str | Path) -> SideroLinkConfig | None:
    """The kernel argument's configuration; None only when `siderolink.api=` is absent."""
    source = f"kernel command line {cmdline_path}"
    url = siderolink_api_from_cmdline(text)
    if url is None:
        if any(key == SIDEROLINK_API and value is None for key, value in split_cmdline(text)):
            raise ConfigError(MSG_BARE_API, source)
        return None
    if not url.strip():
        # Present but empty is a mistake (or a half-written file), never "not configured":
        # taking it as a removal would tear the link down and open the API to the underlay.
        raise ConfigError(MSG_EMPTY_API, source)
    api = parse_api_url(url, f"{source} (siderolink.api)")
    return SideroLinkConfig(api=api, unique_token=None, source=source)


def resolve_texts(
    cmdline_text: str | None,
    cmdline_path: str | Path,
    config_text: str | None,
    config_path: str | Path | None,
) -> SideroLinkConfig | None:
    """`resolve_config` over texts already read (None: the source is absent)."""
    if config_text is not None and config_path is not None:
        where = str(config_path)
        found = siderolink_from_documents(parse_documents(config_text, where), where)
        if found is not None:
            return found
    if cmdline_text is None:
        return None
    return from_cmdline(cmdline_text, cmdline_path)
