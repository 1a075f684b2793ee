"""A SideroLink lab: a server namespace and machine namespaces on a shared underlay.

Used by `gatekeeper demo` and by the end-to-end tests, so both exercise the same real parts:
the `gatekeeper server` and `gatekeeper agent` processes, wireguard-go, gRPC over veth.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatekeeper.lab.netns import Lab, LabError, Namespace, move_veth_pair, require_tool

UNDERLAY = "fd00:6b:{n}::{host}/64"
API_PORT = 8090
WG_PORT = 51820
BRIDGE_MAC = "02:67:6b:00:00:01"  # locally administered, fixed for the lab's life


def gatekeeper_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "gatekeeper", *args]


@dataclass
class Machine:
    name: str
    ns: Namespace
    underlay: str
    node_uuid: str
    run_dir: Path
    cmdline: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def status(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.run_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return doc


@dataclass
class SideroLinkLab:
    """Build with `start_server()` and `add_machine()`; `close()` undoes everything."""

    join_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    installation_id: str = ""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gatekeeper-lab-")))
    lab: Lab = field(init=False)
    server_ns: Namespace = field(init=False)
    server_proc: subprocess.Popen[bytes] | None = None
    machines: list[Machine] = field(default_factory=list)
    _links: int = 0

    def __post_init__(self) -> None:
        require_tool("wireguard-go", "wireguard-go")
        self.lab = Lab()
        try:
            self.server_ns = self.lab.namespace("srv")
            # A bridge in the server namespace lets any number of machines share one underlay.
            # Its MAC is set, not inherited: a bridge without one takes its lowest port's MAC
            # and changes it whenever a lower one joins, so machines added later could leave
            # an earlier machine's neighbour entry for the server pointing at a MAC the bridge
            # no longer answers to (frames dropped as meant for another host, for as long as
            # the entry stays REACHABLE: a link that looks up and carries nothing).
            self.server_ns.run(
                ["ip", "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge"]
            )
            self.server_ns.run(
                ["ip", "addr", "add", UNDERLAY.format(n=1, host=1), "dev", "br0", "nodad"]
            )
            self.server_ns.run(["ip", "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise

    @property
    def server_underlay(self) -> str:
        return UNDERLAY.format(n=1, host=1).split("/")[0]

    @property
    def server_wg_interface(self) -> str:
        # Unique on the host: wireguard-go's UAPI socket directory is shared by all namespaces.
        return f"gk{self.lab.lab_id}srv"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "server-state"

    @property
    def server_log(self) -> Path:
        return self.workdir / "server.log"

    def api_url(self, **query: str) -> str:
        params = {"jointoken": self.join_token, **query}
        qs = "&".join(f"{k}={v}" for k, v in params.items())
        return f"grpc://[{self.server_underlay}]:{API_PORT}?{qs}"

    def token_file(self, token: str | None = None, name: str = "join-token") -> Path:
        """`token` (default: the join token) in a file only its owner reads, for a program
        that takes it from a file: never in argv, which `ps` shows."""
        path = self.workdir / name
        # Written aside and renamed into place: a reader started by an earlier call (a client,
        # a server) reads the whole token, never a file truncated by this one.
        aside = path.with_name(f".{name}.{secrets.token_hex(4)}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.join_token if token is None else token)
        os.replace(aside, path)
        return path

    def start_server(self, *extra: str, wait: float = 10.0, endpoint: str | None = None) -> None:
        """`endpoint` replaces the advertised WireGuard endpoint (default: the underlay's)."""
        token_file = self.token_file()
        argv = gatekeeper_argv(
            "server",
            "--state-dir",
            str(self.state_dir),
            "--listen",
            f"[{self.server_underlay}]:{API_PORT}",
            "--join-token-file",
            str(token_file),
            "--installation-id",
            self.installation_id,
            "--wireguard-interface",
            self.server_wg_interface,
            "--wireguard-port",
            str(WG_PORT),
            "--endpoint",
            endpoint or f"[{self.server_underlay}]:{WG_PORT}",
            *extra,
        )
        self.server_proc = self.lab.spawn(self.server_ns, argv, log=self.server_log)
        self._wait_port(self.server_ns, self.server_underlay, API_PORT, wait, self.server_proc)

    def stop_server(self, *, kill: bool = False) -> None:
        import signal

        if self.server_proc is not None:
            self.lab.stop(self.server_proc, signal.SIGKILL if kill else signal.SIGTERM)
            self.server_proc = None

    def add_machine(self, *, start: bool = True, api_url: str | None = None) -> Machine:
        self._links += 1
        n = self._links
        name = f"m{n}"
        ns = self.lab.namespace(name)
        underlay = UNDERLAY.format(n=1, host=100 + n)
        move_veth_pair(f"gkv{self.lab.lab_id}{n}", (self.server_ns, f"v{n}"), (ns, "eth0"))
        self.server_ns.run(["ip", "link", "set", f"v{n}", "master", "br0", "up"])
        ns.run(["ip", "addr", "add", underlay, "dev", "eth0", "nodad"])
        ns.run(["ip", "link", "set", "eth0", "up"])
        run_dir = self.workdir / name
        run_dir.mkdir()
        cmdline = run_dir / "cmdline"
        cmdline.write_text(f"console=ttyS0 siderolink.api={api_url or self.api_url()} quiet\n")
        machine = Machine(
            name=name,
            ns=ns,
            underlay=underlay.split("/")[0],
            node_uuid=str(uuid.uuid4()),
            run_dir=run_dir,
            cmdline=cmdline,
            log=self.workdir / f"{name}.log",
        )
        self.machines.append(machine)
        if start:
            self.start_agent(machine)
        return machine

    def start_agent(
        self,
        machine: Machine,
        *extra: str,
        env: dict[str, str] | None = None,
        wireguard_run: Path | None = None,
    ) -> None:
        argv = gatekeeper_argv(
            "agent",
            "--cmdline",
            str(machine.cmdline),
            "--node-uuid",
            machine.node_uuid,
            "--run-dir",
            str(machine.run_dir),
            "--wireguard-backend",
            "userspace",
            # Each machine its own unique token, as separate machines have.
            "--state-dir",
            str(machine.run_dir / "state"),
            *extra,
        )
        # Every machine names its link `siderolink`: give each its own UAPI socket directory
        # (or the one given, to share it as processes on one host do).
        machine.proc = self.lab.spawn(
            machine.ns, argv, log=machine.log, env=env, private_wireguard_run=wireguard_run or True
        )

    def stop_agent(self, machine: Machine) -> None:
        if machine.proc is not None:
            self.lab.stop(machine.proc)
            machine.proc = None

    def wait_connected(self, machine: Machine, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_status(machine, lambda s: bool(s.get("connected")), timeout, "connected")

    def wait_status(
        self, machine: Machine, predicate: Any, timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = machine.status()
            if status and predicate(status):
                return status
            if machine.proc is not None and machine.proc.poll() is not None:
                raise LabError(f"agent {machine.name} exited:\n{self.tail(machine.log)}")
            time.sleep(0.05)
        raise LabError(
            f"agent {machine.name} not {what} within {timeout:.0f} s; status "
            f"{machine.status()}\n--- agent log ---\n{self.tail(machine.log)}"
            f"\n--- server log ---\n{self.tail(self.server_log)}"
        )

    def ping(self, machine: Machine, address: str, count: int = 1, wait: int = 2) -> bool:
        proc = subprocess.run(
            machine.ns.exec_argv(["ping", "-6", "-c", str(count), "-W", str(wait), address]),
            capture_output=True,
            timeout=count * wait + 5,
            check=False,
        )
        return proc.returncode == 0

    def server_peers(self) -> list[str]:
        """Public keys on the server's device, read with the real `wg` tool."""
        out = subprocess.run(
            ["wg", "show", self.server_wg_interface, "peers"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return out.split()

    @staticmethod
    def tail(path: Path, lines: int = 30) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_port(
        self,
        ns: Namespace,
        host: str,
        port: int,
        timeout: float,
        proc: subprocess.Popen[bytes],
    ) -> None:
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET6)\n"
            "s.settimeout(0.5)\n"
            f"sys.exit(s.connect_ex(('{host}',{port})))\n"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"server exited:\n{self.tail(self.server_log)}")
            done = subprocess.run(
                ns.exec_argv([sys.executable, "-c", probe]), capture_output=True, check=False
            )
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise LabError(
            f"server not listening within {timeout:.0f} s:\n{self.tail(self.server_log)}"
        )

    def close(self) -> None:
        try:
            self.lab.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SideroLinkLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def registry_endpoints(state_dir: Path) -> dict[str, str | None]:
    """node UUID -> last endpoint as the server recorded it (read-only look at its registry)."""
    import sqlite3

    db = sqlite3.connect(f"file:{state_dir / 'registry.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT node_uuid, endpoint FROM machines").fetchall())
    finally:
        db.close()


def latest_handshakes(ifname: str) -> dict[str, int]:
    """Public key -> unix time of the last handshake on a device, read with `wg`."""
    out = subprocess.run(
        ["wg", "show", ifname, "latest-handshakes"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return {key: int(ts) for key, ts in (line.split() for line in out.splitlines() if line)}
