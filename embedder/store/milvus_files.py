"""Small sets of files by name in Milvus, versioned, so every replica on one Milvus reads the same ones: the
service keeps its classifier heads here (collection ``embedder_heads``) and its fine-tuned backbone versions
(``embedder_backbones``, :mod:`embedder.core.versions`) when its collections live in Milvus. It implements
:class:`classifier.places.HeadPlace` and knows nothing of what it holds: the checks are the readers' (a head's
are :mod:`classifier.persist`'s, a version's weights are checked against their sha256 when loaded).

Each write is a new version: its files go in chunks of base64 text (one row per chunk, key
``<name>/<version>/<file>/<n>``), then one pointer row (key ``<name>``) is upserted naming the version and its
chunk counts. A single-row upsert is atomic, so a reader sees the old version or the new one; the old version's
chunks are deleted after the pointer moved. A reader who read the old pointer and finds its chunks gone reads
the pointer again. The pointer's version is the tag a registry compares on every ``get`` (one primary-key query).
A write that died between its chunks and its pointer leaves chunks no pointer names; :meth:`recover` deletes
those older than :data:`ORPHAN_SECONDS` (younger ones may be another replica's write in progress).
"""
from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from typing import Any, Callable, Mapping, Sequence

from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException, MilvusUnavailableException

from ..errors import StoreUnavailableError
from .milvus_where import quote as _quote

log = logging.getLogger(__name__)

ORPHAN_SECONDS = 3600.0  # chunks without a pointer this old are of a write that died (no write takes an hour)
_CHUNK = 65_535 // 4 * 3  # raw bytes per row: their base64 fits VARCHAR's 65,535
_ROWS_PER_CALL = 64  # chunk rows per upsert or query (~3 MB)
_RESULT_WINDOW = 16384  # rows one query may return (Milvus's default maxQueryResultWindow)


class MilvusFiles:
    """Named, versioned sets of files in the Milvus collection ``embedder_<folder>``. See the module docstring."""

    def __init__(self, client: MilvusClient, folder: str, *, uri: str,
                 check_open: Callable[[], None] = lambda: None) -> None:
        self.collection = f"embedder_{folder}"
        self._client, self._uri, self._check_open = client, uri, check_open
        self._call(self._ensure)

    def __repr__(self) -> str:
        return f"MilvusFiles({self._uri!r}, {self.collection!r})"

    def write(self, name: str, files: Mapping[str, bytes], *, overwrite: bool) -> str:
        old = self._pointer(name)
        if old is not None and not overwrite:
            raise FileExistsError(f"{name!r} already exists in Milvus collection {self.collection}; pass "
                                  "overwrite=True or delete it first")
        version, now = secrets.token_hex(8), time.time()
        rows = [self._row(f"{name}/{version}/{file}/{n}", name, version, file, n,
                          base64.b64encode(data[at:at + _CHUNK]).decode(), now)
                for file, data in files.items() for n, at in enumerate(range(0, max(len(data), 1), _CHUNK))]
        for start in range(0, len(rows), _ROWS_PER_CALL):
            self._call(lambda start=start: self._client.upsert(self.collection, rows[start:start + _ROWS_PER_CALL]))
        counts = {file: -(-len(data) // _CHUNK) or 1 for file, data in files.items()}
        self._call(lambda: self._client.upsert(self.collection, [
            self._row(name, name, version, "", len(counts), json.dumps(counts), now)]))
        if old is not None:  # readers of the old version read the pointer again
            self._delete(f"name == {_quote(name)} and version == {_quote(old[0])} and file != \"\"")
        return version

    def read(self, name: str, names: Sequence[str]) -> tuple[dict[str, bytes], str] | None:
        for _ in range(5):  # a concurrent write deletes the version we are reading: read the new one
            pointer = self._pointer(name)
            if pointer is None:
                return None
            version, counts = pointer
            files, whole = {}, True
            for file in names:
                if file not in counts:
                    continue
                parts = self._chunks(name, version, file, counts[file])
                whole = whole and len(parts) == counts[file]
                files[file] = b"".join(base64.b64decode(parts[n]) for n in sorted(parts))
            if whole or self._pointer(name) == pointer:
                # chunks missing under the current pointer are damage: the caller's checksums say so
                return files, version
        return files, version

    def version(self, name: str) -> str | None:
        pointer = self._pointer(name)
        return None if pointer is None else pointer[0]

    def ids(self) -> list[str]:
        rows = self._call(lambda: self._client.query(self.collection, filter='file == ""', output_fields=["name"],
                                                     limit=_RESULT_WINDOW))
        return sorted(r["name"] for r in rows)

    def remove(self, name: str) -> bool:
        if self._pointer(name) is None:
            return False
        self._delete(f"key == {_quote(name)}")  # the pointer first: readers then see no such name
        self._delete(f"name == {_quote(name)}")
        return True

    def where(self, name: str) -> str:
        return f"{self._uri}, Milvus collection {self.collection}, {name!r}"

    def path(self, name: str) -> None:
        return None

    def recover(self) -> list[str]:
        """Delete chunks of versions no pointer names that are older than :data:`ORPHAN_SECONDS`."""
        pointers = {r["name"]: r["version"] for r in self._call(lambda: self._client.query(
            self.collection, filter='file == ""', output_fields=["name", "version"], limit=_RESULT_WINDOW))}
        cutoff = time.time() - ORPHAN_SECONDS
        firsts = self._call(lambda: self._client.query(
            self.collection, filter=f'file != "" and chunk == 0 and created < {cutoff!r}',
            output_fields=["name", "version"], limit=_RESULT_WINDOW))
        orphans = sorted({(r["name"], r["version"]) for r in firsts if pointers.get(r["name"]) != r["version"]})
        for name, version in orphans:
            self._delete(f"name == {_quote(name)} and version == {_quote(version)} and file != \"\"")
        return [f"removed version {version} of {name!r} (a write that did not finish)" for name, version in orphans]

    # --- internals ---

    def _pointer(self, name: str) -> tuple[str, dict[str, int]] | None:
        rows = self._call(lambda: self._client.query(self.collection, filter=f"key == {_quote(name)}",
                                                     output_fields=["version", "data"], limit=1))
        return (rows[0]["version"], json.loads(rows[0]["data"])) if rows else None

    def _chunks(self, name: str, version: str, file: str, count: int) -> dict[int, str]:
        """The chunks of one file there are, by number (fewer than ``count`` when some are gone)."""
        expr = f"name == {_quote(name)} and version == {_quote(version)} and file == {_quote(file)}"
        parts: dict[int, str] = {}
        for start in range(0, count, _ROWS_PER_CALL):  # a large file is more rows than one answer should carry
            parts.update((r["chunk"], r["data"]) for r in self._call(lambda start=start: self._client.query(
                self.collection, filter=f"{expr} and chunk >= {start} and chunk < {start + _ROWS_PER_CALL}",
                output_fields=["chunk", "data"], limit=_ROWS_PER_CALL)))
        return parts

    def _delete(self, expr: str) -> None:
        self._call(lambda: self._client.delete(self.collection, filter=expr))

    @staticmethod
    def _row(key: str, name: str, version: str, file: str, chunk: int, data: str, created: float) -> dict[str, Any]:
        return {"key": key, "name": name, "version": version, "file": file, "chunk": chunk, "data": data,
                "created": created, "vector": [0.0, 0.0]}

    def _ensure(self) -> None:
        if self._client.has_collection(self.collection):
            self._client.load_collection(self.collection)
            return
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("name", DataType.VARCHAR, max_length=256)
        schema.add_field("version", DataType.VARCHAR, max_length=32)
        schema.add_field("file", DataType.VARCHAR, max_length=128)  # "" on the pointer row
        schema.add_field("chunk", DataType.INT64)  # the pointer row: how many files
        schema.add_field("data", DataType.VARCHAR, max_length=65535)  # base64; the pointer row: chunks per file
        schema.add_field("created", DataType.DOUBLE)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one; unused
        index = self._client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="L2")
        try:
            self._client.create_collection(self.collection, schema=schema, consistency_level="Strong")
            self._client.create_index(self.collection, index, sync=False)
        except MilvusException:
            if not self._client.has_collection(self.collection):
                raise  # else another replica created it meanwhile
        self._client.load_collection(self.collection)

    def _call(self, fn: Callable[[], Any]) -> Any:
        self._check_open()
        try:
            return fn()
        except MilvusUnavailableException as e:
            raise StoreUnavailableError(f"cannot reach Milvus at {self._uri} ({getattr(e, 'message', e)}); check "
                                        "that it runs and listens there") from None
