"""Inputs -> request messages within the server's limits: one item, Embed chunks, and Add/Predict batches.

An item that cannot be sent (unreadable, unknown type, too large for any message) becomes a per-item error
here, on the client, and never fails the others.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import grpc
import numpy as np

from .._proto import embedder_pb2 as pb
from ..messages import to_tensor
from .errors import ServiceError
from .results import Cached, ItemResult, Text

ENVELOPE = 64 * 1024  # room for the request's own fields and per-item framing
DIM_BOUND = 4096  # assumed vector size until the server tells us, to keep responses under the limit too
STATUS_BY_NUMBER = {s.value[0]: s for s in grpc.StatusCode}


def to_item(x: Any, item_id: str = "") -> pb.Item:
    """One input -> an ``embedder.v1.Item``; ValueError/OSError with a fix when it cannot be sent."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        return pb.Item(id=item_id, image=bytes(x))
    if isinstance(x, Cached):
        return pb.Item(id=item_id, content_sha256=x.sha256)
    if isinstance(x, Text):
        return pb.Item(id=item_id, text=x.text)
    if isinstance(x, (str, os.PathLike)):
        try:
            return pb.Item(id=item_id, image=Path(x).read_bytes())
        except OSError as e:
            raise OSError(f"could not read file {str(x)!r}: {e.strerror or e}") from None
    if isinstance(x, np.ndarray):
        return pb.Item(id=item_id, tensor=to_tensor(x))
    # A PIL image exists only if its module is loaded: look there instead of importing Pillow for every other
    # type (the client installs without it).
    Image = sys.modules.get("PIL.Image")
    if Image is not None and isinstance(x, Image.Image):
        return pb.Item(id=item_id, tensor=to_tensor(np.asarray(x.convert("RGB"))))
    raise TypeError(f"cannot send a {type(x).__name__}; pass encoded image bytes, a file path, "
                    "a numpy array (H, W[, C]), a PIL image, or Text(...) for text")


@dataclass(eq=False)
class Chunk:
    """Consecutive input items: the request with the sendable ones, and one slot per input item.

    Slots of items refused on the client are filled at once; the rest are filled from the response.
    Every chunk is sent, even with no sendable items, so results always come back in input order.
    """

    request: pb.EmbedRequest
    slots: list[ItemResult | None] = field(default_factory=list)
    sent_in: int = -1  # stream attempt that last sent it
    done: bool = False

    def fill(self, response: pb.EmbedResponse) -> None:
        """Fill the open slots from the server's answer to :attr:`request`, in order."""
        expected = sum(s is None for s in self.slots)
        if len(response.results) != expected:
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               f"server answered {len(response.results)} results for {expected} items")
        answers = iter(response.results)
        for i, slot in enumerate(self.slots):
            if slot is None:
                r = next(answers)
                code = STATUS_BY_NUMBER.get(r.status.code, grpc.StatusCode.UNKNOWN)
                if code == grpc.StatusCode.OK:
                    vec = np.frombuffer(r.vector, dtype="<f4").astype(np.float32)
                    self.slots[i] = ItemResult(r.id, vec, None, code, r.cached, r.model_id)
                else:
                    self.slots[i] = ItemResult(r.id, None, r.status.message or code.name, code, r.cached,
                                               r.model_id)
        self.done = True


def embed_chunks(pairs: Iterable[tuple[str, Any]], size: int, *, max_message_bytes: int, model: str,
                 dim: Callable[[], int]) -> Iterator[Chunk]:
    """Group ``(id, input)`` pairs into chunks of at most ``size`` items whose request and response fit
    ``max_message_bytes``; ``dim()`` is the vector size as last heard from the server (it may change while
    a stream is read)."""
    budget = max_message_bytes - ENVELOPE
    chunk, used = Chunk(pb.EmbedRequest(model=model)), 0
    for item_id, x in pairs:
        try:
            item = to_item(x, item_id)
        except (ValueError, TypeError, OSError) as e:
            chunk.slots.append(ItemResult(item_id, None, str(e), grpc.StatusCode.INVALID_ARGUMENT))
        else:
            n = item.ByteSize() + 16
            if n > budget:
                chunk.slots.append(ItemResult(item_id, None, (
                    f"item is {n:,} bytes encoded, above the {max_message_bytes:,}-byte message limit; "
                    "downscale or re-encode it, or raise the limit on the server (--max-message-bytes / "
                    "EMBEDDER_MAX_MESSAGE_BYTES) and here (EmbedderClient(max_message_bytes=...))"),
                    grpc.StatusCode.RESOURCE_EXHAUSTED))
            else:
                # responses carry dim float32s per item: keep them under the limit as well
                per_response = budget // (4 * dim() + 128)
                sendable = len(chunk.request.items)
                if sendable and (used + n > budget or sendable >= per_response):
                    yield chunk
                    chunk, used = Chunk(pb.EmbedRequest(model=model)), 0
                chunk.request.items.append(item)
                chunk.slots.append(None)
                used += n
        if len(chunk.slots) >= size:
            yield chunk
            chunk, used = Chunk(pb.EmbedRequest(model=model)), 0
    if chunk.slots:
        yield chunk


def batches(entries: list[tuple[int, Any]], failed: dict[int, str], *, max_message_bytes: int,
            max_items: int) -> Iterator[list[tuple[int, Any]]]:
    """Group ``(index, message)`` entries into requests within ``max_items`` and the message size limit;
    an entry too large for any request goes to ``failed``."""
    budget = max_message_bytes - ENVELOPE
    batch: list[tuple[int, Any]] = []
    used = 0
    for i, entry in entries:
        n = entry.ByteSize() + 16
        if n > budget:
            failed[i] = (f"item is {n:,} bytes encoded, above the {max_message_bytes:,}-byte message "
                         "limit; downscale or re-encode it, or raise the limit on the server and here")
            continue
        if batch and (used + n > budget or len(batch) >= max_items):
            yield batch
            batch, used = [], 0
        batch.append((i, entry))
        used += n
    if batch:
        yield batch
