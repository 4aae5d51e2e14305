"""Each collection's FAISS index in memory, and its snapshot file ``snapshots/c<cid>.faiss``.

On open, each index is loaded from its snapshot and reconciled with SQLite (the truth) by id: rows added
since are inserted, rows gone are removed. A stale snapshot (after a crash) logs a WARNING and is caught
up; a missing or corrupt one logs a WARNING and the index is rebuilt from SQLite.

Reconciling by id is right only while the snapshot is a past state of *this* database: ids are never
reused within one database's history, but a database restored from an older copy hands the ids after its
copy out again, to other vectors. So each save first commits a fresh random tag to the collection's row
(``snapshot_tag``, the tag of the file before it moving to ``previous_tag``), then writes the snapshot
with that tag and the generation. On open, a snapshot whose tag is neither (written after this database
was copied, or by another data dir) or whose generation is newer than the database's is not used: the
index is rebuilt from SQLite and an ERROR is logged. The previous tag covers a crash between the commit and
the file's rename. Rows that fail their checksum (:mod:`.integrity`) are left out of a rebuild.
"""
from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DimensionMismatchError, ModelMismatchError
from ..index import IndexSpec, SnapshotError, VectorIndex
from .integrity import ITEM_COLUMNS, corrupted, item_ok
from .rwlock import RWLock
from .sqlite import chunked_query, matrix, transaction

log = logging.getLogger(__name__)

_RESTORE_ROWS = 8192  # vectors read from SQLite per step while catching an index up


@dataclass(eq=False)
class Collection:
    """A ``collections`` row and its index; ``generation`` counts the committed adds and deletes.

    ``lock`` guards the index: searches and reads share it, writes to this collection take it alone, so a
    write never stalls another collection. ``deleted`` is set (under the lock) when the collection goes.
    """

    cid: int
    name: str
    model_id: str
    dim: int
    spec: IndexSpec
    generation: int
    created: float
    index: VectorIndex
    saved: int = -1  # generation of the snapshot on disk; -1: none usable
    disk_tag: str | None = None  # tag of the snapshot file on disk, as far as this process knows
    lock: RWLock = field(default_factory=RWLock)
    deleted: bool = False

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

    def open_all(self, db: sqlite3.Connection, database: Path) -> dict[str, Collection]:
        """Every collection with its index restored; removes snapshot files no collection owns.

        ``database`` is the SQLite file, for the log.
        """
        collections = {}
        rows = db.execute("SELECT cid, name, model_id, dim, index_spec, generation, created, snapshot_tag, "
                          "previous_tag FROM collections")
        for cid, name, model_id, dim, spec, generation, created, tag, previous in rows.fetchall():
            c = Collection(cid, name, model_id, dim, IndexSpec.parse(spec), generation, created,
                           VectorIndex(dim, IndexSpec.parse(spec)))
            self._restore(db, c, (tag, previous), database)
            collections[name] = c
        known = {self.path(c.cid).name for c in collections.values()}
        for path in self.directory.iterdir():
            if path.name not in known:  # a deleted collection's snapshot, or a temp file of an interrupted save
                log.info("removing leftover snapshot file %s", path)
                path.unlink()
        return collections

    def save(self, c: Collection, db: sqlite3.Connection, db_lock: threading.Lock) -> None:
        """Snapshot ``c`` if it changed since its last snapshot; the caller holds ``c.lock`` (writers are out).

        The new tag is committed before the file is written: a snapshot on disk is always one its database
        knows, and a crash in between leaves the file of ``previous_tag``.
        """
        with self._save_lock:
            if c.saved == c.generation:
                return
            started = time.perf_counter()
            tag = secrets.token_hex(8)
            with db_lock, transaction(db):
                db.execute("UPDATE collections SET snapshot_tag = ?, previous_tag = ? WHERE cid = ?",
                           (tag, c.disk_tag, c.cid))
            size = c.index.save(self.path(c.cid), marker={"cid": c.cid, "generation": c.generation, "tag": tag})
            c.saved, c.disk_tag = c.generation, tag
            log.info("snapshot of %r: %d vectors, %.1f MB in %.2f s", c.name, len(c.index), size / 1e6,
                     time.perf_counter() - started)

    def _restore(self, db: sqlite3.Connection, c: Collection, tags: tuple[str | None, str | None],
                 database: Path) -> None:
        """Load ``c``'s snapshot if it is usable, then reconcile it with SQLite (the truth).

        ``tags``: the collection's ``snapshot_tag`` and ``previous_tag``, the snapshots its database knows.
        """
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
            generation = int(marker["generation"])
            if generation > c.generation or marker.get("tag") not in tags:
                # Its ids may now name other vectors: using it would answer with the wrong items.
                why = (f"it is newer than the database (generation {generation}, database at {c.generation})"
                       if generation > c.generation else "it is not one this database wrote")
                log.error("collection %r: snapshot %s does not belong to database %s: %s. The database was restored "
                          "from an older copy or replaced, or the snapshot comes from another data dir (use embedder "
                          "backup / restore, which copy both together). Not using it; rebuilding the index from "
                          "SQLite (%d vectors)", c.name, path, database, why, len(live))
            else:
                c.index, c.saved, c.disk_tag = index, generation, marker.get("tag")
                if c.saved != c.generation:
                    log.warning("collection %r: snapshot is stale (generation %d, database at %d; the last shutdown "
                                "was not clean); catching up from SQLite", c.name, c.saved, c.generation)
        present = c.index.ids()
        c.index.remove(np.setdiff1d(present, live, assume_unique=True))
        missing = np.setdiff1d(live, present, assume_unique=True)
        damaged: list[str] = []
        for start in range(0, len(missing), _RESTORE_ROWS):
            rows = chunked_query(db, f"SELECT {ITEM_COLUMNS}, fid FROM items WHERE fid IN ({{}})", [],
                                 missing[start:start + _RESTORE_ROWS].tolist())
            ok = [item_ok(c.cid, r) for r in rows]
            damaged += [r[0] for r, good in zip(rows, ok) if not good]
            rows = [r for r, good in zip(rows, ok) if good]
            c.index.add(np.array([r[6] for r in rows], dtype=np.int64), matrix([r[4] for r in rows], c.dim))
        if damaged:  # a damaged vector in the index would poison every search near it
            corrupted(c.name, damaged, database, action="left out of the rebuilt index")
