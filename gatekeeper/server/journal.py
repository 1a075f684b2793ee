"""Bounded JSON-lines journals for machine events and logs, under the server's state dir.

One journal is a file `<name>.jsonl` plus at most one rotated `<name>.jsonl.1`: when the
current file passes `max_bytes` it replaces the old one, so a journal never holds more than
about twice that. Machine logs get one journal per machine (named by machine key, a hex
digest: never a name a machine chose), events one shared journal.

With a maximum age, `sweep()` (the server calls it periodically) deletes a file whose newest
entry is older than that, and rotates a current file whose oldest entry is older than half
of it (when the rotated place is free): every entry is kept at least the maximum age (unless
the size limit pushes it out first) and gone within about twice it, without rewriting files
under a reader.

Plain files, because readers are other processes (`gatekeeper logs --follow`): they read the
files as they grow and notice rotation by the inode changing. Nothing is fsynced: telemetry is
best effort, unlike the registry.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

LOG_MAX_BYTES = 1 << 20
EVENT_MAX_BYTES = 8 << 20
OPEN_FILES = 64


def entry_time(entry: dict[str, Any]) -> float | None:
    """When the server stored an entry (`received` for logs, `time` for events)."""
    stamp = entry.get("received") or entry.get("time")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def _first_entry_time(path: Path) -> float | None:
    try:
        with open(path, "rb") as f:
            doc = _parse(f.readline())
    except OSError:
        return None
    return None if doc is None else entry_time(doc)


class Journal:
    """Appends to many journals in one directory, keeping a few files open (LRU)."""

    def __init__(self, directory: Path, *, max_bytes: int, max_age: float | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._open: collections.OrderedDict[str, IO[bytes]] = collections.OrderedDict()

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.jsonl"

    def append(self, name: str, entries: list[dict[str, Any]]) -> None:
        data = b"".join(
            json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            for e in entries
        )
        f = self._file(name)
        f.write(data)
        f.flush()
        if f.tell() >= self.max_bytes:
            self._rotate(name)

    def _rotate(self, name: str) -> None:
        f = self._open.pop(name, None)
        if f is not None:
            f.close()
        path = self.path(name)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, path.with_name(path.name + ".1"))

    def sweep(self, now: float | None = None) -> int:
        """Apply the maximum age (see the module's doc); the number of files removed."""
        if self.max_age is None:
            return 0
        now = time.time() if now is None else now
        removed = 0
        # Rotated files first: a current file rotates only onto a free place, so entries
        # younger than the maximum age in an older file are never replaced early.
        paths = sorted(self.directory.glob("*.jsonl.1")) + sorted(self.directory.glob("*.jsonl"))
        for path in paths:
            try:
                newest = path.stat().st_mtime
            except FileNotFoundError:
                continue
            name = path.name.split(".jsonl")[0]
            if newest < now - self.max_age:
                if path.suffix == ".jsonl":
                    f = self._open.pop(name, None)
                    if f is not None:
                        f.close()
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed += 1
            elif path.suffix == ".jsonl":
                oldest = _first_entry_time(path)
                rotated = path.with_name(path.name + ".1")
                if oldest is not None and oldest < now - self.max_age / 2 and not rotated.exists():
                    self._rotate(name)
        return removed

    def _file(self, name: str) -> IO[bytes]:
        f = self._open.get(name)
        if f is not None:
            self._open.move_to_end(name)
            return f
        f = open(self.path(name), "ab")  # noqa: SIM115 - kept open across appends
        os.chmod(f.fileno(), 0o600)
        self._open[name] = f
        while len(self._open) > OPEN_FILES:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        return f

    def close(self) -> None:
        for f in self._open.values():
            with contextlib.suppress(OSError):
                f.close()
        self._open.clear()


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def read_journal(
    path: Path, *, follow: bool = False, poll: float = 0.2, stop_after: float | None = None
) -> Iterator[dict[str, Any]]:
    """Every entry (the rotated file first), then, with `follow`, new ones as they come."""
    rotated = path.with_name(path.name + ".1")
    with contextlib.suppress(FileNotFoundError), open(rotated, "rb") as old:
        for raw in old:
            doc = _parse(raw)
            if doc is not None:
                yield doc
    f: IO[bytes] | None = None
    inode = None
    partial = b""
    deadline = None if stop_after is None else time.monotonic() + stop_after
    try:
        while True:
            if f is None:
                try:
                    f = open(path, "rb")  # noqa: SIM115 - reopened on rotation
                    inode = os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    f = None
            if f is not None:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        partial += raw
                        continue
                    doc = _parse(partial + raw)
                    partial = b""
                    if doc is not None:
                        yield doc
            if not follow or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(poll)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if f is not None and current != inode:
                # Rotated: finish the old file (already read up to its end), start the new.
                for raw in f:
                    doc = _parse(partial + raw)
                    partial = b""
                    if doc is not None:
                        yield doc
                f.close()
                f = None
    finally:
        if f is not None:
            f.close()
