"""The :class:`EmbedderClient`: one method per RPC, with retries, and large inputs split to fit the limits."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import grpc
import numpy as np

from ..results import BatchResult, CollectionInfo, CurvePoint, DeleteResult, Hit, ItemPage, StoredItem
from .base import BaseClient, Call, Plan, Sleep, Step, advance
from .chunking import Chunk
from .results import AddSummary, ItemResult, Prediction
from .stream import StreamFeed

T = TypeVar("T")


class EmbedderClient(BaseClient):
    """Talks to an ``embedder serve`` instance; see :mod:`embedder.client`.

    ``target`` is ``host:port``. ``token`` is sent as ``authorization: Bearer <token>``. ``tls_ca`` is the
    PEM file of the CA (or self-signed certificate) to trust; without it the channel is plaintext.
    ``timeout`` bounds each unary call in seconds; ``stream_timeout`` bounds a whole stream (default none).
    ``model`` (a backbone name or model id) is the backbone requests embed with (default: the server's).
    ``channel_options`` are extra gRPC channel arguments (e.g. a service config for load balancing).
    """

    # ------------------------------------------------------------------ public

    def embed(self, images: Sequence[Any], ids: Sequence[str] | None = None, errors: str = "raise",
              *, chunk: int = 64, window: int = 4) -> np.ndarray | BatchResult:
        """Embed ``images`` -> float32 ``(N, dim)`` in input order (``errors="raise"``), or a
        :class:`~embedder.results.BatchResult` with per-item errors (``errors="return"``).

        Up to ``chunk`` images (that fit one message) go in one ``Embed`` call, bounded by ``timeout``; more
        go over one stream in chunks, ``window`` in flight, so a large input never races the per-call timeout.
        """
        return self._run(self._embed(images, ids, errors, chunk, window))

    def embed_iter(self, items: Iterable[Any], *, chunk: int = 64, window: int = 4) -> Iterator[ItemResult]:
        """Stream ``items`` (inputs, or ``(id, input)`` pairs) and yield an :class:`ItemResult` per item, in order.

        Items are read lazily, ``chunk`` per request, with ``window`` requests in flight, so memory stays
        bounded for any input length. Ids default to the running index as a string.
        """
        return self._stream(self._embed_iter_chunks(items, chunk, window), window)

    def list_models(self) -> list[dict[str, Any]]:
        """The server's model(s), with the same keys as the local ``Embedder.info()``."""
        return self._run(self._list_models())

    def server_limits(self) -> dict[str, int]:
        """The server's max_message_bytes, max_items and max_pixels, to size a client to a non-default server."""
        return self._run(self._server_limits())

    # ------------------------------------------------------------------ store

    def add(self, collection: str, images: Sequence[Any], ids: Sequence[str], *,
            labels: Sequence[str | None] | None = None, metadata: Sequence[Mapping[str, Any] | None] | None = None,
            index: str | None = None, model: str | None = None, errors: str = "raise") -> AddSummary:
        """Embed ``images`` (through the server's cache) and upsert them into ``collection`` under ``ids``.

        Inputs as for :meth:`embed`, plus :class:`Cached` (a sha256 the server knows). ``labels`` and
        ``metadata`` (JSON-able dicts) are optional, one per item. ``index`` ("flat", "hnsw[:...]", e.g. "hnsw:codes=sq8") and
        ``model`` (a backbone name or model id, e.g. a fine-tuned version; default: the server's) apply when the
        collection is created; an existing collection embeds with its own model. Items that fail are reported (``errors="return"``) or raised as
        :class:`RemoteBatchError` after the good ones were stored.
        """
        return self._run(self._add(collection, images, ids, labels, metadata, index, model, errors))

    def delete(self, collection: str, ids: Sequence[str]) -> DeleteResult:
        """Delete items; ids that were not there come back in ``missing``."""
        return self._run(self._delete(collection, ids))

    def delete_collection(self, collection: str) -> int:
        """Delete a collection and all its items; returns how many items it held."""
        return self._run(self._delete_collection(collection))

    def set_labels(self, collection: str, labels: Mapping[str, str | None]) -> int:
        """Set labels (None clears one) of stored items, all or nothing; returns the number changed."""
        return self._run(self._set_labels(collection, labels))

    def get(self, collection: str, ids: Sequence[str], *, vectors: bool = True) -> list[StoredItem | None]:
        """Stored items in the order of ``ids``, None where an id is not in the collection."""
        return self._run(self._get(collection, ids, vectors))

    def list_items(self, collection: str, *, offset: int = 0, limit: int = 0, label: str | None = None,
                   unlabelled: bool = False, where: str | Mapping[str, Any] | None = None) -> ItemPage:
        """One page of the collection's items in insertion order (0: 100 of them; all, ``label``'s or the
        ``unlabelled`` ones; only those whose metadata passes ``where``), without vectors, with the ``total`` that
        match: page a large collection with ``offset``."""
        return self._run(self._list_items(collection, offset, limit, label, unlabelled, where))

    def get_image(self, collection: str, item_id: str, *, size: int = 0) -> bytes:
        """A stored item's kept image, as it was added, or (``size`` > 0) a JPEG that fits ``size`` x ``size``."""
        return self._run(self._get_image(collection, item_id, size))

    def create_collection(self, collection: str, *, model: str = "", index: str = "") -> CollectionInfo:
        """Create an empty collection bound to ``model`` (default: the server's), with ``index`` ("flat", the
        default, or "hnsw[:...]"); :meth:`add` creates one on first use too."""
        return self._run(self._create_collection(collection, model, index))

    def search(self, image: Any = None, *, collection: str | None = None, item_id: str | None = None,
               vector: np.ndarray | None = None, k: int = 10, label: str | None = None,
               ef_search: int | None = None, where: str | Mapping[str, Any] | None = None,
               model: str | None = None) -> list[Hit]:
        """The ``k`` stored items most similar to one query: an ``image`` (as for :meth:`embed`, or
        :class:`Cached`), a stored ``item_id`` of ``collection``, or a raw ``vector``. Best first.

        ``label`` and ``where`` keep only items with that label and whose metadata passes the filter: text
        (``'camera == "a" and year >= 2020'``) or a dict (``{"camera": "a", "year": {">=": 2020}}``). Without
        ``collection``, every collection of ``model`` is searched (default: the client's model, else the
        server's)."""
        return self._run(self._search(image, collection, item_id, vector, k, label, ef_search, where, model))

    def stats(self) -> dict[str, Any]:
        """Collections (count, labels, model, index), cache fill, disk use and number of heads."""
        return self._run(self._stats())

    # ------------------------------------------------------------------ heads

    def train(self, collection: str, head: str = "logreg", *, labels: Sequence[str] | None = None,
              ids: Sequence[str] | None = None, params: Mapping[str, Any] | None = None,
              test_size: float | None = None, seed: int = 0, head_id: str | None = None,
              adapt_to: str | None = None, adapt_method: str | None = None,
              where: str | Mapping[str, Any] | None = None,
              class_prompts: Mapping[str, Sequence[str]] | None = None, model: str | None = None,
              timeout: float | None = None) -> dict[str, Any]:
        """Train a head on the labelled vectors of ``collection`` (no image is embedded again); ``labels``, ``ids``
        or a metadata filter ``where`` (as for :meth:`search`) narrow them.

        Returns the head's info (``head_id``, ``classes``, ``metrics`` from a stratified hold-out) plus
        ``samples``, ``train_seconds`` and ``total_seconds``. ``adapt_to`` names a collection of unlabelled
        images of the domain the head will predict on (``adapt_method``: coral or standardize).
        ``head="zero_shot"`` builds a head from ``class_prompts`` (label -> texts describing it) with a text-image
        model's text tower, no labelled image needed (``collection`` may be "": then ``model`` names the model);
        ``head="few_shot"`` starts from those and trains on the collection's labelled vectors.
        ``timeout`` defaults to 10x the client's.
        """
        return self._run(self._train(collection, head, labels, ids, params, test_size, seed, head_id, adapt_to,
                                     adapt_method, where, timeout, class_prompts, model))

    def predict(self, head_id: str | Sequence[str], images: Sequence[Any] = (), *, ids: Sequence[str] = (),
                collection: str | None = None, top_k: int = 1) -> list[Prediction]:
        """Top-``k`` labels for ``images`` (through the cache) and/or stored ``ids`` of ``collection``.

        One :class:`Prediction` per input, images first, then ids; an item that fails carries ``error``.
        ``head_id`` may be a list of heads of one backbone: each image is embedded once and every head
        answers (``Prediction.by_head``).
        """
        return self._run(self._predict(head_id, images, ids, collection, top_k))

    def learning_curve(self, collection: str, head: str = "logreg", *, labels: Sequence[str] | None = None,
                       per_class: Sequence[int] | None = None, repeats: int = 5, test_size: float | None = None,
                       seed: int = 0, params: Mapping[str, Any] | None = None,
                       timeout: float | None = None) -> list[CurvePoint]:
        """Hold-out accuracy at growing numbers of labels per class, with 95% confidence intervals."""
        return self._run(self._learning_curve(collection, head, labels, per_class, repeats, test_size, seed, params,
                                              timeout))

    def suggest(self, collection: str, n: int = 20, *, strategy: str = "", head_id: str | None = None,
                ids: Sequence[str] | None = None, seed: int = 0, where: str | Mapping[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        """The ``n`` unlabelled items of ``collection`` (of ``ids``, or passing the metadata filter ``where``) most
        worth labelling next: ``{"suggestions": [{"id", "score", "reason"}], "strategy", "candidates",
        "labelled"}``. Strategies: auto (default), hybrid, margin, entropy, diversity, representative."""
        return self._run(self._suggest(collection, n, strategy, head_id, ids, seed, where, timeout))

    def label_issues(self, collection: str, *, limit: int = 100, labels: Sequence[str] | None = None,
                     folds: int = 5, near_duplicate: float = 0.0, seed: int = 0,
                     where: str | Mapping[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Labelled items (passing the metadata filter ``where``, when given) whose label looks wrong: ``{"issues":
        [...], "duplicates": [...], "checked", "folds", "noise_rate", "thresholds"}``, each issue ``{"id", "label",
        "suggested", "score", "kind", "other"}``."""
        return self._run(self._label_issues(collection, limit, labels, folds, near_duplicate, seed, where, timeout))

    def list_heads(self) -> list[dict[str, Any]]:
        return self._run(self._list_heads())

    def delete_head(self, head_id: str) -> None:
        self._run(self._delete_head(head_id))

    # ------------------------------------------------------------------ cache

    def forget(self, sha256s: Sequence[str]) -> int:
        """Delete the server's cached vectors of these images (sha256 of their bytes; your key's entries, an admin
        key's: everyone's); returns how many cache rows went. Collection items keep theirs."""
        return self._run(self._forget(sha256s))

    # ------------------------------------------------------------------ jobs

    def finetune(self, collection: str, suffix: str, *, unfreeze: int = 0, epochs: int = 0,
                 labels: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                 params: Mapping[str, Any] | None = None, method: str = "finetune") -> dict[str, Any]:
        """Start fine-tuning the collection's backbone on its labelled (kept) images; returns the job.

        ``method="adabn"`` instead re-estimates the BatchNorm statistics on the collection's (unlabelled)
        images, adapting the backbone to their domain. The new backbone is ``<parent>.<suffix>``. Follow the
        job with :meth:`wait_job` or :meth:`get_job`. ``unfreeze``/``epochs`` 0: the server's defaults; give each
        setting once (here or in ``params``).
        """
        return self._run(self._finetune(collection, suffix, unfreeze, epochs, labels, ids, params, method))

    def get_job(self, job_id: str) -> dict[str, Any]:
        """A job's ``state`` (queued, running, finished, failed, cancelled), ``progress``, ``result``, ``error``."""
        return self._run(self._get_job(job_id))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._run(self._cancel_job(job_id))

    def wait_job(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
                 on_progress: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        """Poll until the job ends (finished, failed or cancelled); ``on_progress(job)`` sees every poll."""
        return self._run(self._wait_job(job_id, poll, timeout, on_progress))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "EmbedderClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ running plans

    def _run(self, plan: Plan[T]) -> T:
        """Run a plan (see :mod:`embedder.client.base`) to its result with blocking calls."""
        answer: Any = None
        while True:
            step, result = advance(plan, answer)
            if step is None:
                return result  # type: ignore[return-value] - the plan's value
            answer = self._do(step)

    def _do(self, step: Step) -> Any:
        if isinstance(step, Call):
            return self._call(getattr(self._stub, step.method), step.request, timeout=step.timeout)
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        return list(self._stream(step.chunks, step.window))

    def _call(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        """A unary call, retrying UNAVAILABLE with bounded exponential backoff."""
        attempt = 0
        while True:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                time.sleep(self._retry_delay(e, attempt))
                attempt += 1

    def _stream(self, chunks: Iterator[Chunk], window: int) -> Iterator[ItemResult]:
        self._run(self._fit_server())  # before the first chunk is built (embed_iter's chunks are lazy)
        feed = StreamFeed(chunks, window)
        failures = 0
        while True:
            call = self._stub.EmbedStream(feed.requests(), metadata=self._metadata, timeout=self.stream_timeout)
            try:
                for response in call:
                    yield from self._answered(feed, response)
                    failures = 0  # progress: the retry budget is per outage, not per job
                self._check_stream_ended(feed)
                return
            except grpc.RpcError as e:
                time.sleep(self._retry_delay(e, failures, feed))
                failures += 1  # a new stream; unanswered chunks are sent again first
            finally:
                call.cancel()  # no-op when finished; stops the server if our caller stopped iterating
                feed.end_attempt()
