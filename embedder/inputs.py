"""What callers hand in: the list check, image files, the content hashes (images, texts), the folder label, the
collection name rule. Standard library only.

The client, the CLI, bulk jobs and the service core share these, so a folder lists the same files and an image
gets the same cache key everywhere.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path, PurePath
from typing import Any

from .errors import InvalidArgumentError

MAX_NAME = 256  # collection names and labels, in characters
# File suffixes treated as images when a folder is walked: the formats the decoder reads.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """The cache key of an encoded image: sha256 of its bytes, lower-case hex."""
    return hashlib.sha256(data).hexdigest()


def text_hash(text: str) -> str:
    """The cache key of a text: sha256 of ``text:`` and its UTF-8, so no text shares a key with an image's bytes."""
    return hashlib.sha256(b"text:" + text.encode("utf-8")).hexdigest()


def image_list(items: object) -> list:
    """``items`` as a list; one image given where a list of them belongs is a TypeError that says so.

    (Iterating one bytes object would embed each of its bytes as an "image", and one str path each letter.)
    """
    pil = sys.modules.get("PIL.Image")  # a PIL image can only exist if PIL is loaded: no import needed here
    single = (bytes, bytearray, memoryview, str, os.PathLike) + ((pil.Image,) if pil is not None else ())
    if items is None or isinstance(items, single):
        raise TypeError(f"pass a list of images, e.g. embed([image]), not one {type(items).__name__}")
    return list(items)  # type: ignore[call-overload]


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, by suffix, sorted."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def folder_label(path: PurePath) -> str | None:
    """The ``--label-from-folder`` label of an image: the name of the folder holding it (None for none).

    ``embedder add`` passes the file's absolute path, so ``cat.jpg`` given inside ``pets/cat/`` is labelled
    ``cat``; a bulk import passes the path it recorded, or the input's id (``cat/1.jpg`` -> ``cat``) as a
    :class:`~pathlib.PurePosixPath` when the input had no file.
    """
    return path.parent.name or None


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)``, shortened: messages travel in gRPC trailers, which have a size limit."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 15]}...' ({len(value) if isinstance(value, str) else '?'} chars)"


def check_name(name: Any) -> str:
    """``name`` if it can name a collection (the store's and the API keys' allow-lists' rule)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise InvalidArgumentError(f"a collection name must be a string of 1 to {MAX_NAME} characters, "
                                   f"got {shown(name)}")
    return name
