"""Runs the agent's reconcilers: each restartable, each restarted with one backoff policy.

A reconciler is a long-running coroutine that converges one thing (the config sources, the
device, the firewall, ...) toward the desired state. When one raises, it is not skipped
silently: the error is logged once, reported in the status (`reconcilers`), and the
reconciler is started again after a backoff (the lifecycle's: 0.5 s, x1.5, capped at 60 s).
A reconciler that ran long enough before failing starts again from the first delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from gatekeeper.config.errors import one_line

log = logging.getLogger(__name__)

# A reconciler that stayed up this long before failing is healthy again: reset its backoff.
HEALTHY_AFTER = 30.0


@dataclass(frozen=True)
class Backoff:
    """The one retry policy of the agent (Talos's: 0.5 s, x1.5, capped at 60 s)."""

    initial: float = 0.5
    factor: float = 1.5
    maximum: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 for the first)."""
        return min(self.initial * self.factor ** max(failures - 1, 0), self.maximum)


@dataclass
class ReconcilerHealth:
    state: str = "running"  # running | restarting | stopped
    restarts: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "restarts": self.restarts, "last_error": self.last_error}


class Runner:
    def __init__(
        self, backoff: Backoff | None = None, on_change: Callable[[], None] | None = None
    ) -> None:
        self.backoff = backoff or Backoff()
        self.health: dict[str, ReconcilerHealth] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._on_change = on_change or (lambda: None)

    def start(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.health[name] = ReconcilerHealth()
        self._tasks[name] = asyncio.create_task(self._supervise(name, factory), name=name)

    async def _supervise(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        health = self.health[name]
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - started >= HEALTHY_AFTER:
                    failures = 0
                failures += 1
                delay = self.backoff.delay(failures)
                health.state = "restarting"
                health.restarts += 1
                health.last_error = one_line(f"{type(exc).__name__}: {exc}")[:300]
                log.error(
                    "reconciler %s failed (%s); restarting in %.1f s",
                    name,
                    health.last_error,
                    delay,
                    exc_info=failures == 1,
                )
                self._on_change()
                await asyncio.sleep(delay)
                health.state = "running"
                self._on_change()
            else:
                health.state = "stopped"
                self._on_change()
                return

    def report(self) -> dict[str, dict[str, Any]]:
        return {name: h.as_dict() for name, h in self.health.items()}

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
