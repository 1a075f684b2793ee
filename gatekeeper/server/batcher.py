"""Provisions that arrive together are answered together (docs/registry.md, "Provision
storms").

One worker thread takes the first waiting request and every other one already queued (at most
MAX_BATCH), hands them to `provision_batch` (one UAPI set, one store commit) and answers each
caller on its own event loop. A request that comes alone is answered at once: nothing waits for
a batch to fill, so a quiet server's latency is unchanged. One thread keeps Provisions in the
order they arrived, so two requests for one machine never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from gatekeeper.server.provisioning import Code, ProvisionInput, ProvisionOutput, Rejected

log = logging.getLogger(__name__)

# Bounds one batch's work (and so the wait of the requests queued behind it): at a few
# hundred microseconds each, 256 Provisions are well under a tenth of a second.
MAX_BATCH = 256
# Provisions waiting (queued or being decided) beyond which a new one is refused at once with
# RESOURCE_EXHAUSTED (a Talos machine retries): a flood of calls must not grow the queue, and
# each one's wait, without end. About five seconds of work at this 2-core machine's rate.
MAX_WAITING = 5000
BUSY = "the server is busy: too many Provisions are waiting; retry later"
# The outcome of a request whose caller had gone before it was decided (nobody receives it).
GONE = Rejected(Code.INTERNAL, "the caller went away")

Outcome = ProvisionOutput | BaseException


class BatchProvisions(Protocol):
    def provision_batch(self, reqs: Sequence[ProvisionInput]) -> list[Outcome]: ...


_Item = tuple[ProvisionInput, "asyncio.Future[ProvisionOutput]", asyncio.AbstractEventLoop]


_Answer = tuple["asyncio.Future[ProvisionOutput]", Outcome]

# Answers released per turn of the event loop. Each one resumes a handler that builds and
# sends its reply (a few hundred microseconds); releasing a whole batch of 256 at once held
# the loop, and every tunnelled datagram behind it, for tens of milliseconds.
SETTLE_CHUNK = 8


def _settle_some(
    batcher: ProvisionBatcher,
    loop: asyncio.AbstractEventLoop,
    pending: list[_Answer],
    start: int,
) -> None:
    end = start + SETTLE_CHUNK
    if end < len(pending):
        # Scheduled first, behind the handlers resumed here and whatever I/O arrives
        # meanwhile: nothing in this chunk can keep the rest of the batch from its callers.
        loop.call_soon(_settle_some, batcher, loop, pending, end)
    chunk = pending[start:end]
    batcher._answered(len(chunk))
    for fut, outcome in chunk:
        if fut.done():  # the caller went away (deadline, cancelled)
            continue
        try:
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)
        except Exception:  # an outcome a future refuses (StopIteration): still an answer
            log.exception("a Provision's outcome could not be handed back")
            fut.set_exception(Rejected(Code.INTERNAL, "internal error"))


class ProvisionBatcher:
    def __init__(
        self,
        provisions: BatchProvisions,
        *,
        max_batch: int = MAX_BATCH,
        max_waiting: int = MAX_WAITING,
        on_busy: Callable[[], None] | None = None,
    ) -> None:
        """`on_busy`: called (on the event loop, so it must be cheap) for each refusal."""
        self.provisions = provisions
        self.on_busy = on_busy
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        # Counted on the event loop only (taken in `provision`, given back in _settle_some).
        self.waiting = 0
        self.refused = 0  # refused as busy since the queue last had room
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="provision", daemon=True)
        self._thread.start()
        # For the benchmarks and tests: how many batches, and the largest.
        self.batches = 0
        self.largest = 0

    async def provision(self, req: ProvisionInput) -> ProvisionOutput:
        if self.waiting >= self.max_waiting:
            if not self.refused:
                log.warning(
                    "%d Provisions waiting: refusing new ones until there is room", self.waiting
                )
            self.refused += 1
            if self.on_busy is not None:
                self.on_busy()
            raise Rejected(Code.RESOURCE_EXHAUSTED, BUSY)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ProvisionOutput] = loop.create_future()
        self.waiting += 1
        self._queue.put((req, fut, loop))
        return await fut

    def _answered(self, count: int) -> None:
        self.waiting -= count
        # The flood is over once the queue has drained to half: near the bound, room for a
        # few comes and goes with every chunk of answers, and each would be logged.
        if self.refused and self.waiting <= self.max_waiting // 2:
            log.warning("Provisions accepted again (%d refused as busy)", self.refused)
            self.refused = 0

    def _take(self) -> list[_Item] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._queue.put(None)  # seen after this batch
                break
            batch.append(more)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            # A caller that gave up (its deadline passed while the store stalled) is not
            # decided: its machine would be claimed for nobody, and after a stall the live
            # ones would wait behind the dead. (done() is a plain read of the future's state.)
            live = [i for i, (_, fut, _) in enumerate(batch) if not fut.done()]
            outcomes: list[Outcome] = [GONE] * len(batch)
            try:
                decided = self.provisions.provision_batch([batch[i][0] for i in live])
            except BaseException as exc:  # the thread must outlive one bad batch
                log.exception("provision batch failed")
                decided = [exc] * len(live)
            for i, outcome in zip(live, decided, strict=True):
                outcomes[i] = outcome
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            if len(batch) > 1:
                log.info("%d Provisions answered as one batch (one commit)", len(batch))
            answers: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
            for (_, fut, loop), outcome in zip(batch, outcomes, strict=True):
                answers.setdefault(loop, []).append((fut, outcome))
            for loop, pending in answers.items():
                # RuntimeError: that loop is closed, nobody waits any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle_some, self, loop, pending, 0)

    def close(self) -> None:
        """Answer what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=30)


__all__ = ["BUSY", "MAX_BATCH", "MAX_WAITING", "BatchProvisions", "ProvisionBatcher"]
