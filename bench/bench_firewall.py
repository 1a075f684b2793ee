"""Benchmark: 1000 NetworkRuleConfig documents rendered and applied in one transaction.

Run as root: `python bench/bench_firewall.py [--rules N]`. It creates its own network
namespace, applies inside it (re-running itself under `ip netns exec`), prints the figures and
deletes the namespace. Target: apply <= 0.5 s for 1000 rules.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time

TARGET_S = 0.5


def documents(n: int, mode: str = "block") -> str:
    docs = [f"apiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: {mode}\n"]
    for i in range(n):
        port = 10000 + i * 2
        docs.append(
            "apiVersion: v1alpha1\nkind: NetworkRuleConfig\n"
            f"name: rule-{i}\n"
            f'portSelector:\n  ports: [{port}, "{port + 20000}-{port + 20001}"]\n'
            f"  protocol: {'tcp' if i % 2 else 'udp'}\n"
            "ingress:\n"
            f"  - subnet: 10.{i // 256}.{i % 256}.0/24\n"
            f"    except: 10.{i // 256}.{i % 256}.128/26\n"
            f"  - subnet: fd00:{i:x}::/64\n"
        )
    return "---\n".join(docs)


def inside(n: int, mode: str) -> dict[str, float | int]:
    from gatekeeper.firewall import render
    from gatekeeper.firewall.apply import Nftables
    from gatekeeper.firewall.documents import parse_policy_text
    from gatekeeper.firewall.policy import LinkState
    from gatekeeper.firewall.ruleset import build_ruleset

    text = documents(n, mode)
    t0 = time.perf_counter()
    policy = parse_policy_text(text, "bench")
    t1 = time.perf_counter()
    ruleset = build_ruleset(policy, LinkState(wireguard_ports=(51820,)))
    commands = render.replace_commands(ruleset)
    t2 = time.perf_counter()
    nft = Nftables()
    nft.apply(commands)  # first apply: the table does not exist yet
    t3 = time.perf_counter()
    nft.apply(commands)  # replace: delete and rebuild in one transaction
    t4 = time.perf_counter()
    live = nft.list_table() or []
    return {
        "documents": len(policy.rules),
        "nft_rules": sum(1 for o in live if "rule" in o),
        "parse_s": t1 - t0,
        "render_s": t2 - t1,
        "apply_first_s": t3 - t2,
        "apply_replace_s": t4 - t3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--mode", choices=["block", "accept"], default="block")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args.rules, args.mode)))
        return 0
    if os.geteuid() != 0:
        print("bench_firewall: needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    ns = f"gkbench-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                __file__,
                "--inside",
                "--rules",
                str(args.rules),
                "--mode",
                args.mode,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if proc.returncode != 0:
            print(proc.stderr.strip(), file=sys.stderr)
            return 1
        r = json.loads(proc.stdout)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    worst = max(r["apply_first_s"], r["apply_replace_s"])
    print(
        f"documents:            {r['documents']} NetworkRuleConfig ({args.mode} mode, IPv4 + IPv6)"
    )
    print(f"nftables rules:       {r['nft_rules']}")
    print(f"parse + validate:     {r['parse_s'] * 1000:8.1f} ms")
    print(f"render:               {r['render_s'] * 1000:8.1f} ms")
    print(f"render + apply:       {(r['render_s'] + r['apply_replace_s']) * 1000:8.1f} ms")
    print(f"apply (new table):    {r['apply_first_s'] * 1000:8.1f} ms")
    print(f"apply (replace):      {r['apply_replace_s'] * 1000:8.1f} ms")
    verdict = "OK" if worst <= TARGET_S else "OVER TARGET"
    print(f"target apply <= {TARGET_S * 1000:.0f} ms: {verdict}")
    return 0 if worst <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
