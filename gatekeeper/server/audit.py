"""The audit log: one JSON object per line, append-only, bounded by rotation.

Every line says what was attempted (`action`), its `outcome`, when (`time`, RFC 3339 UTC),
from where (`from`) and who (the node UUID a machine claimed, the token's id and name, or the
local user for CLI actions). Join tokens, unique tokens and keys' private halves never appear:
callers pass labels (`TokenPolicy.describe`), never secrets.

Several processes append to the same file (the server, `gatekeeper token ...`): each line, or
each batch of lines (a Provision batch's), is one `write()` on an O_APPEND descriptor, which
Linux keeps whole on a local file system.
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

AUDIT_NAME = "audit.jsonl"
MAX_BYTES = 32 << 20
KEEP = 3
MAX_VALUE = 256

Value = str | int | float | bool | None


def rfc3339(ts: float) -> str:
    stamp = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def local_user() -> str:
    """Who ran a CLI action: the login behind sudo when there is one, and the uid."""
    name = os.environ.get("SUDO_USER") or getpass.getuser()
    return f"{name} (uid {os.getuid()})"


def _clip(value: Value) -> Value:
    if isinstance(value, str) and len(value) > MAX_VALUE:
        return value[:MAX_VALUE] + "…"
    return value


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()

    def write(self, now: float, action: str, outcome: str, **fields: Value) -> None:
        self.append([self.line(now, action, outcome, **fields)])

    @staticmethod
    def line(now: float, action: str, outcome: str, **fields: Value) -> bytes:
        """One line as `write` would append it, for `append`."""
        line: dict[str, Value] = {"time": rfc3339(now), "action": action, "outcome": outcome}
        line.update({k: _clip(v) for k, v in fields.items() if v is not None})
        return (json.dumps(line, ensure_ascii=False, sort_keys=False) + "\n").encode()

    def append(self, lines: Sequence[bytes]) -> None:
        """Lines from `line`, in one write: a Provision batch's hundreds of lines cost one
        open and one write, not four system calls each on the thread that decides."""
        if not lines:
            return
        data = b"".join(lines)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size >= self.max_bytes:
                self._rotate()

    def _rotate(self) -> None:
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def read_audit(path: Path) -> list[dict[str, Value]]:
    """The current file's lines (tests and tools)."""
    out: list[dict[str, Value]] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for raw in text.splitlines():
        if raw.strip():
            out.append(json.loads(raw))
    return out
