"""`gatekeeper firewall check` and `explain`: the commands that never touch the kernel."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gatekeeper.cli.firewall import add_parser
from gatekeeper.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def test_check_valid_documents(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["firewall", "check", str(ROOT / "rules")]) == 0
    assert capsys.readouterr().out.strip() == "ok: default action block, 2 rules"
    assert main(["firewall", "check", "--json", str(ROOT / "rules" / "20-kubelet.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert out["rules"][0]["ports"] == ["10250", "30000-32767"]


def test_check_without_files_uses_the_packaged_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["firewall", "check"]) == 0
    assert capsys.readouterr().out.strip() == "ok: default action accept, 0 rules"


def test_check_reports_the_first_error_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1alpha1\nkind: NetworkRuleConfig\nname: web\n"
        "portSelector:\n  ports: [80, '70-90']\n  protocol: tcp\n"
    )
    assert main(["firewall", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f'gatekeeper firewall: {bad} document 1 (NetworkRuleConfig "web"): portSelector.ports: '
        "invalid port range: 80-80, overlaps with 70-90\n"
    )
    assert main(["firewall", "check", "--json", str(bad)]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_explain_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["firewall", "explain", "-c", str(ROOT / "rules"), "--wireguard-port", "51820"]
    assert (
        main([*args, "--iif", "eth0", "--src", "192.168.10.9", "--proto", "tcp", "--dport", "22"])
        == 0
    )
    text = capsys.readouterr().out
    assert "verdict: ACCEPT" in text
    assert '(by NetworkRuleConfig "ssh-admins")' in text
    assert (
        main(
            [
                *args,
                "--iif",
                "eth0",
                "--src",
                "192.168.11.9",
                "--proto",
                "tcp",
                "--dport",
                "22",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "drop"
    assert out["deciding"]["chain"] == "prerouting"
    assert main([*args, "--iif", "eth0", "--src", "fd00::1", "--proto", "icmp"]) == 1
    assert "icmp needs an IPv4" in capsys.readouterr().err


def test_add_parser_registers_handlers() -> None:
    parser = argparse.ArgumentParser(prog="gatekeeper")
    add_parser(parser.add_subparsers(dest="command"))
    for argv in (
        ["show"],
        ["check"],
        ["apply"],
        ["remove"],
        ["explain", "--iif", "lo", "--src", "::1", "--proto", "icmpv6"],
    ):
        args = parser.parse_args(["firewall", *argv])
        assert callable(args.func)


def test_check_answers_an_alias_bomb_at_once(tmp_path: Path) -> None:
    """The real command, as an operator runs it: exit 1 and one line, not a hang."""
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    pairs = zip("abcdefgh", "bcdefghi", strict=True)
    levels += [f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in pairs]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "apiVersion: v1alpha1\nkind: NetworkRuleConfig\n"
        + "".join(f"x{i}: {level}\n" for i, level in enumerate(levels))
        + "name: *i\nportSelector: {ports: [22], protocol: tcp}\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper.cli.main", "firewall", "check", str(bomb)],
        capture_output=True,
        text=True,
        timeout=30,  # a hang detector; the answer takes well under a second
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"gatekeeper firewall: {bomb} document 1: invalid YAML: aliases expand to more than "
        "1,000,000 nodes (an alias bomb?)"
    ]
    assert elapsed < 10, f"took {elapsed:.1f} s"
