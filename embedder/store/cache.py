"""The content-addressed embedding cache: ``(model_id, sha256) -> vector`` for images outside every collection.

Rows carry a logical ``last_used`` clock (an exact LRU order, immune to clock jumps); beyond the store's
``cache_max_items`` the least recently used rows are evicted. Adding an item with a sha256 moves its cache
row into the item (:meth:`EmbeddingCache.promote`), so members are never evicted and no vector is stored
twice; a lookup checks the cache, then collection items of the same model. Lookups only read: the recency
they produce is written with the next put or at close (a crash loses only some LRU order).
"""
from __future__ import annotations

import sqlite3
from typing import Mapping, Sequence

import numpy as np

from .sqlite import blob, chunked_execute, chunked_query, transaction


class EmbeddingCache:
    """The ``cache`` table with its clock and row count. Not locked: callers hold the store's SQLite mutex."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._clock, self.count = db.execute("SELECT coalesce(max(last_used), 0), count(*) FROM cache").fetchone()
        self._touched: dict[tuple[str, str], int] = {}  # cache hits whose last_used is not yet written

    def lookup(self, db: sqlite3.Connection, model_id: str, shas: Sequence[str]) -> dict[str, bytes]:
        """The stored vector blob of each of ``shas`` found under ``model_id``, in the cache or in an item."""
        unique = list(dict.fromkeys(shas))
        found = dict(chunked_query(db, "SELECT sha256, vector FROM cache WHERE model_id = ? AND sha256 IN ({})",
                                   [model_id], unique))
        for sha in unique:  # in input order, so the LRU order is the order of use
            if sha in found:
                self._clock += 1
                self._touched[(model_id, sha)] = self._clock
        rest = [s for s in unique if s not in found]
        for sha, data in chunked_query(
                db, "SELECT i.sha256, i.vector FROM items i JOIN collections c ON c.cid = i.cid "
                    "WHERE c.model_id = ? AND i.sha256 IN ({})", [model_id], rest):
            found.setdefault(sha, data)
        return found

    def put(self, db: sqlite3.Connection, model_id: str, rows: Mapping[str, np.ndarray], max_items: int) -> None:
        """Store the vectors of images no collection holds, then evict down to ``max_items`` rows."""
        # A cache row is recomputable, so its commit skips the fsync (NORMAL: survives kill -9, may lose the
        # latest rows on power loss); the next FULL commit syncs it with everything before it.
        with transaction(db, durable=False):
            self.flush(db)
            members = {s for (s,) in chunked_query(
                db, "SELECT i.sha256 FROM items i JOIN collections c ON c.cid = i.cid "
                    "WHERE c.model_id = ? AND i.sha256 IN ({})", [model_id], list(rows))}
            existing = {s for (s,) in chunked_query(
                db, "SELECT sha256 FROM cache WHERE model_id = ? AND sha256 IN ({})", [model_id], list(rows))}
            fresh, seen = [], []
            for sha, vec in rows.items():
                self._clock += 1
                if sha in existing:
                    seen.append((self._clock, model_id, sha))
                elif sha not in members:
                    fresh.append((model_id, sha, blob(vec), self._clock))
            db.executemany("UPDATE cache SET last_used = ? WHERE model_id = ? AND sha256 = ?", seen)
            db.executemany("INSERT INTO cache (model_id, sha256, vector, last_used) VALUES (?, ?, ?, ?)", fresh)
            count = self.count + len(fresh)
            if count > max_items:
                count -= db.execute("DELETE FROM cache WHERE rowid IN "
                                    "(SELECT rowid FROM cache ORDER BY last_used LIMIT ?)",
                                    (count - max_items,)).rowcount
        self.count = count  # only once committed

    def promote(self, db: sqlite3.Connection, model_id: str, shas: Sequence[str | None]) -> int:
        """Delete the rows of images that items now hold, inside the caller's transaction; returns how many.

        The caller subtracts them from :attr:`count` once the transaction has committed.
        """
        return chunked_execute(db, "DELETE FROM cache WHERE model_id = ? AND sha256 IN ({})",
                               sorted({s for s in shas if s}), prefix=[model_id])

    def flush(self, db: sqlite3.Connection) -> None:
        """Write the recency of the hits since the last flush (inside the caller's transaction)."""
        db.executemany("UPDATE cache SET last_used = ? WHERE model_id = ? AND sha256 = ?",
                       [(t, m, s) for (m, s), t in self._touched.items()])
        self._touched.clear()
