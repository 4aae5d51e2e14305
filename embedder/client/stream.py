"""The request side of a resumable ``EmbedStream``: chunks pulled lazily, a bounded window, resending after a break.

One bookkeeping (:class:`StreamFeedBase`) with two ways of waiting for room in the window: threads for the
blocking client (gRPC reads its request iterator in its own thread), the event loop for the asyncio one.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import AsyncIterator, ContextManager, Iterator

from .._proto import embedder_pb2 as pb
from .chunking import Chunk

PULL, STOP = "pull", "stop"  # what a request iterator does next, besides (re)sending a chunk or waiting


def _pull(chunks: Iterator[Chunk]) -> tuple[Chunk | None, BaseException | None]:
    """The next chunk (None at the end), or the error reading the caller's input raised."""
    try:
        return next(chunks, None), None
    except BaseException as e:  # noqa: BLE001 - re-raised where the results are read
        return None, e


class StreamFeedBase:
    """Request side of a resumable stream: pulls chunks lazily, keeps unanswered ones for resending.

    Each stream attempt gets its own request iterator (``requests()``): unanswered chunks first, then new ones,
    at most ``window`` unanswered at a time. Results are read elsewhere, through the public methods.
    """

    def __init__(self, chunks: Iterator[Chunk], window: int, lock: ContextManager[object]) -> None:
        self._chunks = chunks
        self._window = window
        self._lock = lock  # guards the fields below wherever requests and results run in different threads
        self._queue: deque[Chunk] = deque()  # pulled and not yet yielded, in input order
        self._attempt = 0
        self._pulling = False
        self._exhausted = False
        self.source_error: BaseException | None = None

    def _notify(self) -> None:
        """Wake a request iterator waiting in ``requests()``; called with the lock held."""
        raise NotImplementedError

    def _next(self, attempt: int) -> Chunk | str | None:
        """With the lock held: the chunk the iterator of ``attempt`` sends next, PULL, STOP, or None (wait)."""
        if self._attempt != attempt:
            return STOP
        unsent = next((c for c in self._queue if not c.done and c.sent_in != attempt), None)
        if unsent is not None:
            unsent.sent_in = attempt
            return unsent
        if self._exhausted:
            return STOP  # half-close: the server answers what it has and ends the stream
        if sum(not c.done for c in self._queue) < self._window and not self._pulling:
            self._pulling = True
            return PULL
        return None

    def _pulled(self, chunk: Chunk | None, error: BaseException | None) -> None:
        with self._lock:
            self._pulling = False
            if error is not None:
                self.source_error = error
            if chunk is None:
                self._exhausted = True
            else:
                self._queue.append(chunk)
            self._notify()

    def oldest_unanswered(self) -> Chunk | None:
        with self._lock:
            return next((c for c in self._queue if not c.done), None)

    def pop_done(self) -> list[Chunk]:
        with self._lock:
            out = []
            while self._queue and self._queue[0].done:
                out.append(self._queue.popleft())
            self._notify()  # window room
            return out

    def finished(self) -> bool:
        with self._lock:
            return self._exhausted and not self._queue

    def end_attempt(self) -> None:
        """The current stream is over: its request iterator (maybe waiting for the window) must stop."""
        with self._lock:
            self._attempt += 1
            self._notify()


class StreamFeed(StreamFeedBase):
    """For the blocking client: ``requests()`` runs in gRPC's request thread, results in the caller's."""

    def __init__(self, chunks: Iterator[Chunk], window: int) -> None:
        self._cond = threading.Condition()
        super().__init__(chunks, window, self._cond)

    def _notify(self) -> None:
        self._cond.notify_all()

    def requests(self) -> Iterator[pb.EmbedRequest]:
        with self._cond:
            attempt = self._attempt
        return self._requests(attempt)

    def _requests(self, attempt: int) -> Iterator[pb.EmbedRequest]:
        while True:
            with self._cond:
                while (step := self._next(attempt)) is None:
                    self._cond.wait()
            if step is STOP:
                return
            if step is PULL:
                self._pulled(*_pull(self._chunks))  # outside the lock: reading the caller's input may read files
                continue
            yield step.request  # type: ignore[union-attr] - a Chunk


class AsyncStreamFeed(StreamFeedBase):
    """For the asyncio client: everything runs on the event loop (so no lock); chunks are pulled in a worker
    thread, since reading the caller's input may read files."""

    def __init__(self, chunks: Iterator[Chunk], window: int) -> None:
        super().__init__(chunks, window, contextlib.nullcontext())
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()

    def requests(self) -> AsyncIterator[pb.EmbedRequest]:
        return self._requests(self._attempt)

    async def _requests(self, attempt: int) -> AsyncIterator[pb.EmbedRequest]:
        while True:
            while (step := self._next(attempt)) is None:
                self._changed.clear()  # no await since the check: nothing changed in between
                await self._changed.wait()
            if step is STOP:
                return
            if step is PULL:
                self._pulled(*await asyncio.to_thread(_pull, self._chunks))
                continue
            yield step.request  # type: ignore[union-attr] - a Chunk
