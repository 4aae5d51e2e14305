"""One collection's vectors in FAISS: cosine similarity, exact or HNSW, float32 or compressed, and crash-safe snapshots.

A :class:`VectorIndex` is an ``IndexIDMap`` (our int64 ids) over a scan of every vector (``flat``) or an HNSW
graph (``hnsw``), holding L2-normalised copies of the vectors, so inner product is cosine similarity. The
copies are float32 (``IndexFlatIP``, ``IndexHNSWFlat``) or compressed codes (``IndexScalarQuantizer``,
``IndexHNSWSQ``): ``fp16`` halves the RAM, ``sq8`` (8 bits per dimension) quarters it. It is not thread-safe:
:class:`embedder.store.Store` lets many searches run together but never alongside a write.

Training ``sq8``: its codes map each dimension's range to 256 steps, and the ranges are learnt once, from the
first :data:`TRAIN_SIZE` vectors (widened by :data:`SQ8_MARGIN` on each side; a later value outside is clipped
to the range). Until that many have arrived the index stores them as exact float32 (a small collection needs
no compression); the add that reaches the size trains the ranges and moves every vector into codes. A
rebuild from SQLite trains again on the first vectors by id.

Re-ranking (``rerank=R``): a compressed index scores its codes, not the vectors; with ``rerank`` each query
takes ``max(k, R)`` candidates from the codes, scores them exactly against their float32 vectors (which the
caller reads, e.g. the store from SQLite, only those rows) and keeps the best ``k``.

Deleting from HNSW: FAISS cannot remove from an HNSW graph, so deleted ids become tombstones that
searches filter out with an ``IDSelector``; once tombstones exceed :data:`COMPACT_FRACTION` of the
index, the graph is rebuilt from the live vectors it stores.

Snapshot file (one per collection, written to a temp file, fsynced, then renamed over the old one)::

    b"EMBIDX1\\n" | u32 header length | header JSON | faiss index | u64 body length | u32 crc32 | b"END\\n"

The header carries the caller's marker of what the snapshot reflects (the store's generation counter);
the crc32 covers header and index, so a torn or bit-flipped file is refused instead of half-loaded.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager, nullcontext
from typing import Any, BinaryIO, Callable, Iterator

import faiss
import numpy as np

from .durable import replace_durably, temp_path
from .errors import EmbedderError, InvalidArgumentError

COMPACT_FRACTION = 0.25  # rebuild an HNSW graph once this share of its nodes are tombstones
EXACT_FILTER_FRACTION = 0.5  # HNSW filters matching fewer items than this share are answered exactly
# Searches of fewer queries run on the calling thread alone. An OpenMP team per small search costs more
# than it saves once other work competes for the cores, as it does in a server: one exact query over 20k
# vectors took 24 ms with 2 threads vs 4.8 ms with 1, and HNSW 8 ms vs 0.6 ms (busy 2-core machine).
# Concurrent requests still use every core, each on its own thread.
SERIAL_QUERIES = 8
_MAGIC = b"EMBIDX1\n"
_END = b"END\n"
_TRAILER = struct.Struct("<QI")  # body length, crc32 of the body (header length + header + index)
_CHUNK = 1 << 20


class SnapshotError(EmbedderError):
    """A snapshot file is missing, torn, corrupt or does not match; the store rebuilds from SQLite."""


# FAISS HNSW crashes with M=1 and cannot allocate absurd graphs; these bounds hold every setting FAISS can use.
HNSW_LIMITS = {"m": (2, 256), "ef_construction": (1, 4096), "ef_search": (1, 32768)}
# What a new collection, or one search, may ask for (IndexSpec.check_caps): m and ef_construction bound how long an
# add holds its collection's write lock, ef_search one query's work. The defaults (32, 40, 64) reach recall@10
# 0.985 on 100k vectors and ef_search=128 0.997 (README); beyond the caps adds only get slower. Collections
# created before the caps keep their settings.
HNSW_CAPS = {"m": 64, "ef_construction": 512, "ef_search": 4096}
# How each vector is kept: float32 as given, or FAISS scalar-quantiser codes (bytes per dimension 4, 2, 1).
CODES = {"float32": None, "fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}
TRAIN_SIZE = 4096  # sq8 learns its ranges from this many vectors; a collection below it stays exact float32
# A range learnt from the first vectors is widened by this share of its width on each side, so later vectors a
# little beyond the first ones keep their precision instead of being clipped.
SQ8_MARGIN = 0.1
# Each query of a re-ranking collection reads up to this many stored vectors: it bounds one search's SQLite reads.
RERANK_MAX = 1000
_COMPACT_ROWS = 65536  # vectors moved per step while rebuilding a graph, so a rebuild never holds all as float32


@dataclass(frozen=True)
class IndexSpec:
    """How a collection is indexed: ``kind``, then ``:`` and options, e.g. ``"hnsw:m=48,codes=sq8,rerank=50"``.

    ``flat``: every vector scored (exact with float32 codes). ``hnsw``: approximate search with an HNSW graph:
    ``m`` links per node, ``ef_construction`` candidates while inserting, ``ef_search`` candidates per query
    (raised to ``k`` when smaller). The defaults reach recall@10 >= 0.95 against exact search on 100k
    clustered 1280-d vectors (benchmarks/bench_search.py), but only 0.81 at 1M (ef_search=512: 0.93), where a
    graph needs a larger ``ef_construction`` (100 with ef_search=128: 0.945; with rerank=40: 0.963). ``codes``:
    how vectors are kept in RAM, ``float32`` (default), ``fp16`` or ``sq8`` (:data:`CODES`). ``rerank``: re-score this many candidates per query from the
    float32 vectors (compressed codes only; 0, the default: off).
    """

    kind: str = "flat"
    m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    codes: str = "float32"
    rerank: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "hnsw"):
            raise InvalidArgumentError(f"index kind must be 'flat' (exact) or 'hnsw' (approximate), got {self.kind!r}")
        for name, (low, high) in HNSW_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidArgumentError(f"HNSW setting {name} must be an int in [{low}, {min(high, HNSW_CAPS[name])}] "
                                           f"for a new collection, got {value!r}")
        if self.codes not in CODES:
            raise InvalidArgumentError(f"index codes must be one of {', '.join(CODES)} (4, 2 or 1 bytes per dimension), "
                                       f"got {self.codes!r}; e.g. 'hnsw:codes=sq8'")
        if isinstance(self.rerank, bool) or not isinstance(self.rerank, int) or not 0 <= self.rerank <= RERANK_MAX:
            raise InvalidArgumentError(f"rerank must be an int in [0, {RERANK_MAX}] (candidates re-scored per query; "
                                       f"0: off), got {self.rerank!r}")
        if self.rerank and self.codes == "float32":
            raise InvalidArgumentError(f"rerank re-scores compressed codes from the float32 vectors, but '{self.kind}' "
                                       "with float32 codes scores them exactly already; add codes=sq8 or codes=fp16, "
                                       "or drop rerank")

    def check_caps(self) -> IndexSpec:
        """This spec, if it is within :data:`HNSW_CAPS` (as a new collection's must be); else InvalidArgumentError."""
        if self.kind == "hnsw":
            for name, cap in HNSW_CAPS.items():
                value = getattr(self, name)
                if value > cap:
                    raise InvalidArgumentError(
                        f"HNSW setting {name}={value} is over its cap of {cap} (embedder.index.HNSW_CAPS: it bounds "
                        f"how long one add or search may take); use {name} <= {cap}")
        return self

    @classmethod
    def parse(cls, value: str | IndexSpec) -> IndexSpec:
        """``"flat"``, ``"hnsw"``, ``"flat:codes=sq8"`` or ``"hnsw:m=48,ef_search=128,codes=sq8,rerank=50"``
        (the form :meth:`__str__` prints)."""
        if isinstance(value, IndexSpec):
            return value
        kind, _, options = str(value).strip().partition(":")
        fields: dict[str, Any] = {}
        for option in filter(None, options.split(",")):
            key, eq, setting = (part.strip() for part in option.partition("="))
            if key in fields:
                raise InvalidArgumentError(f"index option {key!r} is given twice in {value!r}; give it once")
            if eq and key == "codes" and setting:
                fields[key] = setting.lower()
            elif eq and key in ("m", "ef_construction", "ef_search", "rerank") and setting.isdigit():
                fields[key] = int(setting)
            else:
                raise InvalidArgumentError(f"bad index option {option!r} in {value!r}; expected e.g. "
                                           "'hnsw:m=32,ef_search=128' or 'hnsw:codes=sq8,rerank=50'")
        if kind.strip().lower() == "flat" and fields.keys() - {"codes", "rerank"}:
            raise InvalidArgumentError(f"{value!r}: m, ef_construction and ef_search are HNSW settings; "
                                       "'flat' takes only codes and rerank")
        return cls(kind.strip().lower(), **fields)

    def __str__(self) -> str:
        options = [f"m={self.m},ef_construction={self.ef_construction},ef_search={self.ef_search}"] \
            if self.kind == "hnsw" else []
        if self.codes != "float32":
            options.append(f"codes={self.codes}")
        if self.rerank:
            options.append(f"rerank={self.rerank}")
        return self.kind + (":" + ",".join(options) if options else "")


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Float32 ``(N, D)`` rows scaled to unit length (a copy); callers refuse zero rows beforehand.

    The norms are taken in float64: in float32 a row scaled by 1e25 overflows and one scaled by 1e-25
    underflows to zero, and FAISS would score it 0 against everything.
    """
    x = np.asarray(vectors, dtype=np.float64)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


class VectorIndex:
    """Vectors of one collection under int64 ids, searched by cosine similarity."""

    def __init__(self, dim: int, spec: IndexSpec, *, _index: faiss.IndexIDMap | None = None) -> None:
        self.dim = dim
        self.spec = spec
        self._set(_index if _index is not None else faiss.IndexIDMap(self._new_base(None)))

    def __len__(self) -> int:
        return self._index.ntotal - len(self._dead)

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, spec='{self.spec}', live={len(self)}, tombstones={self.tombstones})"

    @property
    def tombstones(self) -> int:
        """Deleted ids still in the HNSW graph (always 0 for flat)."""
        return len(self._dead)

    @property
    def compressed(self) -> bool:
        """Whether scores come from compressed codes (not while ``sq8`` is still exact, before training)."""
        return self.spec.codes != "float32" and not self._staging

    def ids(self) -> np.ndarray:
        """The live ids, int64, in insertion order."""
        ids = faiss.vector_to_array(self._index.id_map)
        if self._dead:
            ids = ids[~np.isin(ids, self._dead_array())]
        return ids

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``(N, dim)`` vectors (normalised here) under new int64 ``ids``."""
        if not len(ids):
            return
        x, ids = normalized(vectors), np.ascontiguousarray(ids, dtype=np.int64)
        if self._staging and self._index.ntotal + len(x) >= TRAIN_SIZE:
            self._train(x, ids)
        else:
            self._index.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids that are in the index (flat: at once; HNSW: tombstones, compacted past a threshold)."""
        if not len(ids):
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not self._graph:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            return
        self._dead.update(ids.tolist())
        self._dead_selector = None
        if len(self._dead) > COMPACT_FRACTION * self._index.ntotal:
            self._compact()

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, ef_search: int | None = None,
               vectors: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by cosine for ``(Q, dim)`` queries: ``(scores, ids)``, both ``(Q, k)``, id -1 past the end.

        ``allowed``: only these (live) ids may be returned. HNSW walks its graph through the filter only
        while the filter keeps most items (:data:`EXACT_FILTER_FRACTION`): a sparse filter strands the walk
        (recall@10 fell to 0.66 at 10%), so those searches, and any query for which the walk found fewer
        hits than exist, are answered exactly from the vectors the graph stores.

        ``vectors``: the float32 vectors of some ids, ``(len(ids), dim)`` in their order; required by a spec
        with ``rerank``, whose candidates it re-scores.
        """
        q = normalized(queries)
        rerank = self.spec.rerank if self.compressed else 0
        with _omp_threads(1) if len(q) < SERIAL_QUERIES else nullcontext():
            scores, ids = self._search(q, max(k, rerank), allowed, ef_search)
        if not rerank:
            return scores, ids
        if vectors is None:
            raise ValueError(f"index '{self.spec}' re-ranks: pass vectors= to read the candidates' float32 vectors")
        return _rerank(q, k, ids, vectors)

    def _search(self, q: np.ndarray, k: int, allowed: np.ndarray | None,
                ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            available = len(allowed)
        else:
            selector = self._live_selector()
            available = len(self)
        if not self._graph:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            return self._index.search(q, k, params=params)
        if allowed is not None and available < EXACT_FILTER_FRACTION * len(self):
            return self._exact(q, k, selector)
        params = faiss.SearchParametersHNSW(efSearch=max(ef_search or self.spec.ef_search, k))
        if selector is not None:
            params.sel = selector
        scores, ids = self._index.search(q, k, params=params)
        short = np.flatnonzero((ids >= 0).sum(axis=1) < min(k, available))
        if len(short):
            scores[short], ids[short] = self._exact(q[short], k, selector)
        return scores, ids

    def _exact(self, q: np.ndarray, k: int, selector: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the storage of an HNSW graph (its float32 vectors or codes); ``selector`` works on our ids."""
        storage = faiss.downcast_index(self._base.storage)
        params = None
        if selector is not None:  # the storage counts positions: translate them to ids for the selector
            params = faiss.SearchParameters(sel=faiss.IDSelectorTranslated(self._index.id_map, selector))
        scores, positions = storage.search(q, k, params=params)
        ids = faiss.vector_to_array(self._index.id_map)
        return scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    def _live_selector(self) -> faiss.IDSelector | None:
        if not self._dead:
            return None
        if self._dead_selector is None:
            self._dead_selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._dead_array()))
        return self._dead_selector

    def _dead_array(self) -> np.ndarray:
        return np.fromiter(self._dead, dtype=np.int64, count=len(self._dead))

    def _set(self, index: faiss.IndexIDMap) -> None:
        """Make ``index`` this collection's; tombstones belong to the index they were made in."""
        self._index = index
        self._base = faiss.downcast_index(index.index)
        self._graph = isinstance(self._base, faiss.IndexHNSW)
        self._staging = self.spec.codes != "float32" and isinstance(self._base, faiss.IndexFlat)
        self._dead: set[int] = set()  # HNSW tombstones
        self._dead_selector: faiss.IDSelector | None = None

    def _train(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Learn the sq8 ranges from the staged vectors and ``x``, then move both into codes."""
        staged = self._base.reconstruct_n(0, self._index.ntotal)
        sq = faiss.ScalarQuantizer(self.dim, CODES[self.spec.codes])
        sq.rangestat, sq.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, SQ8_MARGIN
        sq.train(np.vstack([staged, x[:TRAIN_SIZE]]))
        index = faiss.IndexIDMap(self._new_base(sq))
        index.add_with_ids(staged, faiss.vector_to_array(self._index.id_map))
        index.add_with_ids(x, ids)
        self._set(index)

    def _compact(self) -> None:
        ids, dead, old = faiss.vector_to_array(self._index.id_map), self._dead_array(), self._base
        index = faiss.IndexIDMap(self._new_base(self._quantizer()))
        for start in range(0, len(ids), _COMPACT_ROWS):
            chunk = ids[start:start + _COMPACT_ROWS]
            keep = ~np.isin(chunk, dead)
            index.add_with_ids(np.ascontiguousarray(old.reconstruct_n(start, len(chunk))[keep]), chunk[keep])
        self._set(index)

    def _quantizer(self) -> faiss.ScalarQuantizer | None:
        """The trained scalar quantiser of this index's codes; None for float32 ones."""
        storage = faiss.downcast_index(self._base.storage) if self._graph else self._base
        return storage.sq if isinstance(storage, faiss.IndexScalarQuantizer) else None

    def _new_base(self, sq: faiss.ScalarQuantizer | None) -> faiss.Index:
        """An empty index of this spec whose codes use ``sq`` (trained); ``sq8`` without one stores float32."""
        qtype = CODES[self.spec.codes]
        if self.spec.codes == "sq8" and sq is None:
            return faiss.IndexFlatIP(self.dim)  # staging: exact until TRAIN_SIZE vectors arrive
        if self.spec.kind == "flat":
            base = faiss.IndexFlatIP(self.dim) if qtype is None else \
                faiss.IndexScalarQuantizer(self.dim, qtype, faiss.METRIC_INNER_PRODUCT)
            storage = base
        else:
            base = faiss.IndexHNSWFlat(self.dim, self.spec.m, faiss.METRIC_INNER_PRODUCT) if qtype is None else \
                faiss.IndexHNSWSQ(self.dim, qtype, self.spec.m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = self.spec.ef_construction
            base.hnsw.efSearch = self.spec.ef_search
            storage = faiss.downcast_index(base.storage)
        if sq is not None:
            storage.sq = sq  # a copy
            storage.is_trained = base.is_trained = True
        return base

    # --- snapshots ---

    def save(self, path: Path, *, marker: dict[str, Any]) -> int:
        """Write the index and ``marker`` atomically to ``path`` (temp file, fsync, rename); returns its size.

        Tombstones are not written: the store re-derives them from SQLite on load.
        """
        header = json.dumps({"dim": self.dim, "spec": str(self.spec), "marker": marker}).encode()
        tmp = temp_path(path)
        crc, size = 0, 0

        def write(chunk: bytes) -> None:
            nonlocal crc, size
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            f.write(chunk)

        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC)
                write(struct.pack("<I", len(header)) + header)
                faiss.write_index(self._index, faiss.PyCallbackIOWriter(write, _CHUNK))
                f.write(_TRAILER.pack(size, crc) + _END)
                f.flush()
                os.fsync(f.fileno())
            replace_durably(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return len(_MAGIC) + size + _TRAILER.size + len(_END)

    @classmethod
    def load(cls, path: Path) -> tuple[VectorIndex, dict[str, Any]]:
        """Read a snapshot written by :meth:`save`: ``(index, marker)``. Raises :class:`SnapshotError`."""
        try:
            with open(path, "rb") as f:
                return cls._read(f, path.stat().st_size)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {path} is missing") from None
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, struct.error) as e:  # faiss: RuntimeError
            raise SnapshotError(f"snapshot {path} is unreadable ({type(e).__name__}: {e})") from None

    @staticmethod
    def read_marker(path: Path) -> dict[str, Any]:
        """The marker of the snapshot at ``path``, from its header alone (no checksum: :meth:`load` checks)."""
        try:
            with open(path, "rb") as f:
                if f.read(len(_MAGIC)) != _MAGIC:
                    raise SnapshotError(f"{path} is not a snapshot file (bad magic)")
                (header_len,) = struct.unpack("<I", f.read(4))
                return dict(json.loads(f.read(header_len))["marker"])
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise SnapshotError(f"snapshot {path} is unreadable ({type(e).__name__}: {e})") from None

    @classmethod
    def _read(cls, f: BinaryIO, file_size: int) -> tuple[VectorIndex, dict[str, Any]]:
        body = file_size - len(_MAGIC) - _TRAILER.size - len(_END)
        if body < 4 or f.read(len(_MAGIC)) != _MAGIC:
            raise SnapshotError("not a snapshot file (bad magic or too short)")
        f.seek(file_size - _TRAILER.size - len(_END))
        size, crc = _TRAILER.unpack(f.read(_TRAILER.size))
        if f.read(len(_END)) != _END or size != body:
            raise SnapshotError("torn snapshot (trailer missing or length mismatch)")
        f.seek(len(_MAGIC))
        actual, left = 0, size
        while left:  # verify before faiss parses anything, so garbage never reaches the C++ reader
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise SnapshotError("torn snapshot (shorter than its trailer says)")
            actual = zlib.crc32(chunk, actual)
            left -= len(chunk)
        if actual != crc:
            raise SnapshotError(f"checksum mismatch (crc32 {actual:#010x}, recorded {crc:#010x})")
        f.seek(len(_MAGIC))
        (header_len,) = struct.unpack("<I", f.read(4))
        header = json.loads(f.read(header_len))
        index = faiss.read_index(faiss.PyCallbackIOReader(f.read, _CHUNK))
        dim, spec = int(header["dim"]), IndexSpec.parse(header["spec"])
        if not isinstance(index, faiss.IndexIDMap) or index.d != dim:
            raise SnapshotError(f"snapshot holds a {type(index).__name__} of dim {index.d}, "
                                f"expected an IndexIDMap of dim {dim}")
        return cls(dim, spec, _index=index), header["marker"]


def _rerank(q: np.ndarray, k: int, candidates: np.ndarray,
            vectors: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's ``candidates`` (id -1: none) by exact cosine against their float32 vectors."""
    found = np.unique(candidates[candidates >= 0])
    x = normalized(vectors(found)) if len(found) else np.zeros((0, q.shape[1]), dtype=np.float32)
    scores = np.full((len(q), k), -np.finfo(np.float32).max, dtype=np.float32)  # as FAISS marks no hit
    ids = np.full((len(q), k), -1, dtype=np.int64)
    for r, row in enumerate(candidates):
        row = row[row >= 0]
        exact = x[np.searchsorted(found, row)] @ q[r]
        best = np.argsort(-exact, kind="stable")[:k]  # stable: ties keep the index's order
        scores[r, :len(best)], ids[r, :len(best)] = exact[best], row[best]
    return scores, ids


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Cap the OpenMP team of FAISS calls made by this thread (OpenMP keeps the setting per thread)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
