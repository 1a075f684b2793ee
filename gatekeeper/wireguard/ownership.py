"""Who serves a wireguard-go UAPI socket, and whether it is ours to take over.

`/var/run/wireguard` is one directory for every network namespace, so a live `NAME.sock` may
belong to a wireguard-go of ours left running by a run that was killed (an orphan: clean it
up), to one that a running Gatekeeper process still uses (refuse), or to something we never
started (refuse). Each wireguard-go we start carries `GATEKEEPER_OWNER=<pid>:<start time>` in
its environment; `/proc/PID/environ` then tells whose it is, and the owner's start time tells a
dead owner from a recycled PID.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

OWNER_ENV = "GATEKEEPER_OWNER"
_PROC = Path("/proc")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _running(pid: int, started: str) -> bool:
    """Whether the process that started at `started` still runs (a zombie does not)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return len(fields) > 19 and fields[19] == started and fields[0] not in ("Z", "X")


def owner_token(pid: int | None = None) -> str:
    """The value of GATEKEEPER_OWNER for children of `pid` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid) or '0'}"


def socket_peer_pid(path: Path, timeout: float = 1.0) -> int | None:
    """The PID of the process listening on a unix socket (SO_PEERCRED), None if unknown."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid if pid > 0 else None


@dataclass(frozen=True)
class SocketOwner:
    pid: int
    command: str
    # GATEKEEPER_OWNER of that process, None when Gatekeeper did not start it.
    owner: str | None
    same_netns: bool
    # Its start time when seen: a later signal goes only to that same process.
    started: str | None = None

    @property
    def owner_pid(self) -> int | None:
        if self.owner is None:
            return None
        head = self.owner.split(":", 1)[0]
        return int(head) if head.isdigit() else None

    @property
    def orphaned(self) -> bool:
        """Started by a Gatekeeper process that no longer runs."""
        if self.owner is None or self.owner_pid is None:
            return False
        return owner_token(self.owner_pid) != self.owner or not _alive(self.owner_pid)

    def describe(self) -> str:
        where = "this network namespace" if self.same_netns else "another network namespace"
        if self.owner is None:
            return f"pid {self.pid} ({self.command}, {where}), which Gatekeeper did not start"
        state = "no longer running" if self.orphaned else "still running"
        return (
            f"pid {self.pid} ({self.command}, {where}), started by Gatekeeper pid "
            f"{self.owner_pid} ({state})"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _netns(pid: int | str) -> str | None:
    try:
        return os.readlink(_PROC / str(pid) / "ns" / "net")
    except OSError:
        return None


def socket_owner(path: Path) -> SocketOwner | None:
    """Who serves the live socket at `path`, or None when that cannot be told."""
    pid = socket_peer_pid(path)
    return None if pid is None else process_owner(pid)


def tun_holder(ifname: str) -> SocketOwner | None:
    """The process that holds the TUN device `ifname` open, if any.

    A wireguard-go with its own private /run/wireguard (another mount namespace) has no
    socket we can see, but its TUN file descriptor names the interface in its fdinfo.
    """
    wanted = f"iff:\t{ifname}"
    # Interface names are per namespace: only processes in ours can hold this one.
    mine = _netns("thread-self")
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or _netns(entry.name) != mine:
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) != "/dev/net/tun":
                    continue
                info = (entry / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            if wanted in info.splitlines():
                return process_owner(int(entry.name))
    return None


def process_owner(pid: int) -> SocketOwner:
    try:
        command = (_PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        command = "?"
    # thread-self: a thread may have joined another namespace than the process's main one.
    mine = _netns("thread-self")
    return SocketOwner(
        pid=pid,
        command=command,
        owner=_environ(pid).get(OWNER_ENV),
        same_netns=mine is not None and _netns(pid) == mine,
        started=_start_time(pid),
    )


def stop_orphan(owner: SocketOwner, timeout: float = 3.0) -> bool:
    """SIGTERM (then SIGKILL) an orphaned wireguard-go of ours; True once it is gone.

    Only a process whose environment names a dead Gatekeeper owner is ever signalled, and its
    start time is checked again right before, so a recycled PID is never hit.
    """
    if not owner.orphaned:
        return False
    before = _start_time(owner.pid)
    if before is None:
        return True
    if before != owner.started or _environ(owner.pid).get(OWNER_ENV) != owner.owner:
        return False  # not the process we looked at
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(owner.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(owner.pid, before):
                return True
            time.sleep(0.02)
    return not _running(owner.pid, before)
