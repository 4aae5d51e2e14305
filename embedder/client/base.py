"""What both clients share: settings, the channel, and every method as a *plan* that builds requests and reads answers.

A plan is a generator: it yields what to do (a :class:`Call`, a :class:`Stream` of embed chunks, a
:class:`Sleep`), is sent back the answer, and returns the method's result. :class:`EmbedderClient` runs plans
with blocking gRPC, :class:`AsyncEmbedderClient` on ``grpc.aio``; so inputs are read, split to fit the limits
and answers parsed one way for both, and each client adds only how it waits.
"""
from __future__ import annotations

import json
import os
import random
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Generator, Iterable, Iterator, Mapping, Sequence, TypeVar, Union

import grpc
import numpy as np

from .._proto import embedder_pb2 as pb
from .._proto import embedder_pb2_grpc as pb_grpc
from ..config import Config
from ..inputs import image_list
from ..messages import collection_from_pb, head_from_pb, hit_from_pb, job_from_pb, stored_from_pb, vector_bytes
from ..results import BatchResult, CollectionInfo, CurvePoint, DeleteResult, Hit, ItemPage, StoredItem
from .chunking import DIM_BOUND, ENVELOPE, STATUS_BY_NUMBER, Chunk, batches, embed_chunks, to_item
from .errors import RemoteBatchError, ServiceError
from .results import AddSummary, ItemResult, Prediction
from .stream import StreamFeedBase

_OK = grpc.StatusCode.OK.value[0]
# Retried: the server is down, restarting or warming up (UNAVAILABLE), or was shutting down when the call
# arrived (gRPC core answers CANCELLED then; this client never cancels a call it still wants).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """A unary RPC; answered with its response message."""

    method: str  # the RPC's name on the stub
    request: Any
    timeout: float | None = None  # None: the client's


@dataclass(frozen=True)
class Stream:
    """Chunks to send over one resumable ``EmbedStream``, ``window`` in flight; answered with every slot in order."""

    chunks: Iterator[Chunk]
    window: int


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` (polling a job); answered with None."""

    seconds: float


Step = Union[Call, Stream, Sleep]
Plan = Generator[Step, Any, T]


def advance(plan: Plan[T], answer: Any) -> tuple[Step | None, T | None]:
    """Send ``answer`` to ``plan``: ``(next step, None)``, or ``(None, result)`` once it is done.

    (A StopIteration cannot cross an executor's future, so the end comes back as a value.)
    """
    try:
        return plan.send(answer), None
    except StopIteration as done:
        return None, done.value


def _check_errors(errors: str) -> None:
    if errors not in ("raise", "return"):
        raise ValueError(f'errors must be "raise" or "return", got {errors!r}')


def _check_chunking(chunk: int, window: int) -> None:
    if chunk < 1 or window < 1:
        raise ValueError(f"chunk and window must be >= 1, got {chunk} and {window}")


def _params_json(params: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(params)) if params else ""


def _where_text(where: str | Mapping[str, Any] | None) -> str:
    """A metadata filter as the ``where`` field carries it: text as is, a JSON object as JSON text."""
    if where is None or isinstance(where, str):
        return where or ""
    if not isinstance(where, Mapping):
        raise TypeError(f"where must be text or a dict (the JSON form), got {type(where).__name__}")
    return json.dumps(dict(where))


class BaseClient:
    """Settings, channel and plans of both clients; see :class:`~embedder.client.EmbedderClient` for the arguments."""

    _grpc: ClassVar[Any] = grpc  # the module whose channels the client opens: grpc, or grpc.aio

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
        # The server's own limits, asked once before the first call that splits inputs (see _fit_server):
        # None until then, or where the server does not say.
        self._server_max_items: int | None = None
        self._server_max_message_bytes: int | None = None
        self._limits_known = False
        self._plaintext = tls_ca is None
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   # reconnect quickly after a server restart; our own retry loop bounds the total wait
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                   *channel_options]
        if tls_ca is not None:
            try:
                ca = Path(tls_ca).read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"tls_ca (--tls-ca) {str(tls_ca)!r}: no such file; name the PEM "
                                        "certificate of the server's CA") from None
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            self._channel = self._grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = self._grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.EmbedderStub(self._channel)

    # ------------------------------------------------------------------ embed

    def _embed(self, images: Sequence[Any], ids: Sequence[str] | None, errors: str, chunk: int,
               window: int) -> Plan[np.ndarray | BatchResult]:
        _check_errors(errors)
        _check_chunking(chunk, window)
        images = image_list(images)
        ids = [str(i) for i in range(len(images))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(images):
            raise ValueError(f"got {len(ids)} ids for {len(images)} images; pass one id per image or none")
        yield from self._fit_server()
        chunks = list(self._chunks(zip(ids, images), min(chunk, self._item_limit)))
        if len(chunks) == 1:
            if chunks[0].request.items:
                self._fill(chunks[0], (yield Call("Embed", chunks[0].request)))
            results: list[ItemResult] = chunks[0].slots  # type: ignore[assignment] - all filled now
        else:
            results = yield Stream(iter(chunks), window)
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

    def _embed_iter_chunks(self, items: Iterable[Any], chunk: int, window: int) -> Iterator[Chunk]:
        """The lazy chunks of ``embed_iter``: ``items`` are inputs or ``(id, input)`` pairs.

        Sized when the first is read, which the stream does after :meth:`_fit_server`."""
        _check_chunking(chunk, window)

        def pairs() -> Iterator[tuple[str, Any]]:
            for i, x in enumerate(items):
                yield (str(x[0]), x[1]) if isinstance(x, tuple) and len(x) == 2 else (str(i), x)

        def sized() -> Iterator[Chunk]:
            yield from self._chunks(pairs(), min(chunk, self._item_limit))

        return sized()

    def _list_models(self) -> Plan[list[dict[str, Any]]]:
        response = yield Call("ListModels", pb.ListModelsRequest())
        return [{"name": m.name, "model_id": m.model_id, "dim": m.dim, "device": m.device, "runtime": m.runtime,
                 "precision": m.precision, "input_size": m.input_size, "normalize": m.normalize, "text": m.text}
                for m in response.models]

    def _server_limits(self) -> Plan[dict[str, int]]:
        lim = (yield Call("ListModels", pb.ListModelsRequest())).limits
        self._learn_limits(lim)
        return {"max_message_bytes": lim.max_message_bytes, "max_items": lim.max_items, "max_pixels": lim.max_pixels}

    def _fit_server(self) -> Plan[None]:
        """Ask the server for its limits, once per client, before the first call that splits inputs: so requests
        also fit a server started with a lower --max-items or --max-message-bytes than this client's settings."""
        if not self._limits_known:
            self._learn_limits((yield Call("ListModels", pb.ListModelsRequest())).limits)

    def _learn_limits(self, lim: pb.ServerLimits) -> None:
        self._server_max_items = lim.max_items or None  # 0: a server that does not say
        self._server_max_message_bytes = lim.max_message_bytes if lim.max_message_bytes > ENVELOPE else None
        self._limits_known = True

    @property
    def _item_limit(self) -> int:
        """Items per request: ``max_items``, or the server's limit where that is lower."""
        return min(self.max_items, self._server_max_items or self.max_items)

    @property
    def _message_limit(self) -> int:
        """Bytes per message: ``max_message_bytes``, or the server's limit where that is lower."""
        return min(self.max_message_bytes, self._server_max_message_bytes or self.max_message_bytes)

    # ------------------------------------------------------------------ store

    def _add(self, collection: str, images: Sequence[Any], ids: Sequence[str], labels: Sequence[str | None] | None,
             metadata: Sequence[Mapping[str, Any] | None] | None, index: str | None, model: str | None,
             errors: str) -> Plan[AddSummary]:
        _check_errors(errors)
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
        yield from self._fit_server()
        for batch in self._batches(entries, summary.failed):
            response = yield Call("Add", pb.AddRequest(collection=collection, index=index or "",
                                                       model=model or self.model, items=[e for _, e in batch]))
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

    def _delete(self, collection: str, ids: Sequence[str]) -> Plan[DeleteResult]:
        r = yield Call("Delete", pb.DeleteRequest(collection=collection, ids=list(ids)))
        return DeleteResult(collection, r.deleted, list(r.missing))

    def _delete_collection(self, collection: str) -> Plan[int]:
        return (yield Call("Delete", pb.DeleteRequest(collection=collection, whole_collection=True))).deleted

    def _set_labels(self, collection: str, labels: Mapping[str, str | None]) -> Plan[int]:
        request = pb.SetLabelsRequest(collection=collection, labels={k: v for k, v in labels.items() if v is not None},
                                      clear=[k for k, v in labels.items() if v is None])
        return (yield Call("SetLabels", request)).updated

    def _get(self, collection: str, ids: Sequence[str], vectors: bool) -> Plan[list[StoredItem | None]]:
        ids = [str(i) for i in ids]
        r = yield Call("Get", pb.GetRequest(collection=collection, ids=ids, omit_vectors=not vectors))
        found = {s.id: stored_from_pb(s) for s in r.items}
        return [found.get(i) for i in ids]

    def _list_items(self, collection: str, offset: int, limit: int, label: str | None, unlabelled: bool,
                    where: str | Mapping[str, Any] | None) -> Plan[ItemPage]:
        r = yield Call("ListItems", pb.ListItemsRequest(collection=collection, offset=offset, limit=limit, label=label,
                                                        unlabelled=unlabelled, where=_where_text(where)))
        return ItemPage([stored_from_pb(i.item) for i in r.items], [i.image_kept for i in r.items], r.total, r.offset)

    def _get_image(self, collection: str, item_id: str, size: int) -> Plan[bytes]:
        return (yield Call("GetImage", pb.GetImageRequest(collection=collection, id=item_id, size=size))).image

    def _create_collection(self, collection: str, model: str, index: str) -> Plan[CollectionInfo]:
        request = pb.CreateCollectionRequest(collection=collection, model=model, index=index)
        return collection_from_pb((yield Call("CreateCollection", request)))

    def _search(self, image: Any, collection: str | None, item_id: str | None, vector: np.ndarray | None, k: int,
                label: str | None, ef_search: int | None,
                where: str | Mapping[str, Any] | None, model: str | None) -> Plan[list[Hit]]:
        given = [name for name, v in (("image", image), ("item_id", item_id), ("vector", vector)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one query (image, item_id or vector), got {given or 'none'}")
        request = pb.SearchRequest(collection=collection or "", k=k, label=label, ef_search=ef_search or 0,
                                   where=_where_text(where), model=model or self.model)
        if image is not None:
            request.item.CopyFrom(to_item(image, "query"))
        elif item_id is not None:
            request.item_id = item_id
        else:
            request.vector = vector_bytes(np.asarray(vector, np.float32).ravel())
        return [hit_from_pb(h) for h in (yield Call("Search", request)).hits]

    def _stats(self) -> Plan[dict[str, Any]]:
        r = yield Call("Stats", pb.StatsRequest())
        return {"collections": [collection_from_pb(c) for c in r.collections], "items": r.items,
                "cache_items": r.cache_items, "cache_max_items": r.cache_max_items, "disk_bytes": r.disk_bytes,
                "heads": r.heads}

    # ------------------------------------------------------------------ heads

    def _train(self, collection: str, head: str, labels: Sequence[str] | None, ids: Sequence[str] | None,
               params: Mapping[str, Any] | None, test_size: float | None, seed: int, head_id: str | None,
               adapt_to: str | None, adapt_method: str | None, where: str | Mapping[str, Any] | None,
               timeout: float | None, class_prompts: Mapping[str, Sequence[str]] | None = None,
               model: str | None = None) -> Plan[dict[str, Any]]:
        request = pb.TrainRequest(collection=collection, head=head, labels=list(labels or ()), ids=list(ids or ()),
                                  params_json=_params_json(params), test_size=test_size or 0.0, seed=seed,
                                  head_id=head_id or "", adapt_to=adapt_to or "", adapt_method=adapt_method or "",
                                  where=_where_text(where),
                                  class_prompts={label: pb.Prompts(prompts=[prompts] if isinstance(prompts, str)
                                                                   else list(prompts))
                                                 for label, prompts in (class_prompts or {}).items()},
                                  model=model or "")
        r = yield Call("Train", request, timeout or 10 * self.timeout)
        return {**head_from_pb(r.head), "samples": r.samples, "train_seconds": r.train_seconds,
                "total_seconds": r.total_seconds}

    def _predict(self, head_id: str | Sequence[str], images: Sequence[Any], ids: Sequence[str],
                 collection: str | None, top_k: int) -> Plan[list[Prediction]]:
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
        yield from self._fit_server()
        batches_ = list(self._batches(entries, failed))
        for i, message in failed.items():
            out[i] = Prediction(str(i), [], [], message)
        calls = [(pb.PredictRequest(head_ids=head_ids, items=[e for _, e in b], top_k=top_k), [i for i, _ in b])
                 for b in batches_]
        for start in range(0, len(ids), self._item_limit):
            chunk = ids[start:start + self._item_limit]
            calls.append((pb.PredictRequest(head_ids=head_ids, collection=collection or "", ids=chunk, top_k=top_k),
                          [len(images) + start + j for j in range(len(chunk))]))
        for request, where in calls:
            for i, p in zip(where, (yield Call("Predict", request)).predictions):
                error = None if p.status.code == _OK else (p.status.message or STATUS_BY_NUMBER[p.status.code].name)
                by_head = {h.head_id: ([t.label for t in h.top], [float(t.probability) for t in h.top])
                           for h in p.heads}
                first = by_head.get(head_ids[0], ([], []))
                out[i] = Prediction(p.id, first[0], first[1], error, p.cached, by_head)
        return out  # type: ignore[return-value] - every slot is filled

    def _learning_curve(self, collection: str, head: str, labels: Sequence[str] | None,
                        per_class: Sequence[int] | None, repeats: int, test_size: float | None, seed: int,
                        params: Mapping[str, Any] | None, timeout: float | None) -> Plan[list[CurvePoint]]:
        request = pb.LearningCurveRequest(collection=collection, head=head, labels=list(labels or ()),
                                          per_class=list(per_class or ()), repeats=repeats,
                                          test_size=test_size or 0.0, seed=seed, params_json=_params_json(params))
        r = yield Call("LearningCurve", request, timeout or 10 * self.timeout)
        return [CurvePoint(p.per_class, p.n_train, p.accuracy_mean, p.accuracy_std, p.ci_low, p.ci_high, p.repeats,
                           p.fit_seconds) for p in r.points]

    def _suggest(self, collection: str, n: int, strategy: str, head_id: str | None, ids: Sequence[str] | None,
                 seed: int, where: str | Mapping[str, Any] | None, timeout: float | None) -> Plan[dict[str, Any]]:
        request = pb.SuggestRequest(collection=collection, n=n, strategy=strategy, head_id=head_id or "",
                                    ids=list(ids or ()), seed=seed, where=_where_text(where))
        r = yield Call("Suggest", request, timeout or 10 * self.timeout)
        return {"suggestions": [{"id": s.id, "score": s.score, "reason": s.reason} for s in r.suggestions],
                "strategy": r.strategy, "candidates": r.candidates, "labelled": r.labelled}

    def _label_issues(self, collection: str, limit: int, labels: Sequence[str] | None, folds: int,
                      near_duplicate: float, seed: int, where: str | Mapping[str, Any] | None,
                      timeout: float | None) -> Plan[dict[str, Any]]:
        request = pb.LabelIssuesRequest(collection=collection, limit=limit, labels=list(labels or ()), folds=folds,
                                        near_duplicate=near_duplicate, seed=seed, where=_where_text(where))
        r = yield Call("LabelIssues", request, timeout or 10 * self.timeout)

        def issue(i: Any) -> dict[str, Any]:
            return {"id": i.id, "label": i.label, "suggested": i.suggested, "score": i.score, "kind": i.kind,
                    "other": i.other}
        return {"issues": [issue(i) for i in r.issues], "duplicates": [issue(d) for d in r.duplicates],
                "checked": r.checked, "folds": r.folds, "noise_rate": r.noise_rate, "thresholds": dict(r.thresholds)}

    def _list_heads(self) -> Plan[list[dict[str, Any]]]:
        return [head_from_pb(h) for h in (yield Call("ListHeads", pb.ListHeadsRequest())).heads]

    def _delete_head(self, head_id: str) -> Plan[None]:
        yield Call("DeleteHead", pb.DeleteHeadRequest(head_id=head_id))

    # ------------------------------------------------------------------ cache

    def _forget(self, sha256s: Sequence[str]) -> Plan[int]:
        return (yield Call("Forget", pb.ForgetRequest(sha256s=list(sha256s)))).forgotten

    # ------------------------------------------------------------------ jobs

    def _finetune(self, collection: str, suffix: str, unfreeze: int, epochs: int, labels: Sequence[str] | None,
                  ids: Sequence[str] | None, params: Mapping[str, Any] | None, method: str) -> Plan[dict[str, Any]]:
        request = pb.FineTuneRequest(collection=collection, suffix=suffix, unfreeze=unfreeze, epochs=epochs,
                                     labels=list(labels or ()), ids=list(ids or ()), method=method,
                                     params_json=_params_json(params))
        return job_from_pb((yield Call("FineTune", request)))

    def _get_job(self, job_id: str) -> Plan[dict[str, Any]]:
        return job_from_pb((yield Call("GetJob", pb.GetJobRequest(job_id=job_id))))

    def _cancel_job(self, job_id: str) -> Plan[dict[str, Any]]:
        return job_from_pb((yield Call("CancelJob", pb.GetJobRequest(job_id=job_id))))

    def _wait_job(self, job_id: str, poll: float, timeout: float | None,
                  on_progress: Callable[[dict[str, Any]], Any] | None) -> Plan[dict[str, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = yield from self._get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["state"] not in ("queued", "running"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"job {job_id} still {job['state']} after "
                                   f"{timeout} s; wait longer or check it with get_job")
            yield Sleep(poll)

    # ------------------------------------------------------------------ requests and answers

    def _chunks(self, pairs: Iterable[tuple[str, Any]], size: int) -> Iterator[Chunk]:
        return embed_chunks(pairs, size, max_message_bytes=self._message_limit, model=self.model,
                            dim=lambda: self._dim)

    def _batches(self, entries: list[tuple[int, Any]], failed: dict[int, str]) -> Iterator[list[tuple[int, Any]]]:
        return batches(entries, failed, max_message_bytes=self._message_limit, max_items=self._item_limit)

    def _fill(self, chunk: Chunk, response: pb.EmbedResponse) -> None:
        chunk.fill(response)
        if response.dim:
            self._dim = response.dim

    def _answered(self, feed: StreamFeedBase, response: pb.EmbedResponse) -> list[ItemResult]:
        """Fill the oldest open chunk of a stream from ``response``; the results now ready, in input order."""
        chunk = feed.oldest_unanswered()
        if chunk is None:
            raise ServiceError(grpc.StatusCode.INTERNAL, "server sent more responses than requests")
        self._fill(chunk, response)
        return [r for done in feed.pop_done() for r in done.slots]  # type: ignore[misc] - done: all filled

    @staticmethod
    def _check_stream_ended(feed: StreamFeedBase) -> None:
        """The server closed the stream cleanly: every request must have been answered."""
        if feed.source_error is not None:
            raise feed.source_error
        if not feed.finished():
            raise ServiceError(grpc.StatusCode.INTERNAL, "the stream ended before every request was answered")

    def _retry_delay(self, e: grpc.RpcError, attempt: int, feed: StreamFeedBase | None = None) -> float:
        """How long to wait before trying again after ``e`` (``attempt`` failures so far), or raise it as a
        ServiceError (or the caller's own error that broke a stream's input)."""
        if feed is not None and feed.source_error is not None:
            raise feed.source_error from None
        if e.code() in RETRYABLE and attempt < self.retries and self._tls_mismatch(e) is None:
            # full jitter keeps many clients from retrying in lockstep after a restart
            return min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> ServiceError:
        """Turn a gRPC error into a ServiceError whose message says what to do."""
        code, details = e.code(), e.details() or ""
        mismatch = self._tls_mismatch(e)
        if mismatch is not None:
            return mismatch
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

    # ------------------------------------------------------------------ TLS mismatches

    def _tls_mismatch(self, e: grpc.RpcError) -> ServiceError | None:
        """The error to raise at once for a connection that failed over TLS settings (no retry can mend those),
        or None. Certificate checks fail by name; a plaintext channel to a TLS server only sees "Socket closed",
        as it would from a restarting server, so there a TLS handshake is tried once to tell the two apart."""
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        details = e.details() or ""
        fix = None
        if "CERTIFICATE_VERIFY_FAILED" in details or "is not in peer certificate" in details:
            fix = (f"the certificate of the server at {self.target} does not match the CA given as tls_ca "
                   "(--tls-ca): pass the PEM of the CA (or self-signed certificate) the server's --tls-cert is from")
        elif "WRONG_VERSION_NUMBER" in details:
            fix = (f"the server at {self.target} speaks plaintext, not TLS: drop tls_ca (--tls-ca), or start the "
                   "server with --tls-cert and --tls-key")
        elif self._plaintext and "Socket closed" in details and self._probe_tls():
            fix = (f"the server at {self.target} speaks TLS: pass its CA certificate with --tls-ca / "
                   "EmbedderClient(tls_ca=...)")
        return None if fix is None else ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"{fix} ({details})")

    def _probe_tls(self) -> bool:
        """Whether a TLS handshake (certificate unchecked: only the protocol matters) succeeds at the target.

        Only after a plaintext connection was closed at once, so rare and short (loopback: a millisecond)."""
        host, _, port = self.target.removeprefix("dns:///").removeprefix("ipv4:").rpartition(":")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2) as raw, context.wrap_socket(raw):
                return True
        except (OSError, ValueError):  # ssl.SSLError is an OSError; ValueError: a target we cannot parse
            return False
