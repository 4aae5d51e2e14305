"""The request side of a resumable ``EmbedStream``: chunks pulled lazily, a bounded window, resending after a break."""
from __future__ import annotations

import threading
from collections import deque
from typing import Iterator

from .._proto import embedder_pb2 as pb
from .chunking import Chunk


class StreamFeed:
    """Request side of a resumable stream: pulls chunks lazily, keeps unanswered ones for resending.

    ``requests(attempt)`` runs in gRPC's request thread; results are consumed in the caller's thread.
    """

    def __init__(self, chunks: Iterator[Chunk], window: int) -> None:
        self._chunks = chunks
        self._window = window
        self._cond = threading.Condition()
        self._queue: deque[Chunk] = deque()  # pulled and not yet yielded, in input order
        self._attempt = 0
        self._pulling = False
        self._exhausted = False
        self.source_error: BaseException | None = None

    def requests(self) -> Iterator[pb.EmbedRequest]:
        """The request iterator for one stream attempt: unanswered chunks first, then new ones."""
        with self._cond:
            attempt = self._attempt
        return self._requests(attempt)

    def _requests(self, attempt: int) -> Iterator[pb.EmbedRequest]:
        while True:
            with self._cond:
                while True:
                    if self._attempt != attempt:
                        return
                    unsent = next((c for c in self._queue if not c.done and c.sent_in != attempt), None)
                    if unsent is not None:
                        unsent.sent_in = attempt
                        break
                    if self._exhausted:
                        return  # half-close: the server answers what it has and ends the stream
                    inflight = sum(not c.done for c in self._queue)
                    if inflight < self._window and not self._pulling:
                        self._pulling = True
                        break
                    self._cond.wait()
            if unsent is not None:
                yield unsent.request
                continue
            try:  # outside the lock: reading the caller's iterable may read files
                chunk = next(self._chunks, None)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                chunk, self.source_error = None, e
            with self._cond:
                self._pulling = False
                if chunk is None:
                    self._exhausted = True
                else:
                    self._queue.append(chunk)
                self._cond.notify_all()

    def oldest_unanswered(self) -> Chunk | None:
        with self._cond:
            return next((c for c in self._queue if not c.done), None)

    def pop_done(self) -> list[Chunk]:
        with self._cond:
            out = []
            while self._queue and self._queue[0].done:
                out.append(self._queue.popleft())
            self._cond.notify_all()  # window room
            return out

    def finished(self) -> bool:
        with self._cond:
            return self._exhausted and not self._queue

    def end_attempt(self) -> None:
        """The current stream is over: its request generator (maybe blocked on the window) must stop."""
        with self._cond:
            self._attempt += 1
            self._cond.notify_all()

