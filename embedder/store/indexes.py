"""Each collection's FAISS index in memory, and its snapshot file ``snapshots/c<cid>.faiss``.

On open, each index is loaded from its snapshot and reconciled with SQLite (the truth) by id: rows added
since are inserted, rows gone are removed. A stale snapshot (after a crash) logs a WARNING and is caught
up; a missing or corrupt one logs a WARNING and the index is rebuilt from SQLite. A save writes each
index changed since its snapshot (temp file, fsync, rename), tagged with its collection's generation.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import DimensionMismatchError, ModelMismatchError
from ..index import IndexSpec, SnapshotError, VectorIndex
from .sqlite import chunked_query, matrix

log = logging.getLogger(__name__)

_RESTORE_ROWS = 8192  # vectors read from SQLite per step while catching an index up


@dataclass
class Collection:
    """A ``collections`` row and its index; ``generation`` counts the committed adds and deletes."""

    cid: int
    name: str
    model_id: str
    dim: int
    spec: IndexSpec
    generation: int
    created: float
    index: VectorIndex
    saved: int = -1  # generation of the snapshot on disk; -1: none usable

    def check_binding(self, model_id: str, dim: int) -> None:
        """Refuse vectors of another model or dim than the collection holds."""
        if model_id != self.model_id:
            raise ModelMismatchError(f"collection {self.name!r} holds vectors of model {self.model_id}, not "
                                     f"{model_id}; vectors of different models are not comparable. "
                                     "Use another collection.")
        if dim != self.dim:
            raise DimensionMismatchError(f"collection {self.name!r} holds {self.dim}-d vectors, got {dim}-d; "
                                         "use another collection, or vectors of its model")


def insert_collection(db: sqlite3.Connection, name: str, model_id: str, dim: int, spec: IndexSpec) -> Collection:
    """Insert the row inside the caller's transaction; the caller registers it once committed."""
    now = time.time()
    cid = db.execute("INSERT INTO collections (name, model_id, dim, index_spec, created) "
                     "VALUES (?, ?, ?, ?, ?) RETURNING cid", (name, model_id, dim, str(spec), now)).fetchone()[0]
    log.info("creating collection %r (model %s, dim %d, index %s)", name, model_id, dim, spec)
    return Collection(cid, name, model_id, dim, spec, 0, now, VectorIndex(dim, spec))


class Snapshots:
    """The snapshot files of one data dir; saves are serialised by their own lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._save_lock = threading.Lock()

    def path(self, cid: int) -> Path:
        return self.directory / f"c{cid}.faiss"

    def files(self) -> list[Path]:
        return list(self.directory.glob("*.faiss"))

    def open_all(self, db: sqlite3.Connection) -> dict[str, Collection]:
        """Every collection with its index restored; removes snapshot files no collection owns."""
        collections = {}
        rows = db.execute("SELECT cid, name, model_id, dim, index_spec, generation, created FROM collections")
        for cid, name, model_id, dim, spec, generation, created in rows.fetchall():
            c = Collection(cid, name, model_id, dim, IndexSpec.parse(spec), generation, created,
                           VectorIndex(dim, IndexSpec.parse(spec)))
            self._restore(db, c)
            collections[name] = c
        known = {self.path(c.cid).name for c in collections.values()}
        for path in self.directory.iterdir():
            if path.name not in known:  # a deleted collection's snapshot, or a temp file of an interrupted save
                log.info("removing leftover snapshot file %s", path)
                path.unlink()
        return collections

    def save(self, collections: Iterable[Collection]) -> None:
        """Snapshot each collection changed since its last snapshot; the caller keeps writers out."""
        with self._save_lock:
            for c in collections:
                if c.saved != c.generation:
                    started = time.perf_counter()
                    size = c.index.save(self.path(c.cid), marker={"cid": c.cid, "generation": c.generation})
                    c.saved = c.generation
                    log.info("snapshot of %r: %d vectors, %.1f MB in %.2f s", c.name, len(c.index), size / 1e6,
                             time.perf_counter() - started)

    def _restore(self, db: sqlite3.Connection, c: Collection) -> None:
        """Load ``c``'s snapshot if it is usable, then reconcile it with SQLite (the truth)."""
        path = self.path(c.cid)
        live = np.fromiter((f for (f,) in db.execute("SELECT fid FROM items WHERE cid = ?", (c.cid,))),
                           dtype=np.int64)
        try:
            index, marker = VectorIndex.load(path)
            if marker.get("cid") != c.cid or index.dim != c.dim or index.spec != c.spec:
                raise SnapshotError(f"snapshot {path} was made for another collection or index setting")
        except SnapshotError as e:
            if path.exists() or len(live):
                log.warning("collection %r: %s; rebuilding its index from SQLite (%d vectors)", c.name, e, len(live))
        else:
            c.index, c.saved = index, int(marker["generation"])
            if c.saved != c.generation:
                log.warning("collection %r: snapshot is stale (generation %d, database at %d; the last shutdown "
                            "was not clean); catching up from SQLite", c.name, c.saved, c.generation)
        present = c.index.ids()
        c.index.remove(np.setdiff1d(present, live, assume_unique=True))
        missing = np.setdiff1d(live, present, assume_unique=True)
        for start in range(0, len(missing), _RESTORE_ROWS):
            rows = chunked_query(db, "SELECT fid, vector FROM items WHERE fid IN ({})", [],
                                 missing[start:start + _RESTORE_ROWS].tolist())
            c.index.add(np.array([f for f, _ in rows], dtype=np.int64), matrix([v for _, v in rows], c.dim))
