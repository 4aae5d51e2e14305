"""The :class:`AsyncEmbedderClient`: :class:`~embedder.client.EmbedderClient` on ``grpc.aio``, for event loops.

    from embedder.client import AsyncEmbedderClient

    async with AsyncEmbedderClient("127.0.0.1:50051", token="s3cret") as client:
        vectors = await client.embed([jpeg_bytes, "dog.png"])
        hits = await client.search(jpeg_bytes, collection="pets", k=5)
        async for r in client.embed_iter(paths):
            ...

Same methods, arguments, results and errors as the blocking client (both run the plans of
:mod:`embedder.client.base`); each method is a coroutine, except ``embed_iter``, which returns an async
iterator. Requests are built in a worker thread, since that reads file paths and copies pixels; gRPC I/O
and retries (``asyncio.sleep``) stay on the loop, so many calls run concurrently on one channel. Create the
client inside the event loop that uses it (a ``grpc.aio`` channel belongs to one loop).
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence, TypeVar

import grpc
import grpc.aio
import numpy as np

from .._proto import embedder_pb2 as pb
from ..results import BatchResult, CollectionInfo, CurvePoint, DeleteResult, Hit, ItemPage, StoredItem
from .base import BaseClient, Call, Plan, Sleep, Step, advance
from .chunking import Chunk
from .results import AddSummary, ItemResult, Prediction
from .stream import AsyncStreamFeed

T = TypeVar("T")
# What grpc.aio reports, in place of the server's status, when the server ends a stream while a request is
# being sent to it, as it does refusing a stream at once (warming up, bad token). The server refuses a stream
# at the same gate as ListModels (token, then model loaded), so a ListModels call tells the real reason.
_LOST_STATUS = "Internal error from Core"


class AsyncEmbedderClient(BaseClient):
    """Talks to an ``embedder serve`` instance from asyncio; the arguments of
    :class:`~embedder.client.EmbedderClient`, and each method does what the one of the same name does there."""

    _grpc: ClassVar[Any] = grpc.aio

    # ------------------------------------------------------------------ public

    async def embed(self, images: Sequence[Any], ids: Sequence[str] | None = None, errors: str = "raise",
                    *, chunk: int = 64, window: int = 4) -> np.ndarray | BatchResult:
        """Float32 ``(N, dim)`` in input order, or a BatchResult with per-item errors (``errors="return"``)."""
        return await self._run(self._embed(images, ids, errors, chunk, window))

    def embed_iter(self, items: Iterable[Any], *, chunk: int = 64, window: int = 4) -> AsyncIterator[ItemResult]:
        """``async for`` one :class:`ItemResult` per item (inputs or ``(id, input)`` pairs), in order, over a
        stream; ``items`` are read lazily in a worker thread."""
        return self._stream(self._embed_iter_chunks(items, chunk, window), window)

    async def list_models(self) -> list[dict[str, Any]]:
        return await self._run(self._list_models())

    async def server_limits(self) -> dict[str, int]:
        return await self._run(self._server_limits())

    # ------------------------------------------------------------------ store

    async def add(self, collection: str, images: Sequence[Any], ids: Sequence[str], *,
                  labels: Sequence[str | None] | None = None,
                  metadata: Sequence[Mapping[str, Any] | None] | None = None, index: str | None = None,
                  model: str | None = None, errors: str = "raise") -> AddSummary:
        return await self._run(self._add(collection, images, ids, labels, metadata, index, model, errors))

    async def delete(self, collection: str, ids: Sequence[str]) -> DeleteResult:
        return await self._run(self._delete(collection, ids))

    async def delete_collection(self, collection: str) -> int:
        return await self._run(self._delete_collection(collection))

    async def set_labels(self, collection: str, labels: Mapping[str, str | None]) -> int:
        return await self._run(self._set_labels(collection, labels))

    async def get(self, collection: str, ids: Sequence[str], *, vectors: bool = True) -> list[StoredItem | None]:
        return await self._run(self._get(collection, ids, vectors))

    async def list_items(self, collection: str, *, offset: int = 0, limit: int = 0, label: str | None = None,
                         unlabelled: bool = False, where: str | Mapping[str, Any] | None = None) -> ItemPage:
        return await self._run(self._list_items(collection, offset, limit, label, unlabelled, where))

    async def get_image(self, collection: str, item_id: str, *, size: int = 0) -> bytes:
        return await self._run(self._get_image(collection, item_id, size))

    async def create_collection(self, collection: str, *, model: str = "", index: str = "") -> CollectionInfo:
        return await self._run(self._create_collection(collection, model, index))

    async def search(self, image: Any = None, *, collection: str | None = None, item_id: str | None = None,
                     vector: np.ndarray | None = None, k: int = 10, label: str | None = None,
                     ef_search: int | None = None, where: str | Mapping[str, Any] | None = None,
                     model: str | None = None) -> list[Hit]:
        return await self._run(self._search(image, collection, item_id, vector, k, label, ef_search, where,
                                            model))

    async def stats(self) -> dict[str, Any]:
        return await self._run(self._stats())

    # ------------------------------------------------------------------ heads

    async def train(self, collection: str, head: str = "logreg", *, labels: Sequence[str] | None = None,
                    ids: Sequence[str] | None = None, params: Mapping[str, Any] | None = None,
                    test_size: float | None = None, seed: int = 0, head_id: str | None = None,
                    adapt_to: str | None = None, adapt_method: str | None = None,
                    where: str | Mapping[str, Any] | None = None,
                    class_prompts: Mapping[str, Sequence[str]] | None = None, model: str | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        return await self._run(self._train(collection, head, labels, ids, params, test_size, seed, head_id,
                                           adapt_to, adapt_method, where, timeout, class_prompts, model))

    async def predict(self, head_id: str | Sequence[str], images: Sequence[Any] = (), *, ids: Sequence[str] = (),
                      collection: str | None = None, top_k: int = 1) -> list[Prediction]:
        return await self._run(self._predict(head_id, images, ids, collection, top_k))

    async def learning_curve(self, collection: str, head: str = "logreg", *, labels: Sequence[str] | None = None,
                             per_class: Sequence[int] | None = None, repeats: int = 5,
                             test_size: float | None = None, seed: int = 0,
                             params: Mapping[str, Any] | None = None,
                             timeout: float | None = None) -> list[CurvePoint]:
        return await self._run(self._learning_curve(collection, head, labels, per_class, repeats, test_size, seed,
                                                    params, timeout))

    async def suggest(self, collection: str, n: int = 20, *, strategy: str = "", head_id: str | None = None,
                      ids: Sequence[str] | None = None, seed: int = 0, where: str | Mapping[str, Any] | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
        """See :meth:`EmbedderClient.suggest`."""
        return await self._run(self._suggest(collection, n, strategy, head_id, ids, seed, where, timeout))

    async def label_issues(self, collection: str, *, limit: int = 100, labels: Sequence[str] | None = None,
                           folds: int = 5, near_duplicate: float = 0.0, seed: int = 0,
                           where: str | Mapping[str, Any] | None = None,
                           timeout: float | None = None) -> dict[str, Any]:
        """See :meth:`EmbedderClient.label_issues`."""
        return await self._run(self._label_issues(collection, limit, labels, folds, near_duplicate, seed, where,
                                                  timeout))

    async def list_heads(self) -> list[dict[str, Any]]:
        return await self._run(self._list_heads())

    async def delete_head(self, head_id: str) -> None:
        await self._run(self._delete_head(head_id))

    # ------------------------------------------------------------------ cache

    async def forget(self, sha256s: Sequence[str]) -> int:
        """See :meth:`EmbedderClient.forget`."""
        return await self._run(self._forget(sha256s))

    # ------------------------------------------------------------------ jobs

    async def finetune(self, collection: str, suffix: str, *, unfreeze: int = 0, epochs: int = 0,
                       labels: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                       params: Mapping[str, Any] | None = None, method: str = "finetune") -> dict[str, Any]:
        return await self._run(self._finetune(collection, suffix, unfreeze, epochs, labels, ids, params, method))

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return await self._run(self._get_job(job_id))

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await self._run(self._cancel_job(job_id))

    async def wait_job(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
                       on_progress: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        return await self._run(self._wait_job(job_id, poll, timeout, on_progress))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncEmbedderClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ running plans

    async def _run(self, plan: Plan[T]) -> T:
        """Run a plan (see :mod:`embedder.client.base`) to its result on the event loop.

        Its first step, which reads the inputs and builds every request, runs in a worker thread; so does the
        step after a ListModels answer, which builds them where the plan first had to learn the server's limits."""
        step, result = await asyncio.to_thread(advance, plan, None)
        while step is not None:
            answer = await self._do(step)
            if isinstance(step, Call) and step.method == "ListModels":
                step, result = await asyncio.to_thread(advance, plan, answer)
            else:
                step, result = advance(plan, answer)
        return result  # type: ignore[return-value] - the plan's value

    async def _do(self, step: Step) -> Any:
        if isinstance(step, Call):
            return await self._call(getattr(self._stub, step.method), step.request, timeout=step.timeout)
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        return [r async for r in self._stream(step.chunks, step.window)]

    async def _call(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        """A unary call, retrying UNAVAILABLE with bounded exponential backoff."""
        attempt = 0
        while True:
            try:
                return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                await asyncio.sleep(self._retry_delay(e, attempt))
                attempt += 1

    async def _stream(self, chunks: Iterator[Chunk], window: int) -> AsyncIterator[ItemResult]:
        await self._run(self._fit_server())  # before the first chunk is built (embed_iter's chunks are lazy)
        feed = AsyncStreamFeed(chunks, window)
        failures = 0
        while True:
            call = self._stub.EmbedStream(feed.requests(), metadata=self._metadata, timeout=self.stream_timeout)
            try:
                async for response in call:
                    for r in self._answered(feed, response):
                        yield r
                    failures = 0  # progress: the retry budget is per outage, not per job
                self._check_stream_ended(feed)
                return
            except grpc.RpcError as e:
                await asyncio.sleep(self._retry_delay(await self._stream_error(e), failures, feed))
                failures += 1  # a new stream; unanswered chunks are sent again first
            finally:
                call.cancel()  # no-op when finished; stops the server if our caller stopped iterating
                feed.end_attempt()

    async def _stream_error(self, e: grpc.RpcError) -> grpc.RpcError:
        """The error a stream ended with, or when grpc.aio lost it (see :data:`_LOST_STATUS`), the error the
        same gate gives a ListModels call now: UNAVAILABLE (retried) if that call is answered."""
        if e.code() != grpc.StatusCode.INTERNAL or e.details() != _LOST_STATUS:
            return e
        try:
            await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as refused:
            return refused
        return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                    "the server ended the stream while a request was being sent")
