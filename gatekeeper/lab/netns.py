"""Network namespaces, veth pairs and the processes started inside them.

The demo and the tests build small labs out of these: every name carries a short random
lab id, so two labs (or a lab and a real host configuration) never collide, and
`Lab.close()` removes everything the lab made, in reverse order, even after a failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


class LabError(RuntimeError):
    """The lab could not be built (missing tool, missing privilege)."""


def require_root(what: str) -> None:
    """Fail with one clear line when we lack the privileges network namespaces need."""
    if os.geteuid() != 0:
        raise LabError(
            f"{what} needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN to create network namespaces); "
            "run it with sudo"
        )


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LabError(f"{name} not found: install the Debian package {package}")
    return path


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@dataclass
class Namespace:
    """One network namespace; `exec_argv` wraps a command to run inside it."""

    name: str

    def exec_argv(
        self, argv: Sequence[str], *, private_wireguard_run: bool | Path = False
    ) -> list[str]:
        """The argv that runs `argv` inside this namespace.

        wireguard-go keeps its UAPI sockets in /var/run/wireguard, shared by every namespace,
        so two machines that both name their link `siderolink` would collide. With
        `private_wireguard_run` the command gets its own tmpfs there: `ip netns exec` already
        runs it in a private mount namespace, so the mount is seen by nobody else. With a
        directory instead of True, that directory is mounted there: processes given the same
        one share it as processes on one host share /run/wireguard.
        """
        if private_wireguard_run is False:
            return ["ip", "netns", "exec", self.name, *argv]
        # sh -c SCRIPT ARG0 ARGV...: $0 is the directory to bind (or just "sh").
        if private_wireguard_run is True:
            mount, arg0 = "mount -t tmpfs gk-wg /run/wireguard", "sh"
        else:
            mount, arg0 = 'mount --bind "$0" /run/wireguard', str(private_wireguard_run)
        script = f'mkdir -p /run/wireguard && {mount} && exec "$@"'
        return ["ip", "netns", "exec", self.name, "sh", "-c", script, arg0, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
        return run(self.exec_argv(argv), check=check, timeout=timeout)


@dataclass
class Lab:
    """A set of namespaces and processes that is torn down as a whole."""

    prefix: str = "gk"
    lab_id: str = field(default_factory=lambda: secrets.token_hex(2))
    namespaces: list[Namespace] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_root("the lab")
        require_tool("ip", "iproute2")

    def name(self, role: str) -> str:
        return f"{self.prefix}{self.lab_id}-{role}"

    def namespace(self, role: str) -> Namespace:
        ns = Namespace(self.name(role))
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def veth(
        self,
        a: Namespace,
        a_addr: str,
        b: Namespace,
        b_addr: str,
        *,
        a_if: str = "eth0",
        b_if: str = "eth0",
    ) -> None:
        """Join two namespaces with a veth pair and address both ends (addresses with prefix)."""
        move_veth_pair(f"gkv{self.lab_id}", (a, a_if), (b, b_if))
        for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            # nodad: otherwise the first IPv6 packets are lost while DAD runs.
            extra = ["nodad"] if ":" in addr else []
            ns.run(["ip", "addr", "add", addr, "dev", ifname, *extra])
            ns.run(["ip", "link", "set", ifname, "up"])
        for ns, ifname in ((a, a_if), (b, b_if)):
            wait_operstate_up(ns, ifname)

    def spawn(
        self,
        ns: Namespace,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        private_wireguard_run: bool | Path = False,
    ) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            ns.exec_argv(argv, private_wireguard_run=private_wireguard_run),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        if log:
            out.close()  # type: ignore[union-attr]
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Stop one process we started, by PID, then sweep the group it leads.

        The signal goes to the process alone so that it can shut down in order (remove its
        WireGuard link, stop its children); whatever of its group outlives it is killed.
        """
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Safe after the leader is reaped: Linux keeps a PID that still names a process group
        # from being reused, so this reaches only what is left of our group, or nothing.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.processes:
            self.processes.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.processes)):
            self.stop(proc)
        for ns in reversed(self.namespaces):
            # Deleting the namespace destroys its veth ends and TUN devices with it.
            run(["ip", "netns", "delete", ns.name], check=False)
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def move_veth_pair(tmp: str, a: tuple[Namespace, str], b: tuple[Namespace, str]) -> None:
    """Create a veth pair in this namespace and move its ends, renamed, into `a` and `b`.

    If a move fails, the pair is deleted so that nothing is left in the root namespace.
    """
    tmp_a, tmp_b = f"{tmp}a", f"{tmp}b"
    run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
    try:
        run(["ip", "link", "set", tmp_a, "netns", a[0].name, "name", a[1]])
        run(["ip", "link", "set", tmp_b, "netns", b[0].name, "name", b[1]])
    except BaseException:
        # Deleting either end deletes the pair, wherever the other end is by now.
        run(["ip", "link", "delete", tmp_a], check=False)
        run(["ip", "link", "delete", tmp_b], check=False)
        raise


def wait_operstate_up(ns: Namespace, ifname: str, timeout: float = 5.0) -> None:
    """A fresh veth drops the first neighbour-discovery packet until it reports UP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ns.run(["cat", f"/sys/class/net/{ifname}/operstate"], check=False).strip()
        if state == "up":
            return
        time.sleep(0.02)
    raise LabError(f"{ifname} in {ns.name} did not come up within {timeout:.0f} s")
