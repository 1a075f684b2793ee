"""A broken registry is one clear line, never a traceback: a full disk (a real small tmpfs), a
file with corrupted interior pages, a read-only file system (a real read-only bind mount, in
a private mount namespace so nothing outside the test sees it). Listing works read-only."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gatekeeper.lab.netns import Lab
from gatekeeper.lab.siderolink_lab import SideroLinkLab, gatekeeper_argv
from gatekeeper.server.registry import MachineRecord, machine_key
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.wireguard.keys import PrivateKey

GATEKEEPER = [sys.executable, "-m", "gatekeeper"]


def needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (util-linux) for mounts in a private namespace")


def gk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEKEEPER, *args], capture_output=True, text=True, timeout=60, check=False
    )


def one_line_error(done: subprocess.CompletedProcess[str], command: str, words: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"gatekeeper {command}: ") and words in line, line


def fill(state: Path, machines: int) -> list[MachineRecord]:
    records = [
        MachineRecord(
            machine_key=machine_key(f"6e0a5c7a-0000-4000-8000-{i:012d}", None),
            node_uuid=f"6e0a5c7a-0000-4000-8000-{i:012d}",
            address=ipaddress.IPv6Address(f"fdae:41e4:649b:9303::{i + 2:x}"),
            public_key=PrivateKey.generate().public_key().base64(),
            talos_version="v1.9.0",
        )
        for i in range(machines)
    ]
    with SqliteRegistry(state) as reg:
        for r in records:
            reg.claim(r)
    return records


def in_private_mounts(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def corrupt_machines_table(state: Path) -> None:
    """Overwrite the machines table's root page, an interior B-tree page, with garbage."""
    db_path = state / "registry.sqlite3"
    db = sqlite3.connect(db_path)
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'machines'").fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    (kind,) = db.execute("SELECT count(*) FROM machines").fetchone()
    db.close()
    assert kind == 600
    with open(db_path, "r+b") as f:
        f.seek((root - 1) * page_size)
        assert f.read(1) == b"\x05"  # an interior table page
        f.seek((root - 1) * page_size)
        f.write(b"\x05" + os.urandom(page_size - 1))


def test_corrupted_interior_pages_are_one_clear_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fill(state, 600)  # enough rows for a B-tree with interior pages
    corrupt_machines_table(state)
    for args, command in (
        (["machines"], "machines"),
        (["machines", "--json"], "machines"),
        (["machines", "remove", "6e0a5c7a-0000-4000-8000-000000000001"], "machines remove"),
    ):
        one_line_error(gk(*args, "--state-dir", str(state)), command, "is corrupt")
    # The tokens table is intact: creating a token works, or fails in one line.
    created = gk("token", "create", "--state-dir", str(state))
    assert "Traceback" not in created.stderr
    assert created.returncode == 0 or len(created.stderr.strip().splitlines()) == 1


def test_a_server_on_a_corrupt_registry_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    needs_root()
    with SideroLinkLab() as sl:
        fill(sl.state_dir, 600)
        corrupt_machines_table(sl.state_dir)
        log = sl.workdir / "server.log"
        proc = sl.lab.spawn(
            sl.server_ns,
            gatekeeper_argv(
                "server", "--state-dir", str(sl.state_dir), "--join-token", "x",
                "--listen", "[::1]:8090", "--wireguard-interface", sl.server_wg_interface,
                "--endpoint", "[fd00::1]:51820", "--no-isolation",
            ),
            log=log,
        )  # fmt: skip
        assert proc.wait(timeout=30) == 1
        text = log.read_text()
        assert "Traceback" not in text, text
        (line,) = [x for x in text.splitlines() if x.startswith("gatekeeper server:")]
        assert "is corrupt" in line and "restore it from a backup" in line


def test_a_full_disk_is_one_clear_line(tmp_path: Path) -> None:
    needs_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    state = mnt / "state"
    argv = " ".join(shlex.quote(a) for a in GATEKEEPER)
    script = (
        f"mount -t tmpfs -o size=1m gk-full {mnt} && "
        f"{argv} token create --state-dir {state} >/dev/null 2>&1 && "
        f"(dd if=/dev/zero of={mnt}/filler bs=4k 2>/dev/null; true) && "
        f"{argv} token create --state-dir {state}"
    )
    done = in_private_mounts(script)
    one_line_error(done, "token create", "is full")
    assert done.stdout == ""  # no token printed that was never stored


def test_a_read_only_registry_lists_and_refuses_writes_in_one_line(tmp_path: Path) -> None:
    needs_root()
    state = tmp_path / "state"
    records = fill(state, 3)
    argv = " ".join(shlex.quote(a) for a in GATEKEEPER)
    script = (
        f"mount --bind {state} {state} && mount -o remount,ro,bind {state} && "
        f"{argv} machines --json --state-dir {state} && echo '--- table' && "
        f"{argv} machines --state-dir {state} && echo '--- tokens' && "
        f"{argv} token list --state-dir {state}; echo '--- create'; "
        f"{argv} token create --state-dir {state} 2>&1; echo '--- remove'; "
        f"{argv} machines --state-dir {state} remove {records[0].node_uuid} 2>&1; true"
    )
    done = in_private_mounts(script)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    listed, rest = done.stdout.split("--- table\n")
    assert [m["uuid"] for m in json.loads(listed)] == [r.node_uuid for r in records]
    table, rest = rest.split("--- tokens\n")
    assert records[2].node_uuid in table and "v1.9.0" in table
    _, rest = rest.split("--- create\n")
    create, remove = rest.split("--- remove\n")
    (line,) = create.strip().splitlines()
    assert line.startswith("gatekeeper token create: ") and "read-only" in line, line
    (line,) = remove.strip().splitlines()
    assert line.startswith("gatekeeper machines remove: ") and "read-only" in line, line
    # Nothing was written: still three machines, no token.
    with SqliteRegistry(state) as reg:
        assert len(reg.machines()) == 3 and reg.tokens() == []


def test_machines_remove_honours_the_state_dir_given_before_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for before in (True, False):
        (record,) = fill(state, 1)
        where = ["--state-dir", str(state)]
        remove = ["remove", record.node_uuid]
        argv = ["machines", *where, *remove] if before else ["machines", *remove, *where]
        done = gk(*argv)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"removed {record.node_uuid}")
        with SqliteRegistry(state) as reg:
            assert reg.machines() == []


def test_a_psycopg_that_cannot_load_libpq_is_one_clear_line(tmp_path: Path, lab: Lab) -> None:
    # psycopg picks its libpq wrapper when it is first imported; PSYCOPG_IMPL=c asks for one
    # that is not installed here, as a psycopg without its [binary] extra on a host without
    # libpq fails (seen in the vm-tests guest image). Before: a traceback from the import.
    if importlib.util.find_spec("psycopg_c") is not None:
        pytest.skip("psycopg's C implementation is installed here: PSYCOPG_IMPL=c would load")
    url = f"postgresql://gatekeeper@/gk?host={tmp_path}"
    env = {**os.environ, "PSYCOPG_IMPL": "c"}
    state = ["--state-dir", str(tmp_path / "state")]
    # The server inside a namespace of the test's own: were it to get past the registry, it
    # would make its WireGuard device there, not on this host.
    ns = lab.namespace("psy")
    server = [
        "server", "--registry", url, *state, "--endpoint", "[fd00::1]:51820",
        "--listen", "[::1]:0", "--wireguard-interface", f"gk{lab.lab_id}psy",
    ]  # fmt: skip
    for command in (
        ["machines", "--registry", url, *state],
        ["token", "list", "--registry", url, *state],
        server,
    ):
        done = subprocess.run(
            ns.exec_argv([*GATEKEEPER, *command]),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        name = " ".join(command[: 2 if command[0] == "token" else 1])
        one_line_error(done, name, "PostgreSQL needs psycopg with libpq: install")
        assert "No module named 'psycopg_c'" in done.stderr
    # A password in the URL is still the first thing said: it needs no psycopg.
    done = subprocess.run(
        [*GATEKEEPER, "machines", "--registry", "postgresql://gk:hunter2@/gk", *state],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    one_line_error(done, "machines", "no password in the URL")
    assert "hunter2" not in done.stderr
