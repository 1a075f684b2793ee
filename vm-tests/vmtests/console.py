"""The guest's reports, read from its serial console log as the guest writes it.

The guest writes one `@@GK {json}` line per event (guest/init and guest/runner.py); anything
else on the console (kernel messages, the agent's log) is kept in the file for people to read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmtests.errors import VmFailure

PREFIX = "@@GK "


def parse_line(line: str) -> dict[str, Any] | None:
    """The event on this console line, or None (a line may start with kernel noise)."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(PREFIX) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


@dataclass
class Event:
    data: dict[str, Any]
    # Seconds since QEMU started, when the host saw the line.
    seen: float

    @property
    def name(self) -> str:
        return str(self.data.get("event"))


@dataclass
class Console:
    path: Path
    started: float
    # Called between polls; raises when the VM is gone (so waits end at once).
    alive: Callable[[], None] = lambda: None
    events: list[Event] = field(default_factory=list)
    _offset: int = 0
    _partial: bytes = b""

    def poll(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        now = time.monotonic() - self.started
        new = []
        for raw in lines:
            parsed = parse_line(raw.decode(errors="replace"))
            if parsed is not None:
                new.append(Event(parsed, now))
        self.events.extend(new)
        return new

    def find(self, predicate: Callable[[Event], bool]) -> Event | None:
        self.poll()
        for event in self.events:
            if predicate(event):
                return event
        return None

    def wait(self, predicate: Callable[[Event], bool], timeout: float, what: str) -> Event:
        """The first event matching predicate; VmFailure with the console's tail after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(predicate)
            if found is not None:
                return found
            self.alive()
            if time.monotonic() >= deadline:
                raise VmFailure(
                    f"{what}: not within {timeout:.0f} s\n--- console tail ({self.path}) ---\n"
                    f"{self.tail()}"
                )
            time.sleep(0.02)

    def wait_event(self, name: str, timeout: float, what: str) -> Event:
        return self.wait(lambda e: e.name == name, timeout, what)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty console)"
