"""A newc ("SVR4 no CRC") cpio writer: the format the kernel unpacks an initramfs from.

Written here so the initramfs is built the same way everywhere, without the cpio tool.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

_TRAILER = "TRAILER!!!"


def _header(ino: int, mode: int, size: int, name: bytes, nlink: int = 1) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
    return b"070701" + b"".join(f"{v:08x}".encode() for v in fields)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc_archive(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """An archive of (path, mode, data) entries; directories and symlinks use their own modes
    (a symlink's data is its target). Paths are relative, parents listed before children."""
    out = bytearray()
    ino = 1
    for path, mode, data in entries:
        name = path.encode()
        head = _header(ino, mode, len(data), name)
        out += head + name + b"\0"
        out += _pad(len(head) + len(name) + 1)
        out += data + _pad(len(data))
        ino += 1
    name = _TRAILER.encode()
    head = _header(0, 0, 0, name)
    out += head + name + b"\0" + _pad(len(head) + len(name) + 1)
    return bytes(out)


def tree_entries(root: Path) -> list[tuple[str, int, bytes]]:
    """Every file, directory and symlink under root, parents first, in a stable order."""
    entries: list[tuple[str, int, bytes]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        rel_dir = base.relative_to(root)
        if rel_dir != Path("."):
            entries.append((str(rel_dir), stat.S_IFDIR | 0o755, b""))
        for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
            path = base / name
            rel = str(path.relative_to(root))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                entries.append((rel, stat.S_IFLNK | 0o777, os.readlink(path).encode()))
            else:
                entries.append((rel, stat.S_IFREG | (info.st_mode & 0o777), path.read_bytes()))
    return entries
