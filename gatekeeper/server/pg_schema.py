"""The PostgreSQL registry's schema: its versions and how a server brings a database to the
current one at start (docs/registry.md, "Schema versions").

`gatekeeper_schema` holds the version. Migrating runs in one transaction holding a
transaction-level advisory lock: servers starting at once migrate once, the others wait and
find the schema current, and a crash mid-way leaves the previous version whole.
"""

from __future__ import annotations

from typing import Any

import psycopg

from gatekeeper.server.registry import RegistryError

# The schema this code reads and writes. A registry at a higher version was written by a
# newer gatekeeper: refused, since this code would not keep its rules.
SCHEMA_VERSION = 4
# From this version on, the registry holds events and machine logs (pg_telemetry.py).
TELEMETRY_VERSION = 3

# The channel every change to a machine's peer (added, re-keyed, moved, removed, a new owner)
# is announced on, at commit, with the machine's public key as the payload (both keys of a
# re-key; change_keys_function): each instance's peer reconciler LISTENs to it.
CHANGE_CHANNEL = "gatekeeper_machines"

# pg_advisory_xact_lock key (a fixed 64-bit number, "gk" in the top bytes).
MIGRATION_LOCK = 0x676B_0000_0001


def telemetry_step() -> str:
    """Version 3: events and machine logs (pg_telemetry.py). New tables only, touching
    nothing an earlier step made, so it holds whatever version 2 adds."""
    return """
    CREATE TABLE IF NOT EXISTS telemetry_events (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        received double precision NOT NULL,
        node_uuid text NOT NULL,
        entry text NOT NULL
    );
    CREATE INDEX IF NOT EXISTS telemetry_events_received ON telemetry_events (received);
    CREATE TABLE IF NOT EXISTS telemetry_logs (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        machine_key text NOT NULL,
        received double precision NOT NULL,
        bytes integer NOT NULL,
        entry text NOT NULL
    );
    CREATE INDEX IF NOT EXISTS telemetry_logs_machine ON telemetry_logs (machine_key, seq);
    CREATE INDEX IF NOT EXISTS telemetry_logs_received ON telemetry_logs (received);
    """


def owners_step() -> str:
    """Version 4: instances, an owner per machine, and a notification per change.

    Per row, not per statement: an UPDATE that matches nothing (a take-over with no machine
    to take) announces nothing; PostgreSQL folds a transaction's identical notifications
    into one, so a batch of changes is one wake-up for each listener."""
    return f"""
    CREATE TABLE IF NOT EXISTS instances (
        name text PRIMARY KEY,
        endpoints text NOT NULL,
        run_id text NOT NULL,
        started double precision NOT NULL,
        seen double precision NOT NULL
    );
    ALTER TABLE machines ADD COLUMN IF NOT EXISTS owner text;
    CREATE INDEX IF NOT EXISTS machines_owner ON machines (owner);
    CREATE OR REPLACE FUNCTION gatekeeper_machines_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANGE_CHANNEL}', '');
            RETURN NULL;
        END $$;
    DROP TRIGGER IF EXISTS machines_changed ON machines;
    CREATE TRIGGER machines_changed
        AFTER INSERT OR DELETE OR UPDATE OF public_key, address, tunnel, owner ON machines
        FOR EACH ROW EXECUTE FUNCTION gatekeeper_machines_changed();
    """


def change_keys_function() -> str:
    """The trigger function as this gatekeeper writes it: each notification names the public
    key it is about (both keys of a re-key). Version 4 made it with an empty payload, so
    every wake-up read every machine.

    Not a schema version of its own: a version-4 gatekeeper ignores the payload, so through
    a rolling upgrade old and new instances keep sharing the registry (a version bump would
    refuse an old instance that restarts). Every start puts it in place, under the migration
    lock. PostgreSQL folds identical notifications of one transaction; distinct keys stay."""
    return f"""
    CREATE OR REPLACE FUNCTION gatekeeper_machines_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'INSERT' THEN
                PERFORM pg_notify('{CHANGE_CHANNEL}', OLD.public_key);
            END IF;
            IF TG_OP = 'INSERT' THEN
                PERFORM pg_notify('{CHANGE_CHANNEL}', NEW.public_key);
            ELSIF TG_OP = 'UPDATE' AND NEW.public_key IS DISTINCT FROM OLD.public_key THEN
                PERFORM pg_notify('{CHANGE_CHANNEL}', NEW.public_key);
            END IF;
            RETURN NULL;
        END $$;
    """


# Step N takes the schema from version N-1 to N. The store decides uniqueness (constraints)
# and order (`seq`, assigned at commit time, whatever the writing servers' clocks say).
STEPS: tuple[str, ...] = (
    """
    CREATE TABLE identity (
        id integer PRIMARY KEY CHECK (id = 1),
        private_key text NOT NULL,
        installation_id text NOT NULL
    );
    CREATE TABLE machines (
        seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        machine_key text PRIMARY KEY,
        node_uuid text NOT NULL,
        address text NOT NULL CONSTRAINT machines_address_unique UNIQUE,
        public_key text NOT NULL CONSTRAINT machines_public_key_unique UNIQUE,
        endpoint text,
        tunnel boolean NOT NULL DEFAULT false,
        talos_version text NOT NULL DEFAULT '',
        created double precision NOT NULL,
        updated double precision NOT NULL,
        join_token_id text,
        conflict_time double precision,
        conflict_from text,
        provisions integer NOT NULL DEFAULT 0,
        remote_address text
    );
    CREATE TABLE tokens (
        seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        token_id text PRIMARY KEY,
        name text NOT NULL,
        secret_hash text NOT NULL,
        created double precision NOT NULL,
        expires double precision,
        max_uses integer CHECK (max_uses IS NULL OR max_uses >= 1),
        uses integer NOT NULL DEFAULT 0 CHECK (max_uses IS NULL OR uses <= max_uses),
        revoked double precision
    );
    """,
    # Version 2 was reserved for owners while events and logs came first (version 3); owners
    # came as version 4. Empty, so registries at any version agree on what each step made.
    "SELECT 1",
    telemetry_step(),
    owners_step(),
)
assert len(STEPS) == SCHEMA_VERSION


def version(cur: psycopg.Cursor[Any]) -> int:
    """The database's schema version; 0 for a database gatekeeper never wrote to."""
    cur.execute("SELECT to_regclass('gatekeeper_schema') IS NOT NULL")
    row = cur.fetchone()
    if not row or not row[0]:
        return 0
    cur.execute("SELECT version FROM gatekeeper_schema WHERE id = 1")
    row = cur.fetchone()
    return int(row[0]) if row else 0


def refuse_newer(found: int, shown: str) -> None:
    if found > SCHEMA_VERSION:
        raise RegistryError(
            f"the registry {shown} has schema version {found}, newer than this "
            f"gatekeeper's ({SCHEMA_VERSION}): upgrade gatekeeper on this host"
        )


def migrate(cur: psycopg.Cursor[Any], shown: str) -> None:
    """Bring the database to SCHEMA_VERSION; call inside a transaction."""
    # Two servers starting at once: the second waits here until the first committed, then
    # finds the schema current. Released with the transaction.
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    found = version(cur)
    refuse_newer(found, shown)
    if found != SCHEMA_VERSION:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS gatekeeper_schema ("
            "id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)"
        )
        for step in STEPS[found:]:
            cur.execute(step.encode())
        cur.execute(
            "INSERT INTO gatekeeper_schema (id, version) VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (SCHEMA_VERSION,),
        )
    cur.execute(change_keys_function().encode())


def check_version(cur: psycopg.Cursor[Any], shown: str) -> None:
    """For read-only use: the database holds a registry this code understands."""
    found = version(cur)
    if found == 0:
        raise RegistryError(f"{shown} holds no gatekeeper registry (start a server on it first)")
    refuse_newer(found, shown)
