"""When the server reads its whole device for machines' endpoints (endpoint_sync.py).

Pure decisions on one clock; the wiring (the server records a joined machine's endpoint within
seconds) is test_e2e_siderolink.py's server crash test.
"""

from __future__ import annotations

import pytest

from gatekeeper.server.endpoint_sync import JOIN_WINDOW, EndpointSyncSchedule

S = EndpointSyncSchedule(every=5.0, idle_every=300.0, quiet=1.0, max_defer=30.0)


def test_while_machines_join_it_reads_every_few_seconds() -> None:
    # The last machine joined 10 s ago; the last read was 5 s ago.
    assert S.due(now=100.0, last_sync=95.0, last_provision=90.0)
    assert not S.due(now=100.0, last_sync=96.0, last_provision=90.0)


def test_it_waits_while_provisions_are_being_answered() -> None:
    # A storm: the last answer 0.1 s ago. The read is due by the clock but waits.
    assert not S.due(now=100.0, last_sync=90.0, last_provision=99.9)
    # The storm is over once no answer came for `quiet` seconds.
    assert S.due(now=101.0, last_sync=90.0, last_provision=100.0)


def test_a_steady_stream_of_provisions_defers_it_only_so_long() -> None:
    last_sync = 0.0
    due_at = None
    now = 0.0
    while now < 100.0:
        now = round(now + 0.5, 1)
        # A provision answered every half second, for ever.
        if S.due(now, last_sync, last_provision=now - 0.2):
            due_at = now
            break
    assert due_at == pytest.approx(S.every + S.max_defer)


def test_with_nobody_joining_it_reads_rarely() -> None:
    joined = 0.0
    now = joined + JOIN_WINDOW + 1
    assert not S.due(now, last_sync=now - 299, last_provision=joined)
    assert S.due(now, last_sync=now - 300, last_provision=joined)
    assert not S.due(now, last_sync=now - 299, last_provision=None)
    assert S.due(now, last_sync=now - 300, last_provision=None)


def test_it_is_asked_often_enough_to_notice_the_end_of_a_storm() -> None:
    assert S.tick <= S.quiet and S.tick <= S.every
