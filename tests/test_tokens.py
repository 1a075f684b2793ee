"""Join tokens without a network: format, hashing, states, admission, the registry's counting."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest
from conftest import Opener
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.server.audit import AuditLog, read_audit
from gatekeeper.server.ratelimit import FailureLimiter, source_of
from gatekeeper.server.registry import MachineRecord, RegistrationLimit, TokenRefused, machine_key
from gatekeeper.server.sqlite_registry import SqliteRegistry
from gatekeeper.server.tokens import (
    TokenDenied,
    TokenPolicy,
    TokenRecord,
    TokenState,
    new_token,
    parse_duration,
    split_token,
)
from gatekeeper.wireguard.keys import PrivateKey


def policy(
    records: list[TokenRecord], fixed: str | None = None, now: float = 1000.0
) -> TokenPolicy:
    by_id = {r.token_id: r for r in records}
    return TokenPolicy(fixed, by_id.get, lambda: records, lambda: now)


def test_token_is_shown_once_and_stored_only_as_a_hash() -> None:
    text, record = new_token(name="rack 4", now=1000.0, expires_in=60, max_uses=2)
    token_id, secret = text.split(".")
    assert record.token_id == token_id and secret not in repr(record)
    assert len(secret) >= 43 and record.secret_hash != secret
    assert (
        record.expires == 1060.0 and record.max_uses == 2 and record.label == f"{token_id} (rack 4)"
    )
    assert split_token(text) == (token_id, secret)


def test_states() -> None:
    _, r = new_token(name="", now=0.0, expires_in=10, max_uses=1)
    assert r.state(5) is TokenState.ACTIVE
    assert r.state(10) is TokenState.EXPIRED
    assert TokenRecord(**{**r.__dict__, "uses": 1}).state(5) is TokenState.USED_UP
    assert TokenRecord(**{**r.__dict__, "revoked": 3.0}).state(5) is TokenState.REVOKED


def test_admission_rules() -> None:
    text, active = new_token(name="a", now=0.0)
    text_exp, expired = new_token(name="e", now=0.0, expires_in=10)
    text_rev, revoked = new_token(name="r", now=0.0)
    revoked = TokenRecord(**{**revoked.__dict__, "revoked": 1.0})
    p = policy([active, expired, revoked], fixed="the-fixed-token", now=100.0)
    assert p.admit(text).token_id == active.token_id and p.admit(text).refusal is None
    assert p.admit("the-fixed-token").label == "fixed"
    admitted = p.admit(text_exp)
    assert admitted.refusal is TokenState.EXPIRED
    assert not admitted.allows_existing(None) and not admitted.allows_existing(active.token_id)
    assert admitted.allows_existing(expired.token_id)
    with pytest.raises(TokenDenied, match="revoked"):
        p.admit(text_rev)
    # Right id, wrong secret; wrong everything; nothing; oversized: all the same refusal.
    for bad in (f"{active.token_id}.wrong", "garbage", None, "", "x" * 10_000):
        with pytest.raises(TokenDenied, match=r"^invalid join token$"):
            p.admit(bad)
    assert p.describe(text) == active.label and p.describe(f"{active.token_id}.no") == "unknown"
    assert p.describe("the-fixed-token") == "fixed" and p.describe(None) == "none"


def test_open_only_without_any_token() -> None:
    assert policy([]).admit("whatever").label.startswith("none")
    _, revoked = new_token(name="", now=0.0)
    revoked = TokenRecord(**{**revoked.__dict__, "revoked": 1.0})
    with pytest.raises(TokenDenied):
        policy([revoked]).admit("whatever")


@given(st.text(max_size=300))
def test_describe_never_returns_the_presented_text(presented: str) -> None:
    _, record = new_token(name="n", now=0.0)
    label = policy([record], fixed="fixed-secret").describe(presented)
    assert label in ("none", "fixed", "unknown", record.label)


def test_durations() -> None:
    assert parse_duration("90") == 90 and parse_duration("15m") == 900
    assert parse_duration("12h") == 43200 and parse_duration("7d") == 604800
    for bad in ("", "m", "-5", "0", "abc", "inf"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _machine(uuid: str, n: int) -> MachineRecord:
    return MachineRecord(
        machine_key=machine_key(uuid, None),
        node_uuid=uuid,
        address=ipaddress.IPv6Address(f"fdae:41e4:649b:9303::{n:x}"),
        public_key=PrivateKey.generate().public_key().base64(),
    )


def test_registry_counts_uses_only_for_new_machines(backend: Opener) -> None:
    reg = backend()
    _, record = new_token(name="two", now=time.time(), max_uses=2)
    reg.add_token(record)
    a, b, c = _machine("a", 10), _machine("b", 11), _machine("c", 12)
    reg.claim(a, token_id=record.token_id)
    reg.claim(a, token_id=record.token_id)  # a re-provision does not count
    reg.claim(b, token_id=record.token_id)
    assert reg.token(record.token_id).uses == 2
    with pytest.raises(TokenRefused, match="used up"):
        reg.claim(c, token_id=record.token_id)
    assert reg.get(c.machine_key) is None
    assert reg.get(a.machine_key).join_token_id == record.token_id
    assert reg.revoke_token(record.token_id, time.time())
    assert not reg.revoke_token(record.token_id, time.time())
    with pytest.raises(TokenRefused, match="revoked"):
        reg.claim(_machine("d", 13), token_id=record.token_id)


def test_registry_registration_limit(backend: Opener) -> None:
    reg = backend()
    reg.claim(_machine("a", 10), max_machines=2)
    reg.claim(_machine("b", 11), max_machines=2)
    reg.claim(_machine("b", 11), max_machines=2)  # known machines always come back
    with pytest.raises(RegistrationLimit):
        reg.claim(_machine("c", 12), max_machines=2)
    assert len(reg.machines()) == 2


def test_registry_from_before_tokens_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    db.executescript(
        "CREATE TABLE machines (machine_key TEXT PRIMARY KEY, node_uuid TEXT NOT NULL, "
        "address TEXT NOT NULL UNIQUE, public_key TEXT NOT NULL, endpoint TEXT, "
        "tunnel INTEGER NOT NULL DEFAULT 0, talos_version TEXT NOT NULL DEFAULT '', "
        "created REAL NOT NULL, updated REAL NOT NULL);"
        "INSERT INTO machines VALUES ('k', 'u', 'fdae::5', 'pk', NULL, 0, '', 1, 1);"
    )
    db.commit()
    db.close()
    reg = SqliteRegistry(tmp_path)
    (old,) = reg.machines()
    assert old.node_uuid == "u" and old.join_token_id is None and reg.tokens() == []


def test_limiter_blocks_a_flooding_source_and_forgives_it() -> None:
    now = [0.0]
    lim = FailureLimiter(burst=3, per_second=1.0, max_sources=2, clock=lambda: now[0])
    src = source_of("ipv6:[fd00::1234]:5555")
    assert src == source_of("ipv6:[fd00::99]:1") == "fd00::/64"
    for _ in range(3):
        assert not lim.blocked(src)
        lim.failure(src)
    assert lim.blocked(src) and not lim.blocked("other")
    now[0] += 1.0
    assert not lim.blocked(src)
    lim.failure("x")
    lim.failure("y")
    assert len(lim) == 2  # bounded table
    assert source_of("ipv6:%5Bfd00::1234%5D:5555") == "fd00::/64"  # as gRPC really writes it
    assert source_of("ipv4:10.0.0.7:80") == "10.0.0.7"
    assert source_of("ipv6:[::ffff:10.0.0.7]:80") == "10.0.0.7"


def test_audit_lines_rotate_and_stay_bounded(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=2000, keep=2)
    for i in range(100):
        audit.write(1.5e9 + i, "provision", "denied", **{"from": "ipv6:[fd00::1]:1"}, n=i)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size < 2200 for p in tmp_path.iterdir())
    last = read_audit(tmp_path / "audit.jsonl")[-1]
    assert last["n"] == 99 and str(last["time"]).endswith("Z") and last["outcome"] == "denied"
