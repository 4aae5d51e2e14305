"""The :class:`Store` facade: one object over the cache, the collections and their indexes, and the locks.

Locks, always taken in this order: a collection's readers-writer lock (several, for a cross-collection
search or close, in cid order), then the catalog mutex (the dict of collections; held only briefly), then
the SQLite mutex. No thread waits for a collection's lock while it holds either mutex, and only ``close``
holds more than one collection's write lock, so a write to one collection never waits for, or stalls,
another collection.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import AbstractSet, Any, Iterator, Mapping, Sequence

import numpy as np

from .. import filters
from ..config import Config
from ..errors import InvalidArgumentError, NotFoundError, StoreClosedError, StoreLockedError
from ..index import IndexSpec
from ..inputs import content_hash
from ..jsonrule import load_stored_object
from ..results import AddResult, CollectionInfo, DeleteResult, Hit, StoredItem, StoreStats
from .cache import EmbeddingCache
from .indexes import Collection, Snapshots, insert_collection
from .integrity import ITEM_COLUMNS, corrupted, item_crc, item_ok
from .sqlite import blob, chunked_execute, chunked_query, connect, drop_orphan_images, matrix, transaction, vector
from .validation import (check_column, check_ef, check_ids, check_k, check_label, check_list, check_model_id,
                         check_name, check_sha256, check_vectors, metadata_json, missing_message, shown)
from .where import where_sql

_CLOSED = "the store is closed (the server is shutting down); retry on a running instance"


class Store:
    """Embedding cache and collections in one data directory; thread-safe. See :mod:`embedder.store`."""

    def __init__(self, data_dir: str | Path, *, cache_max_items: int = 1_000_000,
                 cache_max_age_seconds: float = 0, cache_shared: bool = False) -> None:
        if not isinstance(cache_max_items, int) or cache_max_items < 0:
            raise InvalidArgumentError(f"cache_max_items must be an int >= 0 (0 disables the cache), "
                                       f"got {cache_max_items!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.cache_max_items = cache_max_items
        self.cache_max_age_seconds = cache_max_age_seconds  # 0: rows stay until evicted
        self.cache_shared = cache_shared  # every owner's rows are the shared ones ("")
        self._snapshots = Snapshots(self.data_dir / "snapshots")  # creates data_dir too
        self._catalog = threading.Lock()  # guards _collections and _closing
        self._db_lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._closing = False
        self._lock_fd = self._lock_dir()
        self._db: sqlite3.Connection | None = None
        self._database = self.data_dir / "store.sqlite3"
        try:
            self._db = connect(self._database)
            self._cache = EmbeddingCache(self._db, self._database)
            self._collections = self._snapshots.open_all(self._db, self._database)
        except BaseException:
            self._release()
            raise

    @classmethod
    def from_config(cls, config: Config) -> Store:
        return cls(config.data_dir, cache_max_items=config.cache_max_items,
                   cache_max_age_seconds=config.cache_max_age_seconds, cache_shared=config.cache_shared)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.data_dir)!r}, collections={len(self._collections)}, cache_items={self._cache.count})"

    # --- cache ---

    def lookup(self, model_id: str, sha256s: Sequence[str], *, owner: str = "",
               visible: AbstractSet[str] | None = None) -> list[np.ndarray | None]:
        """The stored vector of each image (by sha256 of its bytes) under ``model_id``, or None: from ``owner``'s
        cache rows or the items of the collections in ``visible`` (None: all). See :mod:`.cache`."""
        shas = [check_sha256(s) for s in check_list(sha256s, "sha256s")]
        with self._db_lock:
            found = self._cache.lookup(self._conn(), model_id, shas, owner=self._owner(owner), visible=visible,
                                       max_age=self.cache_max_age_seconds)
        return [vector(found[s]) if s in found else None for s in shas]

    def put(self, model_id: str, sha256s: Sequence[str], vectors: np.ndarray, *, owner: str = "",
            visible: AbstractSet[str] | None = None) -> None:
        """Cache ``(N, dim)`` vectors of images outside the ``visible`` collections as ``owner``'s, evicting least
        recently used ones."""
        shas = [check_sha256(s) for s in check_list(sha256s, "sha256s")]
        if not shas:
            return
        x = check_vectors(vectors, n=len(shas), nonzero=False)
        with self._db_lock:
            self._cache.put(self._conn(), model_id, dict(zip(shas, x)), self.cache_max_items,  # one row per image
                            owner=self._owner(owner), visible=visible, max_age=self.cache_max_age_seconds)

    def forget(self, sha256s: Sequence[str], *, owner: str | None = None) -> int:
        """Delete the cached vectors of these images (every model) of ``owner`` (None: everyone's); returns how
        many rows went. Items in collections keep theirs."""
        shas = sorted({check_sha256(s) for s in check_list(sha256s, "sha256s")})
        with self._db_lock:
            return self._cache.forget(self._conn(), shas, None if owner is None else self._owner(owner))

    def _owner(self, owner: str) -> str:
        return "" if self.cache_shared else owner

    # --- collections: writes ---

    def create_collection(self, name: str, *, model_id: str, dim: int,
                          index: str | IndexSpec = "flat") -> CollectionInfo:
        """Create an empty collection bound to ``model_id`` and ``dim``; ``index``: "flat" (exact) or "hnsw".

        Creating one that exists with the same model, dim and index is a no-op. :meth:`add` creates flat
        collections on first use, so this is needed only for another index. A new collection's HNSW settings
        must be within :data:`embedder.index.HNSW_CAPS`.
        """
        name, spec, model_id = check_name(name), IndexSpec.parse(index), check_model_id(model_id)
        if not isinstance(dim, int) or dim < 1:
            raise InvalidArgumentError(f"dim must be a positive int, got {dim!r}")
        c = self._get_or_create(name, model_id, dim, spec)
        c.check_binding(model_id, dim)
        if c.spec != spec:
            raise InvalidArgumentError(f"collection {name!r} exists with index '{c.spec}', not '{spec}'; "
                                       "use another name, or delete it first")
        return self._info(c)

    def add(self, collection: str, ids: Sequence[str], vectors: np.ndarray, *, model_id: str,
            sha256s: Sequence[str | None] | None = None, labels: Sequence[str | None] | None = None,
            metadata: Sequence[Mapping[str, Any] | None] | None = None,
            images: Sequence[bytes | None] | None = None) -> AddResult:
        """Insert or replace items: ``ids[i]`` gets ``vectors[i]`` (``(N, dim)``) and the optional columns.

        Re-adding an id replaces its vector, sha256, label and metadata (``created`` is kept); it is also how
        a damaged item is repaired. The collection is created (flat) on first use, and stays if the add then
        fails; afterwards its model id and dim must match, else
        :class:`ModelMismatchError` / :class:`DimensionMismatchError`. ``images`` keeps the encoded bytes of
        items (their ``sha256s`` must be the bytes' hash), stored once per content, so they can be fine-tuned
        on or embedded again by another backbone version later. Durable when it returns.
        """
        name, model_id = check_name(collection), check_model_id(model_id)
        ids = check_ids(ids)
        x = check_vectors(vectors, n=len(ids))
        shas = check_column(sha256s, ids, "sha256s", lambda s: None if s is None else check_sha256(s))
        labs = check_column(labels, ids, "labels", check_label)
        metas = [metadata_json(m, i) for m, i in zip(check_column(metadata, ids, "metadata", lambda m: m), ids)]
        blobs = check_column(images, ids, "images", lambda b: b)
        for sha, data, item_id in zip(shas, blobs, ids):
            if data is not None and (sha is None or content_hash(data) != sha):
                raise InvalidArgumentError(f"the image of item {shown(item_id)} does not hash to its sha256; pass "
                                           "sha256s=[content_hash(image) ...] for the images you keep")
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

    def delete(self, collection: str, ids: Sequence[str]) -> DeleteResult:
        """Delete items by id; ids not in the collection are reported in ``missing``.

        The vectors go too: embedding a deleted item's image again is a cache miss.
        """
        ids = check_ids(ids)
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

    def set_labels(self, collection: str, labels: Mapping[str, str | None]) -> int:
        """Set (or, with None, clear) the label of existing items; all-or-nothing. Returns the number set.

        Raises :class:`NotFoundError` naming the ids that are not in the collection, :class:`DataLossError`
        naming damaged ones (a new checksum over damaged bytes would hide the damage); then nothing changes.
        """
        if not isinstance(labels, Mapping):
            raise InvalidArgumentError(f"labels must be a mapping of item id to label, got {type(labels).__name__}")
        ids = check_ids(list(labels))
        values = dict(zip(ids, (check_label(labels[i]) for i in ids)))
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

    # --- collections: reads ---

    def get(self, collection: str, ids: Sequence[str]) -> list[StoredItem | None]:
        """The stored items, in the order of ``ids``; None where an id is not in the collection."""
        ids = check_ids(ids)
        with self._locked(self._get(collection)) as c:
            with self._db_lock:
                rows = chunked_query(self._conn(), f"SELECT {ITEM_COLUMNS}, created, updated FROM items "
                                                   "WHERE cid = ? AND item_id IN ({})", [c.cid], ids)
        self._check_items(c, rows)
        found = {r[0]: StoredItem(r[0], c.name, vector(r[4]), r[1], r[2], _metadata(r[3], r[0]), r[6], r[7])
                 for r in rows}
        return [found.get(i) for i in ids]

    def labelled(self, collection: str, *, labels: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                 where: str | Mapping[str, Any] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """A training set from a collection: ``(ids, vectors (N, dim), labels)`` of its labelled items.

        ``labels`` keeps only those classes; ``ids`` only those items (each must exist and carry a label,
        else :class:`NotFoundError` / ValueError naming them); ``where`` only items whose metadata passes that
        filter (:mod:`embedder.filters`; not with ``ids``). Items come in insertion order.
        """
        wanted = None if labels is None else [check_label(lab) for lab in check_list(labels, "labels")]
        chosen = None if ids is None else check_ids(ids)
        condition, params = self._condition(where)
        if chosen is not None and condition != "1":
            raise InvalidArgumentError("choose the items by ids or by where, not both")
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
        if chosen is not None:
            found = {r[0] for r in rows}
            missing = [i for i in chosen if i not in found]
            if missing:
                raise NotFoundError(missing_message(missing, c.name))
            unlabelled = [r[0] for r in rows if r[2] is None]
            if unlabelled:
                listed = ", ".join(repr(i) for i in unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
                raise InvalidArgumentError(f"{len(unlabelled)} of the chosen items have no label ({listed}); "
                                           "label them with set_labels, or leave them out")
        if wanted is not None:
            keep = set(wanted)
            rows = [r for r in rows if r[2] in keep]
        return [r[0] for r in rows], matrix([r[4] for r in rows], c.dim), [r[2] for r in rows]

    def images(self, collection: str, ids: Sequence[str]) -> list[bytes | None]:
        """The kept encoded image of each item, in the order of ``ids``; None where there is none (an item
        added as a tensor, by hash, or without keeping images) or the id is not in the collection.

        Images are stored by their sha256, which is their checksum: one that no longer hashes to it raises
        :class:`DataLossError`."""
        ids = check_ids(ids)
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

    def vectors(self, collection: str, *,
                where: str | Mapping[str, Any] | None = None) -> tuple[list[str], np.ndarray]:
        """Every item of a collection (only those whose metadata passes ``where``), labelled or not:
        ``(ids, vectors (N, dim))`` in insertion order."""
        condition, params = self._condition(where)
        with self._locked(self._get(collection)) as c:
            with self._db_lock:
                rows = self._conn().execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE cid = ? AND {condition} "
                                            "ORDER BY fid", (c.cid, *params)).fetchall()
        self._check_items(c, rows)
        return [r[0] for r in rows], matrix([r[4] for r in rows], c.dim)

    def search(self, collection: str | None, queries: np.ndarray, *, k: int = 10, label: str | None = None,
               model_id: str | None = None, ef_search: int | None = None,
               only: AbstractSet[str] | None = None,
               where: str | Mapping[str, Any] | None = None) -> list[list[Hit]]:
        """The ``k`` most similar stored items to each of the ``(Q, dim)`` queries, best first, per query.

        ``collection=None`` searches every collection of ``model_id`` (which may be left out while all
        collections share one model). ``label`` keeps only items with that label, ``where`` only items whose
        metadata passes that filter (:mod:`embedder.filters`); either way ``k`` hits come back whenever ``k``
        items match. ``ef_search`` overrides an HNSW collection's setting for this call. A collection of another
        model or dim raises :class:`ModelMismatchError` / :class:`DimensionMismatchError`. ``only`` limits a search without
        ``collection`` to those collections (a caller's allow-list).
        """
        q = check_vectors(queries, name="queries")
        k = check_k(k)
        label = check_label(label)
        ef_search = check_ef(ef_search)
        condition = self._condition(where)
        targets = self._targets(collection, model_id, q.shape[1], only)
        with ExitStack() as locks:
            for c in sorted(targets, key=lambda c: c.cid):  # in cid order, as close takes them
                locks.enter_context(self._locked(c) if collection is not None else c.lock.read())
            return self._search([c for c in targets if not c.deleted], q, k, label, condition, ef_search)

    def search_by_id(self, collection: str, item_id: str, *, k: int = 10, label: str | None = None,
                     exclude_self: bool = True, ef_search: int | None = None,
                     where: str | Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``k`` items of ``collection`` most similar to its stored item ``item_id`` (without itself); ``label``
        and ``where`` as in :meth:`search`."""
        (item_id,) = check_ids([item_id])
        k = check_k(k)
        label = check_label(label)
        ef_search = check_ef(ef_search)
        condition = self._condition(where)
        with self._locked(self._get(collection)) as c:
            with self._db_lock:
                row = self._conn().execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE cid = ? AND item_id = ?",
                                           (c.cid, item_id)).fetchone()
            if row is None:
                raise NotFoundError(missing_message([item_id], c.name))
            self._check_items(c, [row])
            hits = self._search([c], vector(row[4])[None], k + exclude_self, label, condition, ef_search)[0]
        return [h for h in hits if not (exclude_self and h.id == item_id)][:k]

    def collection(self, name: str) -> CollectionInfo:
        return self._info(self._get(name))

    def list_collections(self) -> list[CollectionInfo]:
        return [self._info(c) for c in sorted(self._live(), key=lambda c: c.name)]

    def stats(self) -> StoreStats:
        collections = self.list_collections()
        files = [self.data_dir / f"store.sqlite3{s}" for s in ("", "-wal")] + self._snapshots.files()
        return StoreStats(collections, items=sum(c.count for c in collections), cache_items=self._cache.count,
                          cache_max_items=self.cache_max_items,
                          disk_bytes=sum(p.stat().st_size for p in files if p.exists()))

    # --- persistence ---

    def save(self) -> None:
        """Snapshot every collection changed since its last snapshot. Searches go on meanwhile; writes to the
        collection being written wait."""
        for c in sorted(self._live(), key=lambda c: c.cid):
            with c.lock.read():
                if not c.deleted:
                    self._snapshots.save(c, self._conn(), self._db_lock)

    def close(self) -> None:
        """Snapshot changed collections and close; calls from now on raise StoreClosedError. Idempotent."""
        with self._catalog:
            if self._closing:
                return
            self._closing = True
            collections = sorted(self._collections.values(), key=lambda c: c.cid)
        with ExitStack() as locks:
            for c in collections:  # the calls in flight finish first
                locks.enter_context(c.lock.write())
            try:
                for c in collections:
                    if not c.deleted:
                        self._snapshots.save(c, self._conn(), self._db_lock)
            finally:
                # Under the mutex: cache lookups and puts take only the mutex, and SQLite must not close under them.
                with self._db_lock:
                    try:
                        with transaction(self._conn()):
                            self._cache.flush(self._conn())
                    finally:
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

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreClosedError(_CLOSED)
        return self._db

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
        if model_id is None:
            models = sorted({c.model_id for c in live})
            if len(models) > 1:
                raise InvalidArgumentError(f"collections hold vectors of {len(models)} models ({', '.join(models)}); "
                                           "pass model_id= to choose the ones to search")
            model_id = models[0] if models else None
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
            allowed = None
            if label is not None or condition[0] != "1":
                by_label, labels = ("label = ?", [label]) if label is not None else ("1", [])
                with self._db_lock:
                    allowed = np.fromiter((f for (f,) in self._conn().execute(
                        f"SELECT fid FROM items WHERE cid = ? AND {by_label} AND {condition[0]}",
                        [c.cid, *labels, *condition[1]])), dtype=np.int64)
                if not len(allowed):
                    continue
            scores, fids = c.index.search(q, k, allowed=allowed, ef_search=ef_search)
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

    @staticmethod
    def _condition(where: str | Mapping[str, Any] | None) -> tuple[str, list]:
        """``where`` parsed and compiled to an SQL condition on ``items`` and its parameters; ``("1", [])`` for
        no filter. InvalidArgumentError names the part of a bad filter."""
        f = filters.parse(where)
        return ("1", []) if f is None else where_sql(f)

    def _info(self, c: Collection) -> CollectionInfo:
        with self._db_lock:
            counts = self._conn().execute("SELECT label, count(*) FROM items WHERE cid = ? GROUP BY label",
                                          (c.cid,)).fetchall()
        labels = {lab: n for lab, n in counts if lab is not None}
        return CollectionInfo(c.name, c.model_id, c.dim, str(c.spec), count=sum(n for _, n in counts), labels=labels,
                              unlabeled=sum(n for lab, n in counts if lab is None), created=c.created)


def _metadata(text: str, item_id: str) -> dict[str, Any]:
    """Stored metadata read back; one stored before the JSON rule that breaks it comes back marked, never raising
    (a 982-deep value must not fail every Get and Search that meets it)."""
    return load_stored_object(text, f"the metadata of item {item_id!r}")
