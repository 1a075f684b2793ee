"""This server instance's row in the registry, and what it learns from the others' rows.

Every HEARTBEAT_EVERY seconds an instance writes that it is alive and reads the fleet's
instances (one transaction, `Registry.heartbeat`). From that it knows the survivors' endpoints
(listed in Provision replies after its own, so machines walk on to them) and, once it has been
healthy for longer than the stale window, takes over the machines of instances that stopped
writing (docs/registry.md, "Owners and failover").
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gatekeeper.server.registry import (
    INSTANCE_STALE_AFTER,
    InstanceInUse,
    InstanceRecord,
    Registry,
)

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 5.0


def default_instance() -> str:
    return socket.gethostname() or "gatekeeper"


def check_instance_name(name: str) -> str:
    """A name an operator can read in `gatekeeper machines` and type again."""
    if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"instance name {name!r} must be 1-63 letters, digits, '-', '_' or '.'")
    return name


def survivor_endpoints(instances: Sequence[InstanceRecord], me: str, now: float) -> tuple[str, ...]:
    """The endpoints of every other live instance, oldest instance first (a stable order, so
    machines of the fleet walk to the same survivor)."""
    others = sorted(
        (i for i in instances if i.name != me and i.live(now)), key=lambda i: (i.started, i.name)
    )
    seen: list[str] = []
    for instance in others:
        seen.extend(e for e in instance.endpoints if e not in seen)
    return tuple(seen)


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


def run_id_here() -> str:
    """This process: host name, PID namespace and PID (so that a successor on this host can
    tell whether it is gone), and a random part."""
    return f"{default_instance()}:{_pid_namespace()}:{os.getpid()}:{secrets.token_hex(8)}"


def dead_here(run_id: str, host: str | None = None, pidns: str | None = None) -> bool:
    """Whether a run_id names a process of this host and PID namespace that no longer runs
    gatekeeper (gone, or its PID reused by something else). Anything else (another host, a
    container sharing the host name but not the PIDs, a malformed id): not known to be dead."""
    parts = run_id.split(":")
    if len(parts) != 4:
        return False
    name, ns, pid, _ = parts
    if name != (host or default_instance()) or ns != (pidns or _pid_namespace()):
        return False
    if not (pid.isascii() and pid.isdigit() and len(pid) <= 10):
        return False
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False  # cannot tell: wait for the row to go stale
    return b"gatekeeper" not in cmdline


def may_take_over(healthy_since: float | None, now: float) -> bool:
    """Only after this instance has written its heartbeat for longer than the stale window:
    after a store outage every row looks stale, and the first instance back must give the
    others a chance to say they are alive before it takes their machines."""
    return healthy_since is not None and now - healthy_since > INSTANCE_STALE_AFTER


class InstanceHeartbeat:
    def __init__(
        self,
        registry: Registry,
        *,
        name: str,
        endpoints: Sequence[str],
        on_fleet: Callable[[tuple[str, ...]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.name = name
        self.endpoints = tuple(endpoints)
        self.on_fleet = on_fleet
        self.clock = clock
        self.run_id = run_id_here()
        self.started = clock()
        self.healthy_since: float | None = None
        # time.monotonic() at the start of the last beat that was written, and whether the
        # last beat reached the store: what an operator sees (gatekeeper_registry_up and
        # gatekeeper_instance_heartbeat_age_seconds).
        self.last_written: float | None = None
        self.reachable = False
        self.instances: list[InstanceRecord] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, *, replaces: str | None = None) -> list[InstanceRecord]:
        started = time.monotonic()
        now = self.clock()
        me = InstanceRecord(self.name, self.endpoints, self.run_id, self.started, now)
        try:
            instances = self.registry.heartbeat(
                me, take_over=may_take_over(self.healthy_since, now), replaces=replaces
            )
        except Exception:
            self.healthy_since = None
            self.reachable = False
            raise
        if self.healthy_since is None:
            self.healthy_since = now
        self.last_written = started
        self.reachable = True
        self.instances = instances
        self.on_fleet(survivor_endpoints(instances, self.name, now))
        return instances

    def first(self, wait: float = INSTANCE_STALE_AFTER + 1.0) -> None:
        """The first beat, at start. A row of this name whose writer died (kill -9, a crash,
        then a restart by systemd) is taken at once when that writer was a process of this
        host that is gone; otherwise it goes stale within the window: wait that long before
        calling the name taken."""
        deadline = time.monotonic() + wait
        said = False
        while True:
            try:
                self.beat()
                return
            except InstanceInUse as exc:
                if dead_here(exc.holder):
                    log.info("instance %s: its previous process is gone; taking over", self.name)
                    self.beat(replaces=exc.holder)
                    return
                if time.monotonic() >= deadline:
                    raise
                if not said:
                    log.warning(
                        "instance %s: another process wrote its heartbeat less than %g s ago; "
                        "waiting for it to go stale (a previous run of this server?)",
                        self.name,
                        INSTANCE_STALE_AFTER,
                    )
                    said = True
                time.sleep(1.0)

    def age(self) -> float:
        """Seconds since the last heartbeat written began (NaN: none yet)."""
        if self.last_written is None:
            return math.nan
        return time.monotonic() - self.last_written

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="instance-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(HEARTBEAT_EVERY):
            try:
                self.beat()
            except Exception as exc:  # an outage must not end the heartbeat; it retries
                if not failing:
                    log.warning("instance %s: heartbeat failed (retrying): %s", self.name, exc)
                failing = True
                continue
            if failing:
                log.info("instance %s: heartbeat works again", self.name)
            failing = False

    def stop(self) -> None:
        """Stop beating and leave the fleet (see Registry.leave)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.healthy_since is not None:
            me = InstanceRecord(self.name, self.endpoints, self.run_id, self.started, 0.0)
            try:
                self.registry.leave(me)
            except Exception as exc:  # the store may be away: the row then goes stale
                log.warning("instance %s: cannot leave the registry: %s", self.name, exc)


__all__ = [
    "HEARTBEAT_EVERY",
    "InstanceHeartbeat",
    "check_instance_name",
    "dead_here",
    "default_instance",
    "may_take_over",
    "run_id_here",
    "survivor_endpoints",
]
