"""Several datagrams per PeerPacket, between two Gatekeeper ends only (sans-I/O).

The reference carries exactly one datagram per message in `PeerPacket.Data` (field 2). Python
pays a fixed cost per gRPC message, so Gatekeeper may also fill `PeerPacket.batch` (field 3,
`repeated bytes`), but only once both ends said they understand it:

- the client asks with request metadata `x-gatekeeper-batch: 1`;
- a server that understands echoes `x-gatekeeper-batch: 1` in its initial metadata, with
  `x-gatekeeper-batch-bytes: N`, the most datagram bytes it takes (and sends) per message:
  its gRPC port's message limit, which it shares with Provision. Without that header a
  client stays under 15 KiB, which fits the smallest limit a Gatekeeper server uses.

The server batches only towards a client that asked; the client batches only after it saw the
echo. Until then (and always with a reference peer) every message holds one datagram in
`Data`. Nothing waits to fill a batch: a sender takes what is queued at that moment.

A message that holds datagrams in both fields means `Data` first, then `batch` in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gatekeeper.tunnel.queue import DropOldestQueue

BATCH_HEADER = "x-gatekeeper-batch"
BATCH_BYTES_HEADER = "x-gatekeeper-batch-bytes"
BATCH_VERSION = "1"
# Past these the per-message cost is already amortised; bigger messages only add latency
# for the first datagram and memory on both ends. The byte bound keeps a message (payload plus
# a few bytes of framing per datagram) under the 16 KiB message limit of the server's gRPC
# port, which the tunnel shares with Provision: eleven full-size (1312-byte) datagrams.
MAX_BATCH_COUNT = 64
MAX_BATCH_BYTES = 15 * 1024
# What a server may announce is clamped to this range: below it batching is pointless, above
# it a message takes longer to send than many datagrams are worth waiting for.
MIN_ANNOUNCED_BYTES = 1500
MAX_ANNOUNCED_BYTES = 1 << 20

Metadata = Iterable[tuple[str, str | bytes]]


def offer() -> tuple[tuple[str, str], ...]:
    """Request metadata with which a client announces that it understands batches."""
    return ((BATCH_HEADER, BATCH_VERSION),)


def announced(metadata: Metadata | None) -> bool:
    """Did the other end announce batch support (version 1) in this metadata?"""
    for key, value in metadata or ():
        if key == BATCH_HEADER:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return text.strip() == BATCH_VERSION
    return False


def answer(
    client_metadata: Metadata | None, max_bytes: int = MAX_BATCH_BYTES
) -> tuple[tuple[str, str], ...]:
    """The server's initial metadata: the echo when the client offered, nothing otherwise."""
    if not announced(client_metadata):
        return ()
    return (*offer(), (BATCH_BYTES_HEADER, str(max_bytes)))


def batch_bytes(server_metadata: Metadata | None) -> int:
    """The per-message byte budget the server announced, clamped; the default without one."""
    for key, value in server_metadata or ():
        if key == BATCH_BYTES_HEADER:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            if text.strip().isdigit():
                return max(MIN_ANNOUNCED_BYTES, min(int(text.strip()), MAX_ANNOUNCED_BYTES))
    return MAX_BATCH_BYTES


def take(
    queue: DropOldestQueue[bytes],
    *,
    batching: bool,
    max_count: int | None = None,
    max_bytes: int | None = None,
) -> list[bytes]:
    """The datagrams for the next message: one without batching, else what is queued now.

    At least one datagram is taken whenever the queue is not empty, even a big one.
    """
    if not queue:
        return []
    max_count = MAX_BATCH_COUNT if max_count is None else max_count
    max_bytes = MAX_BATCH_BYTES if max_bytes is None else max_bytes
    first = queue.pop()
    out = [first]
    if not batching:
        return out
    size = len(first)
    while queue and len(out) < max_count:
        size += len(queue.peek())
        if size > max_bytes:
            break
        out.append(queue.pop())
    return out


def fields(datagrams: Sequence[bytes], *, batching: bool) -> tuple[bytes, list[bytes]]:
    """(`Data`, `batch`) for a message carrying `datagrams`.

    A single datagram always goes in `Data`, so a lone packet looks exactly like the
    reference's even when batching is on.
    """
    if len(datagrams) == 1:
        return datagrams[0], []
    if not batching:
        raise ValueError("several datagrams in one message need negotiated batching")
    return b"", list(datagrams)


def datagrams(data: bytes, batch: Sequence[bytes], *, batching: bool) -> tuple[list[bytes], int]:
    """The datagrams a received message carries, and how many were refused.

    `batch` entries from a peer that did not negotiate batching are refused (counted, not
    delivered): such a peer does not speak this extension and the field means nothing.
    """
    out = [data] if data else []
    if not batch:
        return out, 0
    if not batching:
        return out, len(batch)
    out.extend(batch)
    return out, 0
