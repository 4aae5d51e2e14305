"""The content-addressed embedding cache: ``(model_id, sha256) -> vector`` for images outside every collection.

Rows carry a logical ``last_used`` clock (an exact LRU order, immune to clock jumps); beyond the store's
``cache_max_items`` the least recently used rows are evicted. Adding an item with a sha256 moves its cache
row into the item (:meth:`EmbeddingCache.promote`), so members are never evicted and no vector is stored
twice; the store's lookup checks the cache, then collection items of the same model (the backend's
``members``; with Milvus the local ``items`` table is empty, so members are cached too and age out by LRU).
Lookups only read: the recency they produce is written with the next put or at close (a crash loses only
some LRU order). A row that fails its checksum (:mod:`.integrity`) is a miss, logged as an ERROR; a damaged
cache row is deleted with the next write, so the next put stores the recomputed vector.

Privacy between API keys: each row has an ``owner`` (the key whose call embedded it; ``""`` is shared: the
library, the server's ``--token``, or every key with ``cache_shared``), and a lookup sees only its owner's rows
and the items of the collections it may see (``visible``). So a key cannot tell from a hit, or its latency,
whether another key embedded an image. With ``max_age`` (seconds) rows older than that are misses, and every
put deletes them.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import AbstractSet, Mapping, Sequence

import numpy as np

from .integrity import cache_crc
from .sqlite import blob, chunked_execute, chunked_query, transaction

log = logging.getLogger(__name__)


class EmbeddingCache:
    """The ``cache`` table with its clock and row count. Not locked: callers hold the store's SQLite mutex."""

    def __init__(self, db: sqlite3.Connection, database: Path) -> None:
        self._clock, self.count = db.execute("SELECT coalesce(max(last_used), 0), count(*) FROM cache").fetchone()
        self._touched: dict[tuple[str, str, str], int] = {}  # (owner, model, sha) hits whose last_used is unwritten
        self._damaged: set[tuple[str, str, str]] = set()  # rows that failed their checksum, deleted with the next write
        self._database = database  # for the log

    def lookup(self, db: sqlite3.Connection, model_id: str, shas: Sequence[str], *, owner: str = "",
               max_age: float = 0) -> dict[str, bytes]:
        """The stored vector blob of each of ``shas`` found under ``model_id`` in ``owner``'s cache rows (younger
        than ``max_age`` seconds, if set). Collection items are the backend's to find (``members``)."""
        unique = list(dict.fromkeys(shas))
        found = {}
        oldest = time.time() - max_age if max_age else float("-inf")
        for sha, data, crc, stored in chunked_query(
                db, "SELECT sha256, vector, crc, stored FROM cache WHERE owner = ? AND model_id = ? AND sha256 IN ({})",
                [owner, model_id], unique):
            if stored < oldest:
                continue  # expired: a miss; the next put deletes it
            if cache_crc(model_id, sha, data) == crc:
                found[sha] = data
            elif (owner, model_id, sha) not in self._damaged:
                log.error("cache row (model %s, sha256 %s) fails its checksum in %s; treated as a miss and deleted "
                          "with the next cache write", model_id, sha, self._database)
                self._damaged.add((owner, model_id, sha))
        for sha in unique:  # in input order, so the LRU order is the order of use
            if sha in found:
                self._clock += 1
                self._touched[(owner, model_id, sha)] = self._clock
        return found

    def put(self, db: sqlite3.Connection, model_id: str, rows: Mapping[str, np.ndarray], max_items: int, *,
            owner: str = "", visible: AbstractSet[str] | None = None, max_age: float = 0) -> None:
        """Store ``owner``'s vectors of images no collection in ``visible`` holds, delete rows older than
        ``max_age`` seconds (if set), then evict down to ``max_items`` rows."""
        # A cache row is recomputable, so its commit skips the fsync (NORMAL: survives kill -9, may lose the
        # latest rows on power loss); the next FULL commit syncs it with everything before it.
        now = time.time()
        with transaction(db, durable=False):
            deleted = self.flush(db)
            if max_age:
                deleted += db.execute("DELETE FROM cache WHERE stored < ?", (now - max_age,)).rowcount
            members = {s for s, name in chunked_query(
                db, "SELECT i.sha256, c.name FROM items i JOIN collections c ON c.cid = i.cid "
                    "WHERE c.model_id = ? AND i.sha256 IN ({})", [model_id], list(rows))
                       if visible is None or name in visible}
            existing = {s for (s,) in chunked_query(
                db, "SELECT sha256 FROM cache WHERE owner = ? AND model_id = ? AND sha256 IN ({})",
                [owner, model_id], list(rows))}
            fresh, seen = [], []
            for sha, vec in rows.items():
                self._clock += 1
                if sha in existing:
                    seen.append((self._clock, owner, model_id, sha))
                elif sha not in members:
                    data = blob(vec)
                    fresh.append((owner, model_id, sha, data, self._clock, cache_crc(model_id, sha, data), now))
            db.executemany("UPDATE cache SET last_used = ? WHERE owner = ? AND model_id = ? AND sha256 = ?", seen)
            db.executemany("INSERT INTO cache (owner, model_id, sha256, vector, last_used, crc, stored) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", fresh)
            count = self.count - deleted + len(fresh)
            if count > max_items:
                count -= db.execute("DELETE FROM cache WHERE rowid IN "
                                    "(SELECT rowid FROM cache ORDER BY last_used LIMIT ?)",
                                    (count - max_items,)).rowcount
        self.count = count  # only once committed

    def promote(self, db: sqlite3.Connection, model_id: str, shas: Sequence[str | None]) -> int:
        """Delete the rows (every owner's) of images that items now hold, inside the caller's transaction; returns
        how many. An owner that cannot see the collection misses once and caches the image again.

        The caller subtracts them from :attr:`count` once the transaction has committed.
        """
        return chunked_execute(db, "DELETE FROM cache WHERE model_id = ? AND sha256 IN ({})",
                               sorted({s for s in shas if s}), prefix=[model_id])

    def forget(self, db: sqlite3.Connection, shas: Sequence[str], owner: str | None) -> int:
        """Delete the rows of ``shas`` (every model) of ``owner`` (None: every owner) in one transaction; returns
        how many went. Collection items are not touched: deleting them is the collection's business."""
        with transaction(db):
            deleted = self.flush(db)
            if owner is None:
                gone = chunked_execute(db, "DELETE FROM cache WHERE sha256 IN ({})", list(shas))
            else:
                gone = chunked_execute(db, "DELETE FROM cache WHERE owner = ? AND sha256 IN ({})", list(shas),
                                       prefix=[owner])
        self.count -= deleted + gone  # only once committed
        return gone

    def flush(self, db: sqlite3.Connection) -> int:
        """Write the recency of the hits since the last flush and delete the damaged rows found, inside the
        caller's transaction; returns how many rows went (the caller subtracts them once committed)."""
        db.executemany("UPDATE cache SET last_used = ? WHERE owner = ? AND model_id = ? AND sha256 = ?",
                       [(t, o, m, s) for (o, m, s), t in self._touched.items()])
        self._touched.clear()
        deleted = sum(db.execute("DELETE FROM cache WHERE owner = ? AND model_id = ? AND sha256 = ?", key).rowcount
                      for key in self._damaged)
        self._damaged.clear()  # rolled back, they fail their checksum again at their next lookup
        return deleted
