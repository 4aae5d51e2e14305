"""Collections in Milvus, through ``pymilvus``: milvus-lite (an embedded Milvus in a local ``.db`` folder) for one
machine and the tests, or a Milvus server / cluster by URI (with a token) for scale. Every ``--role all`` replica
can point at the same Milvus: there is no single store node.

One Milvus collection per collection, named ``emb_<sha256 of the name>`` (our names are any text; Milvus's are
identifiers). Its property ``embedder.binding`` holds the binding as JSON (``name``, ``model_id``, ``dim``, ``index``,
``created``), so every replica reads the same catalog from Milvus itself. Fields: ``id`` (the primary key),
``vector`` (cosine metric: FLAT for ``flat``, HNSW for ``hnsw``), ``seq`` (insertion order, for ties and
listings), ``sha256``, ``label``, ``metadata`` (JSON), ``kinds`` (JSON: the kind of every value a filter can
name, see :func:`.milvus_where.to_milvus_expression`), ``created``, ``updated``. Collections use Strong consistency, so a read
sees every acknowledged write.

Durability: an add returns once Milvus acknowledged its upserts; milvus-lite writes each to its WAL (flushed to
the OS per write, so kill -9 loses nothing acknowledged), a cluster to its log broker. An add is sent in
batches of about 4 MB: a crash mid-add may keep a part of it (re-adding is idempotent), unlike the SQLite
backend's all-or-nothing add. Kept images are stored in Milvus too (``emb_images``: base64 chunks by sha256),
so every replica serves them, and so are the service's heads and backbone versions (:mod:`.milvus_files`). Row
checksums are Milvus's business here (the SQLite backend's ``crc`` column has no counterpart).

The content cache stays local to each node (SQLite in ``--data-dir``): it is recomputable, read on every
embed call (a local lookup, not a network round trip), and private per API key; a lookup also finds vectors of
collection items by sha256 here (:meth:`MilvusCollections.members`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException, MilvusUnavailableException

from ..errors import InvalidArgumentError, NotFoundError, StoreClosedError, StoreUnavailableError
from ..filters import Filter
from ..index import IndexSpec
from ..inputs import shown
from ..results import AddResult, CollectionInfo, DeleteResult, Hit, ItemPage, StoredItem
from .backend import check_binding, pick_model
from .milvus_where import kinds_of, quote, to_milvus_expression
from .rwlock import RWLock
from .validation import missing_message

log = logging.getLogger(__name__)

_CLOSED = "the store is closed (the server is shutting down); retry on a running instance"
_PREFIX = "emb_"
_IMAGES = "emb_images"  # kept images of every collection, by sha256
_BATCH_BYTES = 4 << 20  # rows per upsert: well under gRPC's message limit
_IMAGE_CHUNK = 65_535 // 4 * 3  # raw bytes per image row: its base64 (4 chars per 3 bytes) fits VARCHAR's 65,535
_QUERY_ROWS = 1000  # ids per query expression, rows per iterator batch
_RESULT_WINDOW = 16384  # rows one query may return (Milvus's default maxQueryResultWindow)
_BINDING = "embedder.binding"  # the collection property holding the binding as JSON
_NOT_FOUND = 100  # Milvus's code for "collection does not exist"
_FIELDS = ["id", "seq", "sha256", "label", "metadata", "created", "updated"]


@dataclass(frozen=True)
class _Binding:
    """A collection's catalog entry, read from its Milvus schema description."""

    name: str
    milvus_name: str
    model_id: str
    dim: int
    spec: IndexSpec
    created: float


class MilvusCollections:
    """Collections in one Milvus database. See :mod:`embedder.store.milvus`."""

    def __init__(self, uri: str, *, token: str = "", lite_path: str | None = None) -> None:
        """``uri``: ``http(s)://host:port``, or, with ``lite_path``, the milvus-lite ``.db`` path."""
        self.uri = uri
        self._lite_path = lite_path
        self._bindings: dict[str, _Binding] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()  # guards the two above, _seq and _closed
        # milvus-lite loses a delete, or fails a drop, that races a flush: writes share this lock, flushes and
        # drops take it alone (in this process; a cluster orders them itself)
        self._flush_lock = RWLock()
        self._seq = 0
        self._closed = False
        self._client = connect(lite_path or uri, token)
        try:
            self._ensure_images()
        except MilvusException as e:
            raise _unavailable(uri, e) from None

    # --- catalog ---

    def create_collection(self, name: str, model_id: str, dim: int, spec: IndexSpec) -> CollectionInfo:
        b = self._get_or_create(name, model_id, dim, spec)
        check_binding(b.name, b.model_id, b.dim, model_id, dim)
        if b.spec != spec:
            raise InvalidArgumentError(f"collection {name!r} exists with index '{b.spec}', not '{spec}'; "
                                       "use another name, or delete it first")
        return self._info(b)

    def delete_collection(self, name: str) -> None:
        b = self._binding(name)
        shas = {r["sha256"] for r in self._scan(b, "sha256 != \"\"", ["sha256"])}
        with self._flush_lock.write():
            self._client.drop_collection(b.milvus_name)
        with self._lock:
            self._bindings.pop(name, None)
            self._loaded.discard(b.milvus_name)
        self._drop_orphan_images(shas)

    def collection(self, name: str) -> CollectionInfo:
        return self._info(self._binding(name))

    def list_collections(self) -> list[CollectionInfo]:
        return [self._info(b) for b in sorted(self._all(), key=lambda b: b.name)]

    # --- writes ---

    def add(self, name: str, ids: list[str], x: np.ndarray, model_id: str, shas: list[str | None],
            labels: list[str | None], metas: list[str], images: list[bytes | None]) -> AddResult:
        b = self._get_or_create(name, model_id, x.shape[1], IndexSpec())
        check_binding(b.name, b.model_id, b.dim, model_id, x.shape[1])
        old = {r["id"]: r for r in self._rows(b, ids, ["id", "created", "sha256"])}
        now = time.time()
        self._put_images({s: data for s, data in zip(shas, images) if data is not None})
        seq = self._next_seq(len(ids))
        rows = [{"id": item_id, "vector": vec, "seq": seq + j, "sha256": sha or "", "label": label,
                 "metadata": json.loads(meta), "kinds": kinds_of(json.loads(meta)),
                 "created": old[item_id]["created"] if item_id in old else now, "updated": now}
                for j, (item_id, vec, sha, label, meta) in enumerate(zip(ids, x.tolist(), shas, labels, metas))]
        self._upsert(b, rows)
        self._drop_orphan_images({r["sha256"] for r in old.values()} - set(shas))
        return AddResult(name, added=len(ids) - len(old), replaced=len(old))

    def delete(self, name: str, ids: list[str]) -> DeleteResult:
        b = self._binding(name)
        found = {r["id"]: r["sha256"] for r in self._rows(b, ids, ["id", "sha256"])}
        for start in range(0, len(found), _QUERY_ROWS):
            chunk = list(found)[start:start + _QUERY_ROWS]
            with self._flush_lock.read():
                self._call(b, lambda: self._client.delete(b.milvus_name, filter=_ids_in(chunk)))
        self._drop_orphan_images(set(found.values()))
        return DeleteResult(name, deleted=len(found), missing=[i for i in ids if i not in found])

    def set_labels(self, name: str, labels: dict[str, str | None]) -> int:
        b = self._binding(name)
        rows = self._rows(b, list(labels), ["*"])
        found = {r["id"] for r in rows}
        missing = [i for i in labels if i not in found]
        if missing:
            raise NotFoundError(missing_message(missing, name))
        now = time.time()
        for r in rows:
            r["label"], r["updated"] = labels[r["id"]], now
        self._upsert(b, rows)
        return len(labels)

    # --- reads ---

    def get(self, name: str, ids: list[str]) -> list[StoredItem | None]:
        b = self._binding(name)
        found = {r["id"]: StoredItem(r["id"], name, _vector(r["vector"]), r["sha256"] or None, r["label"],
                                     r["metadata"], r["created"], r["updated"])
                 for r in self._rows(b, ids, _FIELDS + ["vector"])}
        return [found.get(i) for i in ids]

    def training_rows(self, name: str, ids: list[str] | None,
                      where: Filter | None = None) -> tuple[list[str], np.ndarray, list[str | None]]:
        b = self._binding(name)
        if ids is None:
            expr = "label is not null" + (f" and {to_milvus_expression(where)}" if where is not None else "")
            rows = self._scan(b, expr, ["id", "seq", "label", "vector"])
        else:
            rows = self._rows(b, ids, ["id", "seq", "label", "vector"])
        rows.sort(key=lambda r: r["seq"])
        return [r["id"] for r in rows], _matrix([r["vector"] for r in rows], b.dim), [r["label"] for r in rows]

    def images(self, name: str, ids: list[str]) -> list[bytes | None]:
        b = self._binding(name)
        shas = {r["id"]: r["sha256"] for r in self._rows(b, ids, ["id", "sha256"]) if r["sha256"]}
        data = self._get_images(set(shas.values()))
        return [data.get(shas.get(i, "")) for i in ids]

    def page(self, name: str, offset: int, limit: int, label: str | None, unlabelled: bool,
             where: Filter | None) -> ItemPage:
        """Milvus queries have no order: the matching ids and insertion numbers are read (no vectors), sorted,
        and only the page's rows fetched whole."""
        b = self._binding(name)
        parts = ([f"label == {quote(label)}"] if label is not None else ["label is null"] if unlabelled else []) + \
                ([to_milvus_expression(where)] if where is not None else [])
        order = sorted(self._scan(b, " and ".join(parts), ["id", "seq"]), key=lambda r: r["seq"])
        ids = [r["id"] for r in order[offset:offset + limit]]
        items = self.get(name, ids)
        kept = self._get_images({i.sha256 for i in items if i is not None and i.sha256}, keys_only=True)
        shown = [i for i in items if i is not None]  # an item deleted between the two reads is left out
        return ItemPage(shown, [i.sha256 in kept for i in shown], len(order), offset)

    def vectors(self, name: str, where: Filter | None = None) -> tuple[list[str], np.ndarray]:
        b = self._binding(name)
        expr = "" if where is None else to_milvus_expression(where)
        rows = sorted(self._scan(b, expr, ["id", "seq", "vector"]), key=lambda r: r["seq"])
        return [r["id"] for r in rows], _matrix([r["vector"] for r in rows], b.dim)

    def search(self, collection: str | None, q: np.ndarray, k: int, label: str | None, model_id: str | None,
               ef_search: int | None, only: AbstractSet[str] | None,
               where: Filter | None = None) -> list[list[Hit]]:
        targets = self._targets(collection, model_id, q.shape[1], only)
        parts = ([f"label == {quote(label)}"] if label is not None else []) + \
                ([to_milvus_expression(where)] if where is not None else [])
        found: list[list[tuple[float, int, Hit]]] = [[] for _ in range(len(q))]
        for b in targets:
            params: dict[str, Any] = {"metric_type": "COSINE"}
            if b.spec.kind == "hnsw":
                params["params"] = {"ef": max(ef_search or b.spec.ef_search, k)}
            result = []
            with nullcontext() if collection is not None else _gone_is_skipped():
                result = self._call(b, lambda b=b: self._client.search(
                    b.milvus_name, data=q.tolist(), limit=k, filter=" and ".join(parts), search_params=params,
                    output_fields=["seq", "label", "metadata"], anns_field="vector"))
            for row, hits in zip(found, result):
                row += [(float(h["distance"]), h["entity"]["seq"],
                         Hit(h["id"], float(h["distance"]), b.name, h["entity"]["label"],
                             h["entity"]["metadata"])) for h in hits]
        return [[hit for _, _, hit in sorted(row, key=lambda t: (-t[0], t[1]))[:k]] for row in found]

    def members(self, model_id: str, shas: Sequence[str], visible: AbstractSet[str] | None) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        wanted = sorted(set(shas))
        for b in self._all():
            rest = [s for s in wanted if s not in found]
            if not rest or b.model_id != model_id or (visible is not None and b.name not in visible):
                continue
            for start in range(0, len(rest), _QUERY_ROWS):
                chunk = rest[start:start + _QUERY_ROWS]
                with _gone_is_skipped():
                    for r in self._call(b, lambda: self._client.query(
                            b.milvus_name, filter=f"sha256 in [{', '.join(map(quote, chunk))}]",
                            output_fields=["sha256", "vector"], limit=len(chunk) * 16)):  # items may share one
                        found.setdefault(r["sha256"], _vector(r["vector"]))
        return found

    def shared_files(self, folder: str) -> Any:
        """Files every replica on this Milvus reads alike (:class:`~.milvus_files.MilvusFiles` in the collection
        ``embedder_<folder>``): the service keeps its heads there."""
        from .milvus_files import MilvusFiles

        try:
            return MilvusFiles(self._client, folder, uri=self.uri, check_open=self._check_open)
        except MilvusException as e:
            raise _unavailable(self.uri, e) from None

    def disk_bytes(self) -> int:
        """The milvus-lite folder's size; 0 for a server (Milvus reports its own storage)."""
        if self._lite_path is None:
            return 0
        return sum(p.stat().st_size for p in Path(self._lite_path).rglob("*") if p.is_file())

    # --- persistence ---

    def save(self) -> None:
        """Flush every collection's growing segment to storage (recovery then replays less log)."""
        for b in self._all():
            with self._flush_lock.write(), _gone_is_skipped():
                self._call(b, lambda: self._client.flush(b.milvus_name))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._client.close()
        finally:
            if self._lite_path is not None:  # the embedded server holds the folder's lock until released
                from milvus_lite.server_manager import server_manager_instance
                server_manager_instance.release_server(self._lite_path)

    # --- internals ---

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(_CLOSED)

    def _call(self, b: _Binding, fn: Callable[[], Any]) -> Any:
        """Run ``fn``, a pymilvus call on ``b``'s collection, with ``b`` loaded. Milvus's "no such collection"
        (another replica deleted it) becomes NotFoundError, a lost connection StoreUnavailableError."""
        self._check_open()
        try:
            if b.milvus_name not in self._loaded:
                self._client.load_collection(b.milvus_name)  # a no-op when loaded; after a restart it is not
                with self._lock:
                    self._loaded.add(b.milvus_name)
            return fn()
        except MilvusUnavailableException as e:
            raise _unavailable(self.uri, e) from None
        except MilvusException as e:
            if e.code == _NOT_FOUND:
                with self._lock:
                    self._bindings.pop(b.name, None)
                raise _not_found(b.name) from None
            raise

    def _all(self) -> list[_Binding]:
        """Every collection in Milvus now (other replicas create and drop them too)."""
        self._check_open()
        found = []
        for milvus_name in self._client.list_collections():
            if milvus_name.startswith(_PREFIX) and milvus_name != _IMAGES:
                b = self._describe(milvus_name)
                if b is not None:
                    found.append(b)
        with self._lock:
            self._bindings = {b.name: b for b in found}
        return found

    def _describe(self, milvus_name: str) -> _Binding | None:
        try:
            meta = json.loads(self._client.describe_collection(milvus_name)["properties"][_BINDING])
        except MilvusException as e:
            if e.code == _NOT_FOUND:  # dropped meanwhile
                return None
            raise
        return _Binding(meta["name"], milvus_name, meta["model_id"], meta["dim"], IndexSpec.parse(meta["index"]),
                        meta["created"])

    def _binding(self, name: str) -> _Binding:
        self._check_open()
        with self._lock:
            b = self._bindings.get(name)
        if b is None:
            b = self._describe(_milvus_name(name)) if self._client.has_collection(_milvus_name(name)) else None
            if b is None:
                raise _not_found(name)
            with self._lock:
                self._bindings[name] = b
        return b

    def _get_or_create(self, name: str, model_id: str, dim: int, spec: IndexSpec) -> _Binding:
        try:
            return self._binding(name)
        except NotFoundError:
            pass
        spec.check_caps()
        if spec.codes != "float32" or spec.rerank:  # Milvus keeps and indexes the vectors its own way
            raise InvalidArgumentError(f"index {str(spec)!r}: codes= and rerank= are options of the FAISS backend; "
                                       "with Milvus, leave them out (flat or hnsw with its m/ef options)")
        created = time.time()
        milvus_name = _milvus_name(name)
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=4096)  # 1,024 characters of UTF-8
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("seq", DataType.INT64)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)  # "" when there is none
        schema.add_field("label", DataType.VARCHAR, max_length=1024, nullable=True)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("kinds", DataType.JSON)
        schema.add_field("created", DataType.DOUBLE)
        schema.add_field("updated", DataType.DOUBLE)
        index = self._client.prepare_index_params()
        if spec.kind == "hnsw":
            index.add_index("vector", index_type="HNSW", metric_type="COSINE",
                            params={"M": spec.m, "efConstruction": spec.ef_construction})
        else:
            index.add_index("vector", index_type="FLAT", metric_type="COSINE")
        log.info("creating collection %r in Milvus as %s (model %s, dim %d, index %s)", name, milvus_name, model_id,
                 dim, spec)
        try:
            self._create(milvus_name, schema, index, {_BINDING: json.dumps(
                {"name": name, "model_id": model_id, "dim": dim, "index": str(spec), "created": created})})
        except MilvusException:
            if not self._client.has_collection(milvus_name):
                raise
            # another replica created it meanwhile: its binding is the one that counts
        return self._binding(name)

    def _create(self, milvus_name: str, schema: Any, index: Any, properties: dict[str, str] | None = None) -> None:
        """Create, index and load a collection. The index is built without waiting on it (an empty collection's
        is ready at once; pymilvus's wait asks for a timestamp service milvus-lite lacks, and sleeps 0.5 s)."""
        self._client.create_collection(milvus_name, schema=schema, consistency_level="Strong",
                                       properties=properties or {})
        self._client.create_index(milvus_name, index, sync=False)
        self._client.load_collection(milvus_name)
        with self._lock:
            self._loaded.add(milvus_name)

    def _targets(self, collection: str | None, model_id: str | None, dim: int,
                 only: AbstractSet[str] | None) -> list[_Binding]:
        if collection is not None:
            b = self._binding(collection)
            check_binding(b.name, b.model_id, b.dim, model_id or b.model_id, dim)
            return [b]
        live = [b for b in self._all() if only is None or b.name in only]
        model_id = pick_model({b.model_id for b in live}, model_id)
        targets = [b for b in live if b.model_id == model_id]
        for b in targets:
            check_binding(b.name, b.model_id, b.dim, b.model_id, dim)
        return targets

    def _info(self, b: _Binding) -> CollectionInfo:
        labels: dict[str, int] = {}
        count = 0
        for r in self._scan(b, "", ["label"]):
            count += 1
            if r["label"] is not None:
                labels[r["label"]] = labels.get(r["label"], 0) + 1
        return CollectionInfo(b.name, b.model_id, b.dim, str(b.spec), count=count, labels=labels,
                              unlabeled=count - sum(labels.values()), created=b.created)

    def _rows(self, b: _Binding, ids: list[str], fields: list[str]) -> list[dict[str, Any]]:
        """The rows of ``ids`` that exist (any order)."""
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), _QUERY_ROWS):
            chunk = ids[start:start + _QUERY_ROWS]
            rows += self._call(b, lambda: self._client.query(b.milvus_name, filter=_ids_in(chunk),
                                                             output_fields=fields, limit=len(chunk)))
        return [dict(r) for r in rows]

    def _scan(self, b: _Binding, expr: str, fields: list[str]) -> list[dict[str, Any]]:
        """Every row matching ``expr`` (any order): in one query up to Milvus's result window, else by iterator
        (which milvus-lite serves, logging that it has no timestamp service)."""
        count = self._call(b, lambda: self._client.query(b.milvus_name, filter=expr,
                                                         output_fields=["count(*)"]))[0]["count(*)"]
        if count == 0:
            return []
        if count <= _RESULT_WINDOW:
            return [dict(r) for r in self._call(b, lambda: self._client.query(
                b.milvus_name, filter=expr, output_fields=fields, limit=count))]
        it = self._call(b, lambda: self._client.query_iterator(b.milvus_name, batch_size=_QUERY_ROWS, filter=expr,
                                                               output_fields=fields))
        rows: list[dict[str, Any]] = []
        try:
            while batch := it.next():
                rows += [dict(r) for r in batch]
        finally:
            it.close()
        return rows

    def _upsert(self, b: _Binding, rows: list[dict[str, Any]]) -> None:
        """Upsert in batches of about _BATCH_BYTES (metadata can be most of a row)."""
        row_bytes = 4 * b.dim + 512 + max(len(json.dumps(r["metadata"])) * 2 for r in rows)
        step = max(1, _BATCH_BYTES // row_bytes)
        for start in range(0, len(rows), step):
            with self._flush_lock.read():
                self._call(b, lambda: self._client.upsert(b.milvus_name, rows[start:start + step]))

    def _next_seq(self, n: int) -> int:
        """The first of ``n`` insertion-order numbers: increasing in this process, near the clock across replicas."""
        with self._lock:
            self._seq = max(self._seq, time.time_ns())
            first, self._seq = self._seq, self._seq + n
        return first

    # --- kept images: one row per chunk of _IMAGE_CHUNK bytes, key "<sha256>:<chunk>" ---

    def _ensure_images(self) -> None:
        if self._client.has_collection(_IMAGES):
            self._client.load_collection(_IMAGES)
            return
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=80)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)
        schema.add_field("data", DataType.VARCHAR, max_length=65535)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one; unused
        index = self._client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="L2")
        try:
            self._create(_IMAGES, schema, index)
        except MilvusException:
            if not self._client.has_collection(_IMAGES):
                raise

    def _put_images(self, images: dict[str, bytes]) -> None:
        if not images:
            return
        have = set(self._get_images(set(images), keys_only=True))
        rows = [{"key": f"{sha}:{j}", "sha256": sha, "data": base64.b64encode(data[at:at + _IMAGE_CHUNK]).decode(),
                 "vector": [0.0, 0.0]}
                for sha, data in images.items() if sha not in have
                for j, at in enumerate(range(0, max(len(data), 1), _IMAGE_CHUNK))]
        step = _BATCH_BYTES // (_IMAGE_CHUNK * 4 // 3 + 200)
        for start in range(0, len(rows), step):
            with self._flush_lock.read():
                self._client.upsert(_IMAGES, rows[start:start + step])

    def _get_images(self, shas: Iterable[str], keys_only: bool = False) -> dict[str, bytes]:
        """The kept images of ``shas`` that are stored (with ``keys_only``, their values are empty)."""
        chunks: dict[str, list[tuple[int, str]]] = {}
        shas = sorted(shas)
        for start in range(0, len(shas), 8):  # 8 images of up to 2,048 chunks (96 MB) fit the result window
            part = shas[start:start + 8]
            for r in self._client.query(_IMAGES, filter=f"sha256 in [{', '.join(map(quote, part))}]",
                                        output_fields=["key", "sha256"] + ([] if keys_only else ["data"]),
                                        limit=_RESULT_WINDOW):
                chunks.setdefault(r["sha256"], []).append((int(r["key"].rsplit(":", 1)[1]), r.get("data", "")))
        return {sha: b"".join(base64.b64decode(d) for _, d in sorted(parts)) for sha, parts in chunks.items()}

    def _drop_orphan_images(self, shas: set[str]) -> None:
        """Delete the kept images of ``shas`` that no item of any collection refers to any more."""
        shas.discard("")
        if not shas:
            return
        for b in self._all():
            if not shas:
                return
            expr = f"sha256 in [{', '.join(map(quote, sorted(shas)))}]"
            with _gone_is_skipped():
                shas -= {r["sha256"] for r in self._scan(b, expr, ["sha256"])}
        for sha in shas:
            with self._flush_lock.read():
                self._client.delete(_IMAGES, filter=f"sha256 == {quote(sha)}")


def connect(uri: str, token: str = "") -> MilvusClient:
    """A pymilvus client of a Milvus server (``http(s)://host:port``) or a milvus-lite ``.db`` path;
    StoreUnavailableError saying what to check when it cannot be reached."""
    try:
        return MilvusClient(uri=uri, token=token, timeout=30)
    except MilvusException as e:
        raise _unavailable(uri, e) from None


@contextmanager
def _gone_is_skipped() -> Iterator[None]:
    """For loops over every collection: one deleted (here or by another replica) since it was listed is skipped."""
    try:
        yield
    except NotFoundError:
        pass


def _milvus_name(name: str) -> str:
    return _PREFIX + hashlib.sha256(name.encode()).hexdigest()[:40]


def _ids_in(ids: Sequence[str]) -> str:
    return f"id in [{', '.join(map(quote, ids))}]"


def _unavailable(uri: str, e: MilvusException) -> StoreUnavailableError:
    return StoreUnavailableError(f"cannot reach Milvus at {uri} ({getattr(e, 'message', e)}); check that it runs "
                                 "and listens there, the port, TLS (https://) and --store-token / "
                                 "EMBEDDER_STORE_TOKEN")


def _not_found(name: str) -> NotFoundError:
    # other collections' names are not listed: a key limited to some collections must not learn the rest
    return NotFoundError(f"no collection {shown(name)}; list the collections with Stats (`embedder stats`)")


def _vector(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _matrix(rows: list, dim: int) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)
