"""The one cache-aside path every image (and text) takes, whichever front door or call brings it.

:func:`submit` hashes encoded images, serves what the store's cache holds (a hit is neither decoded nor run
through the model), and queues each distinct miss once in the model's batcher: an image repeated inside one
call is embedded once and every copy gets its vector. :func:`finish` waits for the misses within the call's
deadline and puts their vectors in the cache. Cache rows are the caller's own (:func:`cache_scope`): a key
never hits, nor waits less for, what another key embedded. Texts (for a text-image model) take the same path,
keyed by :func:`embedder.inputs.text_hash`; a text miss is embedded at once by the model's text tower, not
queued. Per-item failures stay exception objects (with a :class:`embedder.errors.Category`) until a front door
writes them on its wire.
"""
from __future__ import annotations

import logging
import time
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import (BatchFailedError, Category, DeadlineError, EmbedderError, ItemError, ItemNotFoundError,
                      NotSupportedByModelError, StoreClosedError, category_of)
from ..inputs import content_hash, text_hash
from ..keys import Principal

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")
# Longer texts are refused before tokenizing: text towers truncate to a few dozen tokens (CLIP 77, SigLIP 64).
MAX_TEXT_CHARS = 4096


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Call:
    """What a front door knows of its caller: a deadline (``time.monotonic()`` seconds), whether it left, and
    who it is (``principal``: its API key; None where no auth is configured, and for in-process callers)."""

    deadline: float | None = None
    is_cancelled: Callable[[], bool] = _never
    principal: Principal | None = None

    @classmethod
    def within(cls, seconds: float | None, is_cancelled: Callable[[], bool] = _never,
               principal: Principal | None = None) -> Call:
        """A call that must finish within ``seconds`` from now (None: no deadline)."""
        return cls(None if seconds is None else time.monotonic() + seconds, is_cancelled, principal)

    def time_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class Item:
    """One input: encoded ``image`` bytes, a decoded ``array``, the ``sha256`` of an image the cache holds, or
    ``text`` (for a text-image model).

    ``error`` is set by a front door that could not read the item: it fails alone, nothing is queued.
    """

    id: str = ""
    image: bytes | None = None
    array: np.ndarray | None = None
    sha256: str | None = None
    error: EmbedderError | None = None
    text: str | None = None

    @classmethod
    def of(cls, value: Any, item_id: str = "") -> Item:
        """``value`` as an Item: an Item as it is, bytes as an encoded image, an array as decoded pixels."""
        if isinstance(value, Item):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return cls(item_id, image=bytes(value))
        if isinstance(value, np.ndarray):
            return cls(item_id, array=value)
        raise TypeError(f"an item is encoded image bytes, a decoded (H, W[, C]) array or an Item, not a "
                        f"{type(value).__name__}; read files into bytes first, pass text as Item(text=...)")


@dataclass
class Outcome:
    """One item's result: ``vector`` (float32 ``(dim,)``) or ``error``; ``cached`` when the cache served it."""

    id: str
    sha256: str = ""
    vector: np.ndarray | None = None
    error: EmbedderError | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Pending:
    """A call's items on their way through the batcher; :func:`finish` turns it into outcomes."""

    outcomes: list[Outcome]
    model: Any  # core.models.LoadedModel
    futures: dict[int, Future] = field(default_factory=dict)  # outcome index -> its (maybe shared) future
    on_done: Callable[[], None] | None = None  # gives the model lease back
    scope: dict[str, Any] = field(default_factory=dict)  # the caller's cache_scope, for the put


def cache_scope(call: Call) -> dict[str, Any]:
    """The store's ``owner``/``visible`` arguments for the caller's cache lookups and puts (none: shared)."""
    p = call.principal
    return {} if p is None else {"owner": p.cache_owner, "visible": p.collections}


def submit(items: Sequence[Item], model: Any, call: Call, *, store: Any, block: bool = False,
           metrics: Any = None) -> Pending:
    """Serve cache hits and queue each distinct miss once; items that cannot be read fail alone.

    ``store`` is None on an embedding replica (no cache: a hash alone cannot be served). Raises
    :class:`embedder.errors.QueueFullError` (unless ``block``) when the batcher has no room for the misses.
    """
    outcomes = [Outcome(item.id) for item in items]
    wanted: dict[str, list[int]] = {}  # sha256 -> the items asking for it
    encoded: dict[str, bytes] = {}  # sha256 -> bytes of one item that brought them
    texts: dict[str, str] = {}  # text_hash -> the text
    arrays: list[tuple[int, np.ndarray]] = []
    for i, (item, out) in enumerate(zip(items, outcomes)):
        try:
            if item.error is not None:
                raise item.error
            if item.image is not None:
                out.sha256 = content_hash(item.image)
                encoded.setdefault(out.sha256, item.image)
            elif item.text is not None:
                if not model.info.get("text"):  # before the text's own checks: no text would do
                    raise NotSupportedByModelError.no_text(model.name)
                out.sha256 = text_hash(_check_text(item.text))
                texts.setdefault(out.sha256, item.text)
            elif item.sha256 is not None:
                out.sha256 = _check_sha256(item.sha256)
            elif item.array is not None:
                arrays.append((i, item.array))
                continue
            else:
                raise ItemError("item has neither `image` (encoded bytes), `tensor` (raw pixels), `content_sha256` "
                                "(a cached image) nor `text` set")
            wanted.setdefault(out.sha256, []).append(i)
        except EmbedderError as e:
            out.error = e
        except Exception as e:  # whatever a malformed item does, it fails alone
            out.error = ItemError(f"malformed item ({type(e).__name__}: {e})")
    scope = cache_scope(call)
    if wanted and store is not None:
        shas = list(wanted)
        hits = 0
        for sha, vector in zip(shas, store.lookup(model.model_id, shas, **scope)):
            if vector is not None:
                hits += len(wanted[sha])
                for i in wanted.pop(sha):
                    outcomes[i].vector, outcomes[i].cached = vector, True
        if metrics is not None:
            metrics.cache_hits.inc(hits)
    text_futures = _embed_texts(model, {sha: texts.pop(sha) for sha in list(wanted) if sha in texts})
    for sha, idx in list(wanted.items()):
        if sha not in encoded and sha not in text_futures:
            where = ("this embedding replica keeps no cache (--role embed); send the image bytes, or ask the "
                     "store node") if store is None else (
                f"no cached vector for content_sha256 {sha} under model {model.model_id}; send the image bytes "
                "instead")
            for i in wanted.pop(sha):
                outcomes[i].error = ItemNotFoundError(where)
    pending = Pending(outcomes, model, scope=scope)
    for sha, fut in text_futures.items():
        for i in wanted.pop(sha):
            pending.futures[i] = fut
    inputs = [encoded[sha] for sha in wanted] + [a for _, a in arrays]
    queued = model.batcher.submit(inputs, deadline=call.deadline, is_active=lambda: not call.is_cancelled(),
                                  block=block)
    for idx, fut in zip(list(wanted.values()) + [[i] for i, _ in arrays], queued):
        for i in idx:
            pending.futures[i] = fut
    return pending


def _embed_texts(model: Any, texts: dict[str, str]) -> dict[str, Future]:
    """Embed the distinct texts the cache missed, now, in this thread (a short forward of the model's text tower,
    not worth a batcher's queue); one done future per text hash, holding its vector or the shared error."""
    if not texts:
        return {}
    futs = {sha: Future() for sha in texts}
    embed = getattr(model.embedder, "embed_texts", None)
    try:
        if embed is None:
            raise NotSupportedByModelError("this server sends images to embedding replicas and cannot embed text; "
                                           "send text to a server that runs the model itself (--role all)")
        vectors = embed(list(texts.values()))
    except EmbedderError as e:
        for fut in futs.values():
            fut.set_exception(e)
        return futs
    for fut, vector in zip(futs.values(), vectors):
        fut.set_result(vector)
    return futs


def finish(pending: Pending, call: Call, *, store: Any, metrics: Any = None) -> list[Outcome]:
    """Wait for the misses within the call's deadline, cache their vectors, return every item's outcome.

    Raises :class:`DeadlineError` if the deadline passes first, and the batcher's own error when the failure is
    not the item's (shutting down, caller gone): the whole call fails so a client's retry logic sees it.
    """
    try:
        distinct = set(pending.futures.values())
        _, not_done = futures.wait(distinct, timeout=call.time_left())
        if not_done:
            raise DeadlineError(
                f"deadline passed with {len(not_done)} of {len(pending.outcomes)} items still queued or embedding; "
                "give the call a longer timeout or send fewer items per call")
        fresh: dict[str, np.ndarray] = {}
        for i, fut in pending.futures.items():
            out = pending.outcomes[i]
            error = fut.exception()
            if error is None:
                out.vector = np.asarray(fut.result(), dtype=np.float32)
                if out.sha256:
                    fresh[out.sha256] = out.vector
                continue
            if category_of(error) in (Category.UNAVAILABLE, Category.DEADLINE):
                raise error
            if not isinstance(error, EmbedderError):
                log.error("unexpected per-item error: %r", error)
                error = BatchFailedError(f"server fault, not your input ({type(error).__name__}); retry")
            out.error = error
    finally:
        if pending.on_done is not None:
            pending.on_done()
    if fresh and store is not None:
        try:
            store.put(pending.model.model_id, list(fresh), np.stack(list(fresh.values())), **pending.scope)
        except StoreClosedError:
            pass  # shutting down: the vectors are still good, only not cached
        except Exception:  # the vectors are good; a cache write failure must not fail the call
            log.exception("could not write %d vectors to the cache", len(fresh))
    if metrics is not None:
        ok = sum(o.error is None for o in pending.outcomes)
        metrics.images.labels("ok").inc(ok)
        metrics.images.labels("error").inc(len(pending.outcomes) - ok)
    return pending.outcomes


def _check_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ItemError("text is empty; send the words to embed, e.g. \"a photo of a cat\"")
    if len(text) > MAX_TEXT_CHARS:
        raise ItemError(f"text is {len(text):,} characters, above {MAX_TEXT_CHARS:,}; text-image models read a few "
                        "dozen words (CLIP: 77 tokens), send a shorter text")
    return text


def _check_sha256(sha: str) -> str:
    low = sha.lower()
    if len(low) != 64 or not _HEX.issuperset(low):
        raise ItemError(f"content_sha256 must be 64 hex digits (sha256 of the image bytes), got {sha[:100]!r}")
    return low
