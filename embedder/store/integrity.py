"""Row checksums: every stored vector row proves itself when it is read.

``items.crc`` is a crc32 of what an item row serves (its collection id, item id, sha256, label, metadata
JSON and vector bytes), ``cache.crc`` one of a cache row (model id, sha256, vector). Both are written with
the row and checked by every read that serves it: Get, Search hits, ``search_by_id``'s query, the
training reads (``labelled``, ``vectors``), cache lookups, and the rebuild of an index from SQLite.
crc32 catches every 1-, 2- and 3-bit flip and every burst of up to 32 bits (bit rot, a torn sector, a bad
copy) and anything else with odds of 1 in 4 billion; it is no defence against someone who can write the file.

A corrupted item is never served as is: a read that would return it raises
:class:`~embedder.errors.DataLossError` naming the collection and items (the log names the database
file too, the caller's message names no path), a rebuild leaves it out of the index with an ERROR. A
corrupted cache row is a miss (its vector can be recomputed) and goes with the next cache write.
"""
from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Sequence

from ..errors import DataLossError
from ..inputs import shown

log = logging.getLogger(__name__)

_NONE = b"\xff\xff\xff\xff"  # no length prefix is this long: None differs from every string


def _field(value: str | None) -> bytes:
    """One text field, length-prefixed so that field boundaries are part of the checksum."""
    if value is None:
        return _NONE
    data = value.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(4, "little") + data


def item_crc(cid: int, item_id: str, sha256: str | None, label: str | None, metadata: str, vector: bytes) -> int:
    """The checksum of an ``items`` row (also registered as the SQL function ``item_crc`` for upgrades)."""
    head = cid.to_bytes(8, "little", signed=True) + _field(item_id) + _field(sha256) + _field(label) + _field(metadata)
    return zlib.crc32(vector, zlib.crc32(head))


def cache_crc(model_id: str, sha256: str, vector: bytes) -> int:
    """The checksum of a ``cache`` row (also the SQL function ``cache_crc``)."""
    return zlib.crc32(vector, zlib.crc32(_field(model_id) + _field(sha256)))


# The columns every read of items selects first, in this order, so that :func:`item_ok` can check them.
ITEM_COLUMNS = "item_id, sha256, label, metadata, vector, crc"


def item_ok(cid: int, row: Sequence) -> bool:
    """Whether ``row`` (starting with :data:`ITEM_COLUMNS`) is as it was written."""
    item_id, sha256, label, metadata, vector, crc = row[:6]
    return item_crc(cid, item_id, sha256, label, metadata, vector) == crc


def corrupted(collection: str, item_ids: Sequence[str], database: Path, *, action: str) -> DataLossError:
    """Log the corrupted items of ``collection`` as an ERROR (with the file) and return the caller's error.

    ``action`` says what happened to them (e.g. "not served"); the returned message names no server path.
    """
    listed = ", ".join(shown(i) for i in item_ids[:5]) + (f" and {len(item_ids) - 5} more" if len(item_ids) > 5 else "")
    log.error("collection %r: %d stored item(s) fail their row checksum in %s (the bytes changed on disk: bit rot, "
              "a damaged copy or an edit): %s; %s. Add them again under the same ids, or delete them, or restore "
              "the data dir from a backup (embedder restore)", collection, len(item_ids), database, listed, action)
    one = len(item_ids) == 1
    return DataLossError(f"{'item' if one else 'items'} {listed} of collection {shown(collection)} "
                         f"{'is' if one else 'are'} damaged in the server's store (the stored bytes no longer match "
                         f"their checksum), so {'it is' if one else 'they are'} not served. Add "
                         f"{'it' if one else 'them'} again under the same id (or delete {'it' if one else 'them'}); "
                         "the server log has the details")
