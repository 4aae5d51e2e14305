"""Conversions between ``embedder.v1`` messages and the Python objects of the store and the heads.

Server and client share them, so both sides read a field the same way. No gRPC calls in here.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._proto import embedder_pb2 as pb
from .errors import ItemError
from .jsonrule import dump_json, dump_stored, load_stored_object, parse_json_object
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
