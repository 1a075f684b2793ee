"""The registry on a real SQLite file and a real PostgreSQL: identity, claims, collisions,
restarts. Tests of the interface run against both backends (`backend`); the rest are about
one backend's own files or schema."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from conftest import Opener

from gatekeeper.overlay import overlay_prefix
from gatekeeper.server.addressing import allocate_node_address
from gatekeeper.server.registry import (
    AddressTaken,
    KeyTaken,
    MachineRecord,
    ServerIdentity,
    machine_key,
)
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.wireguard.keys import PrivateKey

PREFIX = overlay_prefix("")


def record(uuid: str, address: str, token: str | None = None) -> MachineRecord:
    return MachineRecord(
        machine_key=machine_key(uuid, token),
        node_uuid=uuid,
        address=ipaddress.IPv6Address(address),
        public_key=PrivateKey.generate().public_key().base64(),
    )


def test_identity_is_created_once_and_survives_reopen(backend: Opener) -> None:
    reg = backend()
    first = reg.identity(lambda: ServerIdentity(PrivateKey.generate(), "inst"))
    reg.close()
    reg = backend()
    again = reg.identity(lambda: ServerIdentity(PrivateKey.generate(), "other"))
    assert again.private_key.raw == first.private_key.raw and again.installation_id == "inst"


def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    reg = SqliteRegistry(tmp_path)
    reg.identity(lambda: ServerIdentity(PrivateKey.generate(), "inst"))
    reg.close()
    assert (tmp_path / "registry.sqlite3").stat().st_mode & 0o077 == 0


def test_claim_update_and_collision(backend: Opener) -> None:
    reg = backend()
    a = record("uuid-a", "fdae:41e4:649b:9303::a")
    reg.claim(a)
    b = record("uuid-b", "fdae:41e4:649b:9303::a")
    with pytest.raises(AddressTaken):
        reg.claim(b)
    assert reg.machine_count() == 1
    moved = MachineRecord(**{**a.__dict__, "public_key": b.public_key})
    reg.claim(moved)
    got = reg.get(a.machine_key)
    assert got is not None and got.public_key == b.public_key and got.address == a.address
    assert reg.by_address(a.address) == got
    reg.update_endpoints({a.machine_key: "[fd00::5]:51821", "unknown": "x"})
    assert reg.get(a.machine_key).endpoint == "[fd00::5]:51821"
    assert reg.remove(a.machine_key) and reg.machines() == [] and reg.machine_count() == 0
    assert not reg.remove(a.machine_key)
    if isinstance(reg, SqliteRegistry):
        assert reg.integrity_check() == "ok"


def test_claims_are_counted_with_the_last_remote_address(backend: Opener) -> None:
    # `gatekeeper machines` shows both, whichever store the fleet uses.
    reg = backend()
    a = record("uuid-a", "fdae:41e4:649b:9303::a")
    reg.claim(MachineRecord(**{**a.__dict__, "remote_address": "[fd00::9]:4000"}))
    reg.claim(MachineRecord(**{**a.__dict__, "remote_address": "[fd00::9]:4001"}))
    got = reg.get(a.machine_key)
    assert got is not None and got.provisions == 2
    assert got.remote_address == "[fd00::9]:4001"
    assert reg.machines() == [got]


def test_unique_token_is_part_of_the_identity_and_never_stored(tmp_path: Path) -> None:
    assert machine_key("U", "t1") != machine_key("U", "t2")
    assert machine_key("U", None) == machine_key("u", "")
    reg = SqliteRegistry(tmp_path)
    reg.claim(record("uuid-a", "fdae:41e4:649b:9303::b", token="very-secret-token"))
    reg.close()
    assert b"very-secret-token" not in (tmp_path / "registry.sqlite3").read_bytes()


def test_allocation_skips_taken_and_reserved_addresses() -> None:
    draws = iter([bytes(8), bytes(7) + b"\x01", bytes(7) + b"\x05", bytes(7) + b"\x06"])
    taken = {ipaddress.IPv6Address("fdae:41e4:649b:9303::5")}
    addr = allocate_node_address(PREFIX, taken=taken.__contains__, randbytes=lambda n: next(draws))
    assert addr == ipaddress.IPv6Address("fdae:41e4:649b:9303::6")


def test_unwritable_state_dir_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Exception, match=r"cannot open the registry .*registry.sqlite3") as info:
        SqliteRegistry(blocker / "state")
    assert "\n" not in str(info.value)


def test_every_registry_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        reg = SqliteRegistry(tmp_path / "state")
        reg.identity(lambda: ServerIdentity(PrivateKey.generate(), ""))
        reg.claim(record("uuid-a", "fdae:41e4:649b:9303::c"))
        files = sorted((tmp_path / "state").glob("registry.sqlite3*"))
        assert {f.name for f in files} >= {"registry.sqlite3", "registry.sqlite3-wal"}
        for f in files:
            assert f.stat().st_mode & 0o077 == 0, f.name
        reg.close()
    finally:
        os.umask(old)


def test_a_public_key_names_one_machine(backend: Opener) -> None:
    reg = backend()
    a = record("uuid-a", "fdae:41e4:649b:9303::a")
    reg.claim(a)
    b = MachineRecord(
        **{**record("uuid-b", "fdae:41e4:649b:9303::b").__dict__, "public_key": a.public_key}
    )
    with pytest.raises(KeyTaken):
        reg.claim(b)
    assert reg.machines() == [reg.get(a.machine_key)] and reg.get(b.machine_key) is None


def test_an_identity_replacement_is_one_write(backend: Opener) -> None:
    reg = backend()
    old = record("uuid-a", "fdae:41e4:649b:9303::a", token="before")
    other = record("uuid-c", "fdae:41e4:649b:9303::c")
    reg.claim(old)
    reg.claim(other)
    new = MachineRecord(
        machine_key=machine_key("uuid-a", "after"),
        node_uuid="uuid-a",
        address=ipaddress.IPv6Address("fdae:41e4:649b:9303::d"),
        public_key=old.public_key,
    )
    # Without `replaces` the key is taken: there is no moment with two rows for one key.
    with pytest.raises(KeyTaken):
        reg.claim(new)
    # A replacement that fails as a whole leaves the old identity as it was (rollback).
    clash = MachineRecord(**{**new.__dict__, "address": other.address})
    with pytest.raises(AddressTaken):
        reg.claim(clash, replaces=old.machine_key)
    assert reg.get(old.machine_key) is not None
    reg.claim(new, replaces=old.machine_key)
    assert reg.get(old.machine_key) is None
    assert reg.by_public_key(old.public_key) == reg.get(new.machine_key)
    assert len(reg.machines()) == 2 == reg.machine_count()


def test_duplicate_keys_of_an_old_registry_are_resolved_and_the_key_made_unique(
    tmp_path: Path,
) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    db.executescript(
        "CREATE TABLE machines (machine_key TEXT PRIMARY KEY, node_uuid TEXT NOT NULL, "
        "address TEXT NOT NULL UNIQUE, public_key TEXT NOT NULL, endpoint TEXT, "
        "tunnel INTEGER NOT NULL DEFAULT 0, talos_version TEXT NOT NULL DEFAULT '', "
        "created REAL NOT NULL, updated REAL NOT NULL);"
        "CREATE INDEX machines_public_key ON machines (public_key);"
        # What a crash between 'claim' and 'remove' used to leave: two rows, one key.
        "INSERT INTO machines VALUES ('old', 'u', 'fdae::5', 'pk', NULL, 0, '', 1, 1);"
        "INSERT INTO machines VALUES ('new', 'u', 'fdae::6', 'pk', NULL, 0, '', 1, 2);"
        "INSERT INTO machines VALUES ('x', 'v', 'fdae::7', 'pk2', NULL, 0, '', 1, 1);"
    )
    db.commit()
    db.close()
    # A read-only look at the unmigrated file works (the newer columns read as empty).
    with SqliteRegistry(tmp_path, readonly=True) as ro:
        assert len(ro.machines()) == 3 and ro.machines()[0].conflict_time is None
    reg = SqliteRegistry(tmp_path)
    assert sorted(m.machine_key for m in reg.machines()) == ["new", "x"]
    clash = MachineRecord("k2", "w", ipaddress.IPv6Address("fdae::8"), "pk2")
    with pytest.raises(KeyTaken):
        reg.claim(clash)
    reg.record_conflict("new", 5.0, "fd00:6b:1::103")
    got = reg.get("new")
    assert got is not None and got.conflict_time == 5.0 and got.conflict_from == "fd00:6b:1::103"
    assert reg.integrity_check() == "ok"


def test_a_registry_from_before_the_counters_gains_them_and_counts_claims(
    tmp_path: Path,
) -> None:
    import sqlite3

    # The machines table as the first releases made it: no provisions, no remote_address.
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    db.executescript(
        "CREATE TABLE machines (machine_key TEXT PRIMARY KEY, node_uuid TEXT NOT NULL, "
        "address TEXT NOT NULL UNIQUE, public_key TEXT NOT NULL, endpoint TEXT, "
        "tunnel INTEGER NOT NULL DEFAULT 0, talos_version TEXT NOT NULL DEFAULT '', "
        "created REAL NOT NULL, updated REAL NOT NULL);"
        "INSERT INTO machines VALUES ('k1', 'old', 'fdae:41e4:649b:9303::5', 'pk', NULL, 0, "
        "'', 1.0, 1.0);"
    )
    db.commit()
    db.close()
    reg = SqliteRegistry(tmp_path)
    (old,) = reg.machines()
    assert old.provisions == 0 and old.remote_address is None
    fresh = record("uuid-1", "fdae:41e4:649b:9303::7")
    reg.claim(MachineRecord(**{**fresh.__dict__, "remote_address": "[fd00::9]:4000"}))
    reg.claim(MachineRecord(**{**fresh.__dict__, "remote_address": "[fd00::9]:4001"}))
    again = reg.get(fresh.machine_key)
    assert again is not None and again.provisions == 2
    assert again.remote_address == "[fd00::9]:4001"
    reg.close()


def test_a_sqlite_url_names_the_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    from gatekeeper.server.registry_url import open_registry

    file = tmp_path / "elsewhere" / "fleet.db"
    with open_registry(f"sqlite://{file}", tmp_path / "state") as reg:
        reg.claim(record("uuid-a", "fdae:41e4:649b:9303::a"))
    assert file.exists() and not (tmp_path / "state" / "registry.sqlite3").exists()

    def gk(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gatekeeper", *args, "--state-dir", str(tmp_path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    listed = gk("machines", "--json", "--registry", f"sqlite://{file}")
    assert listed.returncode == 0 and "uuid-a" in listed.stdout, listed.stderr
    missing = gk("token", "list", "--registry", f"sqlite://{tmp_path}/none.db")
    assert missing.returncode == 1
    assert missing.stderr == (
        f"gatekeeper token list: no registry at {tmp_path}/none.db: "
        "is that the server's --registry?\n"
    )
