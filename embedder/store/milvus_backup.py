"""What ``embedder backup`` / ``restore`` do about a data dir whose collections live in Milvus.

A :class:`~embedder.store.Store` records where its collections live in ``<data_dir>/store.json`` (the ``--store``
URI, never the token), so a backup of the data dir knows without being told:

- **milvus-lite** (``milvus:///abs/path.db``): the ``.db`` folder holds the collections, kept images and heads.
  milvus-lite lets one process hold it (its ``LOCK``) and rewrites its files while it runs, so no consistent copy
  can be taken beside a running server: the backup takes that lock itself (a server cannot start meanwhile) and
  copies the folder into ``milvus-lite/<name>.db/``, or, while a server holds it, refuses saying to stop the server
  first. A restore puts the folder back at the recorded path (or at ``--store``), taking its lock the same way.
- **a Milvus server** (``http(s)://host:port``): the collections and kept images are the server's to back up, with
  Milvus's own tool (milvus-backup); the backup says so. What is ours there, the heads (``embedder_heads``), is
  exported into ``milvus-heads/<head_id>/`` (the folder format of :mod:`classifier.persist`, checksums included)
  and a restore writes them back into Milvus (replacing heads of the same id; others are left alone).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..config import parse_store_uri
from ..durable import write_atomic
from ..errors import InvalidArgumentError, StoreLockedError

log = logging.getLogger(__name__)

STORE_FILE = "store.json"  # in the data dir: where its collections live
LITE_FOLDER = "milvus-lite"  # in a backup: the milvus-lite .db folder
HEADS_FOLDER = "milvus-heads"  # in a backup: the heads a Milvus server held
HEAD_FILES = ("head.json", "head.safetensors")
MILVUS_BACKUP = ("back the collections up with Milvus's own tool, milvus-backup "
                 "(https://github.com/zilliztech/milvus-backup: `milvus-backup create -n NAME`, "
                 "`milvus-backup restore -n NAME`)")


@dataclass
class MilvusPart:
    """What a backup or restore did about Milvus: files it wrote (name -> size and sha256) and lines to show."""

    files: dict[str, dict[str, int | str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def record_store(data_dir: Path, uri: str) -> None:
    """Note in the data dir where its collections live (rewritten only when it changes)."""
    text = json.dumps({"store": uri}).encode()
    path = data_dir / STORE_FILE
    if not path.is_file() or path.read_bytes() != text:
        write_atomic(path, text)


def recorded_store(data_dir: Path) -> str:
    """The ``--store`` a data dir was last opened with ("" : FAISS + SQLite in it, also for data dirs older than
    the record)."""
    try:
        return str(json.loads((data_dir / STORE_FILE).read_text())["store"])
    except FileNotFoundError:
        return ""
    except (ValueError, KeyError, TypeError):
        raise InvalidArgumentError(f"{data_dir / STORE_FILE} is damaged; start the server on this data dir once "
                                   "(it writes the file again), then back up") from None


def lite_folder(uri: str) -> Path | None:
    """The milvus-lite ``.db`` folder of a store URI, None for other stores."""
    kind, target = parse_store_uri(uri)
    return Path(target) if kind == "milvus-lite" else None


@contextmanager
def holding_lite(folder: Path, doing: str) -> Iterator[None]:
    """milvus-lite's own lock on ``folder``, held meanwhile (no server opens it); refused while one holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "LOCK", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(
                f"the milvus-lite store {folder} is open in a running server: milvus-lite lets one process hold it "
                f"and rewrites its files while it runs, so it cannot be {doing} alongside. Stop the server, run this "
                "again, then start it (or keep the collections in a Milvus server and back them up with "
                "milvus-backup)") from None
        yield
    finally:
        os.close(fd)


def export_heads(uri: str, token: str, staging: Path) -> MilvusPart:
    """The heads a Milvus server holds, as ``milvus-heads/<head_id>/`` folders under ``staging``."""
    from .milvus import connect
    from .milvus_files import MilvusFiles

    part = MilvusPart()
    client = connect(uri, token)
    try:
        place = MilvusFiles(client, "heads", uri=uri)
        for head_id in place.ids():
            found = place.read(head_id, HEAD_FILES)
            if found is None:
                continue  # deleted since it was listed
            for name, data in found[0].items():
                relative = f"{HEADS_FOLDER}/{head_id}/{name}"
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                (staging / relative).write_bytes(data)
                part.files[relative] = {"size": len(data), "sha256": _sha256(data)}
    finally:
        client.close()
    heads = len({name.split("/")[1] for name in part.files})
    part.notes.append(f"{heads} head(s) from Milvus at {uri} are in {HEADS_FOLDER}/; the collections and kept images "
                      f"are not (they live in the Milvus server): {MILVUS_BACKUP}")
    return part


def import_heads(src: Path, names: list[str], uri: str, token: str) -> MilvusPart:
    """Write the heads of a backup's ``milvus-heads/`` back into the Milvus server at ``uri``."""
    from .milvus import connect
    from .milvus_files import MilvusFiles

    part = MilvusPart()
    heads: dict[str, dict[str, bytes]] = {}
    for name in names:
        _, head_id, file = name.split("/")
        heads.setdefault(head_id, {})[file] = (src / name).read_bytes()
    client = connect(uri, token)
    try:
        place = MilvusFiles(client, "heads", uri=uri)
        for head_id, files in sorted(heads.items()):
            place.write(head_id, files, overwrite=True)
    finally:
        client.close()
    part.notes.append(f"{len(heads)} head(s) written back into Milvus at {uri} (heads of other ids left as they "
                      f"are); the collections are not in an embedder backup: {MILVUS_BACKUP}")
    return part


def swap_lite(staged: Path, target: Path) -> None:
    """Put the staged ``.db`` folder at ``target`` (whose lock the caller holds), the old one removed after."""
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
