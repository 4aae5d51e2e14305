"""Handlers of the ``embedder.v1.Embedder`` RPCs: embedding, the vector store, classifier heads.

Every image goes through one path, :meth:`EmbedderServicer._submit` + :meth:`EmbedderServicer._wait`:
encoded images are looked up in the store's cache by the sha256 of their bytes (a hit is neither decoded nor
run through the model), misses go to the batcher, and their vectors are cached when they come back.
Embed, Add, Search and Predict all use it, so an image is embedded at most once, whichever RPC brings it.

Errors are mapped once, in :func:`_status_for`: unknown collection/item/head -> NOT_FOUND; another model's or
dim's vectors, too few classes or examples -> FAILED_PRECONDITION; bad arguments -> INVALID_ARGUMENT.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np

from classifier import HeadFormatError, HeadNotFoundError, HeadRegistry, InsufficientDataError

from ._proto import embedder_pb2 as pb
from ._proto import embedder_pb2_grpc as pb_grpc
from .batcher import Batcher
from .config import Config
from .backbones import get_backbone
from .errors import (BatcherClosedError, BatchFailedError, CollectionMismatchError, DroppedError, EmbedderError,
                     ItemError, NotFoundError, QueueFullError, StoreClosedError, TooManyModelsError,
                     UnknownModelError, WeightsNotFoundError)
from .errors import ModelMismatchError as HeadModelMismatchError
from .finetune import (ADABN_MIN_IMAGES, FineTuneConfig, TooFewLabelsError, adabn, check_labels, check_suffix,
                       finetune)
from .jobs import JobRunner
from .messages import (bytes_vector, collection_to_pb, head_to_pb, hit_to_pb, job_to_pb, parse_json_object,
                       stats_to_pb, stored_to_pb, tensor_array, vector_bytes)
from .metrics import Metrics
from .inputs import content_hash
from .store import Store

log = logging.getLogger(__name__)

STREAM_WINDOW = 4  # requests of one stream in the batcher at once: pipelining without hogging the queue
DEFAULT_K = 10
_OK = grpc.StatusCode.OK.value[0]


def _code(status: grpc.StatusCode) -> int:
    return status.value[0]


def _time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the call's deadline, or None without one (grpc reports "no deadline" as ~forever)."""
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(0.0, left)


class _ItemNotFound(EmbedderError):
    """An item the server does not hold: a content_sha256 not in the cache, a stored id not in the collection."""


def _item_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ItemError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, _ItemNotFound):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, DroppedError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    if isinstance(error, BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, BatchFailedError):
        return grpc.StatusCode.INTERNAL, str(error)
    log.error("unexpected per-item error: %r", error)
    return grpc.StatusCode.INTERNAL, f"server fault, not your input ({type(error).__name__}); retry"


MAX_DETAILS = 2000  # characters of an error message: gRPC trailers are limited (16 KiB by default)


def _clip(message: str) -> str:
    return message if len(message) <= MAX_DETAILS else message[:MAX_DETAILS - 20] + " ... (shortened)"


def _status_for(error: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status of a store/classifier error, or None for errors that are not the caller's."""
    if isinstance(error, (NotFoundError, HeadNotFoundError)):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, UnknownModelError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, TooManyModelsError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, (CollectionMismatchError, HeadModelMismatchError, InsufficientDataError, TooFewLabelsError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, HeadFormatError):
        return grpc.StatusCode.DATA_LOSS, f"{error}"
    if isinstance(error, StoreClosedError):
        return grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry another instance"
    if isinstance(error, ValueError):  # HeadError and the store's argument checks are ValueErrors
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return None


@dataclass
class _Slot:
    """One requested image: a cache hit, a future in the batcher, or an error."""

    item_id: str
    sha256: str = ""
    vector: np.ndarray | None = None
    future: Future | None = None
    error: BaseException | None = None
    cached: bool = False


@dataclass
class LoadedModel:
    """One backbone the server embeds with: its pipeline, its batcher and its info."""

    embedder: Any
    batcher: Batcher
    info: dict[str, Any]

    @property
    def model_id(self) -> str:
        return self.info["model_id"]

    @property
    def dim(self) -> int:
        return self.info["dim"]

    @property
    def name(self) -> str:
        return self.info["name"]


class _Pending:
    """A request's images on their way: :meth:`EmbedderServicer._wait` turns it into finished slots."""

    def __init__(self, slots: list[_Slot], model: LoadedModel) -> None:
        self.slots = slots
        self.model = model

    def futures(self) -> list[Future]:
        return [s.future for s in self.slots if s.future is not None]


class _Abort:
    """A stream reader's request to end the stream with a status (the reader thread cannot abort)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


_END = object()


class EmbedderServicer(pb_grpc.EmbedderServicer):
    """Handlers for ``embedder.v1.Embedder``. Answers UNAVAILABLE until :meth:`attach` is called."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._default: LoadedModel | None = None
        self._models: dict[str, LoadedModel] = {}  # by model id; the default first
        self._loader: Callable[[str], LoadedModel] | None = None
        self._load_lock = threading.Lock()
        self._store: Store | None = None
        self._heads: HeadRegistry | None = None
        self._jobs: JobRunner | None = None
        self.shutting_down = False

    def attach(self, default: LoadedModel, store: Store, heads: HeadRegistry, jobs: JobRunner,
               loader: Callable[[str], LoadedModel]) -> None:
        """Start answering: ``default`` embeds requests that name no model; ``loader`` loads any other one."""
        self.metrics.set_model(default.info)
        self._store, self._heads, self._jobs, self._loader = store, heads, jobs, loader
        self._models[default.model_id] = default
        self._default = default

    @property
    def model_id(self) -> str:
        """The default model's id."""
        return self._default.model_id

    @property
    def dim(self) -> int:
        return self._default.dim

    @property
    def models(self) -> list[LoadedModel]:
        return list(self._models.values())

    # ------------------------------------------------------------------ embedding

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        self._ready(context)
        self._check_items(len(request.items), context)
        with self._errors(context):
            model = self._model(request.model)
        pending = self._submit_or_abort(request.items, context, model)
        return self._embed_response(self._wait(pending, context))

    def EmbedStream(self, request_iterator: Iterator[pb.EmbedRequest],
                    context: grpc.ServicerContext) -> Iterator[pb.EmbedResponse]:
        self._ready(context)
        # A reader thread submits requests while earlier ones are still in the batcher (pipelining); the
        # bounded queue between them is the stream's window, and a full window stops reading: flow control.
        window: queue.Queue = queue.Queue(maxsize=STREAM_WINDOW)
        threading.Thread(target=self._read_stream, args=(request_iterator, context, window),
                         name="embedder-stream-reader", daemon=True).start()
        while True:
            entry = window.get()
            if entry is _END:
                return
            if isinstance(entry, _Abort):
                context.abort(entry.code, entry.message)
            yield self._embed_response(self._wait(entry, context))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        """The loaded models, the default first (others load on first use)."""
        self._ready(context)
        models = [pb.ModelInfo(name=i["name"], model_id=i["model_id"], dim=i["dim"], device=i["device"],
                               runtime=i["runtime"], precision=i["precision"], input_size=i["input_size"],
                               normalize=i["normalize"]) for i in (m.info for m in self.models)]
        limits = pb.ServerLimits(max_message_bytes=self.config.max_message_bytes, max_items=self.config.max_items,
                                 max_pixels=getattr(self._default.embedder.config, "max_pixels", self.config.max_pixels))
        return pb.ListModelsResponse(models=models, limits=limits)

    # ------------------------------------------------------------------ store

    def Add(self, request: pb.AddRequest, context: grpc.ServicerContext) -> pb.AddResponse:
        self._stateful(context)
        self._check_items(len(request.items), context)
        store = self._store
        with self._errors(context):
            model = self._collection_model(request.collection, request.model)
            ids = [a.item.id for a in request.items]
            if not request.collection:
                raise ValueError("`collection` is empty; name the collection to add to")
            missing_id = next((i for i, x in enumerate(ids) if not x), None)
            if missing_id is not None:
                raise ValueError(f"item {missing_id} has no id; every item added to a collection needs an "
                                 "id (Item.id), unique within the collection")
            if len(set(ids)) != len(ids):
                dup = next(i for i in ids if ids.count(i) > 1)
                raise ValueError(f"item id {dup!r} appears more than once in one request; pass each id once")
            if request.index:
                store.create_collection(request.collection, model_id=model.model_id, dim=model.dim,
                                        index=request.index)
            metadata: list[dict | None] = []
            bad_meta: dict[int, str] = {}
            for i, a in enumerate(request.items):
                try:
                    metadata.append(parse_json_object(a.metadata_json, f"metadata_json of item {a.item.id!r}"))
                except ValueError as e:
                    metadata.append(None)
                    bad_meta[i] = str(e)
            pending = self._submit_or_abort([a.item for a in request.items], context, model, skip=bad_meta)
            slots = self._wait(pending, context).slots
            for i, message in bad_meta.items():
                slots[i].error = ItemError(message)
            good = [i for i, s in enumerate(slots) if s.error is None]
            added = replaced = 0
            if good:
                result = store.add(request.collection, [ids[i] for i in good],
                                   np.stack([slots[i].vector for i in good]), model_id=model.model_id,
                                   sha256s=[slots[i].sha256 or None for i in good],
                                   labels=[request.items[i].label if request.items[i].HasField("label") else None
                                           for i in good],
                                   metadata=[metadata[i] for i in good],
                                   images=[self._kept_image(request.items[i].item) for i in good])
                added, replaced = result.added, result.replaced
        return pb.AddResponse(results=[self._result(s, model, with_vector=False) for s in slots], added=added,
                              replaced=replaced, collection=request.collection)

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        self._stateful(context)
        with self._errors(context):
            if request.whole_collection:
                if request.ids:
                    raise ValueError("whole_collection deletes every item; leave `ids` empty with it")
                count = self._store.collection(request.collection).count
                self._store.delete_collection(request.collection)
                return pb.DeleteResponse(deleted=count)
            result = self._store.delete(request.collection, list(request.ids))
        return pb.DeleteResponse(deleted=result.deleted, missing=result.missing)

    def SetLabels(self, request: pb.SetLabelsRequest, context: grpc.ServicerContext) -> pb.SetLabelsResponse:
        self._stateful(context)
        with self._errors(context):
            both = sorted(set(request.labels) & set(request.clear))
            if both:
                raise ValueError(f"item(s) {', '.join(map(repr, both[:5]))} are both labelled and cleared; "
                                 "name each item once")
            changes: dict[str, str | None] = {**dict(request.labels), **{i: None for i in request.clear}}
            updated = self._store.set_labels(request.collection, changes)
        return pb.SetLabelsResponse(updated=updated)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        self._stateful(context)
        self._check_items(len(request.ids), context)
        with self._errors(context):
            found = self._store.get(request.collection, list(request.ids))
        return pb.GetResponse(items=[stored_to_pb(s, with_vector=not request.omit_vectors) for s in found if s],
                              missing=[i for i, s in zip(request.ids, found) if s is None])

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        self._stateful(context)
        kind = request.WhichOneof("query")
        cached = False
        model_id = ""
        with self._errors(context):
            k = request.k or DEFAULT_K
            label = request.label if request.HasField("label") else None
            ef = request.ef_search or None
            collection = request.collection or None
            if kind == "item_id":
                if collection is None:
                    raise ValueError("a query by item_id needs `collection`, the collection that holds the item")
                hits = self._store.search_by_id(collection, request.item_id, k=k, label=label, ef_search=ef)
                model_id = self._store.collection(collection).model_id
            else:
                model = (self._collection_model(collection, request.model) if collection is not None
                         else self._model(request.model))
                model_id = model.model_id
                if kind == "vector":
                    query = bytes_vector(request.vector, "the query vector")
                elif kind == "item":
                    slot = self._wait(self._submit_or_abort([request.item], context, model), context).slots[0]
                    if slot.error is not None:
                        code, message = _item_status(slot.error)
                        context.abort(code, f"the query image: {message}")
                    query, cached = slot.vector, slot.cached
                else:
                    raise ValueError("the query is empty; set one of `item` (an image), `item_id` or `vector`")
                hits = self._store.search(collection, query[None], k=k, label=label, model_id=model_id,
                                          ef_search=ef)[0]
        return pb.SearchResponse(hits=[hit_to_pb(h) for h in hits], model_id=model_id, cached=cached)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        self._stateful(context)
        return stats_to_pb(self._store.stats(), heads=len(self._heads.list()))

    # ------------------------------------------------------------------ heads

    def Train(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> pb.TrainResponse:
        self._stateful(context)
        with self._errors(context):
            params = parse_json_object(request.params_json, "params_json")
            ids, X, y = self._store.labelled(request.collection, labels=list(request.labels) or None,
                                             ids=list(request.ids) or None)
            if not ids:
                which = f" with label(s) {', '.join(map(repr, request.labels))}" if request.labels else ""
                raise InsufficientDataError(
                    f"collection {request.collection!r} has no labelled items{which}; add items with labels "
                    "(Add with AddItem.label, or SetLabels) and train again")
            info = self._store.collection(request.collection)
            source = {"collection": request.collection, "labels": list(request.labels), "ids": len(request.ids)}
            target = None
            if request.adapt_to:
                target_info = self._store.collection(request.adapt_to)
                if target_info.model_id != info.model_id:
                    raise CollectionMismatchError(
                        f"adapt_to collection {request.adapt_to!r} holds vectors of model {target_info.model_id}, "
                        f"but {request.collection!r} holds {info.model_id}; adapt between collections of one model")
                _, target = self._store.vectors(request.adapt_to)
                source["adapt_to"] = request.adapt_to
            result = self._heads.train(X, y, model_id=info.model_id, kind=request.head or "logreg", params=params,
                                       test_size=request.test_size or 0.2, seed=request.seed,
                                       head_id=request.head_id or None, source=source, adapt_to=target,
                                       adapt_method=request.adapt_method or "coral")
        return pb.TrainResponse(head=head_to_pb(result.info), samples=result.samples,
                                train_seconds=result.train_seconds, total_seconds=result.total_seconds)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        self._stateful(context)
        self._check_items(len(request.items) + len(request.ids), context)
        with self._errors(context):
            head_ids = list(request.head_ids) or [request.head_id]
            if len(set(head_ids)) != len(head_ids):
                raise ValueError("a head id appears more than once in head_ids; name each head once")
            heads = [self._heads.get(h) for h in head_ids]  # NOT_FOUND before any embedding
            model_id = heads[0].model_id_
            other = next((h for h, head in zip(head_ids, heads) if head.model_id_ != model_id), None)
            if other is not None:
                raise HeadModelMismatchError(
                    f"heads {head_ids[0]!r} and {other!r} take vectors of different models; one Predict embeds "
                    "once, so ask for heads of one backbone together", expected_model_id=model_id,
                    other_model_id=self._heads.get(other).model_id_)
            if request.ids and not request.collection:
                raise ValueError("predicting stored items needs `collection`, the collection that holds the ids")
            slots: list[_Slot] = []
            if request.items:
                model = self._model_for(model_id, f"head {head_ids[0]!r}")
                slots = self._wait(self._submit_or_abort(request.items, context, model), context).slots
            if request.ids:
                stored_model = self._store.collection(request.collection).model_id
                if stored_model != model_id:
                    raise HeadModelMismatchError(
                        f"collection {request.collection!r} holds vectors of model {stored_model}, but head "
                        f"{head_ids[0]!r} takes vectors of model {model_id}",
                        expected_model_id=model_id, other_model_id=stored_model)
                for item_id, stored in zip(request.ids, self._store.get(request.collection, list(request.ids))):
                    slot = _Slot(item_id, cached=True)
                    if stored is None:
                        slot.error = _ItemNotFound(f"no item {item_id!r} in collection {request.collection!r}")
                    else:
                        slot.vector = stored.vector
                    slots.append(slot)
            good = [s for s in slots if s.error is None]
            # one embedding (or cache hit) per item, every head applied to it
            tops = [self._heads.predict(h, np.stack([s.vector for s in good]), model_id=model_id,
                                        top_k=request.top_k or 1) for h in head_ids] if good else []
        predictions, row = [], 0
        for s in slots:
            p = pb.Prediction(id=s.item_id, cached=s.cached)
            if s.error is None:
                p.status.code = _OK
                for h, top in zip(head_ids, tops):
                    scores = [pb.LabelScore(label=str(lab), probability=float(prob))
                              for lab, prob in zip(top.labels[row], top.probabilities[row])]
                    if request.head_ids:
                        p.heads.add(head_id=h, top=scores)
                    else:
                        p.top.extend(scores)
                row += 1
            else:
                code, message = _item_status(s.error)
                p.status.code, p.status.message = _code(code), message
            predictions.append(p)
        return pb.PredictResponse(predictions=predictions, head_id=head_ids[0], model_id=model_id)

    def LearningCurve(self, request: pb.LearningCurveRequest,
                      context: grpc.ServicerContext) -> pb.LearningCurveResponse:
        self._stateful(context)
        with self._errors(context):
            params = parse_json_object(request.params_json, "params_json")
            _, X, y = self._store.labelled(request.collection, labels=list(request.labels) or None)
            points = self._heads.learning_curve(X, y, kind=request.head or "logreg", params=params,
                                                per_class=list(request.per_class) or None,
                                                repeats=request.repeats or 5, test_size=request.test_size or 0.2,
                                                seed=request.seed)
        return pb.LearningCurveResponse(points=[pb.CurvePoint(**asdict(p)) for p in points])

    def ListHeads(self, request: pb.ListHeadsRequest, context: grpc.ServicerContext) -> pb.ListHeadsResponse:
        self._stateful(context)
        return pb.ListHeadsResponse(heads=[head_to_pb(h) for h in self._heads.list()])

    def DeleteHead(self, request: pb.DeleteHeadRequest, context: grpc.ServicerContext) -> pb.DeleteHeadResponse:
        self._stateful(context)
        with self._errors(context):
            self._heads.delete(request.head_id)
        return pb.DeleteHeadResponse()

    # ------------------------------------------------------------------ jobs

    def FineTune(self, request: pb.FineTuneRequest, context: grpc.ServicerContext) -> pb.Job:
        self._stateful(context)
        if request.method == "adabn":
            return self._adabn(request, context)
        with self._errors(context):
            if request.method not in ("", "finetune"):
                raise ValueError(f"method must be 'finetune' or 'adabn', got {request.method[:50]!r}")
            params = parse_json_object(request.params_json, "params_json")
            config = FineTuneConfig.from_params({**params, "unfreeze": request.unfreeze or 1,
                                                 "epochs": request.epochs or 10})
            parent = get_backbone(self._store.collection(request.collection).model_id)
            check_suffix(request.suffix, parent, self.config.data_dir)
            ids, _, labels = self._store.labelled(request.collection, labels=list(request.labels) or None,
                                                  ids=list(request.ids) or None)
            images = self._store.images(request.collection, ids)
            missing = [i for i, img in zip(ids, images) if img is None]
            if missing:
                raise InsufficientDataError(
                    f"{len(missing)} of {len(ids)} labelled items have no kept image (added as tensors, by hash, or "
                    f"by a server run with --no-keep-images), e.g. {missing[0][:100]!r}; add them again as image "
                    "bytes, or leave them out with `ids`/`labels`")
            check_labels(labels)
            job_params = {"collection": request.collection, "suffix": request.suffix, "parent": parent.model_id,
                          "images": len(ids), "config": asdict(config)}
            job = self._jobs.submit("finetune", job_params, self._finetune_work(parent, images, labels, request.suffix,
                                                                                 config))
        return job_to_pb(job)

    def _adabn(self, request: pb.FineTuneRequest, context: grpc.ServicerContext) -> pb.Job:
        with self._errors(context):
            parent = get_backbone(self._store.collection(request.collection).model_id)
            check_suffix(request.suffix, parent, self.config.data_dir)
            ids, _ = self._store.vectors(request.collection)
            images = [img for img in self._store.images(request.collection, ids) if img is not None]
            if len(images) < ADABN_MIN_IMAGES:
                raise TooFewLabelsError(f"collection {request.collection!r} has {len(images)} kept images; AdaBN needs "
                                        f"at least {ADABN_MIN_IMAGES} images of the target domain (added as image bytes)")
            data_dir, suffix = self.config.data_dir, request.suffix

            def work(job: Any, cancel: threading.Event, report: Any) -> dict[str, Any]:
                result = adabn(images, data_dir=data_dir, suffix=suffix, model=parent.model_id, cancel=cancel)
                return {"name": result.spec.name, "model_id": result.spec.model_id, "parent": parent.model_id,
                        "images": result.images, "seconds": result.seconds,
                        "use": f"model={result.spec.name!r} in Embed/Add/Search (loaded on first use)"}

            job = self._jobs.submit("adabn", {"collection": request.collection, "suffix": suffix,
                                              "parent": parent.model_id, "images": len(images)}, work)
        return job_to_pb(job)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        self._stateful(context)
        with self._errors(context):
            return job_to_pb(self._jobs.get(request.job_id))

    def CancelJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        self._stateful(context)
        with self._errors(context):
            return job_to_pb(self._jobs.cancel(request.job_id))

    def _finetune_work(self, parent: Any, images: list[bytes], labels: list[str], suffix: str,
                       config: FineTuneConfig) -> Any:
        data_dir = self.config.data_dir

        def work(job: Any, cancel: threading.Event, report: Any) -> dict[str, Any]:
            result = finetune(images, labels, data_dir=data_dir, suffix=suffix, model=parent.model_id, config=config,
                              cancel=cancel,
                              on_epoch=lambda epoch, stats: report({**stats, "epochs": config.epochs}))
            return {"name": result.spec.name, "model_id": result.spec.model_id, "parent": parent.model_id,
                    "classes": result.classes, "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
                    "trunk_passes": result.trunk_passes, "trunk_seconds": result.trunk_seconds,
                    "train_seconds": result.train_seconds, "history": result.history,
                    "use": f"model={result.spec.name!r} in Embed/Add/Search (loaded on first use)"}

        return work

    # ------------------------------------------------------------------ helpers

    def _stateful(self, context: grpc.ServicerContext) -> None:
        """Store, head and job RPCs: not on a stateless embedding replica."""
        self._ready(context)
        if self._store is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          "this server is an embedding replica (--role embed): it only embeds; send store, head "
                          "and job calls to the store node (--role store or all)")

    def _ready(self, context: grpc.ServicerContext) -> None:
        default = self._default
        if self.shutting_down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry another instance")
        if default is None:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the model is still loading and warming up; retry shortly (health turns SERVING when ready)")
        if not default.batcher.alive:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the embedding worker is not running; the server must be restarted")

    def _model(self, name: str) -> LoadedModel:
        """The model ``name`` (a backbone name or model id; empty: the default), loaded on first use."""
        if not name:
            return self._default
        found = next((m for m in self.models if name in (m.name, m.model_id)), None)
        if found is not None:
            return found
        with self._load_lock:  # one load at a time; a second caller of the same model waits for the first
            found = next((m for m in self.models if name in (m.name, m.model_id)), None)
            if found is not None:
                return found
            if len(self._models) >= self.config.max_models:
                raise TooManyModelsError(
                    f"this server already holds {len(self._models)} models ({', '.join(m.name for m in self.models)}), "
                    "its limit (max_models); raise --max-models / EMBEDDER_MAX_MODELS, or ask another server")
            model = self._loader(name)  # UnknownModelError names the models there are
            self._models[model.model_id] = model
            self.metrics.set_model(model.info)
            log.info("loaded model %s on first use", model.model_id)
            return model

    def _model_for(self, model_id: str, what: str) -> LoadedModel:
        """The model a collection or head is bound to; one this server cannot load is FAILED_PRECONDITION."""
        try:
            return self._model(model_id)
        except (UnknownModelError, WeightsNotFoundError) as e:
            raise CollectionMismatchError(f"{what} holds vectors of model {model_id}, which this server cannot load "
                                          f"({e})") from None

    def _collection_model(self, collection: str, requested: str) -> LoadedModel:
        """An existing collection's model; for a new one the requested model (or the default)."""
        try:
            model_id = self._store.collection(collection).model_id
        except NotFoundError:
            return self._model(requested)
        return self._model_for(model_id, f"collection {collection!r}")

    @contextmanager
    def _errors(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Abort with the status that fits a store/classifier error; other exceptions propagate."""
        try:
            yield
        except (EmbedderError, ValueError, KeyError) as e:
            status = _status_for(e)
            if status is None:
                log.exception("store or classifier failure")
                context.abort(grpc.StatusCode.INTERNAL, _clip(f"server fault, not your input ({type(e).__name__}: {e})"))
            context.abort(status[0], _clip(status[1]))

    def _check_items(self, n: int, context: grpc.ServicerContext) -> None:
        error = self._count_error(n)
        if error is not None:
            context.abort(error.code, error.message)

    def _count_error(self, n: int) -> _Abort | None:
        limit = self.config.max_items
        if n > limit:
            return _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request has {n} items, above the server's limit of {limit} per request (max_items); "
                          "send fewer per request (EmbedderClient splits for you) or raise the limit on the server "
                          "with --max-items / EMBEDDER_MAX_ITEMS")
        return None

    def _submit_or_abort(self, items: Sequence[pb.Item], context: grpc.ServicerContext, model: LoadedModel,
                         *, skip: Any = ()) -> _Pending:
        try:
            return self._submit(items, context, model, block=False, skip=skip)
        except QueueFullError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (BatcherClosedError, StoreClosedError):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry another instance")

    def _submit(self, items: Sequence[pb.Item], context: grpc.ServicerContext, model: LoadedModel,
                *, block: bool, skip: Any = ()) -> _Pending:
        """Serve cache hits, queue the misses in the batcher; malformed items get their error without queueing.

        Items whose index is in ``skip`` are left out (their caller has already failed them).
        """
        slots = [_Slot(item.id) for item in items]
        lookups: dict[int, str] = {}
        inputs: dict[int, Any] = {}
        for i, (item, slot) in enumerate(zip(items, slots)):
            if i in skip:
                continue
            try:
                kind = item.WhichOneof("input")
                if kind == "image":
                    slot.sha256 = lookups[i] = content_hash(item.image)
                    inputs[i] = item.image
                elif kind == "content_sha256":
                    sha = item.content_sha256.lower()
                    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
                        raise ItemError(f"content_sha256 must be 64 hex digits (sha256 of the image bytes), "
                                        f"got {item.content_sha256!r}")
                    slot.sha256 = lookups[i] = sha
                elif kind == "tensor":
                    inputs[i] = tensor_array(item.tensor)
                else:
                    raise ItemError("item has neither `image` (encoded bytes), `tensor` (raw pixels) nor "
                                    "`content_sha256` (a cached image) set")
            except ItemError as e:
                slot.error = e
            except Exception as e:  # whatever a malformed item does, it fails alone
                slot.error = ItemError(f"malformed item ({type(e).__name__}: {e})")
        if lookups and self._store is None:  # an embedding replica keeps no cache
            for i in lookups:
                if i not in inputs:
                    slots[i].error = _ItemNotFound("this embedding replica keeps no cache (--role embed); send the "
                                                   "image bytes, or ask the store node")
        elif lookups:
            found = self._store.lookup(model.model_id, list(lookups.values()))
            for i, vector in zip(lookups, found):
                if vector is not None:
                    slots[i].vector, slots[i].cached = vector, True
                    inputs.pop(i, None)
                elif i not in inputs:
                    slots[i].error = _ItemNotFound(
                        f"no cached vector for content_sha256 {slots[i].sha256} under model {model.model_id}; "
                        "send the image bytes instead")
            self.metrics.cache_hits.inc(sum(v is not None for v in found))
        left = _time_left(context)
        deadline = None if left is None else time.monotonic() + left
        queued = model.batcher.submit(list(inputs.values()), deadline=deadline, is_active=context.is_active,
                                      block=block)
        for i, fut in zip(inputs, queued):
            slots[i].future = fut
        return _Pending(slots, model)

    def _wait(self, pending: _Pending, context: grpc.ServicerContext) -> _Pending:
        """Wait for the misses (within the call's deadline), cache their vectors, return the finished slots."""
        futs = pending.futures()
        _, not_done = futures.wait(futs, timeout=_time_left(context))
        if not_done:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"deadline passed with {len(not_done)} of {len(pending.slots)} items still queued or "
                          "embedding; give the call a longer timeout or send fewer items per call")
        fresh: dict[str, np.ndarray] = {}
        for slot in pending.slots:
            if slot.future is None:
                continue
            slot.error = slot.future.exception()
            if slot.error is None:
                slot.vector = np.asarray(slot.future.result(), dtype=np.float32)
                if slot.sha256:
                    fresh[slot.sha256] = slot.vector
                continue
            code, message = _item_status(slot.error)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Not the item's fault: fail the call so the client's retry/timeout logic sees it.
                context.abort(code, message)
        if fresh and self._store is not None:
            try:
                self._store.put(pending.model.model_id, list(fresh), np.stack(list(fresh.values())))
            except StoreClosedError:
                pass  # shutting down: the vectors are still good, only not cached
            except Exception:  # the vectors are good; a cache write failure must not fail the call
                log.exception("could not write %d vectors to the cache", len(fresh))
        ok = sum(s.error is None for s in pending.slots)
        self.metrics.images.labels("ok").inc(ok)
        self.metrics.images.labels("error").inc(len(pending.slots) - ok)
        return pending

    def _kept_image(self, item: pb.Item) -> bytes | None:
        """The bytes an Add keeps for later fine-tuning (``keep_images``): encoded images only."""
        return item.image if self.config.keep_images and item.WhichOneof("input") == "image" else None

    def _result(self, slot: _Slot, model: LoadedModel, *, with_vector: bool = True) -> pb.Result:
        result = pb.Result(id=slot.item_id, dim=model.dim, model_id=model.model_id, cached=slot.cached,
                           sha256=slot.sha256)
        if slot.error is None:
            result.status.code = _OK
            if with_vector:
                result.vector = vector_bytes(slot.vector)
        else:
            code, message = _item_status(slot.error)
            result.status.code, result.status.message = _code(code), message
        return result

    def _embed_response(self, pending: _Pending) -> pb.EmbedResponse:
        model = pending.model
        return pb.EmbedResponse(results=[self._result(s, model) for s in pending.slots], model_id=model.model_id,
                                dim=model.dim)

    def _read_stream(self, request_iterator: Iterator[pb.EmbedRequest], context: grpc.ServicerContext,
                     window: queue.Queue) -> None:
        """Stream reader thread: validate and submit each request in order, then hand it to the writer."""
        try:
            for request in request_iterator:
                error = self._count_error(len(request.items))
                if error is None:
                    try:
                        model = self._model(request.model)
                    except (EmbedderError, ValueError) as e:
                        code, message = _status_for(e) or (grpc.StatusCode.INTERNAL, f"server fault ({e!r})")
                        error = _Abort(code, _clip(message))
                if error is not None:
                    self._put(window, error, context)
                    return
                # Streams wait for queue room instead of failing: a bulk job should slow down, not die.
                if not self._put(window, self._submit(request.items, context, model, block=True), context):
                    return
        except (BatcherClosedError, StoreClosedError):
            self._put(window, _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry another "
                                     "instance"), context)
        except DroppedError:
            pass  # the caller went away while we waited for room
        except grpc.RpcError:
            pass  # the client cancelled or the call ended; nothing to answer
        except Exception as e:  # never let a reader bug hang the writer
            log.exception("stream reader failed")
            self._put(window, _Abort(grpc.StatusCode.INTERNAL, f"server fault reading the stream ({e!r})"), context)
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
                    return False
