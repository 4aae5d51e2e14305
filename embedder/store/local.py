"""Collections in FAISS (in RAM) with SQLite as the truth, in the data dir: the default backend, embedded, no server.

See :mod:`embedder.store` for the tables, the snapshots, the locking and the durability. The store facade
validates every argument; this module holds the collections' half of the SQLite database (tables
``collections``, ``items``, ``images``) and their FAISS indexes (:mod:`.indexes`), and shares the database
connection and its mutex with the embedding cache (:mod:`.cache`), which it empties of images that items come
to hold.

Locks, always taken in this order: a collection's readers-writer lock (several, for a cross-collection
search or close, in cid order), then the catalog mutex (the dict of collections; held only briefly), then
the SQLite mutex. No thread waits for a collection's lock while it holds either mutex, and only ``close``
holds more than one collection's write lock, so a write to one collection never waits for, or stalls,
another collection.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import AbstractSet, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import InvalidArgumentError, NotFoundError, StoreClosedError
from ..filters import Filter
from ..index import IndexSpec
from ..inputs import content_hash, shown
from ..jsonrule import load_stored_object
from ..results import AddResult, CollectionInfo, DeleteResult, Hit, ItemPage, StoredItem
from .backend import pick_model
from .cache import EmbeddingCache
from .indexes import Collection, Snapshots, insert_collection
from .integrity import ITEM_COLUMNS, corrupted, item_crc, item_ok
from .sqlite import blob, chunked_execute, chunked_query, drop_orphan_images, matrix, transaction, vector
from .validation import missing_message
from .where import Selections, where_sql

_CLOSED = "the store is closed (the server is shutting down); retry on a running instance"


class LocalCollections:
    """Collections of one data dir: FAISS indexes over SQLite rows. See :mod:`embedder.store.local`."""

    def __init__(self, data_dir: Path, conn: Callable[[], sqlite3.Connection], db_lock: threading.Lock,
                 cache: EmbeddingCache) -> None:
        """``conn`` returns the store's SQLite connection (StoreClosedError once closed); ``db_lock`` guards it."""
        self.data_dir = data_dir
        self._conn, self._db_lock, self._cache = conn, db_lock, cache
        self._database = data_dir / "store.sqlite3"
        self._snapshots = Snapshots(data_dir / "snapshots")
        self._catalog = threading.Lock()  # guards _collections and _closing
        self._closing = False
        self._selections = Selections()  # under db_lock
        self._collections: dict[str, Collection] = self._snapshots.open_all(conn(), self._database)

    # --- writes ---

    def create_collection(self, name: str, model_id: str, dim: int, spec: IndexSpec) -> CollectionInfo:
        c = self._get_or_create(name, model_id, dim, spec)
        c.check_binding(model_id, dim)
        if c.spec != spec:
            raise InvalidArgumentError(f"collection {name!r} exists with index '{c.spec}', not '{spec}'; "
                                       "use another name, or delete it first")
        return self._info(c)

    def add(self, name: str, ids: list[str], x: np.ndarray, model_id: str, shas: list[str | None],
            labs: list[str | None], metas: list[str], blobs: list[bytes | None]) -> AddResult:
        now = time.time()
        c = self._get_or_create(name, model_id, x.shape[1], IndexSpec())
        c.check_binding(model_id, x.shape[1])
        with self._locked(c, write=True):
            with self._db_lock:
                db = self._conn()
                with transaction(db):
                    old = {i: (fid, created, sha) for i, fid, created, sha in chunked_query(
                        db, "SELECT item_id, fid, created, sha256 FROM items WHERE cid = ? AND item_id IN ({})",
                        [c.cid], ids)}
                    old_fids = np.array([fid for fid, _, _ in old.values()], dtype=np.int64)
                    chunked_execute(db, "DELETE FROM items WHERE fid IN ({})", old_fids.tolist())
                    db.executemany("INSERT OR IGNORE INTO images (sha256, data) VALUES (?, ?)",
                                   [(sha, data) for sha, data in zip(shas, blobs) if data is not None])
                    fids = np.empty(len(ids), dtype=np.int64)
                    for j, (item_id, sha, vec, label, meta) in enumerate(zip(ids, shas, x, labs, metas)):
                        created = old[item_id][1] if item_id in old else now
                        data = blob(vec)
                        fids[j] = db.execute(
                            "INSERT INTO items (cid, item_id, sha256, vector, label, metadata, created, updated, crc) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING fid",
                            (c.cid, item_id, sha, data, label, meta, created, now,
                             item_crc(c.cid, item_id, sha, label, meta, data))).fetchone()[0]
                    promoted = self._cache.promote(db, model_id, shas)
                    db.execute("UPDATE collections SET generation = generation + 1 WHERE cid = ?", (c.cid,))
                    drop_orphan_images(db, [sha for _, _, sha in old.values()])
                self._cache.count -= promoted
            c.generation += 1
            c.index.remove(old_fids)
            c.index.add(fids, x)
        return AddResult(name, added=len(ids) - len(old), replaced=len(old))

    def delete(self, collection: str, ids: list[str]) -> DeleteResult:
        with self._locked(self._get(collection), write=True) as c:
            with self._db_lock:
                db = self._conn()
                with transaction(db):
                    rows = chunked_query(db, "SELECT item_id, fid, sha256 FROM items WHERE cid = ? AND item_id IN ({})",
                                         [c.cid], ids)
                    found = {item_id: fid for item_id, fid, _ in rows}
                    chunked_execute(db, "DELETE FROM items WHERE fid IN ({})", list(found.values()))
                    drop_orphan_images(db, [sha for _, _, sha in rows])
                    db.execute("UPDATE collections SET generation = generation + 1 WHERE cid = ?", (c.cid,))
            c.generation += 1
            c.index.remove(np.fromiter(found.values(), dtype=np.int64, count=len(found)))
        return DeleteResult(c.name, deleted=len(found), missing=[i for i in ids if i not in found])

    def set_labels(self, collection: str, values: dict[str, str | None]) -> int:
        ids = list(values)
        now = time.time()
        with self._locked(self._get(collection), write=True) as c:
            with self._db_lock:
                db = self._conn()
                with transaction(db):
                    rows = chunked_query(db, f"SELECT {ITEM_COLUMNS} FROM items WHERE cid = ? AND item_id IN ({{}})",
                                         [c.cid], ids)
                    found = {r[0] for r in rows}
                    missing = [i for i in ids if i not in found]
                    if missing:
                        raise NotFoundError(missing_message(missing, c.name))
                    self._check_items(c, rows)
                    db.executemany("UPDATE items SET label = ?, updated = ?, crc = ? WHERE cid = ? AND item_id = ?",
                                   [(values[i], now, item_crc(c.cid, i, sha, values[i], meta, data), c.cid, i)
                                    for i, sha, _, meta, data, _ in rows])
        return len(ids)

    def delete_collection(self, name: str) -> None:
        """Delete a collection with all its items and its snapshot."""
        with self._locked(self._get(name), write=True) as c:
            with self._db_lock:
                db = self._conn()
                with transaction(db):
                    shas = [sha for (sha,) in db.execute("SELECT sha256 FROM items WHERE cid = ?", (c.cid,))]
                    db.execute("DELETE FROM collections WHERE cid = ?", (c.cid,))
                    drop_orphan_images(db, shas)
            c.deleted = True
            self._snapshots.path(c.cid).unlink(missing_ok=True)
        with self._catalog:
            if self._collections.get(c.name) is c:  # not a collection created under the name meanwhile
                del self._collections[c.name]

    # --- reads ---

    def get(self, collection: str, ids: list[str]) -> list[StoredItem | None]:
        with self._locked(self._get(collection)) as c:
            with self._db_lock:
                rows = chunked_query(self._conn(), f"SELECT {ITEM_COLUMNS}, created, updated FROM items "
                                                   "WHERE cid = ? AND item_id IN ({})", [c.cid], ids)
        self._check_items(c, rows)
        found = {r[0]: StoredItem(r[0], c.name, vector(r[4]), r[1], r[2], _metadata(r[3], r[0]), r[6], r[7])
                 for r in rows}
        return [found.get(i) for i in ids]

    def training_rows(self, collection: str, chosen: list[str] | None,
                      where: Filter | None = None) -> tuple[list[str], np.ndarray, list[str | None]]:
        """``(ids, vectors, labels)`` in insertion order: of the labelled items, or of the ``chosen`` ones that exist
        (labelled or not; the facade names the missing and unlabelled ones)."""
        condition, params = _condition(where)
        with self._locked(self._get(collection)) as c:
            with self._db_lock:
                db = self._conn()
                if chosen is None:
                    rows = db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE cid = ? AND label IS NOT NULL "
                                      f"AND {condition} ORDER BY fid", (c.cid, *params)).fetchall()
                else:
                    rows = sorted(chunked_query(db, f"SELECT {ITEM_COLUMNS}, fid FROM items "
                                                    "WHERE cid = ? AND item_id IN ({})", [c.cid], chosen),
                                  key=lambda r: r[6])
        self._check_items(c, rows)
        return [r[0] for r in rows], matrix([r[4] for r in rows], c.dim), [r[2] for r in rows]

    def images(self, collection: str, ids: list[str]) -> list[bytes | None]:
        with self._locked(self._get(collection)) as c:
            with self._db_lock:
                rows = chunked_query(self._conn(), "SELECT i.item_id, i.sha256, m.data FROM items i JOIN images m "
                                                   "ON m.sha256 = i.sha256 WHERE i.cid = ? AND i.item_id IN ({})",
                                     [c.cid], ids)
        damaged = [item_id for item_id, sha, data in rows if content_hash(data) != sha]
        if damaged:
            raise corrupted(c.name, damaged, self._database, action="their kept images are not served")
        found = {item_id: data for item_id, _, data in rows}
        return [found.get(i) for i in ids]

    def page(self, collection: str, offset: int, limit: int, label: str | None, unlabelled: bool,
             where: Filter | None) -> ItemPage:
        condition, params = _condition(where)
        selected, args = f"i.cid = ? AND {condition}", list(params)
        if label is not None:
            selected, args = f"{selected} AND i.label = ?", [*args, label]
        elif unlabelled:
            selected = f"{selected} AND i.label IS NULL"
        columns = ", ".join(f"i.{name}" for name in ITEM_COLUMNS.split(", "))
        with self._locked(self._get(collection)) as c:
            with self._db_lock:
                db = self._conn()
                (total,) = db.execute(f"SELECT count(*) FROM items i WHERE {selected}", [c.cid, *args]).fetchone()
                # the page's fids first, from an index alone: the rows skipped by OFFSET are never read (sorting
                # whole rows, vectors and all, to skip them costs seconds at 100k items)
                rows = db.execute(f"SELECT {columns}, i.created, i.updated, m.sha256 IS NOT NULL FROM items i "
                                  "LEFT JOIN images m ON m.sha256 = i.sha256 WHERE i.fid IN (SELECT i.fid FROM "
                                  f"items i WHERE {selected} ORDER BY i.fid LIMIT ? OFFSET ?) ORDER BY i.fid",
                                  [c.cid, *args, limit, offset]).fetchall()
        self._check_items(c, rows)
        return ItemPage([StoredItem(r[0], c.name, vector(r[4]), r[1], r[2], _metadata(r[3], r[0]), r[6], r[7])
                         for r in rows], [bool(r[8]) for r in rows], total, offset)

    def vectors(self, collection: str, where: Filter | None = None) -> tuple[list[str], np.ndarray]:
        """Every item of a collection (whose metadata passes ``where``): ``(ids, vectors)`` in insertion order."""
        condition, params = _condition(where)
        with self._locked(self._get(collection)) as c:
            with self._db_lock:
                rows = self._conn().execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE cid = ? AND {condition} "
                                            "ORDER BY fid", (c.cid, *params)).fetchall()
        self._check_items(c, rows)
        return [r[0] for r in rows], matrix([r[4] for r in rows], c.dim)

    def search(self, collection: str | None, q: np.ndarray, k: int, label: str | None, model_id: str | None,
               ef_search: int | None, only: AbstractSet[str] | None,
               where: Filter | None = None) -> list[list[Hit]]:
        condition = _condition(where)
        targets = self._targets(collection, model_id, q.shape[1], only)
        with ExitStack() as locks:
            for c in sorted(targets, key=lambda c: c.cid):  # in cid order, as close takes them
                locks.enter_context(self._locked(c) if collection is not None else c.lock.read())
            return self._search([c for c in targets if not c.deleted], q, k, label, condition, ef_search)

    def collection(self, name: str) -> CollectionInfo:
        return self._info(self._get(name))

    def list_collections(self) -> list[CollectionInfo]:
        return [self._info(c) for c in sorted(self._live(), key=lambda c: c.name)]

    def members(self, model_id: str, shas: Sequence[str], visible: AbstractSet[str] | None) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._db_lock:
            rows = chunked_query(self._conn(), f"SELECT {ITEM_COLUMNS}, i.cid, c.name FROM items i JOIN collections c "
                                               "ON c.cid = i.cid WHERE c.model_id = ? AND i.sha256 IN ({})",
                                 [model_id], sorted(set(shas)))
        for row in rows:
            if visible is not None and row[7] not in visible:
                continue
            if item_ok(row[6], row):
                found.setdefault(row[1], vector(row[4]))
            else:  # the item is reported when it is read itself; here it is only a miss
                corrupted(row[7], [row[0]], self._database, action="not used as a cached vector")
        return found

    def disk_bytes(self) -> int:
        """The snapshots' size (the facade counts the SQLite files)."""
        return sum(p.stat().st_size for p in self._snapshots.files() if p.exists())

    def shared_files(self, folder: str) -> None:
        return None  # one node's store: its files stay in its data dir

    # --- persistence ---

    def save(self) -> None:
        """Snapshot every collection changed since its last snapshot. Searches go on meanwhile; writes to the
        collection being written wait."""
        for c in sorted(self._live(), key=lambda c: c.cid):
            with c.lock.read():
                if not c.deleted:
                    self._snapshots.save(c, self._conn(), self._db_lock)

    def close(self) -> None:
        """Snapshot changed collections once the calls in flight finish; calls from now on raise StoreClosedError."""
        with self._catalog:
            if self._closing:
                return
            self._closing = True
            collections = sorted(self._collections.values(), key=lambda c: c.cid)
        with ExitStack() as locks:
            for c in collections:  # the calls in flight finish first
                locks.enter_context(c.lock.write())
            for c in collections:
                if not c.deleted:
                    self._snapshots.save(c, self._conn(), self._db_lock)

    # --- internals ---

    def _live(self) -> list[Collection]:
        """The collections now (a copy: the dict changes under the catalog mutex)."""
        with self._catalog:
            if self._closing:
                raise StoreClosedError(_CLOSED)
            return [c for c in self._collections.values() if not c.deleted]

    def _get(self, name: str) -> Collection:
        """The collection ``name``; a closed store says so, not "no collection"."""
        with self._catalog:
            if self._closing:
                raise StoreClosedError(_CLOSED)
            c = self._collections.get(name)
        if c is None or c.deleted:
            raise self._not_found(name)
        return c

    @staticmethod
    def _not_found(name: str) -> NotFoundError:
        # other collections' names are not listed: a key limited to some collections must not learn the rest
        return NotFoundError(f"no collection {shown(name)}; list the collections with Stats (`embedder stats`)")

    def _get_or_create(self, name: str, model_id: str, dim: int, spec: IndexSpec) -> Collection:
        """The collection ``name``, created (committed, registered) if there is none."""
        with self._catalog:
            c = self._collections.get(name)
            if c is None or c.deleted:
                if self._closing:
                    raise StoreClosedError(_CLOSED)
                spec.check_caps()
                with self._db_lock:
                    db = self._conn()
                    with transaction(db):
                        c = insert_collection(db, name, model_id, dim, spec)
                self._collections[name] = c
            return c

    @contextmanager
    def _locked(self, c: Collection, *, write: bool = False) -> Iterator[Collection]:
        """``c`` with its lock held; NotFoundError if it was deleted while this call waited."""
        with c.lock.write() if write else c.lock.read():
            if c.deleted:
                raise self._not_found(c.name)
            yield c

    def _check_items(self, c: Collection, rows: Sequence[Sequence]) -> None:
        """Raise DataLossError naming the rows (starting with ITEM_COLUMNS) that fail their checksum."""
        damaged = [r[0] for r in rows if not item_ok(c.cid, r)]
        if damaged:
            raise corrupted(c.name, damaged, self._database, action="not served")

    def _targets(self, collection: str | None, model_id: str | None, dim: int,
                 only: AbstractSet[str] | None = None) -> list[Collection]:
        if collection is not None:
            c = self._get(collection)
            c.check_binding(model_id or c.model_id, dim)
            return [c]
        live = [c for c in self._live() if only is None or c.name in only]
        model_id = pick_model({c.model_id for c in live}, model_id)
        targets = [c for c in live if c.model_id == model_id]
        for c in targets:
            c.check_binding(c.model_id, dim)
        return targets

    def _search(self, targets: list[Collection], q: np.ndarray, k: int, label: str | None,
                condition: tuple[str, list], ef_search: int | None) -> list[list[Hit]]:
        """Search each target's index, then merge: best score first (ties in insertion order), ``k`` per query.

        A label or metadata filter selects its items' ids in SQLite first, and the index searches only those
        (:meth:`embedder.index.VectorIndex.search`: exact where the selection is small)."""
        parts = []
        for c in targets:
            allowed = None if condition[0] == "1" else self._selected(c, condition)
            if label is not None:
                with self._db_lock:
                    labelled = np.fromiter((f for (f,) in self._conn().execute(
                        "SELECT fid FROM items WHERE cid = ? AND label = ?", (c.cid, label))), dtype=np.int64)
                allowed = labelled if allowed is None else np.intersect1d(allowed, labelled, assume_unique=True)
            if allowed is not None and not len(allowed):
                continue
            scores, fids = c.index.search(q, k, allowed=allowed, ef_search=ef_search,
                                          vectors=lambda found, c=c: self._vectors(c, found))
            parts.append((scores, fids, c))
        if not parts:
            return [[] for _ in range(len(q))]
        scores = np.hstack([p[0] for p in parts])
        fids = np.hstack([p[1] for p in parts])
        owners = np.hstack([np.full(p[1].shape[1], p[2], dtype=object) for p in parts])
        best = [[j for j in np.lexsort((fids[r], -scores[r])) if fids[r, j] >= 0][:k] for r in range(len(q))]
        owner = {int(fids[r, j]): owners[j] for r, row in enumerate(best) for j in row}
        with self._db_lock:
            found = chunked_query(self._conn(), f"SELECT {ITEM_COLUMNS}, fid FROM items WHERE fid IN ({{}})", [],
                                  sorted(owner))
        for c in set(owner.values()):  # each hit's row is checked against the collection it came from
            self._check_items(c, [r for r in found if owner[r[6]] is c])
        rows = {r[6]: r for r in found}
        return [[Hit(rows[int(fids[r, j])][0], float(scores[r, j]), owners[j].name, rows[int(fids[r, j])][2],
                     _metadata(rows[int(fids[r, j])][3], rows[int(fids[r, j])][0])) for j in row]
                for r, row in enumerate(best)]

    def _vectors(self, c: Collection, fids: np.ndarray) -> np.ndarray:
        """The stored float32 vectors of ``fids`` (in ``c``), in their order, for re-ranking: only those rows are read."""
        with self._db_lock:
            rows = chunked_query(self._conn(), f"SELECT {ITEM_COLUMNS}, fid FROM items WHERE fid IN ({{}})", [],
                                 fids.tolist())
        self._check_items(c, rows)
        stored = {r[6]: r[4] for r in rows}
        return matrix([stored[int(f)] for f in fids], c.dim)

    def _selected(self, c: Collection, condition: tuple[str, list]) -> np.ndarray:
        """The ids of ``c``'s items that pass ``condition``; the caller holds ``c``'s lock (its generation holds)."""
        key = Selections.key(c.cid, c.generation, condition)
        with self._db_lock:
            fids = self._selections.get(key)
            if fids is None:
                fids = np.fromiter((f for (f,) in self._conn().execute(
                    f"SELECT fid FROM items WHERE cid = ? AND {condition[0]}", [c.cid, *condition[1]])),
                    dtype=np.int64)
                self._selections.put(key, fids)
        return fids

    def _info(self, c: Collection) -> CollectionInfo:
        with self._db_lock:
            counts = self._conn().execute("SELECT label, count(*) FROM items WHERE cid = ? GROUP BY label",
                                          (c.cid,)).fetchall()
        labels = {lab: n for lab, n in counts if lab is not None}
        return CollectionInfo(c.name, c.model_id, c.dim, str(c.spec), count=sum(n for _, n in counts), labels=labels,
                              unlabeled=sum(n for lab, n in counts if lab is None), created=c.created)


def _condition(where: Filter | None) -> tuple[str, list]:
    """``where`` compiled to an SQL condition on ``items`` and its parameters; ``("1", [])`` for no filter."""
    return ("1", []) if where is None else where_sql(where)


def _metadata(text: str, item_id: str) -> dict[str, Any]:
    """Stored metadata read back; one stored before the JSON rule that breaks it comes back marked, never raising
    (a 982-deep value must not fail every Get and Search that meets it)."""
    return load_stored_object(text, f"the metadata of item {item_id!r}")
