"""Two real `gatekeeper server` processes on one real PostgreSQL registry, each in its own
network namespace with its own WireGuard interface and port: tokens hold on both, addresses
are unique across both, and both ride out PostgreSQL going away and coming back."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from fleetlab import STORM, provisions
from pgcluster import PgCluster

from gatekeeper.lab.netns import Namespace, move_veth_pair
from gatekeeper.lab.siderolink_lab import (
    API_PORT,
    UNDERLAY,
    Machine,
    SideroLinkLab,
    gatekeeper_argv,
)
from gatekeeper.overlay import overlay_prefix, server_address
from gatekeeper.server.registry import machine_key
from gatekeeper.wireguard.keys import PrivateKey

pytestmark = pytest.mark.netns

UNREACHABLE = "the server's registry is unreachable: try again"
SERVER_OVERLAY = str(server_address(overlay_prefix("")))


@dataclass
class Instance:
    """One server of the fleet: where it listens and where its state is."""

    ns: Namespace
    underlay: str
    interface: str
    state_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def target(self) -> str:
        return f"[{self.underlay}]:{API_PORT}"


def sockets(ns: Namespace) -> str:
    """TCP sockets in a namespace, with their queues and timers (a line that never arrived:
    was it sent, queued, never connected?)."""
    return ns.run(["ss", "-tnaio"], check=False)


@dataclass
class TwoServers:
    sl: SideroLinkLab
    url: str
    password_file: Path
    a: Instance
    b: Instance

    def explain(self, machine: Machine | None = None) -> str:
        """What a failed overlay check needs next to it: each server's peers and log tail, the
        machine's log tail (a flake seen in full-suite runs only left nothing else to read)."""
        parts = []
        for n, server in ((1, self.a), (2, self.b)):
            # (Never `dump`: its first line is the private key.)
            peers = "".join(
                server.ns.run(["wg", "show", server.interface, what], check=False)
                for what in ("endpoints", "latest-handshakes")
            )
            parts.append(f"--- server {n} peers ---\n{peers}")
            parts.append(
                f"--- server {n} log ---\n{self.sl.tail(self.sl.workdir / f'server{n}.log')}"
            )
            parts.append(f"--- server {n} TCP ---\n{sockets(server.ns)}")
        if machine is not None:
            parts.append(f"--- {machine.name} log ---\n{self.sl.tail(machine.log)}")
            parts.append(f"--- {machine.name} TCP ---\n{sockets(machine.ns)}")
        return "\n".join(parts)

    def gk(self, *args: str, via: Instance | None = None) -> subprocess.CompletedProcess[str]:
        """A fleet command against the shared registry (with one server's --state-dir)."""
        return subprocess.run(
            [
                *gatekeeper_argv(*args),
                "--registry", self.url,
                "--registry-password-file", str(self.password_file),
                "--state-dir", str((via or self.a).state_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip


def start_instance(
    sl: SideroLinkLab, n: int, url: str, password_file: Path, extra: Sequence[str] = ()
) -> Instance:
    """Server n (1: the lab's own namespace; 2: a namespace on the same underlay bridge),
    given `extra` arguments, started, not yet waited for."""
    if n == 1:
        ns, underlay = sl.server_ns, sl.server_underlay
    else:
        ns = sl.lab.namespace(f"srv{n}")
        underlay = UNDERLAY.format(n=1, host=n).split("/")[0]
        move_veth_pair(f"gkv{sl.lab.lab_id}s{n}", (sl.server_ns, f"s{n}"), (ns, "eth0"))
        sl.server_ns.run(["ip", "link", "set", f"s{n}", "master", "br0", "up"])
        ns.run(["ip", "addr", "add", f"{underlay}/64", "dev", "eth0", "nodad"])
        ns.run(["ip", "link", "set", "eth0", "up"])
    token_file = sl.token_file()
    interface = f"gk{sl.lab.lab_id}s{n}"
    state_dir = sl.workdir / f"state{n}"
    port = 51820 + n
    argv = gatekeeper_argv(
        "server",
        "--state-dir", str(state_dir),
        "--registry", url,
        "--registry-password-file", str(password_file),
        "--listen", f"[{underlay}]:{API_PORT}",
        "--join-token-file", str(token_file),
        "--wireguard-interface", interface,
        "--wireguard-port", str(port),
        "--endpoint", f"[{underlay}]:{port}",
        "--instance", f"srv{n}",
        *extra,
    )  # fmt: skip
    log = sl.workdir / f"server{n}.log"
    proc = sl.lab.spawn(ns, argv, log=log)
    return Instance(ns, underlay, interface, state_dir, proc)


@contextlib.contextmanager
def two_servers(cluster: PgCluster) -> Iterator[TwoServers]:
    url = cluster.create_database()
    try:
        with SideroLinkLab() as sl:
            # Both at once on a fresh database: they race to create the schema and the
            # server identity, and both must come up with the same one.
            b = start_instance(sl, 2, url, cluster.password_file)
            a = start_instance(sl, 1, url, cluster.password_file)
            for server in (a, b):
                sl._wait_port(server.ns, server.underlay, API_PORT, 20, server.proc)
            yield TwoServers(sl, url, cluster.password_file, a, b)
    finally:
        if cluster.running():
            cluster.drop_database(url)


@pytest.fixture
def fleet(pg_cluster: PgCluster) -> Iterator[TwoServers]:
    with two_servers(pg_cluster) as servers:
        yield servers


def request(token: str) -> dict[str, object]:
    return {
        "node_uuid": str(uuid.uuid4()),
        "node_public_key": PrivateKey.generate().public_key().base64(),
        "join_token": token,
        "node_unique_token": "",
    }


def outcome(result: dict[str, object]) -> str:
    return "OK" if "ok" in result else f"{result['code']}: {result['details']}"


def test_a_token_revoked_through_one_server_is_refused_by_both(fleet: TwoServers) -> None:
    m = fleet.sl.add_machine(start=False)
    created = fleet.gk("token", "create", "--name", "shared", via=fleet.a)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    before = [provisions(m, s.target, [request(token)])[0] for s in (fleet.a, fleet.b)]
    assert [outcome(r) for r in before] == ["OK", "OK"]
    # One fleet: one server identity, one overlay prefix.
    assert before[0]["ok"]["server_public_key"] == before[1]["ok"]["server_public_key"]
    revoked = fleet.gk("token", "revoke", token.split(".")[0], via=fleet.b)
    assert revoked.returncode == 0, revoked.stderr
    after = [provisions(m, s.target, [request(token)])[0] for s in (fleet.a, fleet.b)]
    assert [outcome(r) for r in after] == ["PERMISSION_DENIED: join token revoked"] * 2
    listed = json.loads(fleet.gk("token", "list", "--json").stdout)
    assert [(t["state"], t["uses"]) for t in listed] == [("revoked", 2)]


def storm(fleet: TwoServers, target: Instance, count: int, out: Path) -> subprocess.Popen[bytes]:
    machine = fleet.sl.machines[0]
    return fleet.sl.lab.spawn(
        machine.ns,
        [
            sys.executable, str(STORM), target.target,
            "--count", str(count), "--concurrency", "25", "--channels", "2",
            f"--token-file={fleet.sl.token_file()}", "--out", str(out),
        ],
        log=out.with_suffix(".log"),
    )  # fmt: skip


def test_machines_provisioning_through_both_get_distinct_addresses(fleet: TwoServers) -> None:
    fleet.sl.add_machine(start=False)
    outs = [fleet.sl.workdir / "storm-a.jsonl", fleet.sl.workdir / "storm-b.jsonl"]
    started = time.monotonic()
    # 200 machines at once, half through each server (the figure).
    clients = [storm(fleet, s, 100, out) for s, out in zip((fleet.a, fleet.b), outs, strict=True)]
    for client, out in zip(clients, outs, strict=True):
        assert client.wait(120) == 0, out.with_suffix(".log").read_text()
    elapsed = time.monotonic() - started
    answered = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    assert len(answered) == 200, [out.with_suffix(".log").read_text() for out in outs]
    assert len({a["address"] for a in answered}) == 200
    listed = json.loads(fleet.gk("machines", "--json").stdout)
    assert sorted(r["uuid"] for r in listed) == sorted(a["uuid"] for a in answered)
    assert {r["uuid"]: r["address"] for r in listed} == {a["uuid"]: a["address"] for a in answered}
    # Each machine's peer is on the device of the instance it provisioned through, only.
    for server, out in zip((fleet.a, fleet.b), outs, strict=True):
        keys = sorted(json.loads(line)["key"] for line in out.read_text().splitlines())
        assert sorted(wg_peers(server.interface)) == keys
    print(f"200 provisions through two servers on PostgreSQL: {elapsed:.2f} s")


def test_postgresql_stopped_and_started_again(own_cluster: PgCluster) -> None:
    with two_servers(own_cluster) as fleet:
        # A real agent, joined through server A (the lab's API URL) before the outage.
        agent = fleet.sl.add_machine()
        fleet.sl.wait_connected(agent)
        m = fleet.sl.add_machine(start=False)
        token = fleet.sl.join_token
        first = [outcome(provisions(m, s.target, [request(token)])[0]) for s in (fleet.a, fleet.b)]
        assert first == ["OK", "OK"]
        own_cluster.stop()
        # Its link does not need the store: the overlay still carries traffic.
        assert fleet.sl.ping(agent, SERVER_OVERLAY, count=3), fleet.explain(agent)
        for server in (fleet.a, fleet.b):
            started = time.monotonic()
            (result,) = provisions(m, server.target, [request(token)])
            took = time.monotonic() - started
            assert outcome(result) == f"UNAVAILABLE: {UNREACHABLE}"
            # Well within the 10 s deadline the client gave (including the client's start).
            assert took < 8, took
            print(f"UNAVAILABLE from {server.interface} in {took:.2f} s (client start included)")
        down = fleet.gk("machines")
        assert down.returncode == 1 and down.stdout == ""
        assert down.stderr.count("\n") == 1, down.stderr
        assert down.stderr.startswith(
            f"gatekeeper machines: the registry {fleet.url} is unreachable"
        )
        own_cluster.start()
        # No restart: the same server processes answer again.
        back = [outcome(provisions(m, s.target, [request(token)])[0]) for s in (fleet.a, fleet.b)]
        assert back == ["OK", "OK"]
        assert fleet.a.proc.poll() is None and fleet.b.proc.poll() is None
        listed = json.loads(fleet.gk("machines", "--json").stdout)
        assert len(listed) == 5 and len({r["address"] for r in listed}) == 5
        assert fleet.sl.ping(agent, SERVER_OVERLAY), fleet.explain(agent)
        # The outage was a log line per refused Provision, never a traceback.
        for n in (1, 2):
            log = (fleet.sl.workdir / f"server{n}.log").read_text()
            assert "Traceback" not in log and UNREACHABLE not in log
            assert "is unreachable" in log


def test_postgresql_gone_in_the_middle_of_a_claim_leaves_no_peer(own_cluster: PgCluster) -> None:
    with two_servers(own_cluster) as fleet:
        m = fleet.sl.add_machine(start=False)
        req = request(fleet.sl.join_token)
        key = str(req["node_public_key"])
        # Another server's claim of the same identity in flight: ours waits for its lock, its
        # peer already on the device, when PostgreSQL goes away.
        holder = psycopg.connect(fleet.url.replace("gatekeeper@", "postgres@"), autocommit=True)
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))",
            (machine_key(str(req["node_uuid"]), ""),),
        )
        result: list[dict[str, object]] = []
        call = threading.Thread(target=lambda: result.extend(provisions(m, fleet.a.target, [req])))
        call.start()
        try:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                waiting = holder.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND application_name = 'gatekeeper'"
                ).fetchone()
                if waiting and waiting[0]:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the claim never waited for the lock")
        finally:
            # Immediate: a fast shutdown ends the holder's session first, and the claim, granted
            # the lock in that instant, could still commit (a correct OK, not this test's case).
            own_cluster.stop(mode="immediate")
            with contextlib.suppress(psycopg.Error):
                holder.close()
            call.join(30)
        assert [outcome(r) for r in result] == [f"UNAVAILABLE: {UNREACHABLE}"]
        assert key not in wg_peers(fleet.a.interface)
        own_cluster.start()
        assert [outcome(r) for r in provisions(m, fleet.a.target, [req])] == ["OK"]
        assert key in wg_peers(fleet.a.interface)


def wg_peers(interface: str) -> list[str]:
    return subprocess.run(
        ["wg", "show", interface, "peers"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.split()
