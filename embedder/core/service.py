"""The service core: every call of the API as a plain Python method, under every front door.

A front door (gRPC in :mod:`embedder.servicer`, the CLI, a library caller) converts its wire format into these
arguments, passes its caller's deadline and cancellation as a :class:`~embedder.core.embedding.Call`, and
turns what comes back, or the :class:`~embedder.errors.EmbedderError` raised, into its own answer through
the one table in :mod:`embedder.errors`. Nothing in here knows a transport.

Access control is here too, one place for every door: a call's :class:`~embedder.keys.Principal` (its API key)
needs the call's role (:data:`READ`/:data:`WRITE`/:data:`ADMIN`, see :mod:`embedder.keys`) and may name only
the collections on its allow-list; a search over every collection searches only those.

Images take one path (:mod:`embedder.core.embedding`): cache hits from the store, misses through the model's
batcher, fresh vectors into the cache. Models come from the :class:`~embedder.core.models.ModelPool`.

>>> with Service.open(Config(data_dir="embedder-data")) as service:
...     outcomes = service.embed([jpeg_bytes, jpeg_bytes]).outcomes   # the repeat is embedded once
...     service.add("pets", [AddItem(Item("cat-1", image=jpeg_bytes), label="cat")])
...     service.search(collection="pets", item=Item(image=jpeg_bytes), k=5).hits
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from .. import filters
from ..config import Config
from ..errors import (EmbedderError, InvalidArgumentError, ItemError, ItemNotFoundError, ModelMismatchError,
                      NotFoundError, NotReadyError, NotSupportedByModelError, PermissionDeniedError, ReplicaOnlyError,
                      ResponseTooLargeError)
from ..jsonrule import check_json_object, dump_stored
from ..results import CollectionInfo, CurvePoint, DeleteResult, Hit, ItemPage, StoredItem, StoreStats
from .embedding import Call, Item, Outcome, Pending, finish, submit
from .models import LoadedModel, ModelPool
from .thumbnails import check_side, thumbnail

log = logging.getLogger(__name__)

DEFAULT_K = 10
DEFAULT_PAGE = 100  # items per page of a listing when the caller names no limit
READ, WRITE, ADMIN = "read", "write", "admin"
METADATA_FLAG = "--max-metadata-bytes / EMBEDDER_MAX_METADATA_BYTES"


@dataclass(frozen=True)
class AddItem:
    """An item to store: its input (with an id), and optionally a label and a metadata object."""

    item: Item
    label: str | None = None
    metadata: Mapping[str, Any] | None = None


@dataclass
class EmbedResult:
    outcomes: list[Outcome]
    model: LoadedModel


@dataclass
class AddOutcome:
    outcomes: list[Outcome]
    added: int
    replaced: int
    model: LoadedModel


@dataclass
class SearchResult:
    hits: list[Hit]
    model_id: str
    cached: bool


@dataclass
class PredictRow:
    """One item's predictions: per head, its top labels and their probabilities (empty when ``error``)."""

    id: str
    cached: bool
    error: Exception | None = None
    tops: dict[str, list[tuple[str, float]]] | None = None


@dataclass
class PredictResult:
    rows: list[PredictRow]
    head_ids: list[str]
    model_id: str


class Service:
    """Embedding, collections, heads and jobs over one model pool, store, head registry and job runner.

    ``store``, ``heads`` and ``jobs`` are None on an embedding replica (``role="embed"``): it only embeds.
    Answers :class:`NotReadyError` until :meth:`start` has loaded the default model, and after :meth:`close`.
    """

    def __init__(self, config: Config, *, store: Any = None, heads: Any = None, jobs: Any = None,
                 metrics: Any = None, on_death: Any = None) -> None:
        self.config = config
        self.store, self.heads, self.jobs, self.metrics = store, heads, jobs, metrics
        hooks = {} if metrics is None else {"on_batch": metrics.observe_batch, "on_drop": metrics.dropped.inc}
        self.models = ModelPool(config, on_load=None if metrics is None else metrics.set_model,
                                on_death=on_death, batch_hooks=hooks)
        self._ready = False
        self._closing = False
        if metrics is not None:
            metrics.track_queue(lambda: self.models.queue_depth)

    @classmethod
    def open(cls, config: Config, *, embedder: Any = None, metrics: Any = None) -> Service:
        """A started service over ``config.data_dir`` (none with ``role="embed"``), for use in process."""
        store, heads, jobs = open_data_dir(config)
        service = cls(config, store=store, heads=heads, jobs=jobs, metrics=metrics)
        try:
            service.start(embedder)
        except BaseException:
            service.close(grace=0)
            raise
        return service

    def start(self, embedder: Any = None) -> LoadedModel:
        """Load and warm the default model (``embedder`` if given; the caller closes it), then answer calls."""
        model = self.models.start(embedder)
        self._ready = True
        return model

    def close(self, grace: float | None = None) -> None:
        """Refuse new calls, stop jobs, close the batchers (queued items get ``grace`` seconds) and the store."""
        self._closing = True
        grace = self.config.grace_seconds if grace is None else grace
        if self.jobs is not None:
            self.jobs.close(timeout=grace)  # a running fine-tune stops between batches, registering nothing
        self.models.close(grace)
        if self.store is not None:
            self.store.close()  # snapshots the indexes, so the next start loads instead of rebuilding

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def default(self) -> LoadedModel:
        return self.models.default

    # ------------------------------------------------------------------ embedding

    def embed(self, items: Sequence[Any], *, model: str = "", call: Call = Call()) -> EmbedResult:
        """Embed ``items`` (:class:`Item`, encoded bytes or arrays); per-item errors in the outcomes."""
        return self.finish(self.start_embed(items, model=model, call=call))

    def start_embed(self, items: Sequence[Any], *, model: str = "", call: Call = Call(),
                    block: bool = False) -> Pending:
        """Queue ``items`` and return at once (:meth:`finish` waits); streams pipeline with it. ``block``
        waits for queue room instead of raising QueueFullError."""
        self._check_ready()
        self._permit(call, READ)
        self._check_count(len(items))
        items = [Item.of(x) for x in items]
        leased = self.models.acquire(model)
        try:
            pending = submit(items, leased, call, store=self.store, block=block, metrics=self.metrics)
        except BaseException:
            self.models.release(leased)
            raise
        pending.on_done = lambda: self.models.release(leased)
        return pending

    def finish(self, pending: Pending, call: Call = Call()) -> EmbedResult:
        return EmbedResult(finish(pending, call, store=self.store, metrics=self.metrics), pending.model)

    def list_models(self, call: Call = Call()) -> list[dict[str, Any]]:
        """The loaded models' info, the default first (others load on first use)."""
        self._check_ready()
        self._permit(call, READ)
        return [m.info for m in self.models.models]

    def limits(self) -> dict[str, int]:
        self._check_ready()
        return {"max_message_bytes": self.config.max_message_bytes, "max_items": self.config.max_items,
                "max_pixels": getattr(self.default.embedder.config, "max_pixels", self.config.max_pixels)}

    # ------------------------------------------------------------------ collections

    def add(self, collection: str, items: Sequence[AddItem], *, model: str = "", index: str = "",
            call: Call = Call()) -> AddOutcome:
        """Embed (or look up) and store ``items`` in ``collection``, created on first add with ``model``'s
        binding and ``index``; items that fail are left out and say why."""
        store = self._stateful()
        self._permit(call, WRITE, collection)
        self._check_count(len(items))
        if not collection:
            raise InvalidArgumentError("`collection` is empty; name the collection to add to")
        ids = [a.item.id for a in items]
        missing_id = next((i for i, x in enumerate(ids) if not x), None)
        if missing_id is not None:
            raise InvalidArgumentError(f"item {missing_id} has no id; every item added to a collection needs an "
                                       "id (Item.id), unique within the collection")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InvalidArgumentError(f"item id {dup!r} appears more than once in one request; pass each id once")
        items = [self._checked_metadata(a) for a in items]
        with self._collection_model(collection, model) as bound:
            if index:
                store.create_collection(collection, model_id=bound.model_id, dim=bound.dim, index=index)
            outcomes = self.finish(self._start([a.item for a in items], bound, call)).outcomes
        good = [i for i, o in enumerate(outcomes) if o.error is None]
        added = replaced = 0
        if good:
            keep = self.config.keep_images
            result = store.add(collection, [ids[i] for i in good], np.stack([outcomes[i].vector for i in good]),
                               model_id=bound.model_id, sha256s=[outcomes[i].sha256 or None for i in good],
                               labels=[items[i].label for i in good],
                               metadata=[dict(items[i].metadata) if items[i].metadata is not None else None
                                         for i in good],
                               images=[items[i].item.image if keep else None for i in good])
            added, replaced = result.added, result.replaced
        return AddOutcome(outcomes, added, replaced, bound)

    def delete(self, collection: str, ids: Sequence[str], *, call: Call = Call()) -> DeleteResult:
        store = self._stateful()
        self._permit(call, WRITE, collection)
        return store.delete(collection, list(ids))

    def delete_collection(self, collection: str, *, call: Call = Call()) -> int:
        """Delete a whole collection; returns how many items it held."""
        store = self._stateful()
        self._permit(call, WRITE, collection)
        count = store.collection(collection).count
        store.delete_collection(collection)
        return count

    def set_labels(self, collection: str, labels: Mapping[str, str], clear: Sequence[str] = (), *,
                   call: Call = Call()) -> int:
        store = self._stateful()
        self._permit(call, WRITE, collection)
        both = sorted(set(labels) & set(clear))
        if both:
            raise InvalidArgumentError(f"item(s) {', '.join(map(repr, both[:5]))} are both labelled and cleared; "
                                       "name each item once")
        return store.set_labels(collection, {**dict(labels), **{i: None for i in clear}})

    def get(self, collection: str, ids: Sequence[str], *, vectors: bool = True,
            call: Call = Call()) -> list[StoredItem | None]:
        """The stored items (None for ids not there); refused before anything is sent if the answer would not fit
        in one message (``vectors=False``: the caller leaves the vectors out)."""
        store = self._stateful()
        self._permit(call, READ, collection)
        self._check_count(len(ids))
        found = store.get(collection, list(ids))
        self._check_answer([s for s in found if s is not None], vectors=vectors, what="Get", fix="fewer ids")
        return found

    def list_items(self, collection: str, *, offset: int = 0, limit: int = 0, label: str | None = None,
                   unlabelled: bool = False, where: filters.Where = None, call: Call = Call()) -> ItemPage:
        """A page of ``limit`` (0: :data:`DEFAULT_PAGE`) of a collection's items in insertion order (all,
        ``label``'s or the ``unlabelled`` ones; only those passing the metadata filter ``where``) and how many
        match; a caller pages with ``offset`` instead of reading the whole collection."""
        store = self._stateful()
        self._permit(call, READ, collection)
        return store.page(collection, offset=offset, limit=limit or DEFAULT_PAGE, label=label, unlabelled=unlabelled,
                          where=where)

    def item_image(self, collection: str, item_id: str, *, size: int = 0, call: Call = Call()) -> bytes:
        """The kept encoded image of a stored item, as added (``size`` 0) or as a JPEG thumbnail that fits ``size``
        x ``size`` pixels; NotFoundError when the item or its image is not there."""
        store = self._stateful()
        self._permit(call, READ, collection)
        if size:
            check_side(size)
        (image,) = store.images(collection, [item_id])
        if image is None:
            if store.get(collection, [item_id])[0] is None:
                raise ItemNotFoundError(f"no item {item_id[:200]!r} in collection {collection!r}; list its items "
                                        "to find the ids")
            raise ItemNotFoundError(f"item {item_id[:200]!r} has no kept image: it was added as a tensor or by "
                                    "hash, or while the server ran with --no-keep-images; add it again as an image "
                                    "to keep one")
        return thumbnail(image, size, max_pixels=self.config.max_pixels) if size else image

    def create_collection(self, collection: str, *, model: str = "", index: str = "",
                          call: Call = Call()) -> CollectionInfo:
        """Create an empty collection bound to ``model`` (default: the server's) with ``index`` (default flat);
        one that exists with the same binding and index is returned as is."""
        store = self._stateful()
        self._permit(call, WRITE, collection)
        with self.models.lease(model) as bound:
            return store.create_collection(collection, model_id=bound.model_id, dim=bound.dim,
                                           index=index or "flat")

    def search(self, *, collection: str | None = None, item: Item | None = None, item_id: str | None = None,
               vector: np.ndarray | None = None, model: str = "", k: int = DEFAULT_K, label: str | None = None,
               ef_search: int | None = None, where: filters.Where = None,
               call: Call = Call()) -> SearchResult:
        """The ``k`` nearest stored items to one query: an image (``item``), a stored item or a vector. Without
        ``collection``, every collection of the query's model is searched (that the caller may see). ``label``
        and the metadata filter ``where`` (:mod:`embedder.filters`) keep only the items that pass both."""
        store = self._stateful()
        self._permit(call, READ, collection)
        if sum(q is not None for q in (item, item_id, vector)) != 1:
            raise InvalidArgumentError("the query is empty; set one of `item` (an image), `item_id` or `vector`"
                                       if (item, item_id, vector) == (None, None, None) else
                                       "set only one of `item`, `item_id` and `vector` as the query")
        if item_id is not None:
            if collection is None:
                raise InvalidArgumentError("a query by item_id needs `collection`, the collection that holds the item")
            hits = store.search_by_id(collection, item_id, k=k, label=label, ef_search=ef_search, where=where)
            self._check_answer(hits, vectors=False, what="Search", fix="a smaller k")
            return SearchResult(hits, store.collection(collection).model_id, False)
        cm = self._collection_model(collection, model) if collection is not None else self.models.lease(model)
        cached = False
        with cm as bound:
            if item is not None:
                found = self.finish(self._start([item], bound, call)).outcomes[0]
                if found.error is not None:
                    what = "text" if item.text is not None else "image"
                    found.error.args = (f"the query {what}: {found.error}",)  # a fresh error of this call
                    raise found.error
                vector, cached = found.vector, found.cached
        hits = store.search(collection, np.asarray(vector)[None], k=k, label=label, model_id=bound.model_id,
                            ef_search=ef_search, only=self._allowed(call), where=where)[0]
        self._check_answer(hits, vectors=False, what="Search", fix="a smaller k")
        return SearchResult(hits, bound.model_id, cached)

    def stats(self, call: Call = Call()) -> tuple[StoreStats, int]:
        """The store's statistics and the number of saved heads. A caller with an allow-list sees its collections
        and their heads only, and the shared figures (cache rows, disk bytes) as 0: they would tell it how much
        other keys use the service."""
        store = self._stateful()
        self._permit(call, READ)
        stats, allowed = store.stats(), self._allowed(call)
        if allowed is not None:
            shown = [c for c in stats.collections if c.name in allowed]
            stats = replace(stats, collections=shown, items=sum(c.count for c in shown), cache_items=0, disk_bytes=0)
        return stats, len(self.list_heads(call))

    def forget(self, sha256s: Sequence[str], *, call: Call = Call()) -> int:
        """Delete cached vectors of images (by sha256, every model); returns how many cache rows went. A key
        forgets its own entries (role write); an admin, the library and a server without keys everyone's.
        Collection items keep their vectors: delete the items for that."""
        store = self._stateful()
        self._permit(call, WRITE)
        self._check_count(len(sha256s))
        p = call.principal
        return store.forget(sha256s, owner=None if p is None or p.has(ADMIN) else p.cache_owner)

    # ------------------------------------------------------------------ heads

    def train(self, collection: str, *, head: str = "", labels: Sequence[str] = (), ids: Sequence[str] = (),
              params: Mapping[str, Any] | None = None, test_size: float = 0.0, seed: int = 0, head_id: str = "",
              adapt_to: str = "", adapt_method: str = "", where: filters.Where = None,
              class_prompts: Mapping[str, Sequence[str]] | None = None, model: str = "",
              call: Call = Call()) -> Any:
        """Train and save a head on the labelled items of ``collection`` (a :class:`classifier.TrainResult`);
        ``labels``, ``ids`` or the metadata filter ``where`` narrow them.

        ``head="zero_shot"`` builds one from ``class_prompts`` alone (:meth:`_zero_shot`); ``head="few_shot"``
        starts from those and trains on the labelled items. Stops with DeadlineError, saving nothing, once
        ``call``'s deadline passes, it cancels or the service closes (checked while waiting for the training
        before it and between steps)."""
        from classifier import InsufficientDataError
        from classifier.heads import class_vectors

        if head == "zero_shot":
            return self._zero_shot(collection, class_prompts, model=model, params=params or {}, head_id=head_id,
                                   call=call)
        if class_prompts and head != "few_shot":
            raise InvalidArgumentError("class_prompts apply to heads zero_shot and few_shot; set head to one of them "
                                       "or leave class_prompts out")
        store = self._stateful()
        self._permit(call, WRITE, collection, adapt_to)
        if head_id:  # replacing a head trained on another collection is that collection's business
            self._permit_head(call, WRITE, head_id)
        found_ids, X, y = store.labelled(collection, labels=list(labels) or None, ids=list(ids) or None, where=where)
        f = filters.parse(where)
        if not found_ids:
            which = (f" with label(s) {', '.join(map(repr, labels))}" if labels else "") + (
                f" whose metadata passes {filters.describe(f)}" if f is not None else "")
            raise InsufficientDataError(
                f"collection {collection!r} has no labelled items{which}; add items with labels "
                "(Add with AddItem.label, or SetLabels) and train again")
        info = store.collection(collection)
        source: dict[str, Any] = {"collection": collection, "labels": list(labels), "ids": len(ids)}
        if f is not None:
            source["where"] = filters.describe(f)
        target = None
        if adapt_to:
            target_info = store.collection(adapt_to)
            if target_info.model_id != info.model_id:
                raise ModelMismatchError(
                    f"adapt_to collection {adapt_to!r} holds vectors of model {target_info.model_id}, but "
                    f"{collection!r} holds {info.model_id}; adapt between collections of one model",
                    expected_model_id=info.model_id, other_model_id=target_info.model_id)
            _, target = store.vectors(adapt_to)
            source["adapt_to"] = adapt_to
        if head == "few_shot":
            with self.models.lease_bound(info.model_id, f"collection {collection!r}") as bound:
                prompts = self._prompt_vectors(class_prompts, bound, "few_shot", call)
            params = {**(params or {}), "prior": dict(zip(prompts, class_vectors(prompts, list(prompts))))}
        return self.heads.train(X, y, model_id=info.model_id, kind=head or "logreg", params=params or {},
                                test_size=test_size or 0.2, seed=seed, head_id=head_id or None, source=source,
                                adapt_to=target, adapt_method=adapt_method or "coral",
                                should_stop=lambda: self._closing or call.is_cancelled() or call.time_left() == 0)

    def _zero_shot(self, collection: str, class_prompts: Mapping[str, Sequence[str]] | None, *, model: str,
                   params: Mapping[str, Any], head_id: str, call: Call) -> Any:
        """A zero-shot head: the class prompts' text vectors (with a text-image model: the collection's, else
        ``model``'s), averaged per label; saved like a trained head, no labelled image needed."""
        from classifier.heads import ZeroShotHead

        self._stateful()
        self._permit(call, WRITE, collection)
        if head_id:
            self._permit_head(call, WRITE, head_id)
        with (self._collection_model(collection, model) if collection else self.models.lease(model)) as bound:
            vectors = self._prompt_vectors(class_prompts, bound, "zero_shot", call)
        head = ZeroShotHead.from_text(vectors, model_id=bound.model_id, **params)
        source = {"collection": collection, "class_prompts": _prompt_texts(class_prompts)}
        return self.heads.add(head, head_id=head_id or None, source=source)

    def _prompt_vectors(self, class_prompts: Mapping[str, Sequence[str]] | None, bound: LoadedModel, kind: str,
                        call: Call) -> dict[str, np.ndarray]:
        """Per label, its prompts' text vectors ``(n, dim)`` from ``bound``'s text tower (through the cache)."""
        prompts = _prompt_texts(class_prompts)
        if not bound.info.get("text"):
            raise NotSupportedByModelError(
                f"a {kind} head needs a text-image model, but model {bound.name!r} embeds images only; serve a CLIP "
                "or SigLIP folder with a transformers model card (--model-card) and use a collection of that model")
        flat = [(label, text) for label, texts in prompts.items() for text in texts]
        self._check_count(len(flat))
        outcomes = self.finish(self._start([Item(text=text) for _, text in flat], bound, call)).outcomes
        failed = next((o.error for o in outcomes if o.error is not None), None)
        if failed is not None:
            raise failed
        vectors: dict[str, list[np.ndarray]] = {}
        for (label, _), o in zip(flat, outcomes):
            vectors.setdefault(label, []).append(o.vector)
        return {label: np.stack(v) for label, v in vectors.items()}

    def predict(self, head_ids: Sequence[str], *, items: Sequence[Item] = (), ids: Sequence[str] = (),
                collection: str = "", top_k: int = 1, call: Call = Call()) -> PredictResult:
        """Apply heads (of one backbone) to images (``items``) and stored items (``ids`` of ``collection``):
        one embedding or cache hit per item, every head applied to it."""
        store = self._stateful()
        self._permit(call, READ, collection)
        self._check_count(len(items) + len(ids))
        head_ids = list(head_ids)
        if not head_ids or not all(head_ids):
            raise InvalidArgumentError("name the head(s) to apply: a head id in `head_id`, or `head_ids` with no "
                                       "empty entry")
        if len(set(head_ids)) != len(head_ids):
            raise InvalidArgumentError("a head id appears more than once in head_ids; name each head once")
        for h in head_ids:
            self._permit_head(call, READ, h)
        heads = [self.heads.get(h) for h in head_ids]  # NOT_FOUND before any embedding
        model_id = heads[0].model_id_
        other = next((h for h, head in zip(head_ids, heads) if head.model_id_ != model_id), None)
        if other is not None:
            raise ModelMismatchError(
                f"heads {head_ids[0]!r} and {other!r} take vectors of different models; one Predict embeds "
                "once, so ask for heads of one backbone together", expected_model_id=model_id,
                other_model_id=self.heads.get(other).model_id_)
        if ids and not collection:
            raise InvalidArgumentError("predicting stored items needs `collection`, the collection that holds "
                                       "the ids")
        rows: list[Outcome] = []
        if items:
            with self.models.lease_bound(model_id, f"head {head_ids[0]!r}") as bound:
                rows = self.finish(self._start(items, bound, call)).outcomes
        if ids:
            stored_model = store.collection(collection).model_id
            if stored_model != model_id:
                raise ModelMismatchError(
                    f"collection {collection!r} holds vectors of model {stored_model}, but head {head_ids[0]!r} "
                    f"takes vectors of model {model_id}", expected_model_id=model_id, other_model_id=stored_model)
            for item_id, stored in zip(ids, store.get(collection, list(ids))):
                out = Outcome(item_id, cached=True)
                if stored is None:
                    out.error = ItemNotFoundError(f"no item {item_id!r} in collection {collection!r}")
                else:
                    out.vector = stored.vector
                rows.append(out)
        good = [o for o in rows if o.error is None]
        tops = [self.heads.predict(h, np.stack([o.vector for o in good]), model_id=model_id, top_k=top_k)
                for h in head_ids] if good else []
        result, row = [], 0
        for o in rows:
            if o.error is not None:
                result.append(PredictRow(o.id, o.cached, error=o.error))
                continue
            result.append(PredictRow(o.id, o.cached, tops={
                h: [(str(lab), float(p)) for lab, p in zip(top.labels[row], top.probabilities[row])]
                for h, top in zip(head_ids, tops)}))
            row += 1
        return PredictResult(result, head_ids, model_id)

    def learning_curve(self, collection: str, *, head: str = "", labels: Sequence[str] = (),
                       params: Mapping[str, Any] | None = None, per_class: Sequence[int] = (), repeats: int = 0,
                       test_size: float = 0.0, seed: int = 0, call: Call = Call()) -> list[CurvePoint]:
        """Hold-out accuracy at growing labels per class; stops with DeadlineError once ``call``'s deadline passes,
        it cancels or the service closes (checked before every fit, so SIGTERM is not held up by a long curve)."""
        store = self._stateful()
        self._permit(call, WRITE, collection)  # trains (no head is saved, but it costs like training)
        _, X, y = store.labelled(collection, labels=list(labels) or None)
        return self.heads.learning_curve(X, y, kind=head or "logreg", params=params or {},
                                         per_class=list(per_class) or None, repeats=repeats or 5,
                                         test_size=test_size or 0.2, seed=seed,
                                         should_stop=lambda: self._closing or call.is_cancelled() or
                                         call.time_left() == 0)

    def suggest(self, collection: str, *, n: int = 0, strategy: str = "", head_id: str = "",
                ids: Sequence[str] = (), seed: int = 0, where: filters.Where = None,
                call: Call = Call()) -> Any:
        """The ``n`` (default 20) unlabelled items of ``collection`` (or of its ``ids``, or those whose metadata
        passes ``where``; the head still learns from every labelled item) most worth labelling next,
        each with its score and reason (a :class:`classifier.active.SuggestResult`); see
        :mod:`classifier.active` for the strategies. Reads stored vectors only: no backbone pass."""
        from classifier import active

        store = self._stateful()
        self._permit(call, WRITE, collection)  # may train a head (not saved), which costs like training
        self._check_count(len(ids))
        info = store.collection(collection)  # NotFoundError before any work
        labelled_ids, X_labelled, y_labelled = store.labelled(collection)
        candidates, X = self._unlabelled(store, collection, ids, set(labelled_ids), where)
        if head_id:
            self._permit_head(call, READ, head_id)
        head = self.heads.get(head_id) if head_id else None
        with self.heads.turn(self._should_stop(call), "suggestion"):  # it may train a head: not alongside others
            return active.suggest(candidates, X, X_labelled, y_labelled,
                                  n=active.DEFAULT_SUGGEST if n == 0 else n, strategy=strategy or "auto", head=head,
                                  model_id=info.model_id, seed=seed, should_stop=self._should_stop(call))

    def label_issues(self, collection: str, *, limit: int = 0, labels: Sequence[str] = (), folds: int = 0,
                     near_duplicate: float = 0.0, seed: int = 0, where: filters.Where = None,
                     call: Call = Call()) -> Any:
        """Labelled items of ``collection`` (only ``labels``' classes, and items passing ``where``, when given) whose
        label looks wrong, by confident learning on out-of-fold probabilities, and identical or near-identical items
        with different labels (a :class:`classifier.active.LabelIssuesResult`). Reads stored vectors only: no
        backbone pass."""
        from classifier import active

        store = self._stateful()
        self._permit(call, WRITE, collection)  # trains one head per fold
        ids, X, y = store.labelled(collection, labels=list(labels) or None, where=where)
        sha256s = [s.sha256 if s is not None else None for s in store.get(collection, ids)] if ids else []
        with self.heads.turn(self._should_stop(call), "label check"):  # one head per fold: in turn with trainings
            return active.find_label_issues(ids, X, y, sha256s, limit=limit or active.DEFAULT_ISSUES,
                                            folds=folds or active.DEFAULT_FOLDS,
                                            near_duplicate=near_duplicate or active.DEFAULT_NEAR_DUPLICATE,
                                            seed=seed, should_stop=self._should_stop(call))

    def list_heads(self, call: Call = Call()) -> list[Any]:
        """The saved heads; a key with an allow-list sees those trained on its collections."""
        self._stateful()
        self._permit(call, READ)
        allowed = self._allowed(call)
        return [h for h in self.heads.list() if allowed is None or _source_collection(h.source) in allowed]

    def delete_head(self, head_id: str, *, call: Call = Call()) -> None:
        self._stateful()
        self._permit_head(call, WRITE, head_id)
        self.heads.delete(head_id)

    # ------------------------------------------------------------------ jobs

    def finetune(self, collection: str, suffix: str, *, method: str = "", unfreeze: int = 0, epochs: int = 0,
                 params: Mapping[str, Any] | None = None, labels: Sequence[str] = (),
                 ids: Sequence[str] = (), call: Call = Call()) -> Any:
        """Start a fine-tune (``method="finetune"``) or AdaBN job on the collection's kept images; the job."""
        from .finetuning import start_adabn, start_finetune

        store = self._stateful()
        self._permit(call, WRITE, collection)
        if method == "adabn":
            return start_adabn(store, self.jobs, self.config.data_dir, collection, suffix)
        if method not in ("", "finetune"):
            raise InvalidArgumentError(f"method must be 'finetune' or 'adabn', got {method[:50]!r}")
        return start_finetune(store, self.jobs, self.config.data_dir, collection, suffix, unfreeze=unfreeze or 1,
                              epochs=epochs or 10, params=params or {}, labels=labels, ids=ids)

    def get_job(self, job_id: str, *, call: Call = Call()) -> Any:
        self._stateful()
        self._permit_job(call, READ, job_id)
        return self.jobs.get(job_id)

    def cancel_job(self, job_id: str, *, call: Call = Call()) -> Any:
        self._stateful()
        self._permit_job(call, WRITE, job_id)
        return self.jobs.cancel(job_id)

    # ------------------------------------------------------------------ helpers

    def _start(self, items: Sequence[Item], model: LoadedModel, call: Call) -> Pending:
        """Queue items on a model the caller holds already (its lease outlives the pending items)."""
        return submit(items, model, call, store=self.store, metrics=self.metrics)

    def _collection_model(self, collection: str, requested: str) -> Any:
        """A lease on an existing collection's model; for a new one on the requested model (or the default)."""
        try:
            model_id = self.store.collection(collection).model_id
        except NotFoundError:
            return self.models.lease(requested)
        return self.models.lease_bound(model_id, f"collection {collection!r}")

    @staticmethod
    def _permit(call: Call, role: str, *collections: str | None) -> None:
        """Refuse a caller whose key lacks ``role`` or may not name one of ``collections`` (None/"": none named).
        Checked before the collection is looked up, so a refusal does not tell whether it exists."""
        p = call.principal
        if p is None:
            return
        if not p.has(role):
            raise PermissionDeniedError(f"API key {p.key_id} has role {p.role!r}; this call needs {role!r}: use a key "
                                        f"with that role (`embedder keys add --role {role}`, by an operator)")
        denied = next((c for c in collections if c and not p.may_see(c)), None)
        if denied is not None:
            raise PermissionDeniedError(f"API key {p.key_id} may not use collection {denied!r} (not on its "
                                        "allow-list); use a key allowed that collection")

    def _permit_head(self, call: Call, role: str, head_id: str) -> None:
        """:meth:`_permit` for a saved head: a key with an allow-list may use only heads trained on its
        collections (a head it may not see is refused like an unknown one would be: without saying which)."""
        self._permit(call, role)
        if self._allowed(call) is not None:
            try:
                source = self.heads.info(head_id).source
            except EmbedderError:
                return  # no such head (or a bad id): the call itself says so
            self._permit(call, role, _source_collection(source) or f"(head {head_id!r})")

    def _permit_job(self, call: Call, role: str, job_id: str) -> None:
        """:meth:`_permit` for a job: a key with an allow-list may see jobs on its collections only."""
        self._permit(call, role)
        if self._allowed(call) is not None:
            try:
                collection = self.jobs.get(job_id).params.get("collection")
            except EmbedderError:
                return
            self._permit(call, role, collection or f"(job {job_id!r})")

    @staticmethod
    def _allowed(call: Call) -> frozenset[str] | None:
        """The collections the caller may see; None: every one."""
        return None if call.principal is None else call.principal.collections

    def _should_stop(self, call: Call) -> Any:
        """A long computation's stop signal: the service is closing, or ``call`` was cancelled or ran out of time."""
        return lambda: self._closing or call.is_cancelled() or call.time_left() == 0

    @staticmethod
    def _unlabelled(store: Any, collection: str, ids: Sequence[str], labelled: set[str],
                    where: filters.Where) -> tuple[list[str], np.ndarray]:
        """The unlabelled items of ``collection`` (only those of ``ids``, or passing ``where``, when given): ids and
        vectors."""
        if ids and filters.parse(where) is not None:
            raise InvalidArgumentError("choose the items by ids or by where, not both")
        if not ids:
            all_ids, X = store.vectors(collection, where=where)
            keep = [i for i, item_id in enumerate(all_ids) if item_id not in labelled]
            return [all_ids[i] for i in keep], X[keep]
        found = store.get(collection, list(ids))
        missing = [i for i, s in zip(ids, found) if s is None]
        if missing:
            raise NotFoundError(f"{len(missing)} of the ids are not in collection {collection!r} (first "
                                f"{missing[0]!r}); name items of that collection")
        chosen = [s for s in found if s is not None and s.label is None]
        dim = store.collection(collection).dim
        return [s.id for s in chosen], (np.stack([s.vector for s in chosen]) if chosen else np.zeros((0, dim)))

    def _check_ready(self) -> None:
        if self._closing:
            raise NotReadyError("the server is shutting down; retry another instance")
        if not self._ready:
            raise NotReadyError("the model is still loading and warming up; retry shortly (health turns SERVING "
                                "when ready)")
        if not self.default.batcher.alive:
            raise NotReadyError("the embedding worker is not running; the server must be restarted")

    def _stateful(self) -> Any:
        """The store, for store, head and job calls; an embedding replica has none."""
        self._check_ready()
        if self.store is None:
            raise ReplicaOnlyError("this server is an embedding replica (--role embed): it only embeds; send "
                                   "store, head and job calls to the store node (--role store or all)")
        return self.store

    def _checked_metadata(self, a: AddItem) -> AddItem:
        """The one JSON rule on an item's metadata (depth, storable, ``max_metadata_bytes`` as stored); an item
        that breaks it fails alone."""
        if a.metadata is None or a.item.error is not None:
            return a
        try:
            check_json_object(a.metadata, f"metadata of item {a.item.id!r}", max_bytes=self.config.max_metadata_bytes,
                              raise_with=METADATA_FLAG)
        except ValueError as e:
            return AddItem(Item(a.item.id, error=ItemError(str(e))))
        return a

    def _check_answer(self, found: Sequence[Any], *, vectors: bool, what: str, fix: str) -> None:
        """Refuse an answer that would not fit in one message, before it is sent (gRPC would fail it after the
        work, with a message that names no fix). Exact sizes only when the cheap bound says it might not fit."""
        limit = self.config.max_message_bytes
        per_item = self.config.max_metadata_bytes + 1024 + (4 * max((len(s.vector) for s in found), default=0)
                                                             if vectors else 0)
        if len(found) * per_item <= limit:
            return
        size = sum(len(dump_stored(s.metadata, "metadata").encode()) + len(s.id) + 64 for s in found)
        if vectors:
            size += sum(4 * len(s.vector) for s in found)
        if size > limit:
            raise ResponseTooLargeError(
                f"the {what} answer would be ~{size:,} bytes, above the message limit of {limit:,} "
                f"(max_message_bytes); ask for {fix}" + (", leave the vectors out" if vectors else "")
                + ", or raise --max-message-bytes / EMBEDDER_MAX_MESSAGE_BYTES on both server and client")

    def _check_count(self, n: int) -> None:
        limit = self.config.max_items
        if n > limit:
            raise InvalidArgumentError(
                f"request has {n} items, above the server's limit of {limit} per request (max_items); send fewer "
                "per request (EmbedderClient splits for you) or raise the limit on the server with --max-items / "
                "EMBEDDER_MAX_ITEMS")


def open_data_dir(config: Config) -> tuple[Any, Any, Any]:
    """The store, head registry and job runner under ``config.data_dir`` (None x 3 with ``role="embed"``).

    Fine-tuned versions saved there are registered, so collections, heads and jobs can name them.
    """
    if config.role == "embed":
        return None, None, None
    from classifier import HeadRegistry

    from ..backbones import load_derived
    from ..jobs import JobRunner
    from ..store import Store

    store = Store.from_config(config)
    try:
        heads = HeadRegistry(config.data_dir / "heads")
        jobs = JobRunner(config.data_dir / "jobs")
        load_derived(config.data_dir / "backbones")
    except BaseException:
        store.close()
        raise
    log.info("data dir %s: %s", config.data_dir, store)
    return store, heads, jobs


def _prompt_texts(class_prompts: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Checked class prompts, ``{label}`` in a prompt replaced by the label."""
    if not class_prompts:
        raise InvalidArgumentError("zero_shot and few_shot heads need class_prompts, {label: [prompt, ...]}, e.g. "
                                   "{\"cat\": [\"a photo of a {label}\"], \"dog\": [\"a photo of a {label}\"]}")
    out = {}
    for label, prompts in class_prompts.items():
        if not isinstance(label, str) or not label.strip():
            raise InvalidArgumentError("a label of class_prompts is empty; name each class")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InvalidArgumentError(f"label {label[:100]!r} has no prompts, or an empty one; give texts that "
                                       "describe it, e.g. [\"a photo of a {label}\"]")
        out[label] = [t.replace("{label}", label) for t in texts]
    return out


def _source_collection(source: Mapping[str, Any] | None) -> str:
    """The collection a head was trained on ("" when it was not trained from one)."""
    return str((source or {}).get("collection") or "")
