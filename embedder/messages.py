"""Conversions between ``embedder.v1`` messages and the Python objects of the store and the heads.

Server and client share them, so both sides read a field the same way. No gRPC calls in here.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from ._proto import embedder_pb2 as pb
from .config import Config
from .errors import ItemError
from .results import CollectionInfo, Hit, StoredItem, StoreStats

_DTYPES = {pb.DTYPE_UINT8: np.dtype(np.uint8), pb.DTYPE_FLOAT32: np.dtype("<f4")}


# --- images ---

def tensor_array(t: pb.Tensor) -> np.ndarray:
    """Validate a Tensor message and view its data as an ``(H, W[, C])`` array without copying."""
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise ItemError(f"tensor dtype {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype} "
                        "is not supported; use DTYPE_UINT8 (0..255) or DTYPE_FLOAT32 (0..1)")
    shape = tuple(t.shape)
    if len(shape) not in (2, 3) or any(d < 1 for d in shape) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise ItemError(f"tensor shape {list(shape)} is not an image; expected [H, W] or [H, W, C] "
                        "with C in 1, 3, 4 (channels last)")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape cannot overflow
    if len(t.data) != expected:
        raise ItemError(f"tensor data is {len(t.data)} bytes, but shape {list(shape)} of {dtype.name} "
                        f"needs {expected}; send the pixels row-major, channels last, little-endian")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def to_tensor(arr: np.ndarray) -> pb.Tensor:
    """A uint8 or float (values in [0, 1]) image array -> Tensor, little-endian, channels last."""
    if arr.ndim not in (2, 3):
        raise ValueError(f"array of shape {arr.shape} is not an image; expected (H, W) or (H, W, C)")
    if arr.dtype == np.uint8:
        dtype, data = pb.DTYPE_UINT8, np.ascontiguousarray(arr)
    elif np.issubdtype(arr.dtype, np.floating):
        dtype, data = pb.DTYPE_FLOAT32, np.ascontiguousarray(arr, dtype="<f4")
    else:
        raise ValueError(f"array dtype {arr.dtype} cannot be sent; convert to uint8 (0..255) or float32 (0..1)")
    return pb.Tensor(shape=list(arr.shape), dtype=dtype, data=data.tobytes())


# --- vectors and JSON fields ---

def vector_bytes(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<f4").tobytes()


def bytes_vector(data: bytes, what: str = "vector") -> np.ndarray:
    """Packed little-endian float32 -> a writable float32 array; ValueError when the length is not whole floats."""
    if not data or len(data) % 4:
        raise ValueError(f"{what} must be packed little-endian float32 values (a non-empty multiple of 4 bytes), "
                         f"got {len(data)} bytes")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


# One rule for every ``*_json`` field, at the door and on the way out. The depth cap sits far below Python's
# recursion limit, so no JSON value the service accepted can raise RecursionError where it is later parsed or
# written (a 982-deep value passed Add but broke every Search); the size cap bounds what one item can cost.
MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = Config.max_metadata_bytes  # per field, unless the caller passes its own (metadata: the config's)
UNREADABLE = "_unreadable"  # the one key of what is returned in place of a stored value that cannot be sent


def parse_json_object(text: str, what: str, *, max_bytes: int | None = MAX_JSON_BYTES,
                      raise_with: str = "") -> dict[str, Any]:
    """A JSON object from a ``*_json`` field; empty means ``{}``. ValueError says what is wrong.

    Refused: more than ``max_bytes`` of UTF-8 as sent or as stored and returned (:func:`dump_json`; None: no size
    cap; ``raise_with`` names the setting that raises it), nesting deeper than :data:`MAX_JSON_DEPTH`, and
    anything that could not be stored as JSON.
    """
    if not text:
        return {}
    if max_bytes is not None:  # before parsing: 30 MB of text is refused without building it
        _check_size(len(text.encode("utf-8", "surrogatepass")), max_bytes, what, raise_with)
    try:
        value = json.loads(text, parse_constant=_no_constant)
        too_deep = _deeper_than(value, MAX_JSON_DEPTH)
    except RecursionError:  # nested far beyond the cap
        too_deep = True
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise _not_storable(what, e) from None
    if too_deep:
        raise ValueError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep; flatten it (objects and lists "
                         f"inside each other at most {MAX_JSON_DEPTH} times)")
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object ({{...}}), got {type(value).__name__}")
    try:  # what cannot be stored must fail here, per item: infinities (1e999) and lone surrogates
        stored = dump_json(value, allow_nan=False).encode("utf-8")
    except ValueError as e:  # UnicodeEncodeError is a ValueError
        raise _not_storable(what, e) from None
    if max_bytes is not None:  # as stored and returned it can be longer ([1e15] -> [1000000000000000.0])
        _check_size(len(stored), max_bytes, what, raise_with)
    return value


def _check_size(size: int, max_bytes: int, what: str, raise_with: str) -> None:
    if size > max_bytes:
        raise ValueError(f"{what} is {size:,} bytes, above the limit of {max_bytes:,}; keep large data elsewhere "
                         "and store a reference to it"
                         + (f", or raise the limit with {raise_with}" if raise_with else ""))


def _not_storable(what: str, e: ValueError) -> ValueError:
    return ValueError(f"{what} is not storable JSON ({type(e).__name__}: {str(e)[:200]}); send a JSON object of "
                      "strings, finite numbers, booleans, null, lists and objects")


def load_stored_object(text: str, what: str) -> dict[str, Any]:
    """A stored JSON object read back (no size cap; it was capped when stored). Never raises: a value that does
    not parse within the rule (stored before the depth cap existed) comes back as ``{UNREADABLE: why}``."""
    try:
        return parse_json_object(text, what, max_bytes=None)
    except ValueError as e:
        return {UNREADABLE: str(e)}


def dump_stored(value: Mapping[str, Any] | None, what: str) -> str:
    """:func:`dump_json` of a stored object on its way out; one nested beyond :data:`MAX_JSON_DEPTH` (stored before
    the cap) is sent as ``{UNREADABLE: why}``, so one item cannot fail a whole Get or Search."""
    if value is not None and _deeper_than(value, MAX_JSON_DEPTH):
        return dump_json({UNREADABLE: f"{what} is nested more than {MAX_JSON_DEPTH} levels deep and cannot be "
                                      "returned; store it again, flattened"})
    return dump_json(value)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and dicts nest in ``value`` more than ``limit`` levels; iterative, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def dump_json(value: Any, *, allow_nan: bool = True) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=allow_nan)


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


# --- store ---

def hit_to_pb(h: Hit) -> pb.Hit:
    return pb.Hit(id=h.id, score=h.score, collection=h.collection, label=h.label,
                  metadata_json=dump_stored(h.metadata, f"the metadata of item {h.id!r}"))


def hit_from_pb(h: pb.Hit) -> Hit:
    return Hit(h.id, float(h.score), h.collection, _optional(h, "label"),
               load_stored_object(h.metadata_json, f"the metadata of item {h.id!r}"))


def stored_to_pb(item: StoredItem, *, with_vector: bool = True) -> pb.StoredItem:
    return pb.StoredItem(id=item.id, collection=item.collection, dim=len(item.vector),
                         vector=vector_bytes(item.vector) if with_vector else b"", sha256=item.sha256 or "",
                         label=item.label, created=item.created, updated=item.updated,
                         metadata_json=dump_stored(item.metadata, f"the metadata of item {item.id!r}"))


def stored_from_pb(s: pb.StoredItem) -> StoredItem:
    vector = bytes_vector(s.vector) if s.vector else np.zeros(0, np.float32)
    return StoredItem(s.id, s.collection, vector, s.sha256 or None, _optional(s, "label"),
                      load_stored_object(s.metadata_json, f"the metadata of item {s.id!r}"), s.created, s.updated)


def collection_to_pb(c: CollectionInfo) -> pb.CollectionStats:
    return pb.CollectionStats(name=c.name, model_id=c.model_id, dim=c.dim, index=c.index, count=c.count,
                              labels=c.labels, unlabeled=c.unlabeled, created=c.created)


def collection_from_pb(c: pb.CollectionStats) -> CollectionInfo:
    return CollectionInfo(c.name, c.model_id, c.dim, c.index, c.count, dict(c.labels), c.unlabeled, c.created)


def stats_to_pb(s: StoreStats, heads: int) -> pb.StatsResponse:
    return pb.StatsResponse(collections=[collection_to_pb(c) for c in s.collections], items=s.items,
                            cache_items=s.cache_items, cache_max_items=s.cache_max_items, disk_bytes=s.disk_bytes,
                            heads=heads)


# --- heads ---

def head_to_pb(info: Any) -> pb.HeadInfo:
    """A :class:`classifier.HeadInfo` -> HeadInfo message (classes as strings: store labels are strings)."""
    source = info.source or {}
    return pb.HeadInfo(head_id=info.head_id, kind=info.kind, model_id=info.model_id, dim=info.dim,
                       classes=[str(c) for c in info.classes], class_counts=info.class_counts,
                       params_json=dump_json(info.params), metrics_json=dump_json(info.metrics),
                       created=info.created, collection=str(source.get("collection", "")),
                       adaptation_json=dump_json(info.adaptation and {**info.adaptation,
                                                                      "adapt_to": source.get("adapt_to")}))


def head_from_pb(h: pb.HeadInfo) -> dict[str, Any]:
    """HeadInfo message -> a plain dict (the client's view of a head)."""
    return {"head_id": h.head_id, "kind": h.kind, "model_id": h.model_id, "dim": h.dim, "classes": list(h.classes),
            "class_counts": list(h.class_counts), "params": parse_json_object(h.params_json, "params"),
            "metrics": parse_json_object(h.metrics_json, "metrics") or None, "created": h.created,
            "collection": h.collection, "adaptation": parse_json_object(h.adaptation_json, "adaptation") or None}


# --- jobs ---

def job_to_pb(job: Any) -> pb.Job:
    """A :class:`embedder.jobs.Job` -> Job message."""
    return pb.Job(job_id=job.job_id, kind=job.kind, state=job.state, progress_json=dump_json(job.progress or None),
                  result_json=dump_json(job.result), error=job.error or "", created=job.created, updated=job.updated,
                  params_json=dump_json(job.params))


def job_from_pb(j: pb.Job) -> dict[str, Any]:
    return {"job_id": j.job_id, "kind": j.kind, "state": j.state,
            "progress": parse_json_object(j.progress_json, "progress"),
            "result": parse_json_object(j.result_json, "result") or None, "error": j.error or None,
            "created": j.created, "updated": j.updated, "params": parse_json_object(j.params_json, "params")}
