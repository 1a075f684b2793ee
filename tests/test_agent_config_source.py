"""The agent's config source: real files rewritten under it, read off the loop and confirmed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gatekeeper.agent.config_source import (
    ConfigSource,
    DesiredConfig,
    SourcePaths,
    interpret,
    take_snapshot,
)
from gatekeeper.config.documents import MAX_FILE_BYTES, MSG_TOO_LARGE
from gatekeeper.firewall.policy import DefaultAction

UUID = "0f2d8a3e-1111-2222-3333-444455556666"
LINK_DOC = (
    "apiVersion: v1alpha1\nkind: SideroLinkConfig\n"
    "apiUrl: grpc://[fd00::1]:8090?jointoken=s3cret\n"
    "---\napiVersion: v1alpha1\nkind: NetworkDefaultActionConfig\ningress: block\n"
)


def paths(tmp_path: Path, firewall: list[Path] | None = None) -> SourcePaths:
    cmdline = tmp_path / "cmdline"
    if not cmdline.exists():
        cmdline.write_text("quiet\n")
    return SourcePaths(
        cmdline=cmdline,
        config=tmp_path / "machine.yaml",
        firewall=[] if firewall is None else firewall,
        node_uuid=UUID,
    )


async def collect(source: ConfigSource, seen: list[DesiredConfig]) -> None:
    async def on_change(desired: DesiredConfig) -> None:
        seen.append(desired)

    source.on_change = on_change


async def test_a_file_caught_empty_mid_rewrite_is_not_a_removal(tmp_path: Path) -> None:
    p = paths(tmp_path)
    assert p.config is not None
    p.config.write_text(LINK_DOC)
    seen: list[DesiredConfig] = []
    source = ConfigSource(p, lambda d: asyncio.sleep(0), settle=0.2)
    await collect(source, seen)
    await source.check()
    assert seen and seen[-1].siderolink is not None
    # A config manager truncates, then writes the same content 50 ms later.
    p.config.write_text("")

    async def rewrite() -> None:
        await asyncio.sleep(0.05)
        assert p.config is not None
        p.config.write_text(LINK_DOC)

    writer = asyncio.create_task(rewrite())
    await source.check()
    await writer
    await source.check()
    assert all(d.siderolink is not None for d in seen), "an empty read was taken as a removal"
    assert all(
        d.firewall is not None and d.firewall.default_action is DefaultAction.BLOCK for d in seen
    )


async def test_a_file_that_stays_empty_is_taken_after_the_confirming_read(tmp_path: Path) -> None:
    p = paths(tmp_path)
    assert p.config is not None
    p.config.write_text(LINK_DOC)
    seen: list[DesiredConfig] = []
    source = ConfigSource(p, lambda d: asyncio.sleep(0), settle=0.05)
    await collect(source, seen)
    await source.check()
    p.config.write_text("")
    await source.check()
    # A removal tears the link down: it waits for the next poll to agree.
    assert seen[-1].siderolink is not None
    await source.check()
    assert seen[-1].siderolink is None and seen[-1].error is None
    # No documents any more: the default accept, read from a file that really is empty.
    assert seen[-1].firewall is not None
    assert seen[-1].firewall.default_action is DefaultAction.ACCEPT


async def test_a_removal_that_is_undone_before_the_next_poll_never_happens(tmp_path: Path) -> None:
    p = paths(tmp_path)
    assert p.config is not None
    p.config.write_text(LINK_DOC)
    seen: list[DesiredConfig] = []
    source = ConfigSource(p, lambda d: asyncio.sleep(0), settle=0.01)
    await collect(source, seen)
    await source.check()
    for _ in range(3):
        p.config.write_text("")
        await source.check()
        p.config.write_text(LINK_DOC)
        await source.check()
    assert [d.siderolink is not None for d in seen] == [True]


def test_a_config_typo_without_firewall_documents_does_not_block(tmp_path: Path) -> None:
    p = paths(tmp_path)
    assert p.config is not None
    p.config.write_text("apiVersion: v1alpha1\nkind: SideroLinkConfig\n apiUrl: [oops\n")
    desired = interpret(take_snapshot(p), p)
    assert desired.error is not None and "machine.yaml" in desired.error
    assert desired.firewall is not None and desired.firewall_error is None
    # The same typo in a file that holds firewall documents keeps the policy in force.
    p.config.write_text(LINK_DOC.replace("ingress: block", "ingress: [block"))
    desired = interpret(take_snapshot(p), p)
    assert desired.firewall is None and desired.firewall_error is not None


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    p = paths(tmp_path)
    assert p.config is not None
    with open(p.config, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    desired = interpret(take_snapshot(p), p)
    assert desired.error == f"{p.config}: {MSG_TOO_LARGE}"
    assert desired.firewall is None


def test_an_unreadable_firewall_file_is_an_error_not_an_accept(tmp_path: Path) -> None:
    missing = tmp_path / "rules.yaml"
    p = paths(tmp_path, firewall=[missing])
    desired = interpret(take_snapshot(p), p)
    assert desired.firewall is None
    assert desired.firewall_error == f"{missing}: cannot read: No such file or directory"
