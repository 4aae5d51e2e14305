"""Conversions between the JSON shapes of :mod:`.schema` and the service core's arguments and results.

No logic beyond the wire: an input that cannot be read becomes an ``Item`` carrying its error (it fails alone,
as on the gRPC port), and every failure is answered through the one table in :mod:`embedder.errors`.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import asdict
from typing import Any

import numpy as np
from pydantic import ValidationError

from .._proto import embedder_pb2 as pb
from ..core import AddItem, Item, Outcome
from ..errors import TABLE, Category, EmbedderError, ItemError, category_of, message_of
from ..jsonrule import dump_stored, load_stored_object
from ..messages import bytes_vector, tensor_array, vector_bytes
from . import schema


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DTYPES = {"uint8": pb.DTYPE_UINT8, "float32": pb.DTYPE_FLOAT32}
_IMAGE_MAGIC = [(b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
                (b"BM", "image/bmp"), (b"RIFF", "image/webp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff")]


# --------------------------------------------------------------------------------------------- errors

def error_body(error: BaseException) -> tuple[int, schema.ErrorBody]:
    """The HTTP status and JSON error of any exception; server faults are logged and say so, without a trace."""
    category = category_of(error)
    if isinstance(error, ValidationError):  # pydantic's own text is long and links to its docs
        message = "invalid request: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:10])
    else:
        message = message_of(error, "HTTP")
    return TABLE[category].http, item_error(category, message)


def item_error(category: Category, message: str) -> schema.ErrorBody:
    return schema.ErrorBody(message=message, type=category.value, code=TABLE[category].grpc)


def outcome_error(error: BaseException | None) -> schema.ErrorBody | None:
    """A per-item error as it is written in a result (the item failed alone)."""
    return None if error is None else error_body(error)[1]


# --------------------------------------------------------------------------------------------- inputs

def image_bytes(text: str) -> bytes:
    """An image sent as a ``data:`` URI or plain base64; URLs are refused, never fetched (SSRF)."""
    if _URL.match(text):
        raise ItemError(f"image URLs are not fetched ({text[:100]!r}): the server never fetches URLs; send the "
                        "image itself, as base64, a data: URI or a multipart file upload")
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ItemError(f"a data: URI must be base64 (data:image/jpeg;base64,...), got {header[:100]!r}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ItemError(f"image is not valid base64 ({e}); send standard base64 without line breaks "
                        "(base64 -w0) or a data: URI") from None


def image_item(item_id: str, text: str) -> Item:
    """An image string as the core's item, carrying its error when it cannot be read."""
    try:
        return Item(item_id, image=image_bytes(text))
    except ItemError as e:
        return Item(item_id, error=e)


def input_item(item_id: str, text: str, *, modality: str | None, takes_text: bool) -> Item:
    """One ``/v1/embeddings`` input as the core's item: an image, or a text where the caller or the model says so
    (see ``EmbeddingsRequest.modality``)."""
    if modality == "text":
        return Item(item_id, text=text)
    if modality == "image" or text.startswith("data:") or _URL.match(text):
        return image_item(item_id, text)
    if not takes_text:
        found = image_item(item_id, text)
        if found.error is not None:  # perhaps meant as a text: say why that is no way out either
            found.error.args = (f"{found.error}; (and not a text either: this model embeds images only, texts need "
                                "a text-image model)",)
        return found
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return Item(item_id, text=text)
    return Item(item_id, image=data) if any(data.startswith(m) for m, _ in _IMAGE_MAGIC) else Item(item_id, text=text)


def items(xs: list[schema.ItemIn]) -> list[Item]:
    return [item(x) for x in xs]


def item(x: schema.ItemIn) -> Item:
    """One JSON item as the core's item; one that cannot be read carries its error and fails alone."""
    try:
        given = [name for name in ("image", "sha256", "tensor", "text") if getattr(x, name) is not None]
        if len(given) > 1:
            raise ItemError(f"item sets {' and '.join(given)}; set exactly one of image, sha256, tensor and text")
        if x.text is not None:
            return Item(x.id, text=x.text)
        if x.image is not None:
            return image_item(x.id, x.image)
        if x.sha256 is not None:
            return Item(x.id, sha256=x.sha256)
        if x.tensor is not None:
            t = x.tensor
            return Item(x.id, array=tensor_array(pb.Tensor(shape=t.shape, dtype=_DTYPES[t.dtype],
                                                           data=_base64(t.data, "tensor data"))))
    except EmbedderError as e:
        return Item(x.id, error=e)
    except Exception as e:  # whatever a malformed item does, it fails alone
        return Item(x.id, error=ItemError(f"malformed item ({type(e).__name__}: {e})"))
    return Item(x.id)  # none: the core says what to set


def add_items(xs: list[schema.AddItemIn]) -> list[AddItem]:
    return [add_item(x) for x in xs]


def add_item(x: schema.AddItemIn) -> AddItem:
    """A JSON item to store; the core holds its metadata to the one JSON rule, as for the gRPC port's."""
    return AddItem(item(x), label=x.label, metadata=x.metadata)


def vector_in(value: schema.Vector) -> np.ndarray:
    """A query vector: a JSON float array, or base64 of little-endian float32 values."""
    if isinstance(value, str):
        return bytes_vector(_base64(value, "the query vector"), "the query vector")
    return np.asarray(value, dtype=np.float32)


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not valid base64 ({e})") from None


# --------------------------------------------------------------------------------------------- results

def vector_out(v: np.ndarray, encoding: schema.Encoding) -> schema.Vector:
    return base64.b64encode(vector_bytes(v)).decode("ascii") if encoding == "base64" else v.tolist()


def result(o: Outcome, encoding: schema.Encoding | None) -> schema.Result:
    """One item's outcome; ``encoding`` None leaves the vector out (Add answers stay small)."""
    vector = None if o.error is not None or encoding is None else vector_out(o.vector, encoding)
    return schema.Result(id=o.id, sha256=o.sha256, cached=o.cached, vector=vector, error=outcome_error(o.error))


def stored_metadata(metadata: Any, item_id: str) -> dict[str, Any]:
    """Stored metadata on its way out, under the rule the gRPC port sends it by (and its client reads it by):
    one stored before the rule and beyond it comes back as ``{"_unreadable": why}``."""
    what = f"the metadata of item {item_id!r}"
    return load_stored_object(dump_stored(metadata, what), what)


def stored(s: Any, encoding: schema.Encoding | None) -> schema.StoredItemOut:
    """A :class:`embedder.results.StoredItem`; ``encoding`` None omits the vector."""
    return schema.StoredItemOut(id=s.id, collection=s.collection, dim=len(s.vector),
                                vector=None if encoding is None else vector_out(s.vector, encoding),
                                sha256=s.sha256, label=s.label, metadata=stored_metadata(s.metadata, s.id),
                                created=s.created, updated=s.updated)


def listed(page: Any) -> schema.ItemsResponse:
    """A :class:`embedder.results.ItemPage` without vectors."""
    return schema.ItemsResponse(items=[
        schema.ListedItemOut(id=s.id, sha256=s.sha256, label=s.label, metadata=stored_metadata(s.metadata, s.id),
                             created=s.created, updated=s.updated, image=kept)
        for s, kept in zip(page.items, page.kept)], total=page.total, offset=page.offset)


def image_type(data: bytes) -> str:
    """The media type of a kept image by its leading bytes (what the decoder accepted), for the browser."""
    for magic, media in _IMAGE_MAGIC:
        if data.startswith(magic):
            return media
    return "application/octet-stream"


def hit(h: Any) -> schema.HitOut:
    return schema.HitOut(id=h.id, score=h.score, collection=h.collection, label=h.label,
                         metadata=stored_metadata(h.metadata, h.id))


def collection(c: Any) -> schema.CollectionOut:
    """A :class:`embedder.results.CollectionInfo`."""
    return schema.CollectionOut(**asdict(c))


def stats(s: Any, heads: int) -> schema.StatsResponse:
    return schema.StatsResponse(collections=[collection(c) for c in s.collections],
                                items=s.items, cache_items=s.cache_items, cache_max_items=s.cache_max_items,
                                disk_bytes=s.disk_bytes, heads=heads)


def head(info: Any) -> schema.HeadOut:
    """A :class:`classifier.HeadInfo` as the gRPC port's HeadInfo says it (no server paths)."""
    source = info.source or {}
    return schema.HeadOut(head_id=info.head_id, kind=info.kind, model_id=info.model_id, dim=info.dim,
                          classes=[str(c) for c in info.classes], class_counts=info.class_counts,
                          params=info.params, metrics=info.metrics, created=info.created,
                          collection=str(source.get("collection", "")),
                          adaptation=info.adaptation and {**info.adaptation, "adapt_to": source.get("adapt_to")})


def job(j: Any) -> schema.JobOut:
    return schema.JobOut(**asdict(j))


def prediction(row: Any) -> schema.Prediction:
    return schema.Prediction(id=row.id, cached=row.cached, error=outcome_error(row.error),
                             heads={h: [schema.LabelScore(label=lab, probability=p) for lab, p in top]
                                    for h, top in (row.tops or {}).items()})
