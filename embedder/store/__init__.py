"""The vector store: a content-addressed embedding cache, and named collections for similarity search.

>>> with Store("embedder-data") as store:
...     shas = [content_hash(j) for j in jpegs]
...     store.lookup(embedder.model_id, shas)                       # [None, None]: a miss; embed, then put
...     vectors = embedder.embed(jpegs)
...     store.add("pets", ["cat-1", "cat-2"], vectors, model_id=embedder.model_id, sha256s=shas, labels=["cat", "cat"])
...     store.search("pets", vectors[:1], k=5)                      # [[Hit(id='cat-1', score=1.0000, ...), ...]]

Everything lives in ``data_dir``: ``store.sqlite3`` (+ WAL), ``snapshots/c<cid>.faiss``, ``store.lock``; or,
with ``Store(data_dir, backend="milvus:///abs/path.db" | "http(s)://host:port")``, the collections live in
Milvus (``milvus.py``) and only the cache stays in ``data_dir``. What follows describes the default backend.
One :class:`Store` object is the facade (``store.py``: argument checks, the cache) over modules of one job each:
``backend.py`` (what a collections backend provides), ``local.py`` (the default one: FAISS + SQLite),
``milvus.py`` (Milvus through pymilvus; ``milvus_files.py``: heads kept in Milvus, so every replica sees them),
``cache.py`` (the embedding cache), ``indexes.py`` (collections' FAISS indexes and their snapshots),
``sqlite.py`` (schema, upgrades, transactions), ``integrity.py`` (row checksums), ``rwlock.py`` (the readers-writer lock),
``validation.py`` (argument checks, which raise :class:`~embedder.errors.InvalidArgumentError`, a
``ValueError``), ``backup.py`` (``embedder backup`` / ``restore``: consistent copies while serving;
``milvus_backup.py``: the Milvus part of one).

**SQLite is the source of truth** (metadata *and* every vector as a float32 blob). Tables:

- ``collections``: name, the model id and dim it is bound to, its index spec, a ``generation``
  counter bumped by every add/delete, and the tags of its last two snapshots (what a snapshot is checked
  against: version 3);
- ``items``: one row per stored vector: ``fid`` (AUTOINCREMENT, never reused: the FAISS id), collection,
  the caller's ``item_id`` (unique per collection), sha256, vector, label, metadata JSON, timestamps and
  ``crc``, the row's checksum (version 3), checked by every read that serves the row;
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
label and metadata filters (:mod:`embedder.filters`, compiled to SQLite JSON1 by :mod:`.where`) select
the matching ids in SQLite into an ``IDSelectorBatch``, so ``k`` hits come back whenever ``k`` items match
(HNSW answers filters that keep under half the items exactly: :data:`embedder.index.EXACT_FILTER_FRACTION`).

**Locking**: a readers-writer lock per collection over its FAISS index. Searches, gets and snapshots of
it share it; add, delete, set_labels and delete_collection of it take it alone (FAISS is not safe to write
while searching), so a write never stalls another collection. A catalog mutex guards the dict of
collections (held briefly); one SQLite connection behind a mutex; cache lookups and puts need only that
mutex. Lock order: collection locks (in cid order), the catalog mutex, the SQLite mutex.

**Durability**: WAL with ``synchronous=FULL``: a write method returns only after its transaction is
fsynced, so an acknowledged add survives kill -9 *and* power loss (``NORMAL`` survives kill -9 but can
lose the last commits on power loss; FULL costs ~0.4 ms per commit here, small next to a batch add).
Cache rows are recomputable, so their commits skip the fsync; the next FULL commit syncs them.
SQLite's journal makes every call all-or-nothing. FAISS is updated after the commit, under the write lock.
:meth:`Store.save` / :meth:`Store.close` write each changed index to a snapshot (temp file, fsync,
rename) tagged with its collection's generation and a random tag committed to SQLite first. On open, each
index is loaded from its snapshot and reconciled with SQLite by id: rows added since are inserted, rows
gone are removed. A stale snapshot (after a crash) logs a WARNING and is caught up; a missing or corrupt
one logs a WARNING and the index is rebuilt from SQLite; one the database does not know (restored from an
older copy, or from another data dir) or newer than the database logs an ERROR and is rebuilt. Only one
process may open a data dir at a time (``flock`` on ``store.lock``).
Each module logs to a child of the ``embedder.store`` logger.
"""
from __future__ import annotations

from ..inputs import content_hash  # re-exported: callers key the cache with it (its home is embedder.inputs)
from .store import Store
from .validation import MAX_K

__all__ = ["MAX_K", "Store", "content_hash"]
