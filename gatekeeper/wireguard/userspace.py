"""The userspace backend: wireguard-go on a TUN device, configured over its UAPI socket.

wireguard-go runs as our child in the foreground (`-f`), in our process group, so a Ctrl-C or
a service manager stopping us stops it too; close() stops it by PID. It creates a
non-persistent TUN, which the kernel removes as soon as wireguard-go exits, so a crash leaves
at most a stale socket file. An interface or socket of the same name left by an earlier run
is taken over: the old link is deleted (its wireguard-go exits with it) before we start.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from gatekeeper.wireguard import iplink, ownership, uapi
from gatekeeper.wireguard.backend import (
    MAX_MTU,
    MIN_MTU,
    IPInterface,
    PeerConfig,
    PeerStats,
    WireGuardError,
    check_ifname,
)
from gatekeeper.wireguard.keys import PrivateKey, PublicKey

log = logging.getLogger(__name__)

# wireguard-go hard-codes this directory; it is shared by every network namespace.
SOCKET_DIR = Path("/var/run/wireguard")
TUN_DEVICE = Path("/dev/net/tun")
INSTALL_HINT = "wireguard-go not found: install the Debian package wireguard-go"
CAP_NET_ADMIN = 12
_TAIL_LINES = 30
# A health check's UAPI read: wireguard-go answers in well under a millisecond when it works.
HEALTH_TIMEOUT = 2.0
# "ERROR: (wg0) 2024/01/02 03:04:05 message" -> "message"
_LOG_PREFIX = re.compile(r"^[A-Z]+: \([^)]*\) \d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")
_IPC_ERROR = re.compile(r"IPC error -?\d+: ")
# Environment variables that would make wireguard-go adopt file descriptors we never passed.
_CHILD_ENV_DROP = ("WG_TUN_FD", "WG_UAPI_FD", "WG_PROCESS_FOREGROUND")


def socket_path(ifname: str) -> Path:
    return SOCKET_DIR / f"{ifname}.sock"


def missing_privilege(proc_status: str, euid: int, *, file_caps: bool = False) -> str | None:
    """Why wireguard-go, started by a process with this /proc/self/status, cannot make a TUN.

    Its child inherits root's capabilities, or only the ambient set when we are not root
    (unless the wireguard-go binary carries file capabilities).
    """
    caps: dict[str, int] = {}
    for line in proc_status.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapEff", "CapAmb"):
            with contextlib.suppress(ValueError):
                caps[key] = int(value.strip(), 16)
    bit = 1 << CAP_NET_ADMIN
    if euid == 0:
        if caps.get("CapEff", bit) & bit:
            return None
        return (
            "creating a WireGuard interface needs CAP_NET_ADMIN, which this root process lacks "
            "(dropped by its container or service manager): grant CAP_NET_ADMIN"
        )
    if file_caps or caps.get("CapAmb", 0) & bit:
        return None
    return (
        "creating a WireGuard interface needs CAP_NET_ADMIN for wireguard-go: run as root, or "
        "grant it as an ambient capability (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
    )


def _one_line(lines: Sequence[str]) -> str:
    return " | ".join(lines) if lines else "(no output)"


class _OutputTail:
    """Drains wireguard-go's output (so it never blocks on a full pipe) and keeps the tail."""

    def __init__(self, stream: IO[bytes], ifname: str) -> None:
        self._stream = stream
        self._ifname = ifname
        self._lines: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._count = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(
            target=self._drain, name=f"wireguard-go[{ifname}] output", daemon=True
        )
        self._thread.start()

    def _drain(self) -> None:
        for raw in self._stream:
            line = raw.decode(errors="replace").rstrip()
            # The startup banner (a box drawn around a note about kernel support) is noise.
            if not line or line[0] in "┌│└":
                continue
            line = _LOG_PREFIX.sub("", line)
            log.debug("wireguard-go[%s]: %s", self._ifname, line)
            with self._changed:
                self._lines.append(line)
                self._count += 1
                self._changed.notify_all()
        self._stream.close()

    @property
    def count(self) -> int:
        with self._changed:
            return self._count

    def tail(self, lines: int = 4) -> list[str]:
        with self._changed:
            return list(self._lines)[-lines:]

    def ipc_error_since(self, count: int, timeout: float = 0.2) -> str:
        """The reason wireguard-go logged for a refused request made when count was `count`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                new = list(self._lines)[-(self._count - count) :] if self._count > count else []
                for line in new:
                    if _IPC_ERROR.search(line):
                        return _IPC_ERROR.split(line, maxsplit=1)[-1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return ""
                self._changed.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 3.0) -> None:
    """SIGTERM the child by PID (we still hold it, so the PID cannot have been reused)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _probe(path: Path) -> Literal["absent", "stale", "live"]:
    """Whether a UAPI socket exists, and whether a process still answers on it."""
    if not path.exists():
        return "absent"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return "stale"
        except OSError:
            # Cannot tell (no permission, timeout): never delete what might be in use.
            return "live"
    return "live"


class UserspaceDevice:
    """A wireguard-go interface owned by this process."""

    def __init__(
        self,
        ifname: str,
        process: subprocess.Popen[bytes],
        output: _OutputTail,
        *,
        timeout: float,
    ) -> None:
        self._name = ifname
        self._process = process
        self._output = output
        self._timeout = timeout
        self._socket = socket_path(ifname)
        self._closed = False
        # Set once the link exists; close() deletes the link only while it still has this
        # index, so closing a device that was taken over never removes its successor.
        self.ifindex: int | None = None
        # Stops wireguard-go if we are dropped or the interpreter exits without close().
        self._finalizer = weakref.finalize(self, _stop_process, process)

    @property
    def name(self) -> str:
        return self._name

    @property
    def pid(self) -> int:
        return self._process.pid

    # --- UAPI ----------------------------------------------------------------------------------

    def _exchange(self, request: bytes, what: str, timeout: float | None = None) -> bytes:
        reply = bytearray()
        self._exchange_into(
            request, what, reply.extend, lambda: uapi.reply_complete(reply), timeout
        )
        return bytes(reply)

    def _exchange_into(
        self,
        request: bytes,
        what: str,
        feed: Callable[[bytes], None],
        complete: Callable[[], bool],
        timeout: float | None = None,
    ) -> None:
        """Send `request` and feed the reply's pieces as they arrive until `complete()`."""
        if self._closed:
            raise WireGuardError(f"cannot {what}: {self._name} is closed")
        timeout = self._timeout if timeout is None else timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self._socket))
                sock.sendall(request)
                while not complete():
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    feed(chunk)
        except TimeoutError:
            raise WireGuardError(
                f"cannot {what}: wireguard-go did not answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            status = self._process.poll()
            if status is not None:
                raise WireGuardError(
                    f"cannot {what}: wireguard-go for {self._name} exited (status {status}): "
                    f"{_one_line(self._output.tail())}"
                ) from None
            raise WireGuardError(
                f"cannot {what}: UAPI socket {self._socket}: {exc.strerror or exc}"
            ) from None

    def _set(self, request: bytes, what: str) -> None:
        mark = self._output.count
        reply = self._exchange(request, what)
        try:
            uapi.check_set_reply(reply, what)
        except uapi.UapiError as exc:
            raise uapi.UapiError(exc.errno, what, self._output.ipc_error_since(mark)) from None

    def state(self) -> uapi.DeviceState:
        """Everything a get request reports (includes the private key: never log it)."""
        return uapi.decode_get(self._exchange(uapi.GET_REQUEST, f"read {self._name}"))

    # --- Device --------------------------------------------------------------------------------

    def configure(
        self,
        private_key: PrivateKey,
        listen_port: int | None,
        peers: Sequence[PeerConfig],
        *,
        replace_peers: bool = True,
    ) -> None:
        """listen_port None keeps the current port (a random one on a fresh device)."""
        request = uapi.SetRequest(
            private_key=private_key,
            listen_port=listen_port,
            replace_peers=replace_peers,
            peers=tuple(uapi.PeerUpdate.from_config(p) for p in peers),
        )
        port = "" if listen_port is None else f" (listen port {listen_port})"
        self._set(uapi.encode_set(request), f"configure {self._name}{port}")

    def set_peer(self, peer: PeerConfig) -> None:
        self._set(
            uapi.encode_peers([peer]),
            f"set peer {peer.public_key.fingerprint()} on {self._name}",
        )

    def set_peers(self, peers: Sequence[PeerConfig]) -> None:
        if peers:
            self._set(uapi.encode_peers(peers), f"set {len(peers)} peers on {self._name}")

    def remove_peer(self, public_key: PublicKey) -> None:
        self._set(
            uapi.encode_remove([public_key]),
            f"remove peer {public_key.fingerprint()} from {self._name}",
        )

    def peers(self) -> list[PeerStats]:
        return list(self.state().peers)

    def last_handshakes(self) -> list[float | None]:
        reader = uapi.HandshakeReader()
        what = f"read {self._name}"
        self._exchange_into(uapi.GET_REQUEST, what, reader.feed, lambda: reader.complete)
        return reader.result()

    def listen_port(self) -> int:
        return self.state().listen_port

    def set_addresses(self, addresses: Sequence[IPInterface]) -> None:
        iplink.set_addresses(self._name, addresses)
        iplink.set_up(self._name)

    def failure(self) -> str | None:
        if self._closed:
            return f"{self._name} is closed"
        status = self._process.poll()
        if status is not None:
            return (
                f"wireguard-go for {self._name} (pid {self._process.pid}) exited "
                f"(status {status}): {_one_line(self._output.tail(2))}"
            )
        info = iplink.link_info(self._name)
        if info is None or info.index != self.ifindex:
            return f"the link {self._name} was deleted"
        try:
            # Alive is not enough: a stopped or deadlocked wireguard-go answers nothing.
            self._exchange(uapi.GET_REQUEST, f"check {self._name}", timeout=HEALTH_TIMEOUT)
        except WireGuardError as exc:
            return f"wireguard-go for {self._name} (pid {self._process.pid}) is stuck: {exc}"
        return None

    def close(self) -> None:
        """Stop wireguard-go and make sure the link and socket are gone; safe to repeat."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _stop_process(self._process)
        self._output.join(1.0)
        # The TUN is not persistent and normally vanished with the process.
        info = iplink.link_info(self._name)
        if info is not None and info.index == self.ifindex:
            iplink.delete_link(self._name)
        if _probe(self._socket) == "stale":
            with contextlib.suppress(FileNotFoundError):
                self._socket.unlink()

    def __enter__(self) -> UserspaceDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UserspaceDevice({self._name!r}, pid={self._process.pid})"


class UserspaceBackend:
    """Creates wireguard-go devices in the current network namespace."""

    name = "userspace"

    def __init__(
        self,
        executable: str = "wireguard-go",
        *,
        start_timeout: float = 5.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.executable = executable
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        # The server sets this: its instance is one unit, and a wireguard-go that outlived a
        # kill -9 of its server would keep sending to machines a surviving instance took
        # over (docs/registry.md, "Owners and failover"). The agent leaves it off: its link
        # keeps working through an agent crash.
        self.die_with_parent = False

    def preflight(self) -> str:
        """The wireguard-go path, or a WireGuardError saying what to install or grant."""
        path = shutil.which(self.executable)
        if path is None:
            raise WireGuardError(INSTALL_HINT)
        _check_tun_device()
        file_caps = False
        with contextlib.suppress(OSError):
            file_caps = bool(os.getxattr(path, "security.capability"))
        problem = missing_privilege(
            Path("/proc/self/status").read_text(), os.geteuid(), file_caps=file_caps
        )
        if problem:
            raise WireGuardError(problem)
        _check_socket_dir()
        return path

    def create(self, ifname: str, *, mtu: int = 1280) -> UserspaceDevice:
        check_ifname(ifname)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
            raise WireGuardError(f"MTU {mtu!r} for {ifname}: must be {MIN_MTU}..{MAX_MTU}")
        executable = self.preflight()
        _take_over(ifname)
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
        env.setdefault("LOG_LEVEL", "error")
        # Marks the process as ours, so a later run can tell our orphan from someone else's.
        env[ownership.OWNER_ENV] = ownership.owner_token()
        try:
            process = subprocess.Popen(
                [executable, "-f", ifname],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_parent_death_signal() if self.die_with_parent else None,
            )
        except OSError as exc:
            raise WireGuardError(f"cannot start {executable}: {exc.strerror or exc}") from None
        assert process.stdout is not None
        output = _OutputTail(process.stdout, ifname)
        device = UserspaceDevice(ifname, process, output, timeout=self.request_timeout)
        try:
            self._wait_ready(ifname, process, output)
            self._wait_bound(device, output)
            info = iplink.link_info(ifname)
            if info is None:
                raise WireGuardError(
                    f"wireguard-go answers for {ifname} but the interface is not in this "
                    "network namespace"
                )
            device.ifindex = info.index
            iplink.set_mtu(ifname, mtu)
        except BaseException:
            device.close()
            raise
        log.info("wireguard-go started for %s (pid %d)", ifname, process.pid)
        return device

    def _wait_ready(
        self, ifname: str, process: subprocess.Popen[bytes], output: _OutputTail
    ) -> None:
        path = socket_path(ifname)
        deadline = time.monotonic() + self.start_timeout
        while True:
            status = process.poll()
            if status is not None:
                output.join(1.0)
                tail = output.tail()
                hint = ""
                if any("socket in use" in line for line in tail):
                    hint = f" ({_in_use_hint(ifname)})"
                raise WireGuardError(
                    f"wireguard-go exited early (status {status}) while creating {ifname}: "
                    f"{_one_line(tail)}{hint}"
                )
            if _probe(path) == "live":
                return
            if time.monotonic() > deadline:
                raise WireGuardError(
                    f"wireguard-go did not open {path} within {self.start_timeout:g} s: "
                    f"{_one_line(output.tail())}"
                )
            time.sleep(0.005)

    def _wait_bound(self, device: UserspaceDevice, output: _OutputTail) -> None:
        """Wait until wireguard-go has its device up and a (random) UDP port bound.

        Until its TUN event reader has brought the device up, wireguard-go accepts a
        listen_port and only binds it later; a busy port then fails in its log, not in the
        reply. Waiting here makes every later configure bind at once and report failure.
        """
        deadline = time.monotonic() + self.start_timeout
        # (A wireguard-go that died meanwhile: listen_port() says so, with its exit status.)
        while device.listen_port() == 0:
            if time.monotonic() > deadline:
                raise WireGuardError(
                    f"wireguard-go for {device.name} bound no UDP port within "
                    f"{self.start_timeout:g} s: {_one_line(output.tail())}"
                )
            time.sleep(0.002)


def _in_use_hint(ifname: str) -> str:
    return (
        f"another wireguard-go already serves {socket_path(ifname)}; that directory is shared "
        "by all network namespaces, so choose another interface name or give this namespace "
        "a private /run/wireguard"
    )


def _parent_death_signal() -> Callable[[], None]:
    """A preexec_fn asking the kernel to SIGTERM the child when the thread that started it
    dies; prepared in the parent (nothing may be imported between fork and exec)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def set_it() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return set_it


def _check_tun_device() -> None:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR)
    except FileNotFoundError:
        raise WireGuardError(
            f"{TUN_DEVICE} is missing: load the tun module (modprobe tun) or, in a container, "
            f"pass the device in (--device {TUN_DEVICE})"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise WireGuardError(
                f"{TUN_DEVICE} has no driver: load the tun module (modprobe tun)"
            ) from None
        raise WireGuardError(
            f"cannot open {TUN_DEVICE}: {exc.strerror}: grant read-write access to it "
            f"(container: --device {TUN_DEVICE}; systemd: DeviceAllow={TUN_DEVICE} rw)"
        ) from None
    os.close(fd)


def _check_socket_dir() -> None:
    target = SOCKET_DIR if SOCKET_DIR.exists() else SOCKET_DIR.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise WireGuardError(
            f"wireguard-go keeps its control socket in {SOCKET_DIR} and cannot write {target}: "
            "run as root or create that directory writable for this user"
        )


def _stop_orphan_or_refuse(
    ifname: str, owner: ownership.SocketOwner | None, held: str, hint: str
) -> None:
    """Stop an orphaned wireguard-go of ours in this namespace; refuse anything else."""
    if owner is None or not owner.orphaned or not owner.same_netns:
        who = owner.describe() if owner is not None else "a process that cannot be identified"
        raise WireGuardError(f"cannot create {ifname}: {held} {who}; {hint}")
    log.warning("stopping wireguard-go pid %d left by an earlier run for %s", owner.pid, ifname)
    if not ownership.stop_orphan(owner):
        raise WireGuardError(
            f"cannot create {ifname}: wireguard-go pid {owner.pid} left by an earlier run "
            "does not stop"
        )


def _take_over(ifname: str, wait: float = 1.0) -> None:
    """Clear what an earlier run left (an orphaned wireguard-go of ours, a stale socket, a TUN
    without a process); refuse, with who holds it, a name that a live process still serves."""
    path = socket_path(ifname)
    if _probe(path) == "live":
        owner = ownership.socket_owner(path)
        _stop_orphan_or_refuse(
            ifname, owner, f"its UAPI socket {path} is served by", _in_use_hint(ifname)
        )
    info = iplink.link_info(ifname)
    if info is not None and info.kind == "tun":
        # No socket here, but maybe a live wireguard-go with a private /run/wireguard.
        holder = ownership.tun_holder(ifname)
        if holder is not None:
            _stop_orphan_or_refuse(
                ifname,
                holder,
                "its TUN device is held by",
                "one network namespace has one interface of a name: stop that process first",
            )
            info = iplink.link_info(ifname)
    if info is not None:
        if info.kind not in ("tun", "wireguard"):
            raise WireGuardError(
                f"interface {ifname} already exists as a {info.kind or 'non-WireGuard'} link: "
                "refusing to delete it; choose another interface name"
            )
        log.warning("removing interface %s left by an earlier run", ifname)
        iplink.delete_link(ifname)
    # A wireguard-go that was just stopped needs a moment to remove its socket.
    deadline = time.monotonic() + wait
    while True:
        state = _probe(path)
        if state == "absent":
            return
        if state == "stale":
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise WireGuardError(
                    f"cannot create {ifname}: {path} is left over and cannot be removed: "
                    f"{exc.strerror}"
                ) from None
            return
        if time.monotonic() >= deadline:
            raise WireGuardError(f"cannot create {ifname}: {_in_use_hint(ifname)}")
        time.sleep(0.02)
