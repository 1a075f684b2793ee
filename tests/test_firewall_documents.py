"""Firewall documents: what an operator writes, and the one-line errors they get back."""

from __future__ import annotations

import ipaddress
import textwrap
import time
from pathlib import Path

import pytest

from gatekeeper.firewall.documents import FirewallDocumentError, load_policy, parse_policy_text
from gatekeeper.firewall.policy import DefaultAction, PortRange, Protocol


def _rule(body: str, name: str = "web") -> str:
    head = (
        f"apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: {name}\n"
        if name
        else ("apiVersion: v1alpha1\nkind: NetworkRuleConfig\n")
    )
    return head + textwrap.dedent(body)


def _error(text: str) -> str:
    with pytest.raises(FirewallDocumentError) as info:
        parse_policy_text(text, "rules.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_talos_example_parses() -> None:
    policy = parse_policy_text(
        textwrap.dedent(
            """\
            apiVersion: v1alpha1
            kind: SideroLinkConfig
            apiUrl: https://siderolink.example/?jointoken=secret
            ---
            apiVersion: v1alpha1
            kind: NetworkDefaultActionConfig
            ingress: block
            ---
            apiVersion: v1alpha1
            kind: NetworkRuleConfig
            name: kubelet-ingress
            portSelector:
              ports: [10250, "30000-32767"]
              protocol: tcp
            ingress:
              - subnet: 10.0.0.0/8
                except: 10.1.0.0/16
              - subnet: 2001:db8::/32
            """
        )
    )
    assert policy.default_action is DefaultAction.BLOCK
    (rule,) = policy.rules
    assert rule.name == "kubelet-ingress"
    assert rule.protocol is Protocol.TCP
    assert rule.ports == (PortRange(10250, 10250), PortRange(30000, 32767))
    assert rule.subnets == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert rule.excepts == (ipaddress.ip_network("10.1.0.0/16"),)


def test_default_action_defaults_to_accept() -> None:
    assert parse_policy_text("").default_action is DefaultAction.ACCEPT
    doc = "apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\n"
    assert parse_policy_text(doc).default_action is DefaultAction.ACCEPT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            _rule("portSelector: {ports: [80], protocol: tcp}\n", name=""),
            "rules.yaml document 1 (NetworkRuleConfig): name: name is required",
        ),
        (
            _rule("portSelector: {protocol: tcp}\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): portSelector.ports: '
            "portSelector.ports is required",
        ),
        (
            _rule("portSelector: {ports: [80, 80-79], protocol: tcp}\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): portSelector.ports: '
            "invalid port range: 80-79",
        ),
        (
            _rule("portSelector: {ports: ['80-90', '85-100'], protocol: tcp}\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): portSelector.ports: '
            "invalid port range: 85-100, overlaps with 80-90",
        ),
        (
            _rule("portSelector: {ports: [80, 80], protocol: tcp}\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): portSelector.ports: '
            "invalid port range: 80-80, overlaps with 80-80",
        ),
        (
            _rule("portSelector: {ports: [70000], protocol: tcp}\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): portSelector.ports[0]: '
            'invalid port range: "70000"',
        ),
        (
            _rule("portSelector: {ports: [80, 'http'], protocol: tcp}\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): portSelector.ports[1]: '
            'invalid port range: "http"',
        ),
        (
            _rule("portSelector: {ports: [80], protocol: sctp}\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): portSelector.protocol: '
            "sctp does not belong to Protocol values",
        ),
        (
            _rule("portSelector: {ports: [80], protocol: tcp}\ningress: [{subnet: 10.0.0.0/33}]\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): ingress[0].subnet: '
            "invalid subnet: 10.0.0.0/33",
        ),
        (
            _rule("portSelector: {ports: [80], protocol: tcp}\ningress: [{except: 10.0.0.0/8}]\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): ingress[0].subnet: '
            "invalid subnet: invalid Prefix",
        ),
        (
            _rule(
                "portSelector: {ports: [80], protocol: tcp}\n"
                "ingress: [{subnet: 10.0.0.0/8, except: nope}]\n"
            ),
            'rules.yaml document 1 (NetworkRuleConfig "web"): ingress[0].except: '
            "invalid except: nope",
        ),
        (
            _rule("portSelector: {ports: [80], protocol: tcp, prots: 1}\n"),
            'rules.yaml document 1 (NetworkRuleConfig "web"): portSelector.prots: '
            'unknown field "prots"',
        ),
        (
            "apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: drop\n",
            "rules.yaml document 1 (NetworkDefaultActionConfig): ingress: "
            "drop does not belong to DefaultAction values",
        ),
        (
            "apiVersion: v1\nkind: NetworkDefaultActionConfig\ningress: block\n",
            "rules.yaml document 1 (NetworkDefaultActionConfig): apiVersion must be v1alpha1",
        ),
    ],
)
def test_bad_documents_get_talos_messages(text: str, expected: str) -> None:
    assert _error(text) == expected


def test_error_names_the_document_number() -> None:
    good = _rule("portSelector: {ports: [22], protocol: tcp}\n", name="ssh")
    bad = _rule("portSelector: {ports: [22], protocol: tcp}\ningress: [{subnet: x}]\n")
    message = _error(f"{good}---\n{bad}")
    assert message.startswith('rules.yaml document 2 (NetworkRuleConfig "web"): ingress[0].subnet')


def test_duplicates_are_rejected() -> None:
    rule = _rule("portSelector: {ports: [22], protocol: tcp}\n")
    assert "duplicate name, already defined in rules.yaml document 1" in _error(
        f"{rule}---\n{rule}"
    )
    action = "apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: block\n"
    assert "duplicate document" in _error(f"{action}---\n{action}")


def test_invalid_yaml_is_one_line() -> None:
    assert _error("kind: [unclosed\n").startswith("rules.yaml document 1: invalid YAML")


def test_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: block\n"
    )
    (tmp_path / "b.yml").write_text(_rule("portSelector: {ports: [22], protocol: tcp}\n"))
    (tmp_path / "notes.txt").write_text("not a document")
    policy = load_policy([tmp_path])
    assert policy.default_action is DefaultAction.BLOCK
    assert [r.name for r in policy.rules] == ["web"]
    with pytest.raises(FirewallDocumentError, match=r"missing.yaml: cannot read"):
        load_policy([tmp_path / "missing.yaml"])


def test_shipped_examples_are_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    policy = load_policy([root / "rules"])
    assert policy.default_action is DefaultAction.BLOCK
    assert {r.name for r in policy.rules} == {"kubelet-ingress", "ssh-admins"}
    packaged = load_policy([root / "gatekeeper" / "rules"])
    assert packaged.default_action is DefaultAction.ACCEPT


# --- hostile input: alias bombs, huge files, huge values --------------------------------------

# Nine levels of nine-fold aliases: 9**9 (387 million) strings once expanded, a few hundred
# bytes on disk (the 533-byte documents are of this shape).
_LAUGHS = (
    '&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *(f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
)
_BOMB_ANCHORS = "".join(f"x{i}: {level}\n" for i, level in enumerate(_LAUGHS))


def _bomb(field: str) -> str:
    doc = {
        "name": "name: *i\nportSelector: {ports: [22], protocol: tcp}\n",
        "ports": "name: web\nportSelector:\n  ports: *i\n  protocol: tcp\n",
    }[field]
    # Anchors are per document: they sit in extra fields (x0..x8) of the same document,
    # which the old reader built whole before it rejected them as unknown.
    return "apiVersion: v1alpha1\nkind: NetworkRuleConfig\n" + _BOMB_ANCHORS + doc


@pytest.mark.parametrize("field", ["name", "ports"])
def test_alias_bombs_are_refused_quickly(field: str) -> None:
    text = _bomb(field)
    assert len(text) < 1024
    started = time.monotonic()
    message = _error(text)
    elapsed = time.monotonic() - started
    assert message == (
        "rules.yaml document 1: invalid YAML: aliases expand to more than 1,000,000 nodes "
        "(an alias bomb?)"
    )
    assert elapsed < 5, f"took {elapsed:.1f} s"  # a hang detector, not a benchmark


def test_an_alias_inside_itself_is_refused() -> None:
    text = _rule("portSelector: {ports: &p [22, *p], protocol: tcp}\n")
    assert _error(text) == (
        "rules.yaml document 1: invalid YAML: an alias refers to a node that contains it"
    )


def test_a_moderate_expansion_still_parses() -> None:
    # Aliases are legal YAML: a shared subnet list used by two rules stays fine.
    text = (
        "apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: a\n"
        "portSelector: {ports: &ports [22, 80], protocol: tcp}\n"
        "ingress: &subnets [{subnet: 10.0.0.0/8}, {subnet: 'fd00::/8'}]\n"
    )
    policy = parse_policy_text(text, "rules.yaml")
    assert policy.rules[0].ports == (PortRange(22, 22), PortRange(80, 80))


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("portSelector: {ports: [22], protocol: tcp}\n", "name"),
        ("portSelector: {ports: [LONG], protocol: tcp}\n", "portSelector.ports[0]"),
        ("portSelector: {ports: [22], protocol: LONG}\n", "portSelector.protocol"),
        ("portSelector: {ports: [22], protocol: tcp}\ningress: [{subnet: LONG}]\n", "ingress"),
    ],
)
def test_large_values_are_shown_shortened(body: str, where: str) -> None:
    big_list = "[" + ", ".join(["x" * 100] * 5000) + "]"
    name = big_list if where == "name" else "web"
    message = _error(_rule(body.replace("LONG", big_list), name=name))
    assert where in message
    assert len(message) < 300, message


def test_oversized_files_are_refused_without_reading_them_whole(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("w") as f:
        f.write(_rule("portSelector: {ports: [22], protocol: tcp}\n"))
        f.write("# " + "x" * (20 * 1024 * 1024) + "\n")
    with pytest.raises(FirewallDocumentError) as info:
        load_policy([path])
    assert str(info.value) == f"{path}: file is larger than 1024 KiB"
    assert "x" * 10 not in _error("# " + "x" * (2 * 1024 * 1024))
