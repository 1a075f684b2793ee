"""The runner restarts a failed reconciler with the agent's backoff and reports it."""

from __future__ import annotations

import asyncio

from gatekeeper.agent.runner import Backoff, Runner


def test_backoff_is_the_lifecycle_policy() -> None:
    b = Backoff()
    assert [b.delay(n) for n in (1, 2, 3)] == [0.5, 0.75, 1.125]
    assert b.delay(100) == 60.0


async def test_a_failing_reconciler_is_restarted_and_reported_others_run_on() -> None:
    changes = 0

    def changed() -> None:
        nonlocal changes
        changes += 1

    runner = Runner(Backoff(initial=0.05, factor=2, maximum=0.2), on_change=changed)
    starts = 0
    ticks = 0

    async def flaky() -> None:
        nonlocal starts
        starts += 1
        await asyncio.sleep(0.01)
        raise RuntimeError(f"boom {starts}\nsecond line")

    async def steady() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    runner.start("flaky", flaky)
    runner.start("steady", steady)
    await asyncio.sleep(0.5)
    report = runner.report()
    await runner.close()
    # 0.05, 0.1, 0.2, 0.2 ... between starts: about 4 restarts in 0.5 s, never a busy loop.
    assert 3 <= starts <= 6
    assert report["flaky"]["restarts"] == starts or report["flaky"]["restarts"] == starts - 1
    assert report["flaky"]["last_error"].startswith("RuntimeError: boom")
    assert "\n" not in report["flaky"]["last_error"]
    assert report["steady"] == {"state": "running", "restarts": 0, "last_error": None}
    assert ticks > 20 and changes >= 2 * (starts - 1)
