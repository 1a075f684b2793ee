"""The per-machine byte budget of the events sink (sans-I/O)."""

from __future__ import annotations

from gatekeeper.server.events import ByteBudget


def test_a_burst_then_the_rate_and_refusals_cost_nothing() -> None:
    budget = ByteBudget(rate=100, burst=1000)
    assert budget.take(600, now=0) and budget.take(400, now=0)
    assert not budget.take(1, now=0)
    assert not budget.take(200, now=1)  # 100 back after 1 s: not enough for 200
    assert budget.take(100, now=1)  # the refusal above took nothing
    assert budget.take(1000, now=100)  # refills up to the burst, not beyond
    assert not budget.take(1, now=100)
