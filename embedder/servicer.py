"""The gRPC front door: ``embedder.v1.Embedder`` messages in, :class:`embedder.core.Service` calls, messages out.

No logic of its own: each handler converts its request (items, JSON fields, packed vectors), passes the call's
deadline, cancellation and API key (:class:`~embedder.keys.Principal`, checked by the core) as a
:class:`~embedder.core.Call`, and converts the result. Every failure, whole-call
or per item, is answered through the one table in :mod:`embedder.errors` (category -> status code).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict
from functools import partial
from typing import Any, Iterator

import grpc

from ._proto import embedder_pb2 as pb
from ._proto import embedder_pb2_grpc as pb_grpc
from .core import AddItem, Call, Item, Outcome, Service
from .core.embedding import Pending
from .core.service import DEFAULT_K, METADATA_FLAG
from .errors import TABLE, Category, EmbedderError, ItemError, category_of, message_of
from .jsonrule import parse_json_object
from .keys import Gate, authorization
from .messages import (bytes_vector, collection_to_pb, head_to_pb, hit_to_pb, job_to_pb, stats_to_pb, stored_to_pb,
                       tensor_array, vector_bytes)


STREAM_WINDOW = 4  # requests of one stream in the batcher at once: pipelining without hogging the queue
IDLE_POLL = 0.25  # seconds between a stream's idleness checks
_OK = grpc.StatusCode.OK.value[0]
_END = object()


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for any exception; server faults are logged and say so."""
    return grpc.StatusCode[TABLE[category_of(error)].grpc], message_of(error, "gRPC")


def _item(item: pb.Item) -> Item:
    """An ``Item`` message as the core's item; one that cannot be read carries its error and fails alone."""
    kind = item.WhichOneof("input")
    try:
        if kind == "image":
            return Item(item.id, image=item.image)
        if kind == "content_sha256":
            return Item(item.id, sha256=item.content_sha256)
        if kind == "tensor":
            return Item(item.id, array=tensor_array(item.tensor))
        if kind == "text":
            return Item(item.id, text=item.text)
    except EmbedderError as e:
        return Item(item.id, error=e)
    except Exception as e:  # whatever a malformed item does, it fails alone
        return Item(item.id, error=ItemError(f"malformed item ({type(e).__name__}: {e})"))
    return Item(item.id)  # neither: the core says what to set


def _add_item(a: pb.AddItem, max_bytes: int) -> AddItem:
    item = _item(a.item)
    try:  # the size cap before parsing: 30 MB of text is refused without building it (the core checks the rest)
        metadata = parse_json_object(a.metadata_json, f"metadata_json of item {a.item.id!r}", max_bytes=max_bytes,
                                     raise_with=METADATA_FLAG)
    except ValueError as e:
        return AddItem(Item(item.id, error=ItemError(str(e))))
    return AddItem(item, label=a.label if a.HasField("label") else None, metadata=metadata)


def _status(target: Any, error: BaseException | None) -> None:
    if error is None:
        target.status.code = _OK
    else:
        code, target.status.message = status_of(error)
        target.status.code = code.value[0]


def _result(o: Outcome, model: Any, *, with_vector: bool = True) -> pb.Result:
    result = pb.Result(id=o.id, dim=model.dim, model_id=model.model_id, cached=o.cached, sha256=o.sha256)
    _status(result, o.error)
    if o.error is None and with_vector:
        result.vector = vector_bytes(o.vector)
    return result


class EmbedderServicer(pb_grpc.EmbedderServicer):
    """Handlers for ``embedder.v1.Embedder`` over one :class:`embedder.core.Service`."""

    def __init__(self, service: Service, gate: Gate) -> None:
        self.service = service
        self._gate = gate

    def _call(self, context: grpc.ServicerContext) -> Call:
        """The caller's deadline (grpc reports "no deadline" as ~forever), whether it is still there, and its key
        (the interceptor refused calls without one already; a key revoked since is refused here)."""
        try:
            principal = self._gate.principal(authorization(context.invocation_metadata()))
        except EmbedderError as e:
            context.abort(*status_of(e))
        left = context.time_remaining()
        return Call.within(None if left is None or left > 1e7 else max(0.0, left), lambda: not context.is_active(),
                           principal)

    def _run(self, context: grpc.ServicerContext, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or abort the call with the status its error maps to."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            failed = e
        context.abort(*status_of(failed))  # outside the try: abort raises, and must not be caught above

    def _items(self, items: Any, convert: Any = None, extra: int = 0) -> list:
        """``items`` converted, after the count check: a 4 MB message of empty items would be 2M objects."""
        self.service.check_count(len(items) + extra)
        return [(convert or _item)(i) for i in items]

    # ------------------------------------------------------------------ embedding

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        items = self._run(context, self._items, request.items)
        result = self._run(context, self.service.embed, items, model=request.model, call=self._call(context))
        return self._embed_response(result)

    def EmbedStream(self, request_iterator: Iterator[pb.EmbedRequest],
                    context: grpc.ServicerContext) -> Iterator[pb.EmbedResponse]:
        call = self._call(context)
        self._run(context, self.service.list_models, call)  # UNAVAILABLE or refused before reading, like a unary call
        # A reader thread submits requests while earlier ones are still in the batcher (pipelining); the
        # bounded queue between them is the stream's window, and a full window stops reading: flow control.
        window: queue.Queue = queue.Queue(maxsize=STREAM_WINDOW)
        waiting: list[float | None] = [time.monotonic()]  # since when the reader waits for the caller, or None
        threading.Thread(target=self._read_stream, args=(request_iterator, context, call, window, waiting),
                         name="embedder-stream-reader", daemon=True).start()
        idle = self.service.config.stream_idle_seconds
        while True:
            try:
                entry = window.get(timeout=IDLE_POLL)
            except queue.Empty:
                # idle: nothing left to answer and no request for `idle` seconds (a reader waiting for queue
                # room is busy, not idle)
                since = waiting[0]
                if since is not None and time.monotonic() - since >= idle:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"no request on this stream for {idle:g}s, the server's limit for idle streams; "
                                  "open a stream when there is work (or raise --stream-idle-seconds / "
                                  "EMBEDDER_STREAM_IDLE_SECONDS)")
                continue
            if entry is _END:
                return
            if isinstance(entry, BaseException):
                context.abort(*status_of(entry))
            yield self._embed_response(self._run(context, self.service.finish, entry, call))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        """The loaded models, the default first (others load on first use)."""
        infos = self._run(context, self.service.list_models, self._call(context))
        models = [pb.ModelInfo(name=i["name"], model_id=i["model_id"], dim=i["dim"], device=i["device"],
                               runtime=i["runtime"], precision=i["precision"], input_size=i["input_size"],
                               normalize=i["normalize"], text=i.get("text", False)) for i in infos]
        return pb.ListModelsResponse(models=models, limits=pb.ServerLimits(**self.service.limits()))

    # ------------------------------------------------------------------ store

    def Add(self, request: pb.AddRequest, context: grpc.ServicerContext) -> pb.AddResponse:
        items = self._run(context, self._items, request.items,
                          partial(_add_item, max_bytes=self.service.config.max_metadata_bytes))
        out = self._run(context, self.service.add, request.collection, items, model=request.model,
                        index=request.index, call=self._call(context))
        return pb.AddResponse(results=[_result(o, out.model, with_vector=False) for o in out.outcomes],
                              added=out.added, replaced=out.replaced, collection=request.collection)

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        if request.whole_collection:
            if request.ids:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "whole_collection deletes every item; leave `ids` empty with it")
            return pb.DeleteResponse(deleted=self._run(context, self.service.delete_collection, request.collection,
                                                       call=self._call(context)))
        result = self._run(context, self.service.delete, request.collection, list(request.ids),
                           call=self._call(context))
        return pb.DeleteResponse(deleted=result.deleted, missing=result.missing)

    def SetLabels(self, request: pb.SetLabelsRequest, context: grpc.ServicerContext) -> pb.SetLabelsResponse:
        updated = self._run(context, self.service.set_labels, request.collection, dict(request.labels),
                            list(request.clear), call=self._call(context))
        return pb.SetLabelsResponse(updated=updated)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        found = self._run(context, self.service.get, request.collection, list(request.ids),
                          vectors=not request.omit_vectors, call=self._call(context))
        return pb.GetResponse(items=[stored_to_pb(s, with_vector=not request.omit_vectors) for s in found if s],
                              missing=[i for i, s in zip(request.ids, found) if s is None])

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        kind = request.WhichOneof("query")
        query: dict[str, Any] = {}
        if kind == "item":
            query["item"] = _item(request.item)
        elif kind == "item_id":
            query["item_id"] = request.item_id
        elif kind == "vector":
            query["vector"] = self._run(context, bytes_vector, request.vector, "the query vector")
        found = self._run(context, self.service.search, collection=request.collection or None, model=request.model,
                          k=request.k or DEFAULT_K, ef_search=request.ef_search or None,
                          label=request.label if request.HasField("label") else None, where=request.where,
                          call=self._call(context), **query)
        return pb.SearchResponse(hits=[hit_to_pb(h) for h in found.hits], model_id=found.model_id,
                                 cached=found.cached)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        stats, heads = self._run(context, self.service.stats, self._call(context))
        return stats_to_pb(stats, heads=heads)

    def ListItems(self, request: pb.ListItemsRequest, context: grpc.ServicerContext) -> pb.ListItemsResponse:
        page = self._run(context, self.service.list_items, request.collection, offset=request.offset,
                         limit=request.limit, label=request.label if request.HasField("label") else None,
                         unlabelled=request.unlabelled, where=request.where, call=self._call(context))
        return pb.ListItemsResponse(items=[pb.ListedItem(item=stored_to_pb(s, with_vector=False), image_kept=kept)
                                           for s, kept in zip(page.items, page.kept)],
                                    total=page.total, offset=page.offset)

    def GetImage(self, request: pb.GetImageRequest, context: grpc.ServicerContext) -> pb.GetImageResponse:
        return pb.GetImageResponse(image=self._run(context, self.service.item_image, request.collection, request.id,
                                                   size=request.size, call=self._call(context)))

    def CreateCollection(self, request: pb.CreateCollectionRequest,
                         context: grpc.ServicerContext) -> pb.CollectionStats:
        return collection_to_pb(self._run(context, self.service.create_collection, request.collection,
                                          model=request.model, index=request.index, call=self._call(context)))

    # ------------------------------------------------------------------ heads

    def Train(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> pb.TrainResponse:
        params = self._run(context, parse_json_object, request.params_json, "params_json")
        result = self._run(context, self.service.train, request.collection, head=request.head,
                           labels=list(request.labels), ids=list(request.ids), params=params,
                           test_size=request.test_size, seed=request.seed, head_id=request.head_id,
                           adapt_to=request.adapt_to, adapt_method=request.adapt_method, where=request.where,
                           class_prompts={label: list(p.prompts) for label, p in request.class_prompts.items()},
                           model=request.model, call=self._call(context))
        return pb.TrainResponse(head=head_to_pb(result.info), samples=result.samples,
                                train_seconds=result.train_seconds, total_seconds=result.total_seconds)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        result = self._run(context, self.service.predict, list(request.head_ids) or [request.head_id],
                           items=self._run(context, self._items, request.items, extra=len(request.ids)),
                           ids=list(request.ids),
                           collection=request.collection, top_k=request.top_k or 1, call=self._call(context))
        predictions = []
        for row in result.rows:
            p = pb.Prediction(id=row.id, cached=row.cached)
            _status(p, row.error)
            for h, top in (row.tops or {}).items():
                scores = [pb.LabelScore(label=lab, probability=prob) for lab, prob in top]
                if request.head_ids:
                    p.heads.add(head_id=h, top=scores)
                else:
                    p.top.extend(scores)
            predictions.append(p)
        return pb.PredictResponse(predictions=predictions, head_id=result.head_ids[0], model_id=result.model_id)

    def LearningCurve(self, request: pb.LearningCurveRequest,
                      context: grpc.ServicerContext) -> pb.LearningCurveResponse:
        params = self._run(context, parse_json_object, request.params_json, "params_json")
        points = self._run(context, self.service.learning_curve, request.collection, head=request.head,
                           labels=list(request.labels), params=params, per_class=list(request.per_class),
                           repeats=request.repeats, test_size=request.test_size, seed=request.seed,
                           call=self._call(context))
        return pb.LearningCurveResponse(points=[pb.CurvePoint(**asdict(p)) for p in points])

    def Suggest(self, request: pb.SuggestRequest, context: grpc.ServicerContext) -> pb.SuggestResponse:
        result = self._run(context, self.service.suggest, request.collection, n=request.n,
                           strategy=request.strategy, head_id=request.head_id, ids=list(request.ids),
                           seed=request.seed, where=request.where, call=self._call(context))
        return pb.SuggestResponse(suggestions=[pb.Suggestion(**asdict(s)) for s in result.suggestions],
                                  strategy=result.strategy, candidates=result.candidates, labelled=result.labelled)

    def LabelIssues(self, request: pb.LabelIssuesRequest, context: grpc.ServicerContext) -> pb.LabelIssuesResponse:
        result = self._run(context, self.service.label_issues, request.collection, limit=request.limit,
                           labels=list(request.labels), folds=request.folds, near_duplicate=request.near_duplicate,
                           seed=request.seed, where=request.where, call=self._call(context))
        return pb.LabelIssuesResponse(issues=[pb.LabelIssue(**asdict(i)) for i in result.issues],
                                      duplicates=[pb.LabelIssue(**asdict(d)) for d in result.duplicates],
                                      checked=result.checked, folds=result.folds, noise_rate=result.noise_rate,
                                      thresholds=result.thresholds)

    def ListHeads(self, request: pb.ListHeadsRequest, context: grpc.ServicerContext) -> pb.ListHeadsResponse:
        heads = self._run(context, self.service.list_heads, self._call(context))
        return pb.ListHeadsResponse(heads=[head_to_pb(h) for h in heads])

    def DeleteHead(self, request: pb.DeleteHeadRequest, context: grpc.ServicerContext) -> pb.DeleteHeadResponse:
        self._run(context, self.service.delete_head, request.head_id, call=self._call(context))
        return pb.DeleteHeadResponse()

    # ------------------------------------------------------------------ jobs

    def FineTune(self, request: pb.FineTuneRequest, context: grpc.ServicerContext) -> pb.Job:
        params = self._run(context, parse_json_object, request.params_json, "params_json")
        return job_to_pb(self._run(context, self.service.finetune, request.collection, request.suffix,
                                   method=request.method, unfreeze=request.unfreeze, epochs=request.epochs,
                                   params=params, labels=list(request.labels), ids=list(request.ids),
                                   call=self._call(context)))

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return job_to_pb(self._run(context, self.service.get_job, request.job_id, call=self._call(context)))

    def CancelJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return job_to_pb(self._run(context, self.service.cancel_job, request.job_id, call=self._call(context)))

    # ------------------------------------------------------------------ cache

    def Forget(self, request: pb.ForgetRequest, context: grpc.ServicerContext) -> pb.ForgetResponse:
        forgotten = self._run(context, self.service.forget, list(request.sha256s), call=self._call(context))
        return pb.ForgetResponse(forgotten=forgotten)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _embed_response(result: Any) -> pb.EmbedResponse:
        model = result.model
        return pb.EmbedResponse(results=[_result(o, model) for o in result.outcomes], model_id=model.model_id,
                                dim=model.dim)

    def _read_stream(self, request_iterator: Iterator[pb.EmbedRequest], context: grpc.ServicerContext,
                     call: Call, window: queue.Queue, waiting: list[float | None]) -> None:
        """Stream reader thread: submit each request in order, then hand it to the writer; ``waiting[0]`` says
        since when it waits for the caller's next request (None while it works on one)."""
        try:
            for request in request_iterator:
                waiting[0] = None
                # Streams wait for queue room instead of failing: a bulk job should slow down, not die.
                pending: Pending | BaseException
                try:
                    pending = self.service.start_embed(self._items(request.items), model=request.model, call=call,
                                                       block=True)
                except Exception as e:
                    if category_of(e) is Category.DEADLINE:
                        return  # the caller went away while we waited for room
                    pending = e
                if not self._put(window, pending, context) or isinstance(pending, BaseException):
                    return
                waiting[0] = time.monotonic()
        except grpc.RpcError:
            pass  # the client cancelled or the call ended; nothing to answer
        except Exception as e:  # never let a reader bug hang the writer
            self._put(window, e, context)
        finally:
            self._put(window, _END, context)

    @staticmethod
    def _put(window: queue.Queue, entry: Any, context: grpc.ServicerContext) -> bool:
        """Put into the window, waiting while it is full, unless the call ends meanwhile."""
        while True:
            try:
                window.put(entry, timeout=0.1)
                return True
            except queue.Full:
                if not context.is_active():
                    if isinstance(entry, Pending) and entry.on_done is not None:
                        entry.on_done()  # never finished: give its model lease back
                    return False
