"""A real PostgreSQL 15 for the tests: initdb and pg_ctl as `postgres` in a temporary directory.

It listens on no TCP address at all (`listen_addresses=''`), only on a unix socket in that
directory, which every network namespace reaches; `start(netns=..., listen=...)` adds a TCP
address inside a lab's namespace, for a client that has no file system in common with it (the
QEMU guest of bench/bench_scale_vm.py). The superuser `postgres` logs in without a
password; the role the servers use (`gatekeeper`) needs its password (scram-sha-256), so the
password paths are real too.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

BIN = Path("/usr/lib/postgresql/15/bin")
ROLE = "gatekeeper"


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    if not (BIN / "initdb").exists():
        return "PostgreSQL 15 not installed: apt-get install postgresql (Debian)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user (the Debian package postgresql creates it)"
    if os.geteuid() != 0:
        return "needs root to run initdb and pg_ctl as the postgres user"
    return None


class PgCluster:
    """`start()` it, `close()` it (stops it and removes its directory, also after a failure)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gk-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.password = secrets.token_urlsafe(12)
        self.password_file = self.root / "password"
        user = pwd.getpwnam("postgres")
        self.root.chmod(0o755)
        self.socket_dir.mkdir()
        for path in (self.root, self.socket_dir):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self._as_postgres(
            str(BIN / "initdb"),
            "-D", str(self.data),
            "-U", "postgres",
            "--auth-local=trust",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        # The superuser over the socket without a password; every other role with one.
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\nlocal all all scram-sha-256\n"
        )

    def _as_postgres(self, *argv: str, timeout: float = 60, netns: str | None = None) -> None:
        inside = ["ip", "netns", "exec", netns] if netns else []
        done = subprocess.run(
            [*inside, "runuser", "-u", "postgres", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {done.stderr.strip()[-2000:]}")

    def start(self, *, netns: str | None = None, listen: str | None = None) -> None:
        """`listen`: also a TCP address (port 5432), inside the network namespace `netns`
        (a lab's, for a client that has no unix socket to reach: a QEMU guest)."""
        if listen is not None:
            if netns is None:
                raise ValueError("a TCP listener only inside a lab's namespace (netns=...)")
            hba = self.data / "pg_hba.conf"
            if "host " not in hba.read_text():
                # Any client of that namespace, with the role's password.
                hosts = "host all all ::/0 scram-sha-256\nhost all all 0.0.0.0/0 scram-sha-256\n"
                hba.write_text(hba.read_text() + hosts)
        options = (
            f"-c listen_addresses='{listen or ''}' -c unix_socket_directories='{self.socket_dir}' "
            "-c fsync=off -c max_connections=50"
        )
        self._as_postgres(
            str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "30", "start", netns=netns,
        )  # fmt: skip

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self, mode: str = "fast") -> None:
        """`mode` as pg_ctl's -m: fast (clients disconnected, a clean shutdown) or immediate
        (every backend killed at once, as a crash or a pulled cable looks to a client)."""
        if self.running():
            self._as_postgres(
                str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop"
            )  # fmt: skip

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=str(self.socket_dir), user="postgres", dbname="postgres", autocommit=True
        )

    def create_role(self) -> None:
        with self.admin() as db:
            db.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(self.password)
                )
            )

    def create_database(self) -> str:
        """A fresh database owned by the servers' role; its URL (no password in it)."""
        name = f"gk_{secrets.token_hex(4)}"
        with self.admin() as db:
            db.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(ROLE)
                )
            )
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.split("/")[3].split("?")[0]
        with self.admin() as db:
            db.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def url(self, dbname: str) -> str:
        return f"postgresql://{ROLE}@/{dbname}?host={self.socket_dir}"

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def started_cluster(*, netns: str | None = None, listen: str | None = None) -> PgCluster:
    cluster = PgCluster()
    try:
        cluster.start(netns=netns, listen=listen)
        cluster.create_role()
    except BaseException:
        cluster.close()
        raise
    return cluster
