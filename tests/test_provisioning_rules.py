"""The provisioning rules as a pure decision: no root, no network, no store, no device."""

from __future__ import annotations

import ipaddress

import pytest

from gatekeeper.server.provision_rules import (
    DUPLICATE,
    KEY_ELSEWHERE,
    MAX_FIELD,
    Checked,
    Code,
    Facts,
    Plan,
    ProvisionInput,
    Rejected,
    Rules,
    Session,
    check_request,
    decide,
)
from gatekeeper.server.registry import MachineRecord, machine_key
from gatekeeper.server.tokens import Admission, TokenDenied, TokenState
from gatekeeper.tunnel.peers import TunnelMode
from gatekeeper.wireguard.keys import PrivateKey

UUID = "4c4c4544-0042-3510-8052-b4c04f4d3532"
KEY = PrivateKey.generate().public_key().base64()
OTHER_KEY = PrivateKey.generate().public_key().base64()
OPEN = Admission(token_id=None, label="none (open server)")
ADDRESS = ipaddress.IPv6Address("fdae:41e4:649b:9303::1234")
FREE = ipaddress.IPv6Address("fdae:41e4:649b:9303::5678")
PEER = "ipv6:[2001:db8::7]:40000"
HERE = ipaddress.ip_address("2001:db8::7")
ELSEWHERE = ipaddress.ip_address("2001:db8::99")


def request(**changes: object) -> ProvisionInput:
    fields: dict[str, object] = {"node_uuid": UUID, "node_public_key": KEY, "peer": PEER}
    fields.update(changes)
    return ProvisionInput(**fields)  # type: ignore[arg-type]


def record(
    key: str = KEY, *, uuid: str = UUID, unique: str | None = None, **changes: object
) -> MachineRecord:
    fields: dict[str, object] = {
        "machine_key": machine_key(uuid, unique),
        "node_uuid": uuid,
        "address": ADDRESS,
        "public_key": key,
        "endpoint": "[2001:db8::7]:51821",
        "created": 100.0,
    }
    fields.update(changes)
    return MachineRecord(**fields)  # type: ignore[arg-type]


def checked(req: ProvisionInput, admission: Admission | TokenDenied = OPEN) -> Checked:
    result = check_request(req, admission)
    assert isinstance(result, Checked), result
    return result


def refused(result: object, code: Code, text: str) -> None:
    assert isinstance(result, Rejected), result
    assert result.code is code
    assert text in result.message


def run(
    req: ProvisionInput, facts: Facts, admission: Admission = OPEN, **rules: object
) -> Plan | Rejected:
    return decide(req, checked(req, admission), facts, Rules(**rules), 500.0)  # type: ignore[arg-type]


# Request-only refusals.


def test_token_denied_comes_first() -> None:
    # Even with a broken key: an unauthenticated caller learns nothing about its input.
    result = check_request(request(node_public_key="x"), TokenDenied("invalid join token"))
    refused(result, Code.PERMISSION_DENIED, "invalid join token")


@pytest.mark.parametrize("key", ["", "not base64!", "AAAA"])
def test_bad_key(key: str) -> None:
    refused(check_request(request(node_public_key=key), OPEN), Code.INVALID_ARGUMENT, "key")


def test_low_order_key() -> None:
    zero = "A" * 43 + "="
    refused(check_request(request(node_public_key=zero), OPEN), Code.INVALID_ARGUMENT, "low-order")


def _all_zero_secret(raw: bytes) -> bool:
    """The ground truth is_low_order stands for: X25519 (OpenSSL, through cryptography)
    refuses an exchange whose shared secret is all zero."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    probe = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    try:
        probe.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return True
    return False


def test_low_order_table_matches_a_real_exchange() -> None:
    import secrets

    from gatekeeper.server.identity import _LOW_ORDER, is_low_order
    from gatekeeper.wireguard.keys import PublicKey

    p = 2**255 - 19
    near = [*range(0, 300), *range(p - 300, 2**255)]
    candidates = {(u | top).to_bytes(32, "little") for u in near for top in (0, 1 << 255)} | set(
        _LOW_ORDER
    )
    candidates |= {secrets.token_bytes(32) for _ in range(300)}
    wrong = [
        raw.hex() for raw in candidates if is_low_order(PublicKey(raw)) != _all_zero_secret(raw)
    ]
    assert not wrong, wrong
    assert sum(_all_zero_secret(raw) for raw in candidates) == len(_LOW_ORDER) == 14


@pytest.mark.parametrize(
    ("uuid", "text"),
    [("", "node_uuid is required"), ("machine-1", "is not a UUID"), (UUID + "0", "not a UUID")],
)
def test_bad_uuid(uuid: str, text: str) -> None:
    refused(check_request(request(node_uuid=uuid), OPEN), Code.INVALID_ARGUMENT, text)


def test_uuid_is_shortened_in_the_message() -> None:
    result = check_request(request(node_uuid="z" * 5000), OPEN)
    assert isinstance(result, Rejected)
    assert len(result.message) < 200


@pytest.mark.parametrize("name", ["unique_token", "talos_version"])
def test_oversized_fields(name: str) -> None:
    result = check_request(request(**{name: "v" * (MAX_FIELD + 1)}), OPEN)
    refused(result, Code.INVALID_ARGUMENT, f"longer than {MAX_FIELD} bytes")
    assert isinstance(check_request(request(**{name: "v" * MAX_FIELD}), OPEN), Checked)


def test_control_characters_in_version() -> None:
    result = check_request(request(talos_version="v1.7\x1b[2J"), OPEN)
    refused(result, Code.INVALID_ARGUMENT, "control characters")


def test_machine_key_follows_uuid_case_and_unique_token() -> None:
    a = checked(request(node_uuid=UUID.upper(), unique_token="u1"))
    assert a.machine_key == machine_key(UUID, "u1")
    assert checked(request(unique_token="u2")).machine_key != a.machine_key


# Store-dependent refusals.


def test_key_held_by_another_identity_is_refused() -> None:
    holder = record(uuid="00000000-0000-0000-0000-000000000001")
    result = run(request(), Facts(existing=None, holder=holder, free_address=FREE))
    refused(result, Code.INVALID_ARGUMENT, KEY_ELSEWHERE)
    assert isinstance(result, Rejected) and result.audit["conflict_with"] == str(ADDRESS)


def test_key_of_same_uuid_moves_only_from_where_it_is_connected() -> None:
    # The machine's unique token changed: same UUID, same key, another machine key.
    holder = record(unique="old")
    req = request(unique_token="new")
    for session in (Session(), Session(live=True, host=ELSEWHERE), Session(live=False, host=HERE)):
        result = run(req, Facts(existing=None, holder=holder, holder_session=session))
        refused(result, Code.INVALID_ARGUMENT, KEY_ELSEWHERE)
    plan = run(
        req,
        Facts(
            existing=None,
            holder=holder,
            holder_session=Session(live=True, host=HERE),
            free_address=FREE,
        ),
    )
    assert isinstance(plan, Plan)
    assert plan.replaces == holder
    assert plan.record.machine_key == machine_key(UUID, "new")


def test_clone_of_a_connected_machine_is_refused_and_noted() -> None:
    existing = record(OTHER_KEY)
    facts = Facts(existing=existing, holder=None, existing_session=Session(True, ELSEWHERE))
    result = run(request(), facts)
    refused(result, Code.ALREADY_EXISTS, DUPLICATE)
    assert isinstance(result, Rejected) and result.conflict is not None
    assert result.conflict.machine_key == existing.machine_key
    assert result.conflict.source == str(HERE)
    assert result.conflict.connected_from == ELSEWHERE


@pytest.mark.parametrize("session", [Session(), Session(True, HERE)])
def test_restart_with_new_key_replaces_the_old(session: Session) -> None:
    # Its old session died, or the request comes from where that session is.
    existing = record(OTHER_KEY, join_token_id="t1", provisions=3)
    plan = run(request(), Facts(existing=existing, holder=None, existing_session=session))
    assert isinstance(plan, Plan)
    assert plan.record.address == ADDRESS
    assert plan.record.public_key == KEY
    assert plan.previous == existing
    assert plan.record.created == 100.0
    assert plan.record.join_token_id == "t1"


@pytest.mark.parametrize("state", [TokenState.EXPIRED, TokenState.USED_UP])
def test_exhausted_token_admits_no_new_machine(state: TokenState) -> None:
    admission = Admission(token_id="t1", label="t1", refusal=state)
    result = run(request(), Facts(existing=None, holder=None, free_address=FREE), admission)
    refused(result, Code.PERMISSION_DENIED, f"join token {state.value}")
    # ...nor a machine that joined with another token...
    other = record(join_token_id="t2")
    result = run(request(), Facts(existing=other, holder=None), admission)
    refused(result, Code.PERMISSION_DENIED, "join token")
    # ...but lets a machine that joined with it back in.
    back = run(request(), Facts(existing=record(join_token_id="t1"), holder=None), admission)
    assert isinstance(back, Plan)


def test_address_space_exhausted() -> None:
    result = run(request(), Facts(existing=None, holder=None, free_address=None))
    refused(result, Code.RESOURCE_EXHAUSTED, "no free overlay address")


# Successes.


def test_new_machine() -> None:
    admission = Admission(token_id="t1", label="t1")
    req = request(talos_version="v1.7.0", unique_token="u")
    plan = run(req, Facts(existing=None, holder=None, free_address=FREE), admission)
    assert isinstance(plan, Plan)
    assert plan.record.address == FREE
    assert plan.record.created == 500.0
    assert plan.record.join_token_id == "t1"
    assert plan.token_id == "t1"
    assert plan.record.endpoint is None
    assert plan.record.talos_version == "v1.7.0"
    assert plan.record.remote_address == "[2001:db8::7]:40000"
    assert plan.previous is None and plan.replaces is None


def test_same_machine_again_keeps_address_and_endpoint() -> None:
    existing = record()
    plan = run(request(), Facts(existing=existing, holder=existing, free_address=FREE))
    assert isinstance(plan, Plan)
    assert plan.record.address == ADDRESS  # never the freshly drawn one
    assert plan.record.endpoint == existing.endpoint
    assert plan.replaces is None


@pytest.mark.parametrize(
    ("mode", "wants", "tunnel"),
    [
        (TunnelMode.OFF, True, False),
        (TunnelMode.ALLOW, True, True),
        (TunnelMode.ALLOW, False, False),
        (TunnelMode.ALWAYS, False, True),
    ],
)
def test_tunnel_mode_decides(mode: TunnelMode, wants: bool, tunnel: bool) -> None:
    existing = record()
    plan = run(request(wants_tunnel=wants), Facts(existing, existing), tunnel_mode=mode)
    assert isinstance(plan, Plan)
    assert plan.record.tunnel is tunnel


def test_tunnel_machine_keeps_no_endpoint() -> None:
    # Its device endpoint was a relay socket of the server process: worthless elsewhere.
    existing = record(tunnel=True)
    plan = run(request(), Facts(existing=existing, holder=existing))
    assert isinstance(plan, Plan)
    assert plan.record.endpoint is None


def test_the_answering_instance_becomes_the_owner() -> None:
    # A new machine, and one that was owned by another instance (a take-over, or it moved).
    new = run(request(), Facts(existing=None, holder=None, free_address=FREE), instance="srv2")
    assert isinstance(new, Plan) and new.record.owner == "srv2"
    moved = run(
        request(),
        Facts(existing=record(KEY, owner="srv1"), holder=None),
        instance="srv2",
    )
    assert isinstance(moved, Plan) and moved.record.owner == "srv2"
