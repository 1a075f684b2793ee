"""The firewall applies on a system without /etc/protocols (Talos, a minbase image).

nftables resolves protocol names through /etc/protocols; where it is missing it refused the
whole ruleset ("Could not resolve protocol name"), and block mode never came into force. Here
/etc/protocols is hidden in a private mount namespace (the host's file is untouched) and a
block-mode ruleset with ICMP, ICMPv6, TCP and UDP rules is applied in a throwaway network
namespace, then listed back as the same view.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, nftables)")

POLICY = """\
apiVersion: v1alpha1
kind: NetworkDefaultActionConfig
ingress: block
---
apiVersion: v1alpha1
kind: NetworkRuleConfig
name: ssh
portSelector: {ports: [22], protocol: tcp}
ingress: [{subnet: 10.0.0.0/8}]
---
apiVersion: v1alpha1
kind: NetworkRuleConfig
name: dns
portSelector: {ports: [53], protocol: udp}
ingress: [{subnet: fd00::/8}]
"""

APPLY = textwrap.dedent(
    """
    import json, os, sys
    from gatekeeper.firewall import listing, render
    from gatekeeper.firewall.apply import Nftables, FirewallApplyError
    from gatekeeper.firewall.documents import parse_policy_text
    from gatekeeper.firewall.policy import LinkState
    from gatekeeper.firewall.ruleset import build_ruleset

    ruleset = build_ruleset(
        parse_policy_text(sys.stdin.read(), "test"), LinkState(wireguard_ports=(51820,))
    )
    nft = Nftables()
    try:
        nft.apply(render.replace_commands(ruleset))
    except FirewallApplyError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        raise SystemExit(0)
    live = listing.table_view(nft.list_table() or []).lines()
    want = listing.table_view(render.table_objects(ruleset)).lines()
    size = os.path.getsize("/etc/protocols")
    print(json.dumps({"ok": True, "same": live == want, "protocols": size}))
    """
)


def test_block_mode_applies_without_etc_protocols() -> None:
    ns = f"gk-noproto-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        script = f'mount --bind /dev/null /etc/protocols && exec ip netns exec {ns} "$0" -c "$1"'
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
             sys.executable, APPLY],
            input=POLICY, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert answer["ok"], answer.get("error")
    assert answer["protocols"] == 0  # it really ran without /etc/protocols
    assert answer["same"]
