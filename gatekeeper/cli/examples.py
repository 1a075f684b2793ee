"""One example per command, shown at the end of its --help.

Kept in one table so that a test can check every command has one and that each example
parses with the command's own arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

EXAMPLES: dict[tuple[str, ...], str] = {
    (): "gatekeeper status",
    ("agent",): "gatekeeper agent --config /etc/gatekeeper/machine.yaml",
    ("server",): "gatekeeper server --join-token-file /etc/gatekeeper/join-token "
    "--endpoint 203.0.113.10:51820",
    ("status",): "gatekeeper status --watch",
    ("demo",): "sudo gatekeeper demo --keep-logs /tmp/gatekeeper-demo",
    ("ping",): "gatekeeper ping --count 5",
    ("netcheck",): "gatekeeper netcheck --json",
    ("join-config",): "gatekeeper join-config --create-token --name rack-4 --expires-in 7d",
    ("completion",): "gatekeeper completion bash > /etc/bash_completion.d/gatekeeper",
    ("firewall",): "gatekeeper firewall show",
    ("firewall", "show"): "gatekeeper firewall show --exit-code",
    ("firewall", "explain"): "gatekeeper firewall explain --iif eth0 --src 10.0.0.7 "
    "--proto tcp --dport 22",
    ("firewall", "trace"): "gatekeeper firewall trace --iif eth0 --proto tcp --dport 22 "
    "--seconds 30",
    ("firewall", "check"): "gatekeeper firewall check rules/*.yaml",
    ("firewall", "apply"): "gatekeeper firewall apply --wireguard-port 51821 rules/",
    ("firewall", "remove"): "gatekeeper firewall remove",
    ("maint",): "gatekeeper maint version -n fdae:41e4:649b:9303::2",
    ("maint", "version"): "gatekeeper maint version -n fdae:41e4:649b:9303::2",
    ("maint", "get"): "gatekeeper maint get siderolinkstatus -n fdae:41e4:649b:9303::2 -o yaml",
    ("token",): "gatekeeper token list",
    ("token", "create"): "gatekeeper token create --name rack-4 --max-uses 10 --expires-in 7d",
    ("token", "list"): "gatekeeper token list --json",
    ("token", "revoke"): "gatekeeper token revoke 1a2b3c4d5e6f",
    ("machines",): "gatekeeper machines --offline --watch",
    ("machines", "remove"): "gatekeeper machines remove 4c4c4544-0042-3510-8052-b4c04f4d3532",
    ("instances",): "gatekeeper instances --registry postgresql://gatekeeper@db.example/gatekeeper",
    ("logs",): "gatekeeper logs 4c4c4544-0042-3510-8052-b4c04f4d3532 --since 10m -f",
    ("events",): "gatekeeper events --registry postgresql://gatekeeper@db.example/gatekeeper "
    "--since 1h --follow",
}


class ExampleFormatter(argparse.HelpFormatter):
    """argparse's formatter, but the example keeps its line (wrapped, it is not copyable)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:\n"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser under `parser`, with its command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def add_examples(parser: argparse.ArgumentParser) -> None:
    for path, sub in walk(parser):
        example = EXAMPLES.get(path)
        if example is None:
            continue
        sub.epilog = f"example:\n  {example}"
        if sub.formatter_class is argparse.HelpFormatter:
            sub.formatter_class = ExampleFormatter
