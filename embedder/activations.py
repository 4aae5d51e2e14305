"""Cached trunk activations for fine-tuning: the frozen layers run once per image, every epoch reads this.

Keyed by (model id, cut point, sha256 of the image bytes); stored as float16 blobs in their own SQLite
file (``activations.sqlite3`` in the data dir), least recently used rows evicted beyond ``max_bytes``.
A row is recomputable, so commits skip the fsync (WAL, ``synchronous=NORMAL``: survives kill -9, may
lose the newest rows on power loss); a torn or odd-sized blob reads as a miss, never as data.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS activations (
    model_id  TEXT NOT NULL,
    cut       INTEGER NOT NULL,
    sha256    TEXT NOT NULL,
    shape     TEXT NOT NULL,                    -- e.g. "160,7,7"
    data      BLOB NOT NULL,                    -- float16, C order
    last_used INTEGER NOT NULL,
    PRIMARY KEY (model_id, cut, sha256)
);
CREATE INDEX IF NOT EXISTS activations_lru ON activations (last_used);
"""
_CHUNK = 900  # under SQLite's variable limit


class ActivationCache:
    """float16 trunk outputs by (model id, cut, sha256); thread-safe, bounded by ``max_bytes``."""

    def __init__(self, path: str | Path, *, max_bytes: int = 8 * 1024**3) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(_SCHEMA)
        self._clock, self._bytes = self._db.execute(
            "SELECT coalesce(max(last_used), 0), coalesce(sum(length(data)), 0) FROM activations").fetchone()

    def get(self, model_id: str, cut: int, sha256s: Sequence[str]) -> list[np.ndarray | None]:
        """The cached activation of each image, float16, or None."""
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(sha256s), _CHUNK):
                chunk = list(dict.fromkeys(sha256s[start:start + _CHUNK]))
                rows = self._db.execute(
                    f"SELECT sha256, shape, data FROM activations WHERE model_id = ? AND cut = ? AND sha256 IN "
                    f"({', '.join('?' * len(chunk))})", [model_id, cut, *chunk]).fetchall()
                for sha, shape, data in rows:
                    dims = tuple(int(d) for d in shape.split(","))
                    if len(data) == 2 * int(np.prod(dims)):
                        found[sha] = np.frombuffer(data, dtype="<f2").reshape(dims)
            if found:
                self._db.execute("BEGIN")
                for sha in found:
                    self._clock += 1
                    self._db.execute("UPDATE activations SET last_used = ? WHERE model_id = ? AND cut = ? "
                                     "AND sha256 = ?", (self._clock, model_id, cut, sha))
                self._db.execute("COMMIT")
        return [found.get(s) for s in sha256s]

    def put(self, model_id: str, cut: int, sha256s: Sequence[str], activations: np.ndarray) -> None:
        """Store ``(N, ...)`` activations (kept as float16), evicting the least recently used beyond the bound."""
        data = np.ascontiguousarray(activations, dtype="<f2")
        shape = ",".join(str(d) for d in data.shape[1:])
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sha, row in zip(sha256s, data):
                    self._clock += 1
                    blob = row.tobytes()
                    old = self._db.execute("SELECT length(data) FROM activations WHERE model_id = ? AND cut = ? "
                                           "AND sha256 = ?", (model_id, cut, sha)).fetchone()
                    self._db.execute("INSERT OR REPLACE INTO activations VALUES (?, ?, ?, ?, ?, ?)",
                                     (model_id, cut, sha, shape, blob, self._clock))
                    self._bytes += len(blob) - (old[0] if old else 0)
                while self._bytes > self.max_bytes:
                    victims = self._db.execute("SELECT rowid, length(data) FROM activations ORDER BY last_used "
                                               "LIMIT 256").fetchall()
                    if not victims:
                        break
                    for rowid, size in victims:  # oldest first, only as many as the bound needs
                        if self._bytes <= self.max_bytes:
                            break
                        self._db.execute("DELETE FROM activations WHERE rowid = ?", (rowid,))
                        self._bytes -= size
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @property
    def nbytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
