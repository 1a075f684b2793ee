"""The desired ruleset, its JSON, its listing and `explain`, without the kernel."""

from __future__ import annotations

import ipaddress
import textwrap
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatekeeper.firewall import listing, render
from gatekeeper.firewall.documents import FirewallDocumentError, parse_policy_text
from gatekeeper.firewall.explain import Explanation, Packet, PacketError, explain
from gatekeeper.firewall.policy import LinkState
from gatekeeper.firewall.ruleset import (
    INGRESS_CHAIN,
    PREROUTING_CHAIN,
    Family,
    Verdict,
    build_ruleset,
    source_networks,
)

POLICY = textwrap.dedent(
    """\
    apiVersion: v1alpha1
    kind: NetworkDefaultActionConfig
    ingress: {mode}
    ---
    apiVersion: v1alpha1
    kind: NetworkRuleConfig
    name: web
    portSelector:
      ports: [8080, "9000-9001"]
      protocol: tcp
    ingress:
      - subnet: 10.0.0.0/8
        except: 10.1.0.0/16
      - subnet: fd00::/64
    """
)
LINK = LinkState(wireguard_ports=(51820,))


def _explain(
    mode: str, iif: str, src: str, proto: str, dport: int | None = None, state: str = "new"
) -> Explanation:
    ruleset = build_ruleset(parse_policy_text(POLICY.format(mode=mode)), LINK)
    return explain(ruleset, Packet.make(iif, src, proto, dport, state))


def test_chains_follow_the_spec_shape() -> None:
    ruleset = build_ruleset(parse_policy_text(POLICY.format(mode="block")), LINK)
    ingress = ruleset.chain(INGRESS_CHAIN)
    pre = ruleset.chain(PREROUTING_CHAIN)
    assert (ingress.hook, ingress.priority, ingress.policy) == ("input", -140, Verdict.DROP)
    assert (pre.hook, pre.priority, pre.policy) == ("prerouting", -110, Verdict.ACCEPT)
    assert ingress.rules[0].iifnames == ("lo", "siderolink", "siderolinktun")
    assert pre.rules[0].iifnames == ("lo", "siderolink", "siderolinktun")
    web = [r for r in ingress.rules if "web" in r.comment]
    assert [r.family for r in web] == [Family.IPV4, Family.IPV6]
    assert all(r.saddr_dport for r in web)
    wg = [r for r in ingress.rules + pre.rules if r.dports and r.dports[0].lo == 51820]
    assert len(wg) == 2, "the WireGuard port is admitted in both chains"
    accept_mode = build_ruleset(parse_policy_text(POLICY.format(mode="accept")), LINK)
    assert accept_mode.chain(INGRESS_CHAIN).policy is Verdict.ACCEPT


def test_except_is_carved_out_of_the_subnets() -> None:
    nets = source_networks(
        [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/64")],
        [ipaddress.ip_network("10.1.0.0/16")],
        Family.IPV4,
    )
    covered = {int(a) for n in nets for a in (n.network_address, n.broadcast_address)}
    assert ipaddress.ip_address("10.1.2.3") not in nets[0]
    assert all(ipaddress.ip_address("10.1.2.3") not in n for n in nets)
    assert any(ipaddress.ip_address("10.2.0.1") in n for n in nets)
    assert min(covered) == int(ipaddress.ip_address("10.0.0.0"))
    assert max(covered) == int(ipaddress.ip_address("10.255.255.255"))


@pytest.mark.parametrize(
    ("mode", "iif", "src", "proto", "dport", "state", "verdict", "comment"),
    [
        ("block", "eth0", "10.2.3.4", "tcp", 8080, "new", "accept", 'NetworkRuleConfig "web"'),
        ("block", "eth0", "10.1.3.4", "tcp", 8080, "new", "drop", "new TCP"),
        ("block", "eth0", "192.0.2.1", "tcp", 8080, "new", "drop", "new TCP"),
        ("block", "eth0", "10.2.3.4", "tcp", 22, "new", "drop", "new TCP"),
        ("block", "eth0", "fd00::5", "tcp", 9001, "new", "accept", 'NetworkRuleConfig "web"'),
        ("block", "eth0", "192.0.2.1", "udp", 51820, "new", "accept", "wireguard"),
        ("block", "eth0", "192.0.2.1", "udp", 53, "new", "drop", "new UDP"),
        ("block", "siderolink", "192.0.2.1", "tcp", 22, "new", "accept", "trusted"),
        ("block", "siderolinktun", "fd00::1", "udp", 53, "new", "accept", "trusted"),
        ("block", "eth0", "192.0.2.1", "tcp", 22, "established", "accept", "established"),
        ("block", "eth0", "192.0.2.1", "tcp", 22, "invalid", "drop", "invalid"),
        ("block", "eth0", "192.0.2.1", "icmp", None, "new", "accept", "ICMP rate limit"),
        ("accept", "eth0", "192.0.2.1", "tcp", 8080, "new", "drop", 'NetworkRuleConfig "web"'),
        ("accept", "eth0", "2001:db8::1", "tcp", 8080, "new", "drop", 'NetworkRuleConfig "web"'),
        ("accept", "eth0", "192.0.2.1", "tcp", 22, "new", "accept", ""),
        ("accept", "eth0", "10.5.0.1", "tcp", 8080, "new", "accept", ""),
    ],
)
def test_explain_verdicts(
    mode: str,
    iif: str,
    src: str,
    proto: str,
    dport: int | None,
    state: str,
    verdict: str,
    comment: str,
) -> None:
    result = _explain(mode, iif, src, proto, dport, state)
    assert result.verdict.value == verdict
    assert comment in result.deciding.comment or comment in result.deciding.note
    assert result.text().splitlines()[1] == f"verdict: {verdict.upper()}"


def test_explain_rejects_inconsistent_packets() -> None:
    with pytest.raises(PacketError, match="icmp needs an IPv4"):
        Packet.make("eth0", "fd00::1", "icmp")
    with pytest.raises(PacketError, match="--dport is required for tcp"):
        Packet.make("eth0", "10.0.0.1", "tcp")
    with pytest.raises(PacketError, match="not an IP address"):
        Packet.make("eth0", "nope", "udp", 53)


def test_listing_normalises_like_the_kernel() -> None:
    # The kernel lists one-element sets as values, "in" for ct state, ranges for merged
    # prefixes, and elements in its own order; the canonical text must not care.
    ours: list[dict[str, Any]] = [
        {"match": {"op": "==", "left": {"ct": {"key": "state"}}, "right": {"set": ["invalid"]}}},
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {
                    "set": [
                        {"prefix": {"addr": "10.1.0.0", "len": 16}},
                        {"prefix": {"addr": "10.0.0.0", "len": 16}},
                    ]
                },
            }
        },
        {"counter": {"packets": 0, "bytes": 0}},
        {"drop": None},
    ]
    kernel: list[dict[str, Any]] = [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": "10.0.0.0", "len": 15}},
            }
        },
        {"counter": {"packets": 7, "bytes": 420}},
        {"drop": None},
    ]
    text, packets, _ = listing.expr_text(kernel)
    assert listing.expr_text(ours)[0] == text == "ct state invalid ip saddr 10.0.0.0/15 drop"
    assert packets == 7


def test_show_diff_is_empty_for_the_rendered_table_and_names_a_hand_edit() -> None:
    from gatekeeper.firewall.show import link_from_live, show_report

    ruleset = build_ruleset(parse_policy_text(POLICY.format(mode="block")), LINK)
    objects = render.table_objects(ruleset)
    assert show_report(ruleset, objects).in_sync
    assert link_from_live(objects) == LinkState(wireguard_ports=(51820,))
    edited = [o for o in objects if "web" not in o.get("rule", {}).get("comment", "")]
    report = show_report(ruleset, edited)
    assert not report.in_sync
    assert any(line.startswith("-") and "tcp IPv4: web" in line for line in report.diff)
    assert "DIFF" in report.text()


# Hypothesis: arbitrary documents never crash validation or rendering; they either parse
# into a policy that renders, or fail with FirewallDocumentError.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "tcp",
            "udp",
            "icmp",
            "icmpv6",
            "block",
            "accept",
            "10.0.0.0/8",
            "::/0",
            "fd00::/7",
            "0.0.0.0/0",
            "1-2",
            "65535-0",
            "80",
            "v1alpha1",
        ]
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_port = st.one_of(
    st.integers(min_value=-5, max_value=70000),
    st.builds(lambda a, b: f"{a}-{b}", st.integers(-1, 70000), st.integers(-1, 70000)),
    st.text(max_size=6),
)
_net = st.one_of(
    st.builds(
        lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}",
        st.integers(0, 2**32 - 1),
        st.integers(0, 34),
    ),
    st.builds(
        lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}",
        st.integers(0, 2**128 - 1),
        st.integers(0, 130),
    ),
    _scalars,
)
_rule_doc = st.fixed_dictionaries(
    {"apiVersion": st.just("v1alpha1"), "kind": st.just("NetworkRuleConfig")},
    optional={
        "name": st.one_of(st.text(max_size=10), _scalars),
        "portSelector": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "ports": st.one_of(st.lists(_port, max_size=5), _values),
                    "protocol": st.one_of(
                        st.sampled_from(["tcp", "udp", "icmp", "icmpv6"]), _scalars
                    ),
                },
            ),
            _values,
        ),
        "ingress": st.one_of(
            st.lists(
                st.fixed_dictionaries({}, optional={"subnet": _net, "except": _net}), max_size=4
            ),
            _values,
        ),
    },
)
_action_doc = st.fixed_dictionaries(
    {"apiVersion": st.just("v1alpha1"), "kind": st.just("NetworkDefaultActionConfig")},
    optional={"ingress": st.one_of(st.sampled_from(["accept", "block"]), _scalars)},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(_rule_doc, _action_doc, _values), max_size=4),
    st.lists(st.integers(1, 65535), max_size=2),
)
def test_no_document_crashes_validation_or_rendering(docs: list[object], ports: list[int]) -> None:
    import yaml

    text = yaml.safe_dump_all(docs)
    try:
        policy = parse_policy_text(text, "fuzz.yaml")
    except FirewallDocumentError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.yaml")
        return
    ruleset = build_ruleset(policy, LinkState(wireguard_ports=tuple(ports)))
    commands = render.replace_commands(ruleset)
    assert commands["nftables"][1] == {"add": {"table": {"family": "inet", "name": "gatekeeper"}}}
    view = listing.table_view(render.table_objects(ruleset))
    assert view.lines()
    for chain in ruleset.chains:
        for rule in chain.rules:
            assert len(rule.comment.encode()) <= 127
    explain(ruleset, Packet.make("eth0", "10.0.0.1", "tcp", 80))


def _range_for(bits: int) -> st.SearchStrategy[tuple[int, int]]:
    # Half the examples are whole CIDR blocks (the fast path), half arbitrary ranges.
    block = st.integers(0, bits).flatmap(
        lambda plen: st.integers(0, (1 << plen) - 1).map(
            lambda n: (n << (bits - plen), ((n + 1) << (bits - plen)) - 1)
        )
    )
    pair = st.tuples(st.integers(0, (1 << bits) - 1), st.integers(0, (1 << bits) - 1))
    return st.one_of(block, pair.map(lambda p: (min(p), max(p))))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([Family.IPV4, Family.IPV6]).flatmap(
        lambda f: st.tuples(st.just(f), _range_for(32 if f is Family.IPV4 else 128))
    )
)
def test_rendered_sources_are_the_fewest_cidrs_of_the_range(
    case: tuple[Family, tuple[int, int]],
) -> None:
    from gatekeeper.firewall.ruleset import _networks

    family, (lo, hi) = case
    addr = ipaddress.IPv4Address if family is Family.IPV4 else ipaddress.IPv6Address
    assert _networks([(lo, hi)], family) == list(
        ipaddress.summarize_address_range(addr(lo), addr(hi))
    )
