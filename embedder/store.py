"""The vector store: a content-addressed embedding cache, and named collections for similarity search.

>>> with Store("embedder-data") as store:
...     batch = embed_cached(embedder, jpegs, store=store)          # hits skip decode and model
...     store.add("pets", ["cat-1", "cat-2"], batch.vectors, model_id=embedder.model_id, labels=["cat", "cat"])
...     store.search("pets", batch.vectors[:1], k=5)                # [[Hit(id='cat-1', score=1.0000, ...), ...]]

Everything lives in ``data_dir``: ``store.sqlite3`` (+ WAL), ``snapshots/c<cid>.faiss``, ``store.lock``.

**SQLite is the source of truth** (metadata *and* every vector as a float32 blob). Tables:

- ``collections``: name, the model id and dim it is bound to, its index spec, and a ``generation``
  counter bumped by every add/delete (what a snapshot is checked against);
- ``items``: one row per stored vector: ``fid`` (AUTOINCREMENT, never reused: the FAISS id), collection,
  the caller's ``item_id`` (unique per collection), sha256, vector, label, metadata JSON, timestamps;
- ``cache``: ``(model_id, sha256) -> vector`` for images *outside* every collection, with a logical
  ``last_used`` clock for LRU eviction beyond ``cache_max_items``. Adding an item with a sha256 moves its
  cache row into the item, so members are never evicted and no vector is stored twice; a lookup checks
  the cache, then collection items of the same model. Lookups only read: their recency is written with
  the next put or at close (a crash loses only some LRU order);
- ``images``: ``sha256 -> encoded bytes`` of collection items added with their image (schema version 2),
  stored once per content and deleted with the last item that refers to them: what a fine-tune or a new
  backbone version needs to see the pixels again.

**FAISS holds one index per collection** (:class:`embedder.index.VectorIndex`: exact ``IndexFlatIP`` or
approximate HNSW over L2-normalised vectors, so scores are cosine similarities). Per-collection indexes
make the collection filter free, keep models and dims apart, and let each collection pick its index;
label filters use an ``IDSelectorBatch`` of the label's ids (from SQLite), so ``k`` hits come back
whenever ``k`` items match (HNSW answers filters that keep under half the items exactly).

**Locking**: a readers-writer lock over the FAISS indexes. Searches, gets and snapshots share it; add,
delete, set_labels and delete_collection take it alone (FAISS is not safe to write while searching).
One SQLite connection behind a mutex; cache lookups and puts need only the mutex. Lock order: RW lock,
then the mutex.

**Durability**: WAL with ``synchronous=FULL``: a write method returns only after its transaction is
fsynced, so an acknowledged add survives kill -9 *and* power loss (``NORMAL`` survives kill -9 but can
lose the last commits on power loss; FULL costs ~0.4 ms per commit here, small next to a batch add).
SQLite's journal makes every call all-or-nothing. FAISS is updated after the commit, under the write lock.
:meth:`Store.save` / :meth:`Store.close` write each changed index to a snapshot (temp file, fsync,
rename) tagged with its collection's generation. On open, each index is loaded from its snapshot and
reconciled with SQLite by id: rows added since are inserted, rows gone are removed. A stale snapshot
(after a crash) logs a WARNING and is caught up; a missing or corrupt one logs a WARNING and the index
is rebuilt from SQLite. Only one process may open a data dir at a time (``flock`` on ``store.lock``).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from .config import Config
from .errors import (DimensionMismatchError, EmbedderError, ModelMismatchError, NotFoundError,
                     StoreClosedError, StoreLockedError)
from .inputs import content_hash
from .results import AddResult, CollectionInfo, DeleteResult, Hit, StoredItem, StoreStats
from .index import HNSW_LIMITS, IndexSpec, SnapshotError, VectorIndex

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MAX_K = 10_000  # hits per query; a bound on what one request can make the server allocate
_CHUNK = 900  # ids per `IN (...)`: under SQLite's historic 999-variable limit
_SHA256 = re.compile(r"[0-9a-f]{64}")
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE collections (
    cid        INTEGER PRIMARY KEY AUTOINCREMENT,  -- names the snapshot file
    name       TEXT NOT NULL UNIQUE,
    model_id   TEXT NOT NULL,
    dim        INTEGER NOT NULL,
    index_spec TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,         -- +1 per add/delete; snapshots record the one they reflect
    created    REAL NOT NULL
);
CREATE TABLE items (
    fid      INTEGER PRIMARY KEY AUTOINCREMENT,    -- FAISS id; never reused, so a snapshot's ids stay unambiguous
    cid      INTEGER NOT NULL REFERENCES collections (cid) ON DELETE CASCADE,
    item_id  TEXT NOT NULL,
    sha256   TEXT,
    vector   BLOB NOT NULL,                        -- little-endian float32, as given
    label    TEXT,
    metadata TEXT NOT NULL,                        -- JSON object
    created  REAL NOT NULL,
    updated  REAL NOT NULL,
    UNIQUE (cid, item_id)
);
CREATE INDEX items_label ON items (cid, label);
CREATE INDEX items_sha256 ON items (sha256) WHERE sha256 IS NOT NULL;
CREATE TABLE cache (
    model_id  TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    vector    BLOB NOT NULL,
    last_used INTEGER NOT NULL,                    -- logical clock: an exact LRU order, immune to clock jumps
    PRIMARY KEY (model_id, sha256)
);
CREATE INDEX cache_lru ON cache (last_used);
CREATE TABLE images (                              -- encoded bytes of collection items, by content (version 2)
    sha256 TEXT PRIMARY KEY,
    data   BLOB NOT NULL
);
"""
_MIGRATIONS = {1: "CREATE TABLE images (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);"}  # from version -> next


@dataclass
class _Collection:
    cid: int
    name: str
    model_id: str
    dim: int
    spec: IndexSpec
    generation: int
    created: float
    index: VectorIndex
    saved: int = -1  # generation of the snapshot on disk; -1: none usable


class _RWLock:
    """Many readers or one writer; a waiting writer holds back new readers, so writes never starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class Store:
    """Embedding cache and collections in one data directory; thread-safe. See the module docstring."""

    def __init__(self, data_dir: str | Path, *, cache_max_items: int = 1_000_000) -> None:
        if not isinstance(cache_max_items, int) or cache_max_items < 0:
            raise ValueError(f"cache_max_items must be an int >= 0 (0 disables the cache), got {cache_max_items!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.cache_max_items = cache_max_items
        self._snapshots = self.data_dir / "snapshots"
        self._snapshots.mkdir(parents=True, exist_ok=True)
        self._rw = _RWLock()
        self._db_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._touched: dict[tuple[str, str], int] = {}  # cache hits whose last_used is not yet written
        self._collections: dict[str, _Collection] = {}
        self._lock_fd = self._lock_dir()
        self._db: sqlite3.Connection | None = None
        try:
            self._db = self._connect()
            self._clock, self._cache_count = self._db.execute(
                "SELECT coalesce(max(last_used), 0), count(*) FROM cache").fetchone()
            self._open_indexes()
        except BaseException:
            self._release()
            raise

    @classmethod
    def from_config(cls, config: Config) -> Store:
        return cls(config.data_dir, cache_max_items=config.cache_max_items)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.data_dir)!r}, collections={len(self._collections)}, cache_items={self._cache_count})"

    # --- cache ---

    def lookup(self, model_id: str, sha256s: Sequence[str]) -> list[np.ndarray | None]:
        """The stored vector of each image (by sha256 of its bytes) under ``model_id``, or None."""
        shas = [_check_sha256(s) for s in _check_list(sha256s, "sha256s")]
        found: dict[str, bytes] = {}
        with self._db_lock:
            db = self._conn()
            unique = list(dict.fromkeys(shas))
            found.update(_chunked_query(db, "SELECT sha256, vector FROM cache WHERE model_id = ? AND sha256 IN ({})",
                                        [model_id], unique))
            for sha in unique:  # in input order, so the LRU order is the order of use
                if sha in found:
                    self._clock += 1
                    self._touched[(model_id, sha)] = self._clock
            rest = [s for s in unique if s not in found]
            for sha, blob in _chunked_query(
                    db, "SELECT i.sha256, i.vector FROM items i JOIN collections c ON c.cid = i.cid "
                        "WHERE c.model_id = ? AND i.sha256 IN ({})", [model_id], rest):
                found.setdefault(sha, blob)
        return [_vector(found[s]) if s in found else None for s in shas]

    def put(self, model_id: str, sha256s: Sequence[str], vectors: np.ndarray) -> None:
        """Cache ``(N, dim)`` vectors of images outside any collection, evicting least recently used ones."""
        shas = [_check_sha256(s) for s in _check_list(sha256s, "sha256s")]
        if not shas:
            return
        x = _check_vectors(vectors, n=len(shas), nonzero=False)
        rows = dict(zip(shas, x))  # one row per image
        with self._db_lock:
            db = self._conn()
            # A cache row is recomputable, so its commit skips the fsync (NORMAL: survives kill -9, may lose the
            # latest rows on power loss); the next FULL commit syncs it with everything before it.
            with _transaction(db, durable=False):
                self._flush_touched(db)
                members = {s for (s,) in _chunked_query(
                    db, "SELECT i.sha256 FROM items i JOIN collections c ON c.cid = i.cid "
                        "WHERE c.model_id = ? AND i.sha256 IN ({})", [model_id], list(rows))}
                existing = {s for (s,) in _chunked_query(
                    db, "SELECT sha256 FROM cache WHERE model_id = ? AND sha256 IN ({})", [model_id], list(rows))}
                fresh, seen = [], []
                for sha, vec in rows.items():
                    self._clock += 1
                    if sha in existing:
                        seen.append((self._clock, model_id, sha))
                    elif sha not in members:
                        fresh.append((model_id, sha, _blob(vec), self._clock))
                db.executemany("UPDATE cache SET last_used = ? WHERE model_id = ? AND sha256 = ?", seen)
                db.executemany("INSERT INTO cache (model_id, sha256, vector, last_used) VALUES (?, ?, ?, ?)", fresh)
                count = self._cache_count + len(fresh)
                if count > self.cache_max_items:
                    count -= db.execute("DELETE FROM cache WHERE rowid IN "
                                        "(SELECT rowid FROM cache ORDER BY last_used LIMIT ?)",
                                        (count - self.cache_max_items,)).rowcount
            self._cache_count = count

    # --- collections: writes ---

    def create_collection(self, name: str, *, model_id: str, dim: int,
                          index: str | IndexSpec = "flat") -> CollectionInfo:
        """Create an empty collection bound to ``model_id`` and ``dim``; ``index``: "flat" (exact) or "hnsw".

        Creating one that exists with the same model, dim and index is a no-op. :meth:`add` creates flat
        collections on first use, so this is needed only for another index.
        """
        name, spec, model_id = _check_name(name), IndexSpec.parse(index), _check_model_id(model_id)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        with self._rw.write():
            c = self._collections.get(name)
            if c is None:
                with self._db_lock:
                    db = self._conn()
                    with _transaction(db):
                        c = self._insert_collection(db, name, model_id, dim, spec)
                self._collections[name] = c
            _check_binding(c, model_id, dim)
            if c.spec != spec:
                raise ValueError(f"collection {name!r} exists with index '{c.spec}', not '{spec}'; "
                                 "use another name, or delete it first")
            return self._info(c)

    def add(self, collection: str, ids: Sequence[str], vectors: np.ndarray, *, model_id: str,
            sha256s: Sequence[str | None] | None = None, labels: Sequence[str | None] | None = None,
            metadata: Sequence[Mapping[str, Any] | None] | None = None,
            images: Sequence[bytes | None] | None = None) -> AddResult:
        """Insert or replace items: ``ids[i]`` gets ``vectors[i]`` (``(N, dim)``) and the optional columns.

        Re-adding an id replaces its vector, sha256, label and metadata (``created`` is kept). The collection
        is created (flat) on first use; afterwards its model id and dim must match, else
        :class:`ModelMismatchError` / :class:`DimensionMismatchError`. ``images`` keeps the encoded bytes of
        items (their ``sha256s`` must be the bytes' hash), stored once per content, so they can be fine-tuned
        on or embedded again by another backbone version later. Durable when it returns.
        """
        name, model_id = _check_name(collection), _check_model_id(model_id)
        ids = _check_ids(ids)
        x = _check_vectors(vectors, n=len(ids))
        shas = _column(sha256s, ids, "sha256s", lambda s: None if s is None else _check_sha256(s))
        labs = _column(labels, ids, "labels", _check_label)
        metas = [_metadata_json(m, i) for m, i in zip(_column(metadata, ids, "metadata", lambda m: m), ids)]
        blobs = _column(images, ids, "images", lambda b: b)
        for sha, blob, item_id in zip(shas, blobs, ids):
            if blob is not None and (sha is None or content_hash(blob) != sha):
                raise ValueError(f"the image of item {_shown(item_id)} does not hash to its sha256; pass "
                                 "sha256s=[content_hash(image) ...] for the images you keep")
        now = time.time()
        with self._rw.write():
            c = new = None
            if name in self._collections:
                c = self._collections[name]
                _check_binding(c, model_id, x.shape[1])
            with self._db_lock:
                db = self._conn()
                with _transaction(db):
                    if c is None:
                        c = new = self._insert_collection(db, name, model_id, x.shape[1], IndexSpec())
                    old = {i: (fid, created, sha) for i, fid, created, sha in _chunked_query(
                        db, "SELECT item_id, fid, created, sha256 FROM items WHERE cid = ? AND item_id IN ({})",
                        [c.cid], ids)}
                    old_fids = np.array([fid for fid, _, _ in old.values()], dtype=np.int64)
                    _chunked_execute(db, "DELETE FROM items WHERE fid IN ({})", old_fids.tolist())
                    db.executemany("INSERT OR IGNORE INTO images (sha256, data) VALUES (?, ?)",
                                   [(sha, blob) for sha, blob in zip(shas, blobs) if blob is not None])
                    fids = np.empty(len(ids), dtype=np.int64)
                    for j, (item_id, sha, vec, label, meta) in enumerate(zip(ids, shas, x, labs, metas)):
                        created = old[item_id][1] if item_id in old else now
                        fids[j] = db.execute(
                            "INSERT INTO items (cid, item_id, sha256, vector, label, metadata, created, updated) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING fid",
                            (c.cid, item_id, sha, _blob(vec), label, meta, created, now)).fetchone()[0]
                    # the items now hold these vectors: drop the cache copies (members are never evicted)
                    promoted = _chunked_execute(db, "DELETE FROM cache WHERE model_id = ? AND sha256 IN ({})",
                                                sorted({s for s in shas if s}), prefix=[model_id])
                    db.execute("UPDATE collections SET generation = generation + 1 WHERE cid = ?", (c.cid,))
                    _drop_orphan_images(db, [sha for _, _, sha in old.values()])
                self._cache_count -= promoted
            if new is not None:
                self._collections[name] = new
            c.generation += 1
            c.index.remove(old_fids)
            c.index.add(fids, x)
        return AddResult(name, added=len(ids) - len(old), replaced=len(old))

    def delete(self, collection: str, ids: Sequence[str]) -> DeleteResult:
        """Delete items by id; ids not in the collection are reported in ``missing``.

        The vectors go too: embedding a deleted item's image again is a cache miss.
        """
        ids = _check_ids(ids)
        with self._rw.write():
            c = self._get(collection)
            with self._db_lock:
                db = self._conn()
                with _transaction(db):
                    rows = _chunked_query(db, "SELECT item_id, fid, sha256 FROM items WHERE cid = ? AND item_id IN ({})",
                                          [c.cid], ids)
                    found = {item_id: fid for item_id, fid, _ in rows}
                    _chunked_execute(db, "DELETE FROM items WHERE fid IN ({})", list(found.values()))
                    _drop_orphan_images(db, [sha for _, _, sha in rows])
                    db.execute("UPDATE collections SET generation = generation + 1 WHERE cid = ?", (c.cid,))
            c.generation += 1
            c.index.remove(np.fromiter(found.values(), dtype=np.int64, count=len(found)))
        return DeleteResult(c.name, deleted=len(found), missing=[i for i in ids if i not in found])

    def set_labels(self, collection: str, labels: Mapping[str, str | None]) -> int:
        """Set (or, with None, clear) the label of existing items; all-or-nothing. Returns the number set.

        Raises :class:`NotFoundError` naming the ids that are not in the collection (then nothing changes).
        """
        if not isinstance(labels, Mapping):
            raise ValueError(f"labels must be a mapping of item id to label, got {type(labels).__name__}")
        ids = _check_ids(list(labels))
        values = [_check_label(labels[i]) for i in ids]
        now = time.time()
        with self._rw.write():
            c = self._get(collection)
            with self._db_lock:
                db = self._conn()
                with _transaction(db):
                    missing = [i for i, v in zip(ids, values) if not db.execute(
                        "UPDATE items SET label = ?, updated = ? WHERE cid = ? AND item_id = ?",
                        (v, now, c.cid, i)).rowcount]
                    if missing:
                        raise NotFoundError(_missing_message(missing, c.name))
        return len(ids)

    def delete_collection(self, name: str) -> None:
        """Delete a collection with all its items and its snapshot."""
        with self._rw.write():
            c = self._get(name)
            with self._db_lock:
                db = self._conn()
                with _transaction(db):
                    shas = [sha for (sha,) in db.execute("SELECT sha256 FROM items WHERE cid = ?", (c.cid,))]
                    db.execute("DELETE FROM collections WHERE cid = ?", (c.cid,))
                    _drop_orphan_images(db, shas)
            del self._collections[c.name]
            self._snapshot_path(c.cid).unlink(missing_ok=True)

    # --- collections: reads ---

    def get(self, collection: str, ids: Sequence[str]) -> list[StoredItem | None]:
        """The stored items, in the order of ``ids``; None where an id is not in the collection."""
        ids = _check_ids(ids)
        with self._rw.read():
            c = self._get(collection)
            with self._db_lock:
                rows = _chunked_query(self._conn(), "SELECT item_id, sha256, vector, label, metadata, created, updated "
                                                    "FROM items WHERE cid = ? AND item_id IN ({})", [c.cid], ids)
        found = {r[0]: StoredItem(r[0], c.name, _vector(r[2]), r[1], r[3], json.loads(r[4]), r[5], r[6]) for r in rows}
        return [found.get(i) for i in ids]

    def labelled(self, collection: str, *, labels: Sequence[str] | None = None,
                 ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """A training set from a collection: ``(ids, vectors (N, dim), labels)`` of its labelled items.

        ``labels`` keeps only those classes; ``ids`` only those items (each must exist and carry a label,
        else :class:`NotFoundError` / ValueError naming them). Items come in insertion order.
        """
        wanted = None if labels is None else [_check_label(lab) for lab in _check_list(labels, "labels")]
        chosen = None if ids is None else _check_ids(ids)
        with self._rw.read():
            c = self._get(collection)
            with self._db_lock:
                db = self._conn()
                if chosen is None:
                    rows = db.execute("SELECT item_id, vector, label FROM items WHERE cid = ? AND label IS NOT NULL "
                                      "ORDER BY fid", (c.cid,)).fetchall()
                else:
                    rows = sorted(_chunked_query(db, "SELECT fid, item_id, vector, label FROM items "
                                                     "WHERE cid = ? AND item_id IN ({})", [c.cid], chosen))
                    rows = [r[1:] for r in rows]
        if chosen is not None:
            found = {r[0] for r in rows}
            missing = [i for i in chosen if i not in found]
            if missing:
                raise NotFoundError(_missing_message(missing, c.name))
            unlabelled = [r[0] for r in rows if r[2] is None]
            if unlabelled:
                shown = ", ".join(repr(i) for i in unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
                raise ValueError(f"{len(unlabelled)} of the chosen items have no label ({shown}); "
                                 "label them with set_labels, or leave them out")
        if wanted is not None:
            keep = set(wanted)
            rows = [r for r in rows if r[2] in keep]
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), c.dim).astype(np.float32)
        return [r[0] for r in rows], x, [r[2] for r in rows]

    def images(self, collection: str, ids: Sequence[str]) -> list[bytes | None]:
        """The kept encoded image of each item, in the order of ``ids``; None where there is none (an item
        added as a tensor, by hash, or without keeping images) or the id is not in the collection."""
        ids = _check_ids(ids)
        with self._rw.read():
            c = self._get(collection)
            with self._db_lock:
                found = dict(_chunked_query(self._conn(), "SELECT i.item_id, m.data FROM items i JOIN images m "
                                                          "ON m.sha256 = i.sha256 WHERE i.cid = ? AND i.item_id IN ({})",
                                            [c.cid], ids))
        return [found.get(i) for i in ids]

    def vectors(self, collection: str) -> tuple[list[str], np.ndarray]:
        """Every item of a collection, labelled or not: ``(ids, vectors (N, dim))`` in insertion order."""
        with self._rw.read():
            c = self._get(collection)
            with self._db_lock:
                rows = self._conn().execute("SELECT item_id, vector FROM items WHERE cid = ? ORDER BY fid",
                                            (c.cid,)).fetchall()
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), c.dim).astype(np.float32)
        return [r[0] for r in rows], x

    def search(self, collection: str | None, queries: np.ndarray, *, k: int = 10, label: str | None = None,
               model_id: str | None = None, ef_search: int | None = None) -> list[list[Hit]]:
        """The ``k`` most similar stored items to each of the ``(Q, dim)`` queries, best first, per query.

        ``collection=None`` searches every collection of ``model_id`` (which may be left out while all
        collections share one model). ``label`` keeps only items with that label; ``ef_search`` overrides an
        HNSW collection's setting for this call. A collection of another model or dim raises
        :class:`ModelMismatchError` / :class:`DimensionMismatchError`.
        """
        q = _check_vectors(queries, name="queries")
        k = _check_k(k)
        label = _check_label(label)
        ef_search = _check_ef(ef_search)
        with self._rw.read():
            return self._search(self._targets(collection, model_id, q.shape[1]), q, k, label, ef_search)

    def search_by_id(self, collection: str, item_id: str, *, k: int = 10, label: str | None = None,
                     exclude_self: bool = True, ef_search: int | None = None) -> list[Hit]:
        """The ``k`` items of ``collection`` most similar to its stored item ``item_id`` (without itself)."""
        (item_id,) = _check_ids([item_id])
        k = _check_k(k)
        label = _check_label(label)
        ef_search = _check_ef(ef_search)
        with self._rw.read():
            c = self._get(collection)
            with self._db_lock:
                row = self._conn().execute("SELECT vector FROM items WHERE cid = ? AND item_id = ?",
                                           (c.cid, item_id)).fetchone()
            if row is None:
                raise NotFoundError(_missing_message([item_id], c.name))
            hits = self._search([c], _vector(row[0])[None], k + exclude_self, label, ef_search)[0]
        return [h for h in hits if not (exclude_self and h.id == item_id)][:k]

    def collection(self, name: str) -> CollectionInfo:
        with self._rw.read():
            return self._info(self._get(name))

    def list_collections(self) -> list[CollectionInfo]:
        with self._rw.read():
            return [self._info(c) for c in sorted(self._collections.values(), key=lambda c: c.name)]

    def stats(self) -> StoreStats:
        collections = self.list_collections()
        files = [self.data_dir / f"store.sqlite3{s}" for s in ("", "-wal")] + list(self._snapshots.glob("*.faiss"))
        return StoreStats(collections, items=sum(c.count for c in collections), cache_items=self._cache_count,
                          cache_max_items=self.cache_max_items,
                          disk_bytes=sum(p.stat().st_size for p in files if p.exists()))

    # --- persistence ---

    def save(self) -> None:
        """Snapshot every collection changed since its last snapshot. Searches go on meanwhile; writes wait."""
        with self._rw.read():
            self._save()

    def close(self) -> None:
        """Snapshot changed collections and close. Idempotent."""
        if self._db is None:
            return
        with self._rw.write():
            self._save()
            # Under the mutex: cache lookups and puts take only the mutex, and SQLite must not close under them.
            with self._db_lock:
                with _transaction(self._db):
                    self._flush_touched(self._db)
                self._release()

    # --- internals ---

    def _lock_dir(self) -> int:
        fd = os.open(self.data_dir / "store.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(f"the store in {self.data_dir} is open in another process (or another Store "
                                   "object); close that one first, or use another data dir") from None
        return fd

    def _release(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.data_dir / "store.sqlite3", isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; commits append to the WAL
        db.execute("PRAGMA synchronous = FULL")  # fsync the WAL per commit: acknowledged writes survive power loss
        db.execute("PRAGMA foreign_keys = ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        while version in _MIGRATIONS:
            log.info("upgrading %s/store.sqlite3 from schema version %d", self.data_dir, version)
            db.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[version]}; PRAGMA user_version = {version + 1}; COMMIT;")
            version += 1
        if version not in (0, SCHEMA_VERSION):
            db.close()
            raise EmbedderError(f"{self.data_dir}/store.sqlite3 has schema version {version}; this embedder "
                                f"reads version {SCHEMA_VERSION}. Use a matching embedder version.")
        return db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreClosedError(f"the store in {self.data_dir} is closed")
        return self._db

    def _snapshot_path(self, cid: int) -> Path:
        return self._snapshots / f"c{cid}.faiss"

    def _open_indexes(self) -> None:
        rows = self._db.execute("SELECT cid, name, model_id, dim, index_spec, generation, created FROM collections")
        for cid, name, model_id, dim, spec, generation, created in rows.fetchall():
            c = _Collection(cid, name, model_id, dim, IndexSpec.parse(spec), generation, created,
                            VectorIndex(dim, IndexSpec.parse(spec)))
            self._restore(c)
            self._collections[name] = c
        known = {self._snapshot_path(c.cid).name for c in self._collections.values()}
        for path in self._snapshots.iterdir():
            if path.name not in known:  # a deleted collection's snapshot, or a temp file of an interrupted save
                log.info("removing leftover snapshot file %s", path)
                path.unlink()

    def _restore(self, c: _Collection) -> None:
        """Load ``c``'s snapshot if it is usable, then reconcile it with SQLite (the truth)."""
        path = self._snapshot_path(c.cid)
        live = np.fromiter((f for (f,) in self._db.execute("SELECT fid FROM items WHERE cid = ?", (c.cid,))),
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
        for start in range(0, len(missing), 8192):
            chunk = missing[start:start + 8192].tolist()
            rows = _chunked_query(self._db, "SELECT fid, vector FROM items WHERE fid IN ({})", [], chunk)
            c.index.add(np.array([f for f, _ in rows], dtype=np.int64),
                        np.frombuffer(b"".join(v for _, v in rows), dtype="<f4").reshape(len(rows), c.dim))

    def _save(self) -> None:
        with self._save_lock:
            for c in list(self._collections.values()):
                if c.saved != c.generation:
                    started = time.perf_counter()
                    size = c.index.save(self._snapshot_path(c.cid), marker={"cid": c.cid, "generation": c.generation})
                    c.saved = c.generation
                    log.info("snapshot of %r: %d vectors, %.1f MB in %.2f s", c.name, len(c.index), size / 1e6,
                             time.perf_counter() - started)

    def _flush_touched(self, db: sqlite3.Connection) -> None:
        db.executemany("UPDATE cache SET last_used = ? WHERE model_id = ? AND sha256 = ?",
                       [(t, m, s) for (m, s), t in self._touched.items()])
        self._touched.clear()

    @staticmethod
    def _insert_collection(db: sqlite3.Connection, name: str, model_id: str, dim: int,
                           spec: IndexSpec) -> _Collection:
        """Insert the row inside the caller's transaction; the caller registers it once committed."""
        now = time.time()
        cid = db.execute("INSERT INTO collections (name, model_id, dim, index_spec, created) "
                         "VALUES (?, ?, ?, ?, ?) RETURNING cid", (name, model_id, dim, str(spec), now)).fetchone()[0]
        log.info("creating collection %r (model %s, dim %d, index %s)", name, model_id, dim, spec)
        return _Collection(cid, name, model_id, dim, spec, 0, now, VectorIndex(dim, spec))

    def _get(self, name: str) -> _Collection:
        self._conn()
        c = self._collections.get(name)
        if c is None:
            names = sorted(self._collections)
            known = ", ".join(_shown(n) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10
                                                                  else "") if names else "none yet"
            raise NotFoundError(f"no collection {_shown(name)} (collections: {known})")
        return c

    def _targets(self, collection: str | None, model_id: str | None, dim: int) -> list[_Collection]:
        if collection is not None:
            c = self._get(collection)
            _check_binding(c, model_id or c.model_id, dim)
            return [c]
        self._conn()
        if model_id is None:
            models = sorted({c.model_id for c in self._collections.values()})
            if len(models) > 1:
                raise ValueError(f"collections hold vectors of {len(models)} models ({', '.join(models)}); "
                                 "pass model_id= to choose the ones to search")
            model_id = models[0] if models else None
        targets = [c for c in self._collections.values() if c.model_id == model_id]
        for c in targets:
            _check_binding(c, c.model_id, dim)
        return targets

    def _search(self, targets: list[_Collection], q: np.ndarray, k: int, label: str | None,
                ef_search: int | None) -> list[list[Hit]]:
        parts = []
        for c in targets:
            allowed = None
            if label is not None:
                with self._db_lock:
                    allowed = np.fromiter((f for (f,) in self._conn().execute(
                        "SELECT fid FROM items WHERE cid = ? AND label = ?", (c.cid, label))), dtype=np.int64)
                if not len(allowed):
                    continue
            scores, fids = c.index.search(q, k, allowed=allowed, ef_search=ef_search)
            parts.append((scores, fids, c.name))
        if not parts:
            return [[] for _ in range(len(q))]
        scores = np.hstack([p[0] for p in parts])
        fids = np.hstack([p[1] for p in parts])
        names = np.hstack([np.full(p[1].shape[1], p[2], dtype=object) for p in parts])
        best = [[j for j in np.lexsort((fids[r], -scores[r])) if fids[r, j] >= 0][:k] for r in range(len(q))]
        wanted = sorted({int(fids[r, j]) for r, row in enumerate(best) for j in row})
        with self._db_lock:
            rows = {f: (i, lab, meta) for f, i, lab, meta in _chunked_query(
                self._conn(), "SELECT fid, item_id, label, metadata FROM items WHERE fid IN ({})", [], wanted)}
        return [[Hit(rows[int(fids[r, j])][0], float(scores[r, j]), names[j], rows[int(fids[r, j])][1],
                     json.loads(rows[int(fids[r, j])][2])) for j in row] for r, row in enumerate(best)]

    def _info(self, c: _Collection) -> CollectionInfo:
        with self._db_lock:
            counts = self._conn().execute("SELECT label, count(*) FROM items WHERE cid = ? GROUP BY label",
                                          (c.cid,)).fetchall()
        labels = {lab: n for lab, n in counts if lab is not None}
        return CollectionInfo(c.name, c.model_id, c.dim, str(c.spec), count=sum(n for _, n in counts), labels=labels,
                              unlabeled=sum(n for lab, n in counts if lab is None), created=c.created)


# --- SQLite helpers ---

@contextmanager
def _transaction(db: sqlite3.Connection, *, durable: bool = True) -> Iterator[None]:
    """One write transaction; the caller holds the connection's mutex. Rolled back on any error.

    ``durable=False`` commits without fsync (for data that can be recomputed, like cache rows).
    """
    if not durable:
        db.execute("PRAGMA synchronous = NORMAL")
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        if not durable:
            db.execute("PRAGMA synchronous = FULL")


def _chunked_query(db: sqlite3.Connection, sql: str, params: list[Any], values: Sequence[Any]) -> list[tuple]:
    """``sql`` with ``IN ({})`` filled by ``values``, in chunks that fit SQLite's variable limit."""
    rows: list[tuple] = []
    for start in range(0, len(values), _CHUNK):
        chunk = list(values[start:start + _CHUNK])
        rows += db.execute(sql.format(", ".join("?" * len(chunk))), [*params, *chunk]).fetchall()
    return rows


def _chunked_execute(db: sqlite3.Connection, sql: str, values: Sequence[Any], *, prefix: Sequence[Any] = ()) -> int:
    changed = 0
    for start in range(0, len(values), _CHUNK):
        chunk = list(values[start:start + _CHUNK])
        changed += db.execute(sql.format(", ".join("?" * len(chunk))), [*prefix, *chunk]).rowcount
    return changed


def _drop_orphan_images(db: sqlite3.Connection, shas: Sequence[str | None]) -> None:
    """Delete kept images no item refers to any more (inside the caller's transaction)."""
    _chunked_execute(db, "DELETE FROM images WHERE sha256 IN ({}) AND NOT EXISTS "
                         "(SELECT 1 FROM items WHERE items.sha256 = images.sha256)", sorted({s for s in shas if s}))


def _blob(vector: np.ndarray) -> bytes:
    return vector.astype("<f4", copy=False).tobytes()


def _vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)  # a writable native-order copy


# --- input checks (messages name what was received and how to fix it) ---

MAX_NAME = 256  # collection names and labels, in characters
MAX_ID = 1024  # item ids


def _shown(value: Any, limit: int = 200) -> str:
    """``repr(value)``, shortened: messages travel in gRPC trailers, which have a size limit."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}...' ({len(value) if isinstance(value, str) else '?'} chars)"


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ValueError(f"a collection name must be a string of 1 to {MAX_NAME} characters, got {_shown(name)}")
    return name


def _check_list(values: Any, what: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{what} must be a list, got {type(values).__name__}; wrap a single value in [...]")
    return list(values)


def _check_ids(ids: Any) -> list[str]:
    ids = _check_list(ids, "ids")
    for i in ids:
        if not isinstance(i, str) or not i or len(i) > MAX_ID:
            raise ValueError(f"item ids must be strings of 1 to {MAX_ID} characters, got {_shown(i)}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"item id {_shown(dup)} appears more than once in one call; pass each id once")
    return ids


def _check_sha256(sha: Any) -> str:
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
        raise ValueError("a sha256 must be 64 hex digits (hashlib.sha256(image_bytes).hexdigest()), "
                         f"got {_shown(sha)}")
    return sha.lower()


def _check_model_id(model_id: Any) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must be a non-empty string (Embedder.model_id), got {_shown(model_id)}")
    return model_id


def _check_label(label: Any) -> str | None:
    if label is not None and (not isinstance(label, str) or not label or len(label) > MAX_NAME):
        raise ValueError(f"a label must be a string of 1 to {MAX_NAME} characters, or None for no label; "
                         f"got {_shown(label)}")
    return label


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    return int(k)


def _check_ef(ef_search: Any) -> int | None:
    low, high = HNSW_LIMITS["ef_search"]
    if ef_search is not None and (isinstance(ef_search, bool) or not isinstance(ef_search, int)
                                  or not low <= ef_search <= high):
        raise ValueError(f"ef_search must be an int in [{low}, {high}] or None, got {ef_search!r}")
    return ef_search


def _check_vectors(x: Any, *, n: int | None = None, name: str = "vectors", nonzero: bool = True) -> np.ndarray:
    """``x`` as C-contiguous float32 ``(N, D)``, finite (and without zero rows when ``nonzero``)."""
    try:
        arr = np.ascontiguousarray(x, dtype="float32")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a float array of shape (N, dim): {e}") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, dim), got {arr.shape}; pass v[None] for a single vector")
    if n is not None and len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} rows but {n} ids were given; pass one row per id")
    bad = ~np.isfinite(arr).all(axis=1)
    if nonzero:
        bad |= ~arr.any(axis=1)
    if bad.any():
        raise ValueError(f"row {int(np.argmax(bad))} of {name} is not finite or is all zeros; "
                         "cosine similarity needs finite, non-zero vectors")
    return arr


def _check_binding(c: _Collection, model_id: str, dim: int) -> None:
    if model_id != c.model_id:
        raise ModelMismatchError(f"collection {c.name!r} holds vectors of model {c.model_id}, not {model_id}; "
                                 "vectors of different models are not comparable. Use another collection.")
    if dim != c.dim:
        raise DimensionMismatchError(f"collection {c.name!r} holds {c.dim}-d vectors, got {dim}-d; "
                                     "use another collection, or vectors of its model")


def _column(values: Sequence[_T] | None, ids: list[str], what: str, check: Callable[[Any], _T]) -> list[_T]:
    if values is None:
        return [None] * len(ids)  # type: ignore[list-item]
    values = _check_list(values, what)
    if len(values) != len(ids):
        raise ValueError(f"{what} has {len(values)} entries but {len(ids)} ids were given; pass one per id (or None)")
    return [check(v) for v in values]


def _metadata_json(metadata: Any, item_id: str) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata of item {_shown(item_id)} must be a dict, got {type(metadata).__name__}")
    try:
        text = json.dumps(dict(metadata), sort_keys=True, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # a lone surrogate cannot be stored as UTF-8
        return text
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"metadata of item {_shown(item_id)} is not storable JSON ({type(e).__name__}: "
                         f"{str(e)[:200]}); use str, finite numbers, bool, None, list and dict values") from None


def _missing_message(ids: list[str], collection: str) -> str:
    shown = ", ".join(_shown(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return f"no item {shown} in collection {_shown(collection)}"
