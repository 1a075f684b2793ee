"""The one exception configuration parsers raise."""

from __future__ import annotations

import unicodedata


def one_line(text: str) -> str:
    """Escape control and other non-printing characters so text fits on one log line."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif unicodedata.category(ch) == "Zs":
            out.append(" ")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    return "".join(out)


class ConfigError(ValueError):
    """Bad configuration: ``str()`` is one line, ``"<where>: <what is wrong>"``.

    Parsers build the message from fixed wording and never echo input values,
    so a join token or unique token cannot leak through an error.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return one_line(text)
