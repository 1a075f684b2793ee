"""Every command's --help ends with one example that its own parser accepts, and the bash
and zsh completion scripts complete commands, options and choices in a real shell."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest

from gatekeeper.cli.examples import EXAMPLES, walk
from gatekeeper.cli.main import build_parser


def test_every_command_has_an_example_that_parses() -> None:
    parser = build_parser()
    paths = [path for path, _ in walk(parser)]
    assert sorted(paths) == sorted(EXAMPLES)
    for path, sub in walk(parser):
        lexer = shlex.shlex(EXAMPLES[path], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        if ">" in words:  # the shell's redirection is not the command's
            words = words[: words.index(">")]
        if words[0] == "sudo":
            words = words[1:]
        assert words[0] == "gatekeeper" and words[1 : 1 + len(path)] == list(path)
        try:
            parser.parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"the example of {' '.join(path) or 'gatekeeper'} does not parse")
        # Unwrapped at the end of the help, so it can be copied as it is.
        assert sub.format_help().rstrip().endswith(f"example:\n  {EXAMPLES[path]}")


def test_help_shows_the_example_from_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "firewall", "trace", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.rstrip().splitlines()[-1] == "  " + EXAMPLES[("firewall", "trace")]


def script(shell: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "gatekeeper", "completion", shell],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


CASES = [
    (["fi"], ["firewall"]),
    (["firewall", "t"], ["trace"]),
    (["firewall", "trace", "--pr"], ["--proto"]),
    (["firewall", "trace", "--proto", ""], ["tcp", "udp", "icmp", "icmpv6"]),
    (["--log-level", "debug", "machines", "--of"], ["--offline"]),
    (["machines", "--state-dir", "/x", "r"], ["remove"]),
    (["completion", ""], ["bash", "zsh"]),
    (["join-config", "--format", "y"], ["yaml"]),
]


def complete_in(shell: str, text: str, words: list[str]) -> list[str]:
    argv = ["gatekeeper", *words]
    snippet = (
        f"source /dev/stdin <<'EOF'\n{text}EOF\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in argv)}); COMP_CWORD={len(words)}\n"
        '_gatekeeper; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        [shell, "-c", snippet], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.parametrize(("words", "expected"), CASES)
def test_bash_completion(words: list[str], expected: list[str]) -> None:
    assert complete_in("bash", script("bash"), words) == expected


@pytest.mark.parametrize(("words", "expected"), CASES)
def test_zsh_completion(words: list[str], expected: list[str]) -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh not installed")
    # zsh's compgen (bashcompinit) leaves matching the typed prefix to zsh itself, so the
    # function hands back every candidate of the right kind: the expected ones among them.
    got = complete_in("zsh", script("zsh"), words)
    assert set(expected) <= set(got)
    assert not any(w.startswith("-") for w in got) or words[-1].startswith("-")
