"""Reading parameters from the kernel command line.

Splitting follows the kernel's own parser (lib/cmdline.c ``next_arg``):
parameters are separated by unquoted whitespace; a double quote toggles
quoting anywhere in a parameter; a quote opening the parameter or its value
and the matching quote closing it are removed, quotes in the middle stay.
The key is everything before the first ``=``. A bare ``--`` ends the kernel's
parameters (the rest belongs to init), so nothing after it is looked at.
"""

from __future__ import annotations

from pathlib import Path

from gatekeeper.config.errors import ConfigError

PROC_CMDLINE = "/proc/cmdline"
MAX_CMDLINE_BYTES = 64 * 1024
SIDEROLINK_API = "siderolink.api"

# The kernel's isspace(): space, \t, \n, \v, \f, \r.
_SPACE = frozenset(" \t\n\v\f\r")


def split_cmdline(text: str) -> list[tuple[str, str | None]]:
    """All (key, value) pairs in order; value is None for a parameter without ``=``."""
    params: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n:
            return params
        quoted = text[i] == '"'
        if quoted:
            i += 1
        start, in_quote, equals = i, quoted, -1
        while i < n and (in_quote or text[i] not in _SPACE):
            if equals < 0 and text[i] == "=":
                equals = i
            if text[i] == '"':
                in_quote = not in_quote
            i += 1
        end = i
        # The kernel strips a closing quote by overwriting it, so the last
        # character can be consumed only once.
        tail_used = False
        if equals < 0:
            key, value = text[start:end], None
        else:
            key, value = text[start:equals], text[equals + 1 : end]
            if value.startswith('"'):
                tail_used = text[end - 1] == '"'
                value = value[1:-1] if tail_used and len(value) > 1 else value[1:]
        if quoted and not tail_used and end > start and text[end - 1] == '"':
            if value is None:
                key = key[:-1]
            else:
                value = value[:-1]
        if key == "--" and value is None and not quoted:
            return params
        params.append((key, value))


def cmdline_values(text: str, key: str) -> list[str]:
    """Every value given for ``key``, in order (``key`` without ``=`` gives none)."""
    return [value for k, value in split_cmdline(text) if k == key and value is not None]


def siderolink_api_from_cmdline(text: str) -> str | None:
    """The first ``siderolink.api=`` value, or None when there is none."""
    values = cmdline_values(text, SIDEROLINK_API)
    return values[0] if values else None


def read_cmdline(path: str | Path = PROC_CMDLINE) -> str:
    """The kernel command line as text (undecodable bytes become U+FFFD).

    At most MAX_CMDLINE_BYTES: the kernel's own limit (COMMAND_LINE_SIZE) is 2 to 4 KiB on
    most architectures, so a larger file is not a kernel command line; it is refused rather
    than read whole.
    """
    try:
        with Path(path).open("rb") as stream:
            data = stream.read(MAX_CMDLINE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or type(exc).__name__}", str(path)) from None
    if len(data) > MAX_CMDLINE_BYTES:
        raise ConfigError(
            f"larger than {MAX_CMDLINE_BYTES // 1024} KiB, not a kernel command line", str(path)
        )
    return data.decode("utf-8", errors="replace").rstrip("\0\n")
