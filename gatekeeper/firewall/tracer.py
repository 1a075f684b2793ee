"""`firewall trace`, the I/O: the marking table in the kernel and the `nft monitor` process.

Runs in the caller's network namespace. The trace table is removed again on every way out
(end of --seconds, --count reached, Ctrl-C, SIGTERM, an error).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from types import FrameType

from gatekeeper.firewall.apply import FirewallApplyError, FirewallUnavailable, Nftables
from gatekeeper.firewall.trace import (
    READY_PREFIX,
    RuleNames,
    TraceAssembler,
    TracedPacket,
    TraceFilter,
    parse_trace_line,
    start_commands,
    stop_commands,
)

READY_WITHIN = 5.0
RESTART_EVERY = 0.2


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class _Lines:
    """Lines from a pipe, with a timeout (select on the raw descriptor, no hidden buffer)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def next(self, timeout: float) -> str | None:
        """The next line; None on timeout, "" at the end of the stream."""
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            if self.eof:
                return ""
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            self.eof = not chunk
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace") + "\n"


def run_trace(
    flt: TraceFilter,
    *,
    seconds: float,
    count: int | None,
    on_ready: Callable[[], None],
    on_packet: Callable[[TracedPacket], None],
) -> int:
    """Trace until `seconds` pass or `count` packets were judged; the number of packets."""
    nft = Nftables()
    live = nft.list_table()
    if live is None:
        raise FirewallUnavailable(
            "table inet gatekeeper is not loaded here: no agent firewall to trace"
        )
    binary = shutil.which("nft")
    if binary is None:
        raise FirewallUnavailable("nft not found: install the Debian package nftables")
    assembler = TraceAssembler(RuleNames(live))
    # Ruleset events too (not only `monitor trace`): the trace table's own `add table` line
    # proves the monitor listens before the first packet is marked.
    monitor = subprocess.Popen(
        [binary, "-a", "monitor"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    seen = 0
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        assert monitor.stdout is not None and monitor.stderr is not None
        lines = _Lines(monitor.stdout.fileno())
        ready_by = time.monotonic() + READY_WITHIN
        deadline: float | None = None
        while deadline is None or time.monotonic() < deadline:
            if deadline is None:
                if time.monotonic() > ready_by:
                    raise FirewallApplyError(
                        f"nft monitor printed nothing within {READY_WITHIN:.0f} s"
                    )
                # The monitor subscribes some milliseconds after it starts, and nothing says
                # when: (re)create the trace table until the monitor reports it.
                nft.apply(start_commands(flt))
                line = lines.next(RESTART_EVERY)
            else:
                line = lines.next(max(0.0, deadline - time.monotonic()))
            if line is None:
                continue
            if line == "":
                error = monitor.stderr.read().decode(errors="replace").strip()
                raise FirewallUnavailable(f"nft monitor ended: {error or 'no reason given'}")
            if deadline is None:
                if line.startswith(READY_PREFIX):
                    deadline = time.monotonic() + seconds
                    on_ready()
                continue
            event = parse_trace_line(line)
            if event is None:
                continue
            if assembler.needs_names(event):
                # The agent replaced its table since we listed it: name rules anew.
                assembler.names = RuleNames(nft.list_table() or [])
            done = assembler.feed(event)
            if done is not None:
                on_packet(done)
                seen += 1
                if count is not None and seen >= count:
                    return seen
        for packet in assembler.leftovers():
            on_packet(packet)
            seen += 1
        return seen
    finally:
        with contextlib.suppress(FirewallApplyError, FirewallUnavailable):
            nft.apply(stop_commands())
        monitor.terminate()
        try:
            monitor.wait(timeout=5)
        except subprocess.TimeoutExpired:
            monitor.kill()
            monitor.wait()
        signal.signal(signal.SIGTERM, previous)
