"""A pass after a change reads only the machines the change feed named (peer_reconciler.py),
and the full pass still catches what no feed can see. Real SQLite registry, real
wireguard-go in a lab namespace; the registry is wrapped only to count its reads."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.lab.netns import Lab
from gatekeeper.lab.nsthread import NamespaceThread
from gatekeeper.server.devicewatch import SwappableDevice
from gatekeeper.server.peer_reconciler import PeerReconciler
from gatekeeper.server.registry import ANYTHING, MachineRecord
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.wireguard.keys import PrivateKey
from gatekeeper.wireguard.userspace import UserspaceBackend

pytestmark = pytest.mark.netns

ME = "srv-a"


class Counted:
    """The real registry, with its whole-fleet and by-key reads counted."""

    def __init__(self, registry: SqliteRegistry) -> None:
        self.registry = registry
        self.full_reads = 0
        self.keyed_reads: list[int] = []

    def machines(self) -> list[MachineRecord]:
        self.full_reads += 1
        return self.registry.machines()

    def machines_matching(
        self, *, machine_keys: Collection[str] = (), public_keys: Collection[str] = ()
    ) -> list[MachineRecord]:
        self.keyed_reads.append(len(machine_keys) + len(public_keys))
        return self.registry.machines_matching(machine_keys=machine_keys, public_keys=public_keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registry, name)


def machine(n: int, owner: str = ME) -> MachineRecord:
    return MachineRecord(
        machine_key=f"key-{n}",
        node_uuid=f"uuid-{n}",
        address=ipaddress.IPv6Address(f"fdae:41e4:649b:9303::{n:x}"),
        public_key=PrivateKey.generate().public_key().base64(),
        owner=owner,
    )


def elsewhere(path: Path, sql: str, *params: str) -> None:
    """A write from another process (`gatekeeper machines remove` on another host)."""
    code = "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
    code += "db.execute(sys.argv[2], sys.argv[3:]); db.commit()"
    subprocess.run([sys.executable, "-c", code, str(path), sql, *params], check=True)


def scenario(state: Path, ifname: str) -> dict[str, Any]:
    reg = SqliteRegistry(state)
    counted = Counted(reg)
    device = SwappableDevice(UserspaceBackend().create(ifname))
    try:
        device.configure(PrivateKey.generate(), None, [])
        fleet = [machine(n) for n in range(1, 31)]
        for m in fleet:
            reg.claim(m)
        rec = PeerReconciler(
            counted,
            device,
            instance=ME,
            endpoints_of=lambda records: [None] * len(records),
            forget_addresses=lambda _addresses: None,
            booked=device.booked,
            rebook=device.rebook,
        )
        feed = reg.change_feed()
        assert feed.wait(1.0) == ANYTHING
        rec.reconcile(full=True)
        out: dict[str, Any] = {"after_start": {p.public_key.base64() for p in device.peers()}}

        elsewhere(reg.path, "DELETE FROM machines WHERE machine_key = ?", "key-5")
        elsewhere(reg.path, "UPDATE machines SET owner = 'srv-b' WHERE machine_key = ?", "key-6")
        newcomer = machine(31)
        reg.claim(newcomer)
        changes = feed.wait(2.0)
        assert changes is not None and changes.keys is not None
        out["named"] = set(changes.keys)
        full_before = counted.full_reads
        rec.reconcile(full=False, keys=changes.keys)
        out["full_reads_in_keyed_pass"] = counted.full_reads - full_before
        out["keyed_reads"] = list(counted.keyed_reads)
        out["after_change"] = {p.public_key.base64() for p in device.peers()}

        # A peer removed behind the server's back (`wg set ... remove`): no feed sees it; a
        # pass for other keys leaves it missing, the full pass puts it back.
        lost = fleet[9].public_key
        subprocess.run(
            ["wg", "set", ifname, "peer", lost, "remove"], check=True, capture_output=True
        )
        rec.reconcile(full=False, keys=frozenset({newcomer.public_key}))
        out["lost_after_keyed"] = lost in {p.public_key.base64() for p in device.peers()}
        rec.reconcile(full=True)
        out["lost_after_full"] = lost in {p.public_key.base64() for p in device.peers()}
        out["fleet"] = [m.public_key for m in fleet]
        out["newcomer"] = newcomer.public_key
        feed.close()
        return out
    finally:
        device.close()
        reg.close()


def test_a_pass_after_a_change_reads_only_the_named_machines(tmp_path: Path) -> None:
    with Lab() as lab:
        ns = lab.namespace("r")
        with NamespaceThread(ns.name) as inside:
            out = inside.call(scenario, tmp_path, lab.name("wg"))
    fleet = out["fleet"]
    assert out["after_start"] == set(fleet)
    assert out["named"] == {fleet[4], fleet[5], out["newcomer"]}
    assert out["full_reads_in_keyed_pass"] == 0 and out["keyed_reads"] == [3]
    assert out["after_change"] == (set(fleet) - {fleet[4], fleet[5]}) | {out["newcomer"]}
    assert out["lost_after_keyed"] is False
    assert out["lost_after_full"] is True
