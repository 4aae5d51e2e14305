"""The :class:`EmbedderClient`: one method per RPC, with retries, and large inputs split to fit the limits."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np

from .._proto import embedder_pb2 as pb
from .._proto import embedder_pb2_grpc as pb_grpc
from ..config import Config
from ..inputs import image_list
from ..messages import collection_from_pb, head_from_pb, hit_from_pb, job_from_pb, stored_from_pb, vector_bytes
from ..results import BatchResult, CurvePoint, DeleteResult, Hit, StoredItem
from .chunking import DIM_BOUND, ENVELOPE, STATUS_BY_NUMBER, Chunk, batches, embed_chunks, to_item
from .errors import RemoteBatchError, ServiceError
from .results import AddSummary, ItemResult, Prediction
from .stream import StreamFeed

_OK = grpc.StatusCode.OK.value[0]
# Retried: the server is down, restarting or warming up (UNAVAILABLE), or was shutting down when the call
# arrived (gRPC core answers CANCELLED then; this client never cancels a call it still wants).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class EmbedderClient:
    """Talks to an ``embedder serve`` instance; see :mod:`embedder.client`.

    ``target`` is ``host:port``. ``token`` is sent as ``authorization: Bearer <token>``. ``tls_ca`` is the
    PEM file of the CA (or self-signed certificate) to trust; without it the channel is plaintext.
    ``timeout`` bounds each unary call in seconds; ``stream_timeout`` bounds a whole stream (default none).
    ``model`` (a backbone name or model id) is the backbone requests embed with (default: the server's).
    ``channel_options`` are extra gRPC channel arguments (e.g. a service config for load balancing).
    """

    def __init__(self, target: str, token: str | None = None, timeout: float = 30.0,
                 tls_ca: str | os.PathLike | None = None, *, max_message_bytes: int = Config.max_message_bytes,
                 max_items: int = Config.max_items, retries: int = 5, backoff: float = 0.2,
                 max_backoff: float = 2.0, stream_timeout: float | None = None, model: str | None = None,
                 channel_options: Sequence[tuple[str, Any]] = ()) -> None:
        if max_message_bytes <= ENVELOPE:
            raise ValueError(f"max_message_bytes must be above {ENVELOPE}, got {max_message_bytes}")
        if max_items < 1 or retries < 0:
            raise ValueError(f"max_items must be >= 1 and retries >= 0, got {max_items} and {retries}")
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.max_message_bytes = max_message_bytes
        self.max_items = max_items
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.model = model or ""  # sent with every request: the backbone to embed with
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._dim = DIM_BOUND
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   # reconnect quickly after a server restart; our own retry loop bounds the total wait
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                   *channel_options]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.EmbedderStub(self._channel)

    # ------------------------------------------------------------------ public

    def embed(self, images: Sequence[Any], ids: Sequence[str] | None = None, errors: str = "raise",
              *, chunk: int = 64, window: int = 4) -> np.ndarray | BatchResult:
        """Embed ``images`` -> float32 ``(N, dim)`` in input order (``errors="raise"``), or a
        :class:`~embedder.results.BatchResult` with per-item errors (``errors="return"``).

        Up to ``chunk`` images (that fit one message) go in one ``Embed`` call, bounded by ``timeout``; more
        go over one stream in chunks, ``window`` in flight, so a large input never races the per-call timeout.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f'errors must be "raise" or "return", got {errors!r}')
        if chunk < 1 or window < 1:
            raise ValueError(f"chunk and window must be >= 1, got {chunk} and {window}")
        images = image_list(images)
        ids = [str(i) for i in range(len(images))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(images):
            raise ValueError(f"got {len(ids)} ids for {len(images)} images; pass one id per image or none")
        chunks = list(self._chunks(zip(ids, images), min(chunk, self.max_items)))
        if len(chunks) == 1:
            results = self._unary(chunks[0])
        else:
            results = list(self._stream(iter(chunks), window))
        dim = next((r.vector.shape[0] for r in results if r.ok), self._dim if self._dim != DIM_BOUND else 0)
        vectors = np.zeros((len(results), dim), np.float32)
        errs: list[str | None] = []
        for i, r in enumerate(results):
            if r.ok:
                vectors[i] = r.vector
            errs.append(r.error)
        if errors == "return":
            return BatchResult(vectors, errs)
        failed = {i: e for i, e in enumerate(errs) if e is not None}
        if failed:
            raise RemoteBatchError(failed, ids)
        return vectors

    def embed_iter(self, items: Iterable[Any], *, chunk: int = 64, window: int = 4) -> Iterator[ItemResult]:
        """Stream ``items`` (inputs, or ``(id, input)`` pairs) and yield an :class:`ItemResult` per item, in order.

        Items are read lazily, ``chunk`` per request, with ``window`` requests in flight, so memory stays
        bounded for any input length. Ids default to the running index as a string.
        """
        if chunk < 1 or window < 1:
            raise ValueError(f"chunk and window must be >= 1, got {chunk} and {window}")

        def pairs() -> Iterator[tuple[str, Any]]:
            for i, x in enumerate(items):
                yield (str(x[0]), x[1]) if isinstance(x, tuple) and len(x) == 2 else (str(i), x)

        return self._stream(self._chunks(pairs(), min(chunk, self.max_items)), window)

    def list_models(self) -> list[dict[str, Any]]:
        """The server's model(s), with the same keys as the local ``Embedder.info()``."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [{"name": m.name, "model_id": m.model_id, "dim": m.dim, "device": m.device, "runtime": m.runtime,
                 "precision": m.precision, "input_size": m.input_size, "normalize": m.normalize}
                for m in response.models]

    def server_limits(self) -> dict[str, int]:
        """The server's max_message_bytes, max_items and max_pixels, to size a client to a non-default server."""
        lim = self._call(self._stub.ListModels, pb.ListModelsRequest()).limits
        return {"max_message_bytes": lim.max_message_bytes, "max_items": lim.max_items, "max_pixels": lim.max_pixels}

    # ------------------------------------------------------------------ store

    def add(self, collection: str, images: Sequence[Any], ids: Sequence[str], *,
            labels: Sequence[str | None] | None = None, metadata: Sequence[Mapping[str, Any] | None] | None = None,
            index: str | None = None, model: str | None = None, errors: str = "raise") -> AddSummary:
        """Embed ``images`` (through the server's cache) and upsert them into ``collection`` under ``ids``.

        Inputs as for :meth:`embed`, plus :class:`Cached` (a sha256 the server knows). ``labels`` and
        ``metadata`` (JSON-able dicts) are optional, one per item. ``index`` ("flat" or "hnsw[:...]") and
        ``model`` (a backbone name or model id, e.g. a fine-tuned version; default: the server's) apply when the
        collection is created; an existing collection embeds with its own model. Items that fail are reported (``errors="return"``) or raised as
        :class:`RemoteBatchError` after the good ones were stored.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f'errors must be "raise" or "return", got {errors!r}')
        images, ids = image_list(images), [str(i) for i in ids]
        labels = [None] * len(ids) if labels is None else list(labels)
        metadata = [None] * len(ids) if metadata is None else list(metadata)
        if not len(images) == len(ids) == len(labels) == len(metadata):
            raise ValueError(f"got {len(images)} images, {len(ids)} ids, {len(labels)} labels and {len(metadata)} "
                             "metadata entries; pass one of each per item")
        summary = AddSummary(collection, 0, 0, 0)
        entries: list[tuple[int, pb.AddItem]] = []
        for i, (x, item_id, label, meta) in enumerate(zip(images, ids, labels, metadata)):
            try:
                entry = pb.AddItem(item=to_item(x, item_id), label=label,
                                   metadata_json=json.dumps(meta) if meta is not None else "")
            except (ValueError, TypeError, OSError) as e:
                summary.failed[i] = str(e)
                continue
            entries.append((i, entry))
        for batch in self._batches(entries, summary.failed):
            response = self._call(self._stub.Add, pb.AddRequest(collection=collection, index=index or "",
                                                                model=model or self.model,
                                                                items=[e for _, e in batch]))
            summary.added += response.added
            summary.replaced += response.replaced
            for (i, _), r in zip(batch, response.results):
                if r.status.code != _OK:
                    summary.failed[i] = r.status.message or STATUS_BY_NUMBER[r.status.code].name
                summary.cached += r.cached
        summary.failed = dict(sorted(summary.failed.items()))
        if summary.failed and errors == "raise":
            raise RemoteBatchError(summary.failed, ids, action="added")
        return summary

    def delete(self, collection: str, ids: Sequence[str]) -> DeleteResult:
        """Delete items; ids that were not there come back in ``missing``."""
        r = self._call(self._stub.Delete, pb.DeleteRequest(collection=collection, ids=list(ids)))
        return DeleteResult(collection, r.deleted, list(r.missing))

    def delete_collection(self, collection: str) -> int:
        """Delete a collection and all its items; returns how many items it held."""
        return self._call(self._stub.Delete, pb.DeleteRequest(collection=collection, whole_collection=True)).deleted

    def set_labels(self, collection: str, labels: Mapping[str, str | None]) -> int:
        """Set labels (None clears one) of stored items, all or nothing; returns the number changed."""
        request = pb.SetLabelsRequest(collection=collection, labels={k: v for k, v in labels.items() if v is not None},
                                      clear=[k for k, v in labels.items() if v is None])
        return self._call(self._stub.SetLabels, request).updated

    def get(self, collection: str, ids: Sequence[str], *, vectors: bool = True) -> list[StoredItem | None]:
        """Stored items in the order of ``ids``, None where an id is not in the collection."""
        ids = [str(i) for i in ids]
        r = self._call(self._stub.Get, pb.GetRequest(collection=collection, ids=ids, omit_vectors=not vectors))
        found = {s.id: stored_from_pb(s) for s in r.items}
        return [found.get(i) for i in ids]

    def search(self, image: Any = None, *, collection: str | None = None, item_id: str | None = None,
               vector: np.ndarray | None = None, k: int = 10, label: str | None = None,
               ef_search: int | None = None) -> list[Hit]:
        """The ``k`` stored items most similar to one query: an ``image`` (as for :meth:`embed`, or
        :class:`Cached`), a stored ``item_id`` of ``collection``, or a raw ``vector``. Best first."""
        given = [name for name, v in (("image", image), ("item_id", item_id), ("vector", vector)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one query (image, item_id or vector), got {given or 'none'}")
        request = pb.SearchRequest(collection=collection or "", k=k, label=label, ef_search=ef_search or 0)
        if image is not None:
            request.item.CopyFrom(to_item(image, "query"))
        elif item_id is not None:
            request.item_id = item_id
        else:
            request.vector = vector_bytes(np.asarray(vector, np.float32).ravel())
        return [hit_from_pb(h) for h in self._call(self._stub.Search, request).hits]

    def stats(self) -> dict[str, Any]:
        """Collections (count, labels, model, index), cache fill, disk use and number of heads."""
        r = self._call(self._stub.Stats, pb.StatsRequest())
        return {"collections": [collection_from_pb(c) for c in r.collections], "items": r.items,
                "cache_items": r.cache_items, "cache_max_items": r.cache_max_items, "disk_bytes": r.disk_bytes,
                "heads": r.heads}

    # ------------------------------------------------------------------ heads

    def train(self, collection: str, head: str = "logreg", *, labels: Sequence[str] | None = None,
              ids: Sequence[str] | None = None, params: Mapping[str, Any] | None = None,
              test_size: float | None = None, seed: int = 0, head_id: str | None = None,
              adapt_to: str | None = None, adapt_method: str | None = None,
              timeout: float | None = None) -> dict[str, Any]:
        """Train a head on the labelled vectors of ``collection`` (no image is embedded again).

        Returns the head's info (``head_id``, ``classes``, ``metrics`` from a stratified hold-out) plus
        ``samples``, ``train_seconds`` and ``total_seconds``. ``adapt_to`` names a collection of unlabelled
        images of the domain the head will predict on (``adapt_method``: coral or standardize).
        ``timeout`` defaults to 10x the client's.
        """
        request = pb.TrainRequest(collection=collection, head=head, labels=list(labels or ()), ids=list(ids or ()),
                                  params_json=json.dumps(dict(params)) if params else "",
                                  test_size=test_size or 0.0, seed=seed, head_id=head_id or "",
                                  adapt_to=adapt_to or "", adapt_method=adapt_method or "")
        r = self._call(self._stub.Train, request, timeout=timeout or 10 * self.timeout)
        return {**head_from_pb(r.head), "samples": r.samples, "train_seconds": r.train_seconds,
                "total_seconds": r.total_seconds}

    def predict(self, head_id: str | Sequence[str], images: Sequence[Any] = (), *, ids: Sequence[str] = (),
                collection: str | None = None, top_k: int = 1) -> list[Prediction]:
        """Top-``k`` labels for ``images`` (through the cache) and/or stored ``ids`` of ``collection``.

        One :class:`Prediction` per input, images first, then ids; an item that fails carries ``error``.
        ``head_id`` may be a list of heads of one backbone: each image is embedded once and every head
        answers (``Prediction.by_head``).
        """
        head_ids = [head_id] if isinstance(head_id, str) else list(head_id)
        images, ids = image_list(images), [str(i) for i in ids]
        out: list[Prediction | None] = [None] * (len(images) + len(ids))
        failed: dict[int, str] = {}
        entries: list[tuple[int, pb.Item]] = []
        for i, x in enumerate(images):
            try:
                entries.append((i, to_item(x, str(i))))
            except (ValueError, TypeError, OSError) as e:
                failed[i] = str(e)
        batches = list(self._batches(entries, failed))
        for i, message in failed.items():
            out[i] = Prediction(str(i), [], [], message)
        calls = [(pb.PredictRequest(head_ids=head_ids, items=[e for _, e in b], top_k=top_k), [i for i, _ in b])
                 for b in batches]
        for start in range(0, len(ids), self.max_items):
            chunk = ids[start:start + self.max_items]
            calls.append((pb.PredictRequest(head_ids=head_ids, collection=collection or "", ids=chunk, top_k=top_k),
                          [len(images) + start + j for j in range(len(chunk))]))
        for request, where in calls:
            for i, p in zip(where, self._call(self._stub.Predict, request).predictions):
                error = None if p.status.code == _OK else (p.status.message or STATUS_BY_NUMBER[p.status.code].name)
                by_head = {h.head_id: ([t.label for t in h.top], [float(t.probability) for t in h.top])
                           for h in p.heads}
                first = by_head.get(head_ids[0], ([], []))
                out[i] = Prediction(p.id, first[0], first[1], error, p.cached, by_head)
        return out  # type: ignore[return-value] - every slot is filled

    def learning_curve(self, collection: str, head: str = "logreg", *, labels: Sequence[str] | None = None,
                       per_class: Sequence[int] | None = None, repeats: int = 5, test_size: float | None = None,
                       seed: int = 0, params: Mapping[str, Any] | None = None,
                       timeout: float | None = None) -> list[CurvePoint]:
        """Hold-out accuracy at growing numbers of labels per class, with 95% confidence intervals."""
        request = pb.LearningCurveRequest(collection=collection, head=head, labels=list(labels or ()),
                                          per_class=list(per_class or ()), repeats=repeats,
                                          test_size=test_size or 0.0, seed=seed,
                                          params_json=json.dumps(dict(params)) if params else "")
        r = self._call(self._stub.LearningCurve, request, timeout=timeout or 10 * self.timeout)
        return [CurvePoint(p.per_class, p.n_train, p.accuracy_mean, p.accuracy_std, p.ci_low, p.ci_high, p.repeats,
                           p.fit_seconds) for p in r.points]

    def list_heads(self) -> list[dict[str, Any]]:
        return [head_from_pb(h) for h in self._call(self._stub.ListHeads, pb.ListHeadsRequest()).heads]

    def delete_head(self, head_id: str) -> None:
        self._call(self._stub.DeleteHead, pb.DeleteHeadRequest(head_id=head_id))

    # ------------------------------------------------------------------ jobs

    def finetune(self, collection: str, suffix: str, *, unfreeze: int = 1, epochs: int = 10,
                 labels: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                 params: Mapping[str, Any] | None = None, method: str = "finetune") -> dict[str, Any]:
        """Start fine-tuning the collection's backbone on its labelled (kept) images; returns the job.

        ``method="adabn"`` instead re-estimates the BatchNorm statistics on the collection's (unlabelled)
        images, adapting the backbone to their domain. The new backbone is ``<parent>.<suffix>``. Follow the
        job with :meth:`wait_job` or :meth:`get_job`.
        """
        request = pb.FineTuneRequest(collection=collection, suffix=suffix, unfreeze=unfreeze, epochs=epochs,
                                     labels=list(labels or ()), ids=list(ids or ()), method=method,
                                     params_json=json.dumps(dict(params)) if params else "")
        return job_from_pb(self._call(self._stub.FineTune, request))

    def get_job(self, job_id: str) -> dict[str, Any]:
        """A job's ``state`` (queued, running, finished, failed, cancelled), ``progress``, ``result``, ``error``."""
        return job_from_pb(self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id)))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return job_from_pb(self._call(self._stub.CancelJob, pb.GetJobRequest(job_id=job_id)))

    def wait_job(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
                 on_progress: Any = None) -> dict[str, Any]:
        """Poll until the job ends (finished, failed or cancelled); ``on_progress(job)`` sees every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["state"] not in ("queued", "running"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"job {job_id} still {job['state']} after "
                                   f"{timeout} s; wait longer or check it with get_job")
            time.sleep(poll)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "EmbedderClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def _chunks(self, pairs: Iterable[tuple[str, Any]], size: int) -> Iterator[Chunk]:
        return embed_chunks(pairs, size, max_message_bytes=self.max_message_bytes, model=self.model,
                            dim=lambda: self._dim)

    def _batches(self, entries: list[tuple[int, Any]], failed: dict[int, str]) -> Iterator[list[tuple[int, Any]]]:
        return batches(entries, failed, max_message_bytes=self.max_message_bytes, max_items=self.max_items)

    def _fill(self, chunk: Chunk, response: pb.EmbedResponse) -> None:
        chunk.fill(response)
        if response.dim:
            self._dim = response.dim

    def _unary(self, chunk: Chunk) -> list[ItemResult]:
        if chunk.request.items:
            self._fill(chunk, self._call(self._stub.Embed, chunk.request))
        return chunk.slots  # type: ignore[return-value] - all filled now

    def _call(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        """A unary call, retrying UNAVAILABLE with bounded exponential backoff."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() in RETRYABLE and attempt < self.retries:
                    time.sleep(self._delay(attempt))
                    continue
                raise self._error(e) from None
        raise AssertionError("unreachable")

    def _delay(self, attempt: int) -> float:
        # full jitter keeps many clients from retrying in lockstep after a restart
        return min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)

    def _stream(self, chunks: Iterator[Chunk], window: int) -> Iterator[ItemResult]:
        feed = StreamFeed(chunks, window)
        failures = 0
        while True:
            call = self._stub.EmbedStream(feed.requests(), metadata=self._metadata, timeout=self.stream_timeout)
            try:
                for response in call:
                    chunk = feed.oldest_unanswered()
                    if chunk is None:
                        raise ServiceError(grpc.StatusCode.INTERNAL, "server sent more responses than requests")
                    self._fill(chunk, response)
                    failures = 0  # progress: the retry budget is per outage, not per job
                    for done in feed.pop_done():
                        yield from done.slots  # type: ignore[misc]
                if feed.source_error is not None:
                    raise feed.source_error
                if not feed.finished():
                    raise ServiceError(grpc.StatusCode.INTERNAL, "the stream ended before every request was answered")
                return
            except grpc.RpcError as e:
                if feed.source_error is not None:
                    raise feed.source_error from None
                if e.code() in RETRYABLE and failures < self.retries:
                    time.sleep(self._delay(failures))
                    failures += 1
                    continue  # a new stream; unanswered chunks are sent again first
                raise self._error(e) from None
            finally:
                call.cancel()  # no-op when finished; stops the server if our caller stopped iterating
                feed.end_attempt()

    def _error(self, e: grpc.RpcError) -> ServiceError:
        """Turn a gRPC error into a ServiceError whose message says what to do."""
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details.lower():
            msg = (f"{details}. A request or response exceeded a gRPC message size limit: this client sends at "
                   f"most {self.max_message_bytes:,} bytes per message (EmbedderClient(max_message_bytes=...)); "
                   "the server accepts --max-message-bytes / EMBEDDER_MAX_MESSAGE_BYTES (default 64 MiB). Raise "
                   "the server's limit, or give the client the server's smaller value so it splits requests to fit")
        elif code == grpc.StatusCode.UNAVAILABLE:
            msg = (f"no serving embedder at {self.target} after {self.retries + 1} attempts ({details}); check that "
                   "`embedder serve` runs there and its health check says SERVING")
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            msg = f"{details} (server {self.target})"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            msg = (f"no answer within the timeout ({details}); pass a larger EmbedderClient(timeout=...) or send "
                   "fewer items per call")
        else:
            msg = details or "no details"
        return ServiceError(code, msg)
