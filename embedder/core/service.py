"""The service core: every call of the API as a plain Python method, under every front door.

A front door (gRPC in :mod:`embedder.servicer`, the CLI, a library caller) converts its wire format into these
arguments, passes its caller's deadline and cancellation as a :class:`~embedder.core.embedding.Call`, and
turns what comes back, or the :class:`~embedder.errors.EmbedderError` raised, into its own answer through
the one table in :mod:`embedder.errors`. Nothing in here knows a transport.

Every call checks its caller's key first (:mod:`embedder.core.access`); a search over every collection searches
only those the key may see. The head calls live in :mod:`embedder.core.heads`, mixed in.

Images take one path (:mod:`embedder.core.embedding`): cache hits from the store, misses through the model's
batcher, fresh vectors into the cache. Models come from the :class:`~embedder.core.models.ModelPool`.

>>> with Service.open(Config(data_dir="embedder-data")) as service:
...     outcomes = service.embed([jpeg_bytes, jpeg_bytes]).outcomes   # the repeat is embedded once
...     service.add("pets", [AddItem(Item("cat-1", image=jpeg_bytes), label="cat")])
...     service.search(collection="pets", item=Item(image=jpeg_bytes), k=5).hits
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import filters
from ..config import Config, parse_store_uri
from ..errors import (InvalidArgumentError, ItemError, ItemNotFoundError, ModelMismatchError, NotFoundError,
                      NotReadyError, ReplicaOnlyError, ResponseTooLargeError)
from ..jsonrule import check_json_object, dump_stored
from ..results import CollectionInfo, DeleteResult, Hit, ItemPage, StoredItem, StoreStats
from .access import ADMIN, READ, WRITE
from .embedding import Call, Item, Outcome, Pending, finish, submit
from .heads import HeadCalls
from .models import LoadedModel, ModelPool, canonical
from . import versions
from .thumbnails import check_side, thumbnail

log = logging.getLogger(__name__)

DEFAULT_K = 10
DEFAULT_PAGE = 100  # items per page of a listing when the caller names no limit
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


class Service(HeadCalls):
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
        # with Milvus, fine-tuned versions are shared like the collections: fetched now and when a call names one
        # made on another replica since, published when made here
        self._versions = store.shared_files("backbones") if store is not None else None
        if self._versions is not None:
            self.models.on_unknown = self._sync_versions
            self._sync_versions()

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
        self.check_count(len(items))
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

    def takes_text(self, model: str = "", call: Call = Call()) -> bool:
        """Whether ``model`` (default: the served one) embeds text too, in its images' space; loads it on first use."""
        self._check_ready()
        self._permit(call, READ)
        with self.models.lease(model) as bound:
            return bool(bound.info.get("text"))

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
        self.check_count(len(items))
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
        self.check_count(len(ids))
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
        self.check_count(len(sha256s))
        p = call.principal
        return store.forget(sha256s, owner=None if p is None or p.has(ADMIN) else p.cache_owner)

    # ------------------------------------------------------------------ jobs

    def finetune(self, collection: str, suffix: str, *, method: str = "", unfreeze: int = 0, epochs: int = 0,
                 params: Mapping[str, Any] | None = None, labels: Sequence[str] = (),
                 ids: Sequence[str] = (), call: Call = Call()) -> Any:
        """Start a fine-tune (``method="finetune"``) or AdaBN job on the collection's kept images; the job."""
        from .finetuning import start_adabn, start_finetune

        store = self._stateful()
        self._permit(call, WRITE, collection)
        if self._versions is not None:
            self._sync_versions()  # so a name taken on another replica is refused here too
        publish = None if self._versions is None else partial(versions.publish, self._versions)
        if method == "adabn":
            return start_adabn(store, self.jobs, self.config.data_dir, collection, suffix, publish=publish)
        if method not in ("", "finetune"):
            raise InvalidArgumentError(f"method must be 'finetune' or 'adabn', got {method[:50]!r}")
        return start_finetune(store, self.jobs, self.config.data_dir, collection, suffix, unfreeze=unfreeze,
                              epochs=epochs, params=params or {}, labels=labels, ids=ids, publish=publish)

    def _sync_versions(self) -> None:
        versions.sync(self._versions, self.config.data_dir / "backbones")

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
        """A lease on an existing collection's model; for a new one on the requested model (or the default).
        A request naming another model than an existing collection's is refused, not served with the other."""
        try:
            model_id = self.store.collection(collection).model_id
        except NotFoundError:
            return self.models.lease(requested)
        if requested and canonical(requested) not in (model_id, model_id.partition(":")[0]):
            raise ModelMismatchError(
                f"collection {collection!r} holds vectors of model {model_id}; this request names model "
                f"{requested[:200]!r}: leave the model out to use the collection's, or use a collection of that "
                "model", expected_model_id=model_id)
        return self.models.lease_bound(model_id, f"collection {collection!r}")

    def _should_stop(self, call: Call) -> Any:
        """A long computation's stop signal: the service is closing, or ``call`` was cancelled or ran out of time."""
        return lambda: self._closing or call.is_cancelled() or call.time_left() == 0

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

    def check_count(self, n: int) -> None:
        limit = self.config.max_items
        if n > limit:
            raise InvalidArgumentError(
                f"request has {n} items, above the server's limit of {limit} per request (max_items); send fewer "
                "per request (EmbedderClient splits for you) or raise the limit on the server with --max-items / "
                "EMBEDDER_MAX_ITEMS")


def open_data_dir(config: Config) -> tuple[Any, Any, Any]:
    """The store, head registry and job runner under ``config.data_dir`` (None x 3 with ``role="embed"``).

    Heads follow the store: in Milvus when the collections are there (every replica on it sees the same heads),
    else in ``<data_dir>/heads``. Fine-tuned versions saved in the data dir are registered, so collections, heads
    and jobs can name them.
    """
    if config.role == "embed":
        return None, None, None
    from classifier import HeadRegistry

    from ..backbones import load_derived
    from ..jobs import JobRunner
    from ..store import Store

    store = Store.from_config(config)
    try:
        shared = store.shared_files("heads")
        if shared is not None:
            _move_local_heads(config.data_dir / "heads", shared)
        heads = HeadRegistry(shared or config.data_dir / "heads")
        jobs = JobRunner(config.data_dir / "jobs")
        load_derived(config.data_dir / "backbones")
    except BaseException:
        store.close()
        raise
    log.info("data dir %s: %s", config.data_dir, store)
    _warn_replica_state(config)
    return store, heads, jobs


def _move_local_heads(folder: Path, shared: Any) -> None:
    """Heads saved in the data dir before heads followed a Milvus store: copied into Milvus once (the folder is
    then renamed, so a head deleted in Milvus later does not come back), so no replica silently loses them."""
    from classifier import HeadFolder
    from classifier.persist import ARRAYS_FILE
    from classifier.places import META_FILE, copy_heads

    local = HeadFolder(folder)
    if not local.ids():
        return
    for line in copy_heads(local, shared, [META_FILE, ARRAYS_FILE]):
        log.warning("heads in %s now live in Milvus: %s", folder, line)
    moved = folder.with_name(f"heads.moved-to-milvus-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    folder.rename(moved)
    log.warning("heads: the data dir's heads folder is renamed to %s (kept as it was; remove it when done)", moved)


def _warn_replica_state(config: Config) -> None:
    """With a Milvus server every replica may share the collections, heads and backbone versions; say where state
    that stays in this replica's data dir would silently differ between replicas."""
    if parse_store_uri(config.store)[0] != "milvus":
        return
    if not config.keys_file and config.keys_path.is_file():
        log.warning("API keys are read from %s, this replica's own file: replicas sharing %s do not see a key added "
                    "or revoked here. Give every replica one keys file (--keys-file / EMBEDDER_KEYS_FILE, e.g. "
                    "mounted from a Kubernetes Secret)", config.keys_path, config.store)

