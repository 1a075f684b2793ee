"""Reading `nft -a monitor` trace lines (as nftables 1.0.6 prints them, recorded from a real
trace) into packets and the rules they passed, named by position as `explain` names them."""

from __future__ import annotations

from typing import Any

from gatekeeper.agent.status_file import with_path_history
from gatekeeper.firewall.trace import (
    READY_PREFIX,
    RuleNames,
    TraceAssembler,
    TraceFilter,
    TraceFilterError,
    parse_trace_line,
)

PACKET = (
    'iif "eth0" @ll,0,112 0x86dd ip6 saddr fd00:6b:1::1 ip6 daddr fd00:6b:1::101 ip6 dscp cs0 '
    "ip6 ecn not-ect ip6 hoplimit 64 ip6 flowlabel 1 ip6 nexthdr tcp ip6 length 40 "
    "tcp sport 40000 tcp dport 22 tcp flags == syn tcp window 64800 "
)
LINES = [
    "add table inet gatekeeper_trace # handle 7\n",
    f"trace id 0badcafe inet gatekeeper_trace mark packet: {PACKET}\n",
    "trace id 0badcafe inet gatekeeper_trace mark unknown rule handle 2 (verdict continue)\n",
    f"trace id 0badcafe inet gatekeeper prerouting packet: {PACKET}\n",
    "trace id 0badcafe inet gatekeeper prerouting rule ct state new meta l4proto tcp counter "
    'packets 0 bytes 0 drop comment "gatekeeper: new TCP" # handle 12 (verdict drop)\n',
    "trace id 00c0ffee inet gatekeeper prerouting policy accept \n",
    "trace id 00c0ffee inet gatekeeper ingress policy drop \n",
]
TABLE: list[dict[str, Any]] = [
    {"table": {"family": "inet", "name": "gatekeeper"}},
    {"chain": {"name": "prerouting", "hook": "prerouting", "prio": -110, "policy": "accept"}},
    {
        "rule": {
            "chain": "prerouting",
            "handle": 11,
            "comment": "gatekeeper: trusted interfaces",
            "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}},
                {"accept": None},
            ],
        }
    },
    {
        "rule": {
            "chain": "prerouting",
            "handle": 12,
            "comment": "gatekeeper: new TCP",
            "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                {"drop": None},
            ],
        }
    },
]


def test_lines_become_packets_with_their_path() -> None:
    assert LINES[0].startswith(READY_PREFIX)
    events = [e for e in map(parse_trace_line, LINES) if e is not None]
    # Only our table's events: not the marking table's, not the ruleset's.
    assert {e.table for e in events} == {"gatekeeper"}
    assembler = TraceAssembler(RuleNames(TABLE))
    done = [p for p in map(assembler.feed, events) if p is not None]
    (dropped, judged) = done
    assert dropped.trace_id == "0badcafe" and dropped.verdict == "drop"
    assert dropped.packet is not None and dropped.packet.text() == (
        "iif eth0 src fd00:6b:1::1 tcp dport 22"
    )
    assert [s.describe() for s in dropped.path] == [
        "prerouting rule 2 [gatekeeper: new TCP]: meta l4proto tcp drop"
    ]
    assert judged.packet is None and judged.verdict == "drop"
    assert [s.describe() for s in judged.path] == [
        "prerouting: no rule matched, chain policy accept",
        "ingress: no rule matched, chain policy drop",
    ]
    assert assembler.leftovers() == []


def test_filters_are_checked() -> None:
    for args, message in [
        ((None, None, None, 22), "--dport needs --proto tcp or --proto udp"),
        ((None, "10.0.0.1", "icmpv6", None), "--proto icmpv6 does not go with an IPv4 --src"),
        ((None, "nowhere", None, None), "--src: 'nowhere' is not an address or prefix"),
    ]:
        try:
            TraceFilter.make(*args)
        except TraceFilterError as exc:
            assert str(exc) == message
        else:
            raise AssertionError(f"{args} accepted")
    rule = TraceFilter.make("eth0", "fd00::/64", "tcp", 22).match_expr()
    assert [m["match"]["right"] for m in rule] == [
        "eth0",
        {"prefix": {"addr": "fd00::", "len": 64}},
        22,
    ]


def test_path_history_records_changes_only() -> None:
    up = {"updated": 10.0, "connected": True, "path": "udp", "endpoint": "[fd00::1]:51820"}
    first = with_path_history(up, None)
    same = with_path_history({**up, "updated": 12.0}, first)
    assert len(same["path_history"]) == 1
    tunnel = with_path_history(
        {**up, "updated": 20.0, "path": "tunnel", "path_reason": "no handshake over UDP"}, same
    )
    assert [(h["at"], h["path"], h["path_reason"]) for h in tunnel["path_history"]] == [
        (10.0, "udp", None),
        (20.0, "tunnel", "no handshake over UDP"),
    ]
    many = tunnel
    for n in range(30):
        many = with_path_history({**up, "updated": 100.0 + n, "connected": n % 2 == 0}, many)
    assert len(many["path_history"]) == 10 and many["path_history"][-1]["at"] == 129.0
