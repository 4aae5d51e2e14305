"""Durable file writes: what survives kill -9 and power loss once the call returns.

One place for the fsync rules every writer of the data and cache dirs follows: write the data to a temp
file in the target's directory and fsync it, ``os.replace`` it over the target, then fsync the directory
so the rename itself is on disk.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename, creation or unlink inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file someone else wrote (e.g. an exporter given a path) to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (no rename: for files inside a not-yet-published temp dir)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the synced temp file ``tmp`` over ``path`` and fsync the directory."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temp file name beside ``path`` (same directory, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` all-or-nothing: readers see the old or the new file, never a mix."""
    tmp = temp_path(path)
    try:
        write_synced(tmp, data)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
