"""A heartbeat on the running event loop: how long the loop was held between two beats, for
tests that check that blocking work stays off it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def heartbeat(every: float = 0.01) -> AsyncIterator[list[float]]:
    """Yields the list of gaps between beats (seconds), filled while the block runs."""
    gaps: list[float] = []

    async def beat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(beat())
    try:
        yield gaps
    finally:
        task.cancel()
