"""Client-supplied text made safe to print: in our log lines, in CLI tables, on a terminal.

A machine chooses its node UUID, its version string, its log lines and event ids. Printed raw,
a newline forges a whole log line and an ESC sequence drives the operator's terminal. Every
such string goes through `shown()` before it reaches a log or a table: characters that are
not printable (C0 and C1 controls, DEL, line and paragraph separators, bidi overrides) become
Python-style escapes (`\\n`, `\\x1b`, `\\u202e`), and long values are clipped.
"""

from __future__ import annotations

DEFAULT_LIMIT = 128


def shown(text: object, limit: int | None = DEFAULT_LIMIT) -> str:
    value = text if isinstance(text, str) else str(text)
    clipped = limit is not None and len(value) > limit
    if clipped:
        value = value[:limit]
    if not value.isprintable():
        value = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return value + ("…" if clipped else "")
