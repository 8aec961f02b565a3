"""The one atomic file writer: a temporary sibling, fsync, rename, fsync of the directory.

A reader (or a process restarted after `kill -9` or a power loss) sees the old file or the whole
new one, never a torn one. Every artefact writer in the project goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable (some filesystems refuse: ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory below `root` (before publishing it with a rename)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def write_bytes_atomic(path: str | Path, data: bytes | bytearray | memoryview | Iterable[bytes]) -> None:
    """Write `data` (one buffer, or pieces written in order) to `path` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str | Iterable[str]) -> None:
    """UTF-8 text (one string, or pieces written in order), atomically."""
    if isinstance(text, str):
        write_bytes_atomic(path, text.encode("utf-8"))
    else:
        write_bytes_atomic(path, (piece.encode("utf-8") for piece in text))
