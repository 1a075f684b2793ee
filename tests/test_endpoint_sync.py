"""When the server reads its whole device for machines' endpoints (endpoint_sync.py).

Pure decisions on one clock; the wiring (the server records a joined machine's endpoint within
seconds) is test_e2e_siderolink.py's server crash test.
"""

from __future__ import annotations

import pytest

from gatekeeper.server.endpoint_sync import JOIN_WINDOW, EndpointSyncSchedule

S = EndpointSyncSchedule(every=5.0, idle_every=300.0, quiet=1.0, max_defer=30.0)


def test_while_machines_join_it_reads_every_few_seconds() -> None:
    # The last machine joined 10 s ago.
    assert S.start(now=95.0).due(now=100.0, last_provision=90.0)
    assert not S.start(now=96.0).due(now=100.0, last_provision=90.0)


def test_it_waits_while_provisions_are_being_answered() -> None:
    timer = S.start(now=90.0)
    # A storm: the last answer 0.1 s ago. The read is due by the clock but waits.
    assert not timer.due(now=100.0, last_provision=99.9)
    # The storm is over once no answer came for `quiet` seconds.
    assert timer.due(now=101.0, last_provision=100.0)


def test_a_storm_on_a_quiet_server_holds_back_the_long_overdue_read() -> None:
    # Nobody joined for minutes, the last read was long ago: the storm's first answer must not
    # set the read off in the middle of the storm.
    timer = S.start(now=0.0)
    assert not timer.due(now=1000.0, last_provision=999.9)
    assert not timer.due(now=1010.0, last_provision=1009.9)
    assert timer.due(now=1012.0, last_provision=1010.5)


def test_a_steady_stream_of_provisions_defers_it_only_so_long_after_it_fell_due() -> None:
    for last_sync in (0.0, -100.0, -10_000.0):
        timer = S.start(now=last_sync)
        now, due_at = 0.0, None
        while now < 200.0:
            now = round(now + 0.5, 1)
            # A provision answered every half second, for ever.
            if timer.due(now, last_provision=now - 0.2):
                due_at = now
                break
        fell_due = max(0.5, last_sync + S.every)
        assert due_at == pytest.approx(fell_due + S.max_defer)


def test_after_a_read_it_waits_its_interval_again() -> None:
    timer = S.start(now=0.0)
    assert not timer.due(now=10.0, last_provision=9.9)  # waiting from 10 s
    timer.ran(now=11.0)
    assert not timer.due(now=15.0, last_provision=12.0)
    # The earlier wait is forgotten: a new storm gets its own 30 s.
    assert not timer.due(now=41.0, last_provision=40.9)
    assert not timer.due(now=70.0, last_provision=69.9)
    assert timer.due(now=71.0, last_provision=70.9)


def test_with_nobody_joining_it_reads_rarely() -> None:
    joined = 0.0
    now = joined + JOIN_WINDOW + 1
    assert not S.start(now=now - 299).due(now, last_provision=joined)
    assert S.start(now=now - 300).due(now, last_provision=joined)
    assert not S.start(now=now - 299).due(now, last_provision=None)
    assert S.start(now=now - 300).due(now, last_provision=None)


def test_it_is_asked_often_enough_to_notice_the_end_of_a_storm() -> None:
    assert S.tick <= S.quiet and S.tick <= S.every
