"""The store's SQLite database: schema and upgrades, the write transaction, chunked ``IN (...)``, vector blobs."""
from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import SettingError
from .integrity import cache_crc, item_crc
from .where import json_string

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
_CHUNK = 900  # ids per `IN (...)`: under SQLite's historic 999-variable limit

_SCHEMA = """
CREATE TABLE collections (
    cid        INTEGER PRIMARY KEY AUTOINCREMENT,  -- names the snapshot file
    name       TEXT NOT NULL UNIQUE,
    model_id   TEXT NOT NULL,
    dim        INTEGER NOT NULL,
    index_spec TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,         -- +1 per add/delete; snapshots record the one they reflect
    created    REAL NOT NULL,
    snapshot_tag TEXT,                             -- random tag of the newest snapshot written (version 3)
    previous_tag TEXT                              -- the tag of the snapshot file before that one
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
    crc      INTEGER NOT NULL DEFAULT 0,           -- integrity.item_crc of the row (version 3)
    UNIQUE (cid, item_id)
);
CREATE INDEX items_label ON items (cid, label);
-- metadata filters (.where) read only this index: the rows hold 5 KB vectors in overflow pages, and scanning them
-- made the pre-selection 7x slower (version 5)
CREATE INDEX items_metadata ON items (cid, metadata);
CREATE INDEX items_sha256 ON items (sha256) WHERE sha256 IS NOT NULL;
CREATE TABLE cache (
    owner     TEXT NOT NULL DEFAULT '',            -- the API key whose calls see the row ('': shared) (version 4)
    model_id  TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    vector    BLOB NOT NULL,
    last_used INTEGER NOT NULL,                    -- logical clock: an exact LRU order, immune to clock jumps
    crc       INTEGER NOT NULL DEFAULT 0,          -- integrity.cache_crc of the row (version 3)
    stored    REAL NOT NULL DEFAULT 0,             -- wall-clock time of the put, for the age limit (version 4)
    PRIMARY KEY (owner, model_id, sha256)
);
CREATE INDEX cache_lru ON cache (last_used);
CREATE INDEX cache_stored ON cache (stored);
CREATE TABLE images (                              -- encoded bytes of collection items, by content (version 2)
    sha256 TEXT PRIMARY KEY,
    data   BLOB NOT NULL
);
"""
# from version -> next. Version 3's checksums are computed from the rows as they are: damage done before the
# upgrade cannot be told apart from data.
_MIGRATIONS = {
    1: "CREATE TABLE images (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);",
    2: """ALTER TABLE collections ADD COLUMN snapshot_tag TEXT;
          ALTER TABLE collections ADD COLUMN previous_tag TEXT;
          ALTER TABLE items ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;
          UPDATE items SET crc = item_crc(cid, item_id, sha256, label, metadata, vector);
          ALTER TABLE cache ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;
          UPDATE cache SET crc = cache_crc(model_id, sha256, vector);""",
    # the primary key gains the owner, so the table is rebuilt; existing rows become shared, aged from now
    3: f"""{_SCHEMA[_SCHEMA.index("CREATE TABLE cache"):_SCHEMA.index("CREATE INDEX cache_lru")].replace(
              "TABLE cache", "TABLE cache_v4")}
          INSERT INTO cache_v4 (owner, model_id, sha256, vector, last_used, crc, stored)
              SELECT '', model_id, sha256, vector, last_used, crc, CAST(strftime('%s', 'now') AS REAL) FROM cache;
          DROP TABLE cache;
          ALTER TABLE cache_v4 RENAME TO cache;
          CREATE INDEX cache_lru ON cache (last_used);
          CREATE INDEX cache_stored ON cache (stored);""",
    4: "CREATE INDEX IF NOT EXISTS items_metadata ON items (cid, metadata);",
}


def connect(path: Path) -> sqlite3.Connection:
    """Open the database at ``path``, creating or upgrading its schema; refuse a newer schema."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; commits append to the WAL
    db.execute("PRAGMA synchronous = FULL")  # fsync the WAL per commit: acknowledged writes survive power loss
    db.execute("PRAGMA foreign_keys = ON")
    db.create_function("item_crc", 6, item_crc, deterministic=True)  # for the version 3 upgrade
    db.create_function("cache_crc", 3, cache_crc, deterministic=True)
    db.create_function("json_string", 1, json_string, deterministic=True)  # for metadata filters (.where)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    while version in _MIGRATIONS:
        log.info("upgrading %s from schema version %d", path, version)
        db.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[version]}; PRAGMA user_version = {version + 1}; COMMIT;")
        version += 1
    if version not in (0, SCHEMA_VERSION):
        db.close()
        raise SettingError(f"{path} has schema version {version}; this embedder reads version "
                           f"{SCHEMA_VERSION}. Use a matching embedder version.")
    return db


@contextmanager
def transaction(db: sqlite3.Connection, *, durable: bool = True) -> Iterator[None]:
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


def chunked_query(db: sqlite3.Connection, sql: str, params: list[Any], values: Sequence[Any]) -> list[tuple]:
    """``sql`` with ``IN ({})`` filled by ``values``, in chunks that fit SQLite's variable limit."""
    rows: list[tuple] = []
    for start in range(0, len(values), _CHUNK):
        chunk = list(values[start:start + _CHUNK])
        rows += db.execute(sql.format(", ".join("?" * len(chunk))), [*params, *chunk]).fetchall()
    return rows


def chunked_execute(db: sqlite3.Connection, sql: str, values: Sequence[Any], *, prefix: Sequence[Any] = ()) -> int:
    """Like :func:`chunked_query` for a write; returns the number of rows changed."""
    changed = 0
    for start in range(0, len(values), _CHUNK):
        chunk = list(values[start:start + _CHUNK])
        changed += db.execute(sql.format(", ".join("?" * len(chunk))), [*prefix, *chunk]).rowcount
    return changed


def drop_orphan_images(db: sqlite3.Connection, shas: Sequence[str | None]) -> None:
    """Delete kept images no item refers to any more (inside the caller's transaction)."""
    chunked_execute(db, "DELETE FROM images WHERE sha256 IN ({}) AND NOT EXISTS "
                        "(SELECT 1 FROM items WHERE items.sha256 = images.sha256)", sorted({s for s in shas if s}))


def blob(vector: np.ndarray) -> bytes:
    """A vector as its stored little-endian float32 bytes."""
    return vector.astype("<f4", copy=False).tobytes()


def vector(data: bytes) -> np.ndarray:
    """A stored vector as a writable native-order float32 copy."""
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def matrix(rows: Sequence[bytes], dim: int) -> np.ndarray:
    """Stored vectors as one writable ``(N, dim)`` float32 array."""
    return np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), dim).astype(np.float32)
