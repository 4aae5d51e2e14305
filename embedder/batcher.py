"""Dynamic batching: items from many callers -> decode ahead -> one model worker running full batches.

Data flow (no gRPC in here; the server adapts it)::

    submit(items)  -- the model probes each item once (its header: the decode's cost); one it refuses fails here
      -- bounded: at most max_queue items admitted and not yet answered, else QueueFullError
      -> pending requests, served round-robin so one caller's 1000 images cannot starve another's one
      -> Embedder.submit(item, probe) (the decode pool), as the decode budget allows: dispatched by whichever
         thread made room (the submitter, a finished decode, the worker taking a batch), not by a thread of its own
      -> decoded crop -> its request's ready queue (a bad item fails only its own future, here)
      -> worker thread: as soon as a full batch is ready (the model's micro-batch: ~4 on CPU, max_batch
         on CUDA), or what is ready max_delay_ms after the oldest became ready, or what is ready once no
         other item is queued or decoding (waiting for batch-mates nobody has sent only adds latency),
         whichever comes first; at most one full batch, taken round-robin over the requests with ready crops
         -> Embedder.embed_arrays -> each item's future

Fairness: every stage a caller's item can wait in is round-robin over requests, one item per turn, and short.
The decode pool and the ready crops are FIFO underneath, so the decode budget keeps only a few batches' worth
ahead of the model (``max_ahead``); and the worker hands the model one full batch at a time (one micro-batch on
CPU), so an item's future resolves after its own batch, not after the 64 items another caller sent with it.
A one-image call that arrives behind a 64-image one therefore waits for a few items, not 64.

Memory: decoding is where image size costs memory (a 64 MP JPEG is ~190 MB of RGB while it decodes); after
the resize-crop every item is the same small ``(crop, crop, 3)`` array, so the model batch is already bounded
by the full batch. ``max_batch_pixels`` therefore caps the *source* pixels (the ``pixels`` of the model's probe:
the image header's size, or a tensor's shape) of the items being decoded at once, and ``max_ahead`` caps how many
crops wait for the model. A single image larger than the budget still runs, alone. So a burst of huge images
slows down instead of blowing up memory, and a batch never holds more than ``max_batch_pixels`` source pixels'
worth of work. The batcher never looks inside an item: the probe is the model's, and goes back to the model's
decode with the item, so each image's header is read once.

Callers that are gone (deadline passed, or ``is_active()`` false) are dropped before decode and again before
the model. When the model raises on a batch, its items are retried one by one, so only the items that fail
alone get the error (no caller's item can fail another's) and the worker carries on; if the worker thread
itself dies (or dispatching to the decode pool fails), every queued future fails, ``on_death`` fires (the
server turns health NOT_SERVING) and further submissions raise :class:`BatcherClosedError`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .errors import BatcherClosedError, BatchFailedError, DroppedError, ItemError, QueueFullError

log = logging.getLogger(__name__)


class Probed(Protocol):
    """The model's probe of one item, as the batcher sees it: a cost, handed back to the model to decode."""

    @property
    def pixels(self) -> int: ...  # source pixels the decode materialises


class SupportsBatching(Protocol):
    """What the batcher needs from :class:`embedder.pipeline.Embedder`."""

    micro_batch: int  # the model's efficient batch: a batch this full leaves without waiting
    decode_workers: int  # threads of its decode pool: the decode budget keeps each one busy, and no more

    def probe(self, item: Any) -> Probed: ...  # reads the item once; raises an ItemError for one it refuses

    def submit(self, item: Any, probe: Any) -> "Future[np.ndarray]": ...  # decode; fails with the item's ItemError

    def embed_arrays(self, images: np.ndarray) -> np.ndarray: ...

    def warm_up(self) -> None: ...  # run each batch size once before serving (the server calls it)


def _item_error(error: BaseException) -> ItemError:
    """An item's failure as its ItemError: the model's own as it is, anything else described."""
    if isinstance(error, ItemError):
        return error
    return ItemError(f"could not decode image ({type(error).__name__}: {error})")


@dataclass(eq=False)
class _Request:
    """One caller's submission; its items are dispatched, and then batched, round-robin with other requests."""

    works: deque  # not yet sent to decode
    deadline: float | None
    is_active: Callable[[], bool] | None
    ready: deque = field(default_factory=deque)  # decoded, waiting for the model

    def alive(self, now: float) -> bool:
        if self.deadline is not None and now >= self.deadline:
            return False
        return self.is_active is None or bool(self.is_active())


def _take_turn(turns: deque[_Request], queue: Callable[[_Request], deque]) -> _Work:
    """The next item round-robin: the first request in turn gives one item from ``queue`` and goes to the back
    while it has more (a deficit round-robin with a quantum of one item, so callers share by items, not calls)."""
    request = turns.popleft()
    items = queue(request)
    work = items.popleft()
    if items:
        turns.append(request)
    return work


@dataclass(eq=False)
class _Work:
    item: Any
    probe: Any  # the model's, made at submit and handed back to it with the item
    pixels: int
    request: _Request
    future: Future
    array: np.ndarray | None = None
    ready_at: float = 0.0
    finished: bool = False


class Batcher:
    """Gathers items from concurrent callers into model batches; see the module docstring.

    >>> batcher = Batcher(embedder, max_batch=64, max_delay_ms=5)
    >>> futures = batcher.submit([jpeg_bytes, other_bytes], deadline=time.monotonic() + 30)
    >>> vectors = [f.result() for f in futures]   # float32 (dim,) each, or raises ItemError etc.

    ``on_batch(size, seconds)``, ``on_drop(count)`` and ``on_death(reason)`` are hooks for metrics and
    health; they run on the batcher's threads and must not block.
    """

    def __init__(self, embedder: SupportsBatching, *, max_batch: int = 64, max_delay_ms: float = 5.0,
                 max_batch_pixels: int = 64 * 1024 * 1024, max_queue: int = 4096, max_ahead: int | None = None,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_drop: Callable[[int], None] | None = None,
                 on_death: Callable[[str], None] | None = None) -> None:
        for name, value in (("max_batch", max_batch), ("max_batch_pixels", max_batch_pixels),
                            ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"Batcher {name} must be >= 1, got {value}")
        if max_delay_ms < 0:
            raise ValueError(f"Batcher max_delay_ms must be >= 0, got {max_delay_ms}")
        self._embedder = embedder
        self.max_batch = max_batch
        # On CPU the model runs micro-batches of ~4 and gains nothing from waiting for 64 items, nor from being
        # handed 64 at once (each item would wait for all of them); on CUDA micro_batch == max_batch, so the
        # batcher waits for a full batch as usual.
        self.full_batch = min(max_batch, int(getattr(embedder, "micro_batch", max_batch)))
        self.max_delay = max_delay_ms / 1000.0
        self.max_batch_pixels = max_batch_pixels
        self.max_queue = max_queue
        # Items decoding or decoded and waiting for the model: enough to fill the next few batches and keep every
        # decode worker busy, and no more: the decode pool is FIFO, so an item sent there waits for all before it.
        self.max_ahead = max_ahead or 4 * self.full_batch + int(getattr(embedder, "decode_workers", 0))
        self._on_batch = on_batch
        self._on_drop = on_drop
        self._on_death = on_death

        # One lock, three conditions, so that each event wakes only the thread that waits for it: on two
        # cores every needless wake-up is a context switch fighting decode and the model for a core.
        self._lock = threading.Lock()
        self._work_cv = threading.Condition(self._lock)  # the worker: items ready, or closing
        self._room_cv = threading.Condition(self._lock)  # blocking submitters: queue room
        self._pending: deque[_Request] = deque()  # requests with items not yet sent to decode, in turn
        self._ready: deque[_Request] = deque()  # requests with decoded items waiting for the model, in turn
        self._n_ready = 0
        self._running: list[_Work] = []  # in the model right now
        self._queued = 0  # admitted and not yet finished: what max_queue bounds
        self._decoding = 0
        self._decoding_pixels = 0
        self._dispatching = False  # a thread is in _dispatch(); others leave it to that one
        self._closing = False
        self._dead: str | None = None
        self._stats = {"batches": 0, "embedded": 0, "failed": 0, "dropped": 0}

        self._thread = threading.Thread(target=self._guard, args=(self._work,), name="embedder-batch-worker",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, items: Sequence[Any], *, deadline: float | None = None,
               is_active: Callable[[], bool] | None = None, block: bool = False) -> list[Future]:
        """Queue ``items``; one future per item, resolving to a float32 ``(dim,)`` vector.

        ``deadline`` is a :func:`time.monotonic` time; ``is_active`` says whether the caller still wants
        the answer. Futures fail with :class:`ItemError` (bad input: the model's own error object, such as an
        :class:`~embedder.errors.ImageDecodeError`, from its probe here or its decode), :class:`DroppedError`
        (caller gone), :class:`BatchFailedError` (model fault) or :class:`BatcherClosedError`.

        When the queue is full: ``block=False`` raises :class:`QueueFullError` at once (fail fast);
        ``block=True`` waits for room until the deadline or until ``is_active()`` turns false, and then
        raises :class:`DroppedError`. The request is admitted whole or not at all.
        """
        n = len(items)
        if n > self.max_queue:
            raise QueueFullError(
                f"a request of {n} items can never fit the batcher queue of {self.max_queue} items; "
                "send fewer items per request or raise --max-queue / EMBEDDER_MAX_QUEUE")
        if n == 0:
            return []
        request = _Request(deque(), deadline, is_active)
        futures: list[Future] = []
        refused: list[tuple[Future, ItemError]] = []
        # Probes (header reads) happen here, in the caller's thread, so they run in parallel across callers.
        for item in items:
            future: Future = Future()
            future.set_running_or_notify_cancel()  # callers cannot cancel; they go inactive instead
            futures.append(future)
            try:
                probe = self._embedder.probe(item)
                work = _Work(item, probe, int(probe.pixels), request, future)
            except Exception as e:  # this item alone fails, and takes no queue slot
                refused.append((future, _item_error(e)))
            else:
                request.works.append(work)
        n = len(request.works)
        with self._lock:
            while True:
                self._raise_if_closed()
                if self._queued + n <= self.max_queue:
                    break
                if not block:
                    raise QueueFullError(
                        f"the server queue has no room for this request ({n} item{'s' * (n != 1)}; {self._queued} of "
                        f"{self.max_queue} already waiting); retry with backoff, send fewer items per call, or "
                        "raise --max-queue / EMBEDDER_MAX_QUEUE")
                if not request.alive(time.monotonic()):
                    raise DroppedError("the caller went away or its deadline passed while waiting for queue room")
                self._room_cv.wait(0.05)  # short: is_active() cannot notify us
            self._stats["failed"] += len(refused)
            if n:
                self._queued += n
                self._pending.append(request)
        for future, error in refused:
            future.set_exception(error)
        self._dispatch()
        return futures

    @property
    def queue_depth(self) -> int:
        """Items admitted and not yet answered."""
        return self._queued

    @property
    def alive(self) -> bool:
        """False once the worker thread has died or :meth:`close` was called."""
        return self._dead is None and not self._closing

    def stats(self) -> dict[str, float]:
        """Counters since start (batches, embedded, failed and dropped items, mean batch size) and items now
        decoding and ready for the model."""
        with self._lock:
            s: dict[str, float] = {**self._stats, "decoding": self._decoding, "ready": self._n_ready}
        s["mean_batch_size"] = s["embedded"] / s["batches"] if s["batches"] else 0.0
        return s

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new work, let admitted work finish (up to ``timeout`` seconds), then stop the threads."""
        with self._lock:
            self._closing = True
            self._work_cv.notify_all()
            self._room_cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._die(f"closed with work still queued after {timeout}s", death=False)

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ threads

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as e:  # noqa: BLE001 - the point is to notice *any* death
            log.critical("batcher worker thread died (%r); failing all queued work", e, exc_info=True)
            self._die(f"the batch worker thread died: {e!r}", death=True)

    def _done_when_closing(self) -> bool:
        return self._closing and self._queued == 0

    def _dispatch(self) -> None:
        """Send pending items to the decode pool, round-robin over requests, within the decode budget.

        Called by every thread that may have made room (after submit, a decode, a batch taken). One thread
        dispatches at a time; a caller arriving meanwhile leaves, since the dispatching thread re-reads the
        state under the lock before it stops. A decode future that is already done when its callback is added
        runs that callback here, whose own ``_dispatch()`` then returns at once: no recursion.
        """
        with self._lock:
            if self._dispatching:
                return
            self._dispatching = True
        current: _Work | None = None  # popped and not yet in the decode pool
        try:
            while True:
                with self._lock:
                    if self._dead is not None or not self._can_dispatch():
                        self._dispatching = False
                        return
                    work = current = _take_turn(self._pending, lambda r: r.works)
                    request = work.request
                    alive = request.alive(time.monotonic())
                    if alive:
                        self._decoding += 1
                        self._decoding_pixels += work.pixels
                    else:  # drop the rest of this request too, before any decode
                        current = None
                        dropped = [work, *request.works]
                        request.works.clear()
                        if self._pending and self._pending[-1] is request:
                            self._pending.pop()
                if not alive:
                    self._drop(dropped)
                    continue
                try:
                    decode = self._embedder.submit(work.item, work.probe)
                except Exception as e:  # decode pool shut down: the embedder was closed under us
                    decode = Future()
                    decode.set_exception(e)
                decode.add_done_callback(lambda f, w=work: self._decoded(w, f))
                current = None
        except Exception as e:  # a bug, not an input: stop taking work rather than strand queued items
            log.critical("batcher dispatch failed (%r); failing all queued work", e, exc_info=True)
            with self._lock:
                self._dispatching = False
            self._die(f"dispatching to the decode pool failed: {e!r}", death=True)
            if current is not None:
                self._finish(current, error=BatcherClosedError(f"not embedded: {self._dead}"), stat="failed")
        except BaseException:
            with self._lock:
                self._dispatching = False
            raise

    def _can_dispatch(self) -> bool:
        if not self._pending:
            return False
        if self._decoding + self._n_ready >= self.max_ahead:
            return False
        nxt = self._pending[0].works[0]
        return self._decoding == 0 or self._decoding_pixels + nxt.pixels <= self.max_batch_pixels

    def _decoded(self, work: _Work, decode: Future) -> None:
        """Decode-pool callback: route the crop to the ready queue, or fail just this item."""
        error: ItemError | None = None
        try:
            array = decode.result()
        except BaseException as e:  # noqa: BLE001 - the item's own error, or the decode pool failing
            error = _item_error(e)
        with self._lock:
            self._decoding -= 1
            self._decoding_pixels -= work.pixels
            if error is None and self._dead is None:
                work.array = array
                work.ready_at = time.monotonic()
                if not work.request.ready:
                    self._ready.append(work.request)
                work.request.ready.append(work)
                self._n_ready += 1
            self._work_cv.notify()  # a crop is ready, or one fewer is on the way
        if error is not None:
            self._finish(work, error=error, stat="failed")
        elif self._dead is not None:
            self._finish(work, error=BatcherClosedError(f"not embedded: {self._dead}"), stat="failed")
        self._dispatch()  # the decode budget has room again

    def _work(self) -> None:
        """Form batches (full_batch ready, max_delay after the oldest ready item, or nothing else on the way; at
        most full_batch, round-robin over requests) and run."""
        while True:
            with self._lock:
                while self._dead is None and not self._ready and not self._done_when_closing():
                    self._work_cv.wait()
                if self._dead is not None or (not self._ready and self._done_when_closing()):
                    return
                oldest = min(r.ready[0].ready_at for r in self._ready)  # each request's crops are in ready order
                while self._n_ready < self.full_batch and not self._closing and self._dead is None:
                    if not self._pending and not self._decoding:
                        break  # nothing else is on the way: waiting could only add latency
                    remaining = oldest + self.max_delay - time.monotonic()
                    if remaining <= 0:
                        break
                    self._work_cv.wait(remaining)
                take = min(self.full_batch, self._n_ready)
                batch = [_take_turn(self._ready, lambda r: r.ready) for _ in range(take)]
                self._n_ready -= take
            self._dispatch()  # room ahead
            now = time.monotonic()
            alive = [w.request.alive(now) for w in batch]
            self._drop([w for w, a in zip(batch, alive) if not a])
            live = [w for w, a in zip(batch, alive) if a]
            if live:
                self._run(live)

    def _run(self, batch: list[_Work]) -> None:
        with self._lock:
            self._running = batch
        # A BaseException (not caught below) leaves self._running set, so _die() can fail these futures.
        try:
            self._forward(batch)
        except Exception as e:
            if len(batch) == 1:
                self._fail_batch(batch, e)
            else:
                # Isolate the culprit: one caller's item must not fail the others' (and a batch that is
                # too big for the device may still fit one at a time).
                log.warning("model failed on a batch of %d items (%r); retrying them one by one", len(batch), e)
                for w in batch:
                    try:
                        self._forward([w])
                    except Exception as e1:
                        self._fail_batch([w], e1)
        with self._lock:
            self._running = []

    def _forward(self, batch: list[_Work]) -> None:
        start = time.monotonic()
        vectors = self._embedder.embed_arrays(np.stack([w.array for w in batch]))
        if vectors.shape[0] != len(batch):
            raise RuntimeError(f"model returned {vectors.shape[0]} vectors for a batch of {len(batch)}")
        with self._lock:
            self._stats["batches"] += 1
        for w, v in zip(batch, vectors):
            w.array = None  # the crop is no longer needed
            self._finish(w, result=v, stat="embedded")
        if self._on_batch is not None:
            self._on_batch(len(batch), time.monotonic() - start)

    def _fail_batch(self, batch: list[_Work], e: Exception) -> None:
        log.error("model failed on %d item(s): %r", len(batch), e, exc_info=e)
        err = BatchFailedError(f"the model failed on this item ({type(e).__name__}: {e}); "
                               "this is a server fault, not your input; retry")
        for w in batch:
            self._finish(w, error=err, stat="failed")

    # ------------------------------------------------------------------ bookkeeping

    def _finish(self, work: _Work, *, result: np.ndarray | None = None, error: BaseException | None = None,
                stat: str) -> None:
        """Resolve one item's future exactly once and give its queue slot back."""
        with self._lock:
            if work.finished:
                return
            work.finished = True
            self._queued -= 1
            self._stats[stat] += 1
            self._room_cv.notify()  # a submitter may be waiting for queue room (no-op when none is)
            if self._closing:
                self._work_cv.notify()  # the last item lets the worker exit
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result)

    def _drop(self, works: list[_Work]) -> None:
        for w in works:
            self._finish(w, error=DroppedError("dropped before the model: the caller went away or its "
                                               "deadline passed"), stat="dropped")
        if works and self._on_drop is not None:
            self._on_drop(len(works))

    def _raise_if_closed(self) -> None:
        if self._dead is not None:
            raise BatcherClosedError(f"the embedding worker is not running ({self._dead}); restart the server")
        if self._closing:
            raise BatcherClosedError("the server is shutting down; retry against another instance")

    def _die(self, reason: str, *, death: bool) -> None:
        """Stop the worker and fail every unfinished item (a thread died, or close() timed out)."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = reason
            doomed = ([w for r in self._pending for w in r.works] + [w for r in self._ready for w in r.ready]
                      + list(self._running))
            self._pending.clear()
            self._ready.clear()
            self._work_cv.notify_all()
            self._room_cv.notify_all()
        if death and self._on_death is not None:
            try:  # first: health must say NOT_SERVING before any caller hears of it
                self._on_death(reason)
            except Exception:
                log.exception("on_death hook failed")
        err = BatcherClosedError(f"not embedded: {reason}")
        for w in doomed:
            self._finish(w, error=err, stat="failed")
