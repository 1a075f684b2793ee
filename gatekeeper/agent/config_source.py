"""The agent's one reader of its configuration sources: kernel command line, config file,
firewall documents. Produces the desired configuration; never acts on it.

Files are read whole, off the event loop, and a change is taken only when a second read a
moment later (`settle`) sees the same bytes: an editor or a config manager that truncates a
file and writes it again is caught in the middle by a single read, and an empty or truncated
file is then not mistaken for "SideroLink removed" or "no firewall documents" (see
docs/agent.md, "Configuration sources").
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gatekeeper.agent.machine import MachineError, node_uuid
from gatekeeper.config.cmdline import MAX_CMDLINE_BYTES
from gatekeeper.config.documents import MAX_FILE_BYTES, MSG_TOO_LARGE
from gatekeeper.config.errors import ConfigError
from gatekeeper.config.resolve import resolve_texts
from gatekeeper.config.siderolink import SideroLinkConfig
from gatekeeper.firewall.documents import FirewallDocumentError, PolicyBuilder
from gatekeeper.firewall.policy import FirewallPolicy
from gatekeeper.link.lifecycle import Identity

log = logging.getLogger(__name__)

# Whether a file that does not parse was meant to hold firewall documents.
_NETWORK_KIND = re.compile(rb"kind:\s*[\"']?Network")


@dataclass(frozen=True)
class FileRead:
    path: str
    data: bytes | None  # None: absent (or unreadable, see error)
    error: str | None = None


def read_file(path: Path, limit: int = MAX_FILE_BYTES) -> FileRead:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return FileRead(str(path), None)
    except OSError as exc:
        return FileRead(str(path), None, f"cannot read: {exc.strerror or type(exc).__name__}")
    if len(data) > limit:
        return FileRead(str(path), None, MSG_TOO_LARGE)
    return FileRead(str(path), data)


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; a directory means its *.yaml and *.yml files in name order."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            out.append(path)
    return out


@dataclass(frozen=True)
class Snapshot:
    cmdline: FileRead
    config: FileRead | None
    firewall: tuple[FileRead, ...]


@dataclass(frozen=True)
class DesiredConfig:
    """What the sources say the machine should do; an error keeps what runs."""

    siderolink: SideroLinkConfig | None
    identity: Identity | None
    error: str | None
    # None when the documents are invalid (firewall_error says why).
    firewall: FirewallPolicy | None
    firewall_error: str | None
    # The kernel command line, for the readers of its other parameters (telemetry sinks).
    cmdline_text: str | None = None


@dataclass
class SourcePaths:
    cmdline: Path
    config: Path | None
    # None: the agent runs no document policy (only the overlay guard).
    firewall: list[Path] | None
    node_uuid: str | None = None


def take_snapshot(paths: SourcePaths) -> Snapshot:
    firewall: list[FileRead] = []
    if paths.firewall is not None:
        for path in expand(paths.firewall):
            firewall.append(read_file(path))
    return Snapshot(
        cmdline=read_file(paths.cmdline, MAX_CMDLINE_BYTES),
        config=read_file(paths.config) if paths.config is not None else None,
        firewall=tuple(firewall),
    )


def _text(read: FileRead) -> str:
    if read.error is not None:
        raise ConfigError(read.error, read.path)
    assert read.data is not None
    try:
        return read.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 (byte offset {exc.start})", read.path) from None


def interpret(snapshot: Snapshot, paths: SourcePaths) -> DesiredConfig:
    siderolink: SideroLinkConfig | None = None
    identity: Identity | None = None
    error: str | None = None
    cmdline_text: str | None = None
    try:
        cmdline = snapshot.cmdline
        if cmdline.data is None:
            raise ConfigError(
                cmdline.error or "cannot read: No such file or directory", cmdline.path
            )
        # As the kernel gives it: undecodable bytes become U+FFFD.
        cmdline_text = cmdline.data.decode("utf-8", errors="replace").rstrip("\0\n")
        config = snapshot.config
        config_text = None
        if config is not None and (config.data is not None or config.error is not None):
            config_text = _text(config)
        siderolink = resolve_texts(
            cmdline_text, paths.cmdline, config_text, config.path if config else None
        )
        identity = Identity(
            node_uuid=node_uuid(paths.node_uuid),
            unique_token=siderolink.unique_token if siderolink else None,
        )
    except (ConfigError, MachineError) as exc:
        siderolink, identity, error = None, None, str(exc)
    policy: FirewallPolicy | None = FirewallPolicy()
    firewall_error: str | None = None
    try:
        builder = PolicyBuilder()
        documents = [*([snapshot.config] if snapshot.config else []), *snapshot.firewall]
        for read in documents:
            if read.data is None and read.error is None:
                if read is snapshot.config:
                    continue  # an absent --config file holds no documents
                raise FirewallDocumentError("cannot read: No such file or directory", read.path)
            try:
                text = _text(read)
                builder.add_text(text, read.path)
            except ConfigError as exc:
                if (
                    read is snapshot.config
                    and read.data is not None
                    and not _NETWORK_KIND.search(read.data)
                ):
                    # A typo in a config file that holds no firewall documents is the
                    # SideroLink config's error (reported there), not a reason to block.
                    continue
                raise FirewallDocumentError(exc.message, exc.where) from None
        policy = builder.build()
    except ConfigError as exc:
        policy, firewall_error = None, str(exc)
    return DesiredConfig(siderolink, identity, error, policy, firewall_error, cmdline_text)


class ConfigSource:
    """Polls the sources; calls `on_change` with each new desired configuration."""

    def __init__(
        self,
        paths: SourcePaths,
        on_change: Callable[[DesiredConfig], Awaitable[None]],
        *,
        poll: float = 2.0,
        settle: float = 0.15,
    ) -> None:
        self.paths = paths
        self.on_change = on_change
        self.poll = poll
        self.settle = settle
        self._last: Snapshot | None = None
        self._accepted: DesiredConfig | None = None
        self._pending_removal: Snapshot | None = None

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.poll)

    async def check(self) -> None:
        first = await asyncio.to_thread(take_snapshot, self.paths)
        if first == self._last:
            self._pending_removal = None
            return
        # Confirm, also on the first read: a file caught in the middle of being rewritten
        # reads differently a moment later.
        await asyncio.sleep(self.settle)
        second = await asyncio.to_thread(take_snapshot, self.paths)
        if second != first:
            log.debug("configuration sources are changing; reading again later")
            return
        desired = await asyncio.to_thread(interpret, first, self.paths)
        removal = (
            desired.siderolink is None
            and desired.error is None
            and self._accepted is not None
            and self._accepted.siderolink is not None
        )
        if removal and self._pending_removal != first:
            # Going from configured to not configured tears the link down and opens the
            # maintenance API on every address: take it only when the next poll agrees.
            self._pending_removal = first
            log.info("SideroLink configuration gone from the sources; confirming at the next read")
            return
        self._pending_removal = None
        self._last = first
        self._accepted = desired
        await self.on_change(desired)
