"""The :class:`Store` facade: argument checks, the embedding cache, and a collections backend (:mod:`.backend`).

The cache always lives here, in SQLite in the data dir (``store.sqlite3``), whichever backend holds the
collections: it is recomputable, read on every embed call, and private per API key, so a local table beats a
round trip to a shared server. The collections live in FAISS + the same SQLite file (:mod:`.local`, the
default) or in Milvus (:mod:`.milvus`, ``store="milvus:///abs/path.db"`` or ``"http(s)://host:port"``).

Lock order: the backend's locks (see :mod:`.local`), then the SQLite mutex, which the cache and the local
backend share.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path
from typing import AbstractSet, Any, Mapping, Sequence

import numpy as np

from .. import filters
from ..config import Config, parse_store_uri
from ..errors import InvalidArgumentError, NotFoundError, SettingError, StoreClosedError, StoreLockedError
from ..index import IndexSpec
from ..inputs import check_name, content_hash, shown
from ..results import AddResult, CollectionInfo, DeleteResult, Hit, ItemPage, StoredItem, StoreStats
from .backend import Collections
from .cache import EmbeddingCache
from .milvus_backup import record_store
from .sqlite import connect, transaction, vector
from .validation import (check_column, check_ef, check_ids, check_k, check_label, check_list, check_model_id,
                         check_page, check_sha256, check_vectors, metadata_json, missing_message)

_CLOSED = "the store is closed (the server is shutting down); retry on a running instance"


class Store:
    """Embedding cache and collections; thread-safe. See :mod:`embedder.store`."""

    def __init__(self, data_dir: str | Path, *, cache_max_items: int = 1_000_000,
                 cache_max_age_seconds: float = 0, cache_shared: bool = False, backend: str = "",
                 backend_token: str = "") -> None:
        """``backend``: empty (FAISS + SQLite in ``data_dir``), ``milvus:///abs/path.db`` (milvus-lite) or
        ``http(s)://host:port`` (a Milvus server, with ``backend_token``); the cache stays in ``data_dir``."""
        if not isinstance(cache_max_items, int) or cache_max_items < 0:
            raise InvalidArgumentError(f"cache_max_items must be an int >= 0 (0 disables the cache), "
                                       f"got {cache_max_items!r}")
        kind, target = parse_store_uri(backend)
        self.data_dir = Path(data_dir).expanduser()
        self.cache_max_items = cache_max_items
        self.cache_max_age_seconds = cache_max_age_seconds  # 0: rows stay until evicted
        self.cache_shared = cache_shared  # every owner's rows are the shared ones ("")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._db_lock = threading.Lock()
        self._lock_fd = self._lock_dir()
        self._db: sqlite3.Connection | None = None
        self._database = self.data_dir / "store.sqlite3"
        try:
            self._db = connect(self._database)
            self._cache = EmbeddingCache(self._db, self._database)
            record_store(self.data_dir, backend)  # so `embedder backup` knows where the collections are
            self._backend: Collections
            if kind == "local":
                from .local import LocalCollections
                self._backend = LocalCollections(self.data_dir, self._conn, self._db_lock, self._cache)
            else:
                try:  # imported only here: pymilvus is the `milvus` extra
                    from .milvus import MilvusCollections
                except ImportError as e:
                    raise SettingError(f"--store {backend} needs pymilvus and milvus-lite ({e}); install them with "
                                       "pip install 'embedder[milvus]' (make install does)") from None
                self._backend = MilvusCollections(target, token=backend_token,
                                                  lite_path=target if kind == "milvus-lite" else None)
        except BaseException:
            self._release()
            raise

    @classmethod
    def from_config(cls, config: Config) -> Store:
        return cls(config.data_dir, cache_max_items=config.cache_max_items,
                   cache_max_age_seconds=config.cache_max_age_seconds, cache_shared=config.cache_shared,
                   backend=config.store, backend_token=config.store_token)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.data_dir)!r}, backend={type(self._backend).__name__}, cache_items={self._cache.count})"

    # --- cache ---

    def lookup(self, model_id: str, sha256s: Sequence[str], *, owner: str = "",
               visible: AbstractSet[str] | None = None) -> list[np.ndarray | None]:
        """The stored vector of each image (by sha256 of its bytes) under ``model_id``, or None: from ``owner``'s
        cache rows or the items of the collections in ``visible`` (None: all). See :mod:`.cache`."""
        shas = [check_sha256(s) for s in check_list(sha256s, "sha256s")]
        with self._db_lock:
            cached = self._cache.lookup(self._conn(), model_id, shas, owner=self._owner(owner),
                                        max_age=self.cache_max_age_seconds)
        found = {s: vector(data) for s, data in cached.items()}
        rest = [s for s in dict.fromkeys(shas) if s not in found]
        if rest:
            found.update(self._backend.members(model_id, rest, visible))
        return [found.get(s) for s in shas]

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
        return self._backend.create_collection(name, model_id, dim, spec)

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
        return self._backend.add(name, ids, x, model_id, shas, labs, metas, blobs)

    def delete(self, collection: str, ids: Sequence[str]) -> DeleteResult:
        """Delete items by id; ids not in the collection are reported in ``missing``.

        The vectors go too: embedding a deleted item's image again is a cache miss.
        """
        return self._backend.delete(collection, check_ids(ids))

    def set_labels(self, collection: str, labels: Mapping[str, str | None]) -> int:
        """Set (or, with None, clear) the label of existing items; all-or-nothing. Returns the number set.

        Raises :class:`NotFoundError` naming the ids that are not in the collection, :class:`DataLossError`
        naming damaged ones (a new checksum over damaged bytes would hide the damage); then nothing changes.
        """
        if not isinstance(labels, Mapping):
            raise InvalidArgumentError(f"labels must be a mapping of item id to label, got {type(labels).__name__}")
        ids = check_ids(list(labels))
        return self._backend.set_labels(collection, dict(zip(ids, (check_label(labels[i]) for i in ids))))

    def delete_collection(self, name: str) -> None:
        """Delete a collection with all its items (and, in the default store, its snapshot)."""
        self._backend.delete_collection(name)

    # --- collections: reads ---

    def get(self, collection: str, ids: Sequence[str]) -> list[StoredItem | None]:
        """The stored items, in the order of ``ids``; None where an id is not in the collection."""
        return self._backend.get(collection, check_ids(ids))

    def labelled(self, collection: str, *, labels: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                 where: filters.Where = None) -> tuple[list[str], np.ndarray, list[str]]:
        """A training set from a collection: ``(ids, vectors (N, dim), labels)`` of its labelled items.

        ``labels`` keeps only those classes; ``ids`` only those items (each must exist and carry a label,
        else :class:`NotFoundError` / ValueError naming them); ``where`` only items whose metadata passes that
        filter (:mod:`embedder.filters`; not with ``ids``). Items come in insertion order.
        """
        wanted = None if labels is None else [check_label(lab) for lab in check_list(labels, "labels")]
        chosen = None if ids is None else check_ids(ids)
        f = filters.parse(where)
        if chosen is not None and f is not None:
            raise InvalidArgumentError("choose the items by ids or by where, not both")
        found, x, labs = self._backend.training_rows(collection, chosen, f)
        if chosen is not None:
            have = set(found)
            missing = [i for i in chosen if i not in have]
            if missing:
                raise NotFoundError(missing_message(missing, collection))
            unlabelled = [i for i, lab in zip(found, labs) if lab is None]
            if unlabelled:
                listed = ", ".join(repr(i) for i in unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
                raise InvalidArgumentError(f"{len(unlabelled)} of the chosen items have no label ({listed}); "
                                           "label them with set_labels, or leave them out")
        if wanted is not None:
            kept = set(wanted)
            keep = [j for j, lab in enumerate(labs) if lab in kept]
            found, x, labs = [found[j] for j in keep], x[keep], [labs[j] for j in keep]
        return found, x, labs

    def images(self, collection: str, ids: Sequence[str]) -> list[bytes | None]:
        """The kept encoded image of each item, in the order of ``ids``; None where there is none (an item
        added as a tensor, by hash, or without keeping images) or the id is not in the collection.

        Images are stored by their sha256, which is their checksum: one that no longer hashes to it raises
        :class:`DataLossError`."""
        return self._backend.images(collection, check_ids(ids))

    def page(self, collection: str, *, offset: int = 0, limit: int = 100, label: str | None = None,
             unlabelled: bool = False, where: filters.Where = None) -> ItemPage:
        """Items ``offset`` to ``offset + limit`` of a collection in insertion order, with the total: all of them,
        those labelled ``label``, or the ``unlabelled`` ones, of those only the ones whose metadata passes
        ``where``. Reads one page, never the whole collection."""
        offset, limit = check_page(offset, limit)
        label = check_label(label)
        if label is not None and unlabelled:
            raise InvalidArgumentError("ask for items with `label` or for the `unlabelled` ones, not both")
        return self._backend.page(collection, offset, limit, label, unlabelled, filters.parse(where))

    def vectors(self, collection: str, *,
                where: filters.Where = None) -> tuple[list[str], np.ndarray]:
        """Every item of a collection (only those whose metadata passes ``where``), labelled or not:
        ``(ids, vectors (N, dim))`` in insertion order."""
        return self._backend.vectors(collection, filters.parse(where))

    def search(self, collection: str | None, queries: np.ndarray, *, k: int = 10, label: str | None = None,
               model_id: str | None = None, ef_search: int | None = None,
               only: AbstractSet[str] | None = None,
               where: filters.Where = None) -> list[list[Hit]]:
        """The ``k`` most similar stored items to each of the ``(Q, dim)`` queries, best first, per query.

        ``collection=None`` searches every collection of ``model_id`` (which may be left out while all
        collections share one model). ``label`` keeps only items with that label, ``where`` only items whose
        metadata passes that filter (:mod:`embedder.filters`); either way ``k`` hits come back whenever ``k``
        items match. ``ef_search`` overrides an HNSW collection's setting for this call. A collection of another
        model or dim raises :class:`ModelMismatchError` / :class:`DimensionMismatchError`. ``only`` limits a
        search without ``collection`` to those collections (a caller's allow-list).
        """
        q = check_vectors(queries, name="queries")
        k, label, ef_search, f = check_k(k), check_label(label), check_ef(ef_search), filters.parse(where)
        return self._backend.search(collection, q, k, label, model_id, ef_search, only, f)

    def search_by_id(self, collection: str, item_id: str, *, k: int = 10, label: str | None = None,
                     exclude_self: bool = True, ef_search: int | None = None,
                     where: filters.Where = None) -> list[Hit]:
        """The ``k`` items of ``collection`` most similar to its stored item ``item_id`` (without itself); ``label``
        and ``where`` as in :meth:`search`."""
        (item_id,) = check_ids([item_id])
        k, label, ef_search, f = check_k(k), check_label(label), check_ef(ef_search), filters.parse(where)
        item = self._backend.get(collection, [item_id])[0]
        if item is None:
            raise NotFoundError(missing_message([item_id], collection))
        hits = self._backend.search(collection, item.vector[None], k + exclude_self, label, None, ef_search, None, f)[0]
        return [h for h in hits if not (exclude_self and h.id == item_id)][:k]

    def collection(self, name: str) -> CollectionInfo:
        return self._backend.collection(name)

    def list_collections(self) -> list[CollectionInfo]:
        return self._backend.list_collections()

    def stats(self) -> StoreStats:
        collections = self.list_collections()
        files = [self.data_dir / f"store.sqlite3{s}" for s in ("", "-wal")]
        return StoreStats(collections, items=sum(c.count for c in collections), cache_items=self._cache.count,
                          cache_max_items=self.cache_max_items,
                          disk_bytes=sum(p.stat().st_size for p in files if p.exists()) + self._backend.disk_bytes())

    def shared_files(self, folder: str) -> Any:
        """With Milvus, the place (in Milvus) for files every replica must read alike, e.g. ``"heads"``; None with
        the default backend, whose files stay in the data dir."""
        return self._backend.shared_files(folder)

    # --- persistence ---

    def save(self) -> None:
        """Persist the collections (default store: snapshot each changed index; Milvus: flush). Searches go on."""
        self._backend.save()

    def close(self) -> None:
        """Persist and close; calls from now on raise StoreClosedError. Idempotent."""
        try:
            self._backend.close()  # the calls in flight finish first
        finally:
            # Under the mutex: cache lookups and puts take only the mutex, and SQLite must not close under them.
            with self._db_lock:
                if self._db is None:
                    return
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
