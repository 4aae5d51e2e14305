"""The HTTP/JSON front door: REST routes and OpenAI's ``/v1/embeddings`` over one :class:`embedder.core.Service`.

No logic of its own, like the gRPC servicer: each route reads its body (:mod:`.schema`), converts it
(:mod:`.convert`), runs the blocking core call in a thread (the batcher does the heavy work; the event loop
only parses and writes), and converts the result. Errors go through the one table (:mod:`.guards`).

Images come as base64 or ``data:`` URIs in JSON, or as ``multipart/form-data`` files named ``image`` (what
``curl -F image=@cat.jpg`` sends; each file's name is its item id, the other form fields are the request's).
"""
from __future__ import annotations

import asyncio
import os
import threading
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator, Callable, TypeVar

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import __version__
from ..config import Config
from ..core import AddItem, Call, Item, Service
from ..core.service import METADATA_FLAG
from ..errors import TABLE, Category, InvalidArgumentError, NotReadyError
from ..jsonrule import parse_json_object
from ..keys import Gate
from . import convert, page, schema
from .guards import (PRINCIPAL, AnswerErrors, Authenticate, KnownHosts, LimitBody, LimitConcurrency, Measure,
                     SameOrigin)

# Threads for blocking core calls: a call holds one while its items are in the batcher, and 64 concurrent
# callers must all be inside the batcher for it to form full batches (as the gRPC port's handler threads).
CALL_THREADS = 128

M = TypeVar("M", bound=BaseModel)
_BY_HTTP = {answer.http: category for category, answer in reversed(TABLE.items())}  # first category wins


def json_response(body: BaseModel, status: int = 200) -> Response:
    """Serialized by pydantic straight to bytes (no second validation of what we built)."""
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


def create_app(service: Service, config: Config, *, metrics: Any = None,
               ready: Callable[[], bool] | None = None, gate: Gate | None = None) -> FastAPI:
    """The ASGI app over ``service``: ``config`` gives the token and the body limit, ``metrics`` (an
    :class:`embedder.metrics.Metrics`) gets per-route counters, ``ready()`` answers ``/readyz`` (default: the
    service answers calls), ``gate`` checks callers (default: one from ``config``; a server passes the gate its
    gRPC port uses, so a key either door saw keeps auth on for both)."""
    limiter = anyio.CapacityLimiter(CALL_THREADS)
    # Parsing a JSON body holds the GIL and several times the body's size in memory: one parse per core goes as
    # fast as more, and bounds the memory of many large bodies at once to that many parses.
    parsing = anyio.CapacityLimiter(os.cpu_count() or 1)
    is_ready = ready or partial(_service_ready, service)

    async def run(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=limiter)

    async def read(request: Request, model: type[M], form: type[BaseModel] | None = None
                   ) -> tuple[M | Any, list[Item]]:
        """The body as ``model`` (JSON), or for a route taking images as ``form`` (multipart) with its
        uploaded ``image`` files as items. Parsed off the event loop (a large body must not stall the other
        calls, probes included), and a body with more items than ``max_items`` is refused before anything is made
        of them."""
        if form is None or not request.headers.get("content-type", "").startswith("multipart/form-data"):
            body = await anyio.to_thread.run_sync(model.model_validate_json, await request.body(), limiter=parsing)
            service.check_count(_item_count(body))
            return body, []
        fields: dict[str, Any] = {}
        uploads: list[Item] = []
        lists = {name for name, f in form.model_fields.items() if getattr(f.annotation, "__origin__", None) is list}
        try:
            async with request.form(max_files=config.max_items, max_fields=config.max_items) as data:
                for key, value in data.multi_items():
                    if isinstance(value, UploadFile):
                        if key != "image":
                            raise InvalidArgumentError(f"file field {key!r}: send images as `image` files "
                                                       "(curl -F image=@cat.jpg)")
                        uploads.append(Item(value.filename or "", image=await value.read()))
                    elif key in lists:
                        fields.setdefault(key, []).append(value)
                    elif key in fields:
                        raise InvalidArgumentError(f"form field {key!r} is sent twice; send it once")
                    else:
                        fields[key] = value
        except HTTPException as e:  # Starlette's refusal of the form: too many parts (no flag named), or malformed
            if not str(e.detail).startswith("Too many"):
                raise InvalidArgumentError(f"{e.detail.rstrip('.')}: send a multipart/form-data body as curl -F "
                                           "does, or JSON") from None
            raise InvalidArgumentError(f"{e.detail}; a form holds at most {config.max_items} files (max_items): "
                                       "send fewer per request or raise --max-items / EMBEDDER_MAX_ITEMS") from None
        return form.model_validate(fields), uploads

    router = APIRouter(prefix="/v1", responses={"4XX": {"model": schema.ErrorResponse, "description": "refused"},
                                                "5XX": {"model": schema.ErrorResponse,
                                                        "description": "unavailable or a server fault"}})

    def route(method: str, path: str, response: type[BaseModel], request: type[BaseModel] | None = None,
              form: type[BaseModel] | None = None, query: type[BaseModel] | None = None) -> Callable:
        """Register a route; ``request``/``form`` document the body it reads itself (JSON / multipart), ``query``
        the query string it reads itself."""
        extra = None if request is None else {"requestBody": {"required": True, "content": _body_doc(request, form)}}
        if query is not None:
            extra = _query_doc(query)
        return router.api_route(path, methods=[method], response_model=response, openapi_extra=extra)

    # ------------------------------------------------------------------ embedding

    @route("POST", "/embeddings", schema.EmbeddingsResponse, schema.EmbeddingsRequest)
    async def create_embeddings(request: Request) -> Response:
        """OpenAI-compatible: each `input` string is one image (data: URI or base64) or, for a text-image model,
        a text (see `modality`). All or nothing: one bad input fails the call, naming its index."""
        body, _ = await read(request, schema.EmbeddingsRequest)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs:
            raise InvalidArgumentError("`input` is empty; send at least one image (a data: URI or base64 string)")
        if any(not isinstance(x, str) for x in inputs):
            raise InvalidArgumentError("`input` holds token ids; send images as data: URIs or base64 strings, and "
                                       "texts (for a text-image model) as strings")
        takes_text = body.modality is None and await run(service.takes_text, body.model, who(request))
        items = await anyio.to_thread.run_sync(lambda: [
            convert.input_item(str(i), text, modality=body.modality, takes_text=takes_text)
            for i, text in enumerate(inputs)])
        _all_or_nothing([it.error for it in items])  # before any embedding: the call fails anyway
        async with caller(request) as call:
            result = await run(service.embed, items, model=body.model, call=call)
        _all_or_nothing([o.error for o in result.outcomes])
        if body.dimensions is not None and body.dimensions != result.model.dim:
            raise InvalidArgumentError(f"dimensions={body.dimensions} is not offered: model {result.model.name} "
                                       f"gives {result.model.dim}-dimensional vectors; leave `dimensions` out or "
                                       f"set it to {result.model.dim}")
        return json_response(schema.EmbeddingsResponse(
            data=[schema.Embedding(embedding=convert.vector_out(o.vector, body.encoding_format), index=i)
                  for i, o in enumerate(result.outcomes)], model=body.model or result.model.name))

    @route("GET", "/models", schema.ModelsResponse)
    async def list_models(request: Request) -> Response:
        """The loaded models (OpenAI's model list; others load on first use) and the server's limits."""
        infos = await run(service.list_models, who(request))
        limits = await run(service.limits)
        return json_response(schema.ModelsResponse(data=[schema.ModelOut(id=i["name"], **i) for i in infos],
                                                   limits=schema.Limits(**limits)))

    @route("POST", "/embed", schema.EmbedResponse, schema.EmbedRequest, schema.EmbedRequest)
    async def embed(request: Request) -> Response:
        """Per-item results: an item that fails says why in its `error`, the others get vectors."""
        body, uploads = await read(request, schema.EmbedRequest, schema.EmbedRequest)
        items = await anyio.to_thread.run_sync(convert.items, body.items) + uploads
        async with caller(request) as call:
            result = await run(service.embed, items, model=body.model, call=call)
        return json_response(schema.EmbedResponse(
            results=[convert.result(o, body.encoding_format) for o in result.outcomes],
            model_id=result.model.model_id, dim=result.model.dim))

    # ------------------------------------------------------------------ collections

    @route("POST", "/collections/{collection:path}/add", schema.AddResponse, schema.AddRequest, schema.AddForm)
    async def add(collection: str, request: Request) -> Response:
        """Embed and store items (the collection is created on first add); failed items say why."""
        body, uploads = await read(request, schema.AddRequest, schema.AddForm)
        if isinstance(body, schema.AddForm):
            metadata = parse_json_object(body.metadata or "", "the `metadata` form field",
                                         max_bytes=config.max_metadata_bytes, raise_with=METADATA_FLAG) or None
            items = [AddItem(u, label=body.label, metadata=metadata) for u in uploads]
        else:
            items = await anyio.to_thread.run_sync(convert.add_items, body.items)
        async with caller(request) as call:
            out = await run(service.add, collection, items, model=body.model, index=body.index, call=call)
        return json_response(schema.AddResponse(results=[convert.result(o, None) for o in out.outcomes],
                                                added=out.added, replaced=out.replaced, collection=collection,
                                                model_id=out.model.model_id))

    @route("PUT", "/collections/{collection:path}", schema.CollectionOut, schema.CreateCollectionRequest)
    async def create_collection(collection: str, request: Request) -> Response:
        """Create an empty collection (adding to a new name creates one too); an existing one with the same model
        and index is answered as is."""
        body, _ = await read(request, schema.CreateCollectionRequest)
        info = await run(service.create_collection, collection, model=body.model, index=body.index,
                         call=who(request))
        return json_response(convert.collection(info))

    @route("GET", "/collections/{collection:path}/items", schema.ItemsResponse, query=schema.ItemsQuery)
    async def list_items(collection: str, request: Request) -> Response:
        """A page of the collection's items in insertion order, without vectors, and how many match."""
        query = schema.ItemsQuery.model_validate(dict(request.query_params))
        page = await run(service.list_items, collection, **query.model_dump(), call=who(request))
        return json_response(convert.listed(page))

    @router.get("/collections/{collection:path}/image", response_class=Response, openapi_extra=_query_doc(
        schema.ImageQuery), responses={200: {"content": {"image/*": {}}, "description": "the encoded image"}})
    async def item_image(collection: str, request: Request) -> Response:
        """A stored item's kept image, as it was added or as a thumbnail (404 when none is kept)."""
        query = schema.ImageQuery.model_validate(dict(request.query_params))
        data = await run(service.item_image, collection, query.id, size=query.size, call=who(request))
        # caller-supplied bytes: the browser must take them for the image type named, never sniff them as a page
        return Response(data, media_type=convert.image_type(data), headers={
            "x-content-type-options": "nosniff", "content-security-policy": "default-src 'none'",
            "cache-control": "private, no-cache"})

    @route("POST", "/collections/{collection:path}/get", schema.GetResponse, schema.GetRequest)
    async def get(collection: str, request: Request) -> Response:
        body, _ = await read(request, schema.GetRequest)
        found = await run(service.get, collection, body.ids, vectors=not body.omit_vectors, call=who(request))
        encoding = None if body.omit_vectors else body.encoding_format
        return json_response(schema.GetResponse(items=[convert.stored(s, encoding) for s in found if s],
                                                missing=[i for i, s in zip(body.ids, found) if s is None]))

    @route("POST", "/collections/{collection:path}/delete", schema.DeleteResponse, schema.IdsRequest)
    async def delete(collection: str, request: Request) -> Response:
        """Delete items by id; ids not in the collection are listed in `missing`."""
        body, _ = await read(request, schema.IdsRequest)
        result = await run(service.delete, collection, body.ids, call=who(request))
        return json_response(schema.DeleteResponse(deleted=result.deleted, missing=result.missing))

    @route("DELETE", "/collections/{collection:path}", schema.DeleteResponse)
    async def delete_collection(collection: str, request: Request) -> Response:
        """Delete a whole collection and its items."""
        return json_response(schema.DeleteResponse(
            deleted=await run(service.delete_collection, collection, call=who(request))))

    @route("POST", "/collections/{collection:path}/labels", schema.LabelsResponse, schema.LabelsRequest)
    async def set_labels(collection: str, request: Request) -> Response:
        body, _ = await read(request, schema.LabelsRequest)
        return json_response(schema.LabelsResponse(
            updated=await run(service.set_labels, collection, body.labels, body.clear, call=who(request))))

    @route("POST", "/search", schema.SearchResponse, schema.SearchRequest, schema.SearchRequest)
    async def search(request: Request) -> Response:
        """The k nearest stored items to an image (`item`, or one uploaded `image`), a stored item or a vector."""
        body, uploads = await read(request, schema.SearchRequest, schema.SearchRequest)
        if len(uploads) > 1:
            raise InvalidArgumentError(f"{len(uploads)} images uploaded; a search takes one query image")
        query: dict[str, Any] = {}
        if body.item is not None or uploads:
            query["item"] = uploads[0] if uploads else convert.item(body.item)
        if body.item_id is not None:
            query["item_id"] = body.item_id
        if body.vector is not None:
            query["vector"] = convert.vector_in(body.vector)
        async with caller(request) as call:
            found = await run(service.search, collection=body.collection or None, model=body.model, k=body.k,
                              label=body.label, ef_search=body.ef_search, where=body.where, call=call, **query)
        return json_response(schema.SearchResponse(hits=[convert.hit(h) for h in found.hits],
                                                   model_id=found.model_id, cached=found.cached))

    @route("GET", "/stats", schema.StatsResponse)
    async def stats(request: Request) -> Response:
        store_stats, heads = await run(service.stats, who(request))
        return json_response(convert.stats(store_stats, heads))

    @route("POST", "/cache/forget", schema.ForgetResponse, schema.ForgetRequest)
    async def forget(request: Request) -> Response:
        """Delete the cached vectors of images by sha256 (the caller's own; an admin key: everyone's)."""
        body, _ = await read(request, schema.ForgetRequest)
        return json_response(schema.ForgetResponse(forgotten=await run(service.forget, body.sha256s,
                                                                       call=who(request))))

    # ------------------------------------------------------------------ heads

    @route("POST", "/collections/{collection:path}/train", schema.TrainResponse, schema.TrainRequest)
    async def train(collection: str, request: Request) -> Response:
        """Train and save a classifier head on the collection's labelled items."""
        body, _ = await read(request, schema.TrainRequest)
        async with caller(request) as call:
            result = await run(service.train, collection, **body.model_dump(), call=call)
        return json_response(schema.TrainResponse(head=convert.head(result.info), samples=result.samples,
                                                  train_seconds=result.train_seconds,
                                                  total_seconds=result.total_seconds))

    @route("POST", "/collections/{collection:path}/learning-curve", schema.LearningCurveResponse,
           schema.LearningCurveRequest)
    async def learning_curve(collection: str, request: Request) -> Response:
        """Hold-out accuracy at growing numbers of labels per class."""
        body, _ = await read(request, schema.LearningCurveRequest)
        async with caller(request) as call:
            points = await run(service.learning_curve, collection, **body.model_dump(), call=call)
        return json_response(schema.LearningCurveResponse(points=[schema.CurvePointOut(**vars(p)) for p in points]))

    @route("POST", "/collections/{collection:path}/suggest", schema.SuggestResponse, schema.SuggestRequest)
    async def suggest(collection: str, request: Request) -> Response:
        """The unlabelled items most worth labelling next, each with its score and reason."""
        body, _ = await read(request, schema.SuggestRequest)
        async with caller(request) as call:
            result = await run(service.suggest, collection, **body.model_dump(), call=call)
        return json_response(schema.SuggestResponse(
            suggestions=[schema.SuggestionOut(**vars(s)) for s in result.suggestions], strategy=result.strategy,
            candidates=result.candidates, labelled=result.labelled))

    @route("POST", "/collections/{collection:path}/label-issues", schema.LabelIssuesResponse,
           schema.LabelIssuesRequest)
    async def label_issues(collection: str, request: Request) -> Response:
        """Labelled items whose label looks wrong, and duplicates carrying different labels."""
        body, _ = await read(request, schema.LabelIssuesRequest)
        async with caller(request) as call:
            result = await run(service.label_issues, collection, **body.model_dump(), call=call)
        return json_response(schema.LabelIssuesResponse(
            issues=[schema.LabelIssueOut(**vars(i)) for i in result.issues],
            duplicates=[schema.LabelIssueOut(**vars(d)) for d in result.duplicates], checked=result.checked,
            folds=result.folds, noise_rate=result.noise_rate, thresholds=result.thresholds))

    @route("POST", "/predict", schema.PredictResponse, schema.PredictRequest, schema.PredictRequest)
    async def predict(request: Request) -> Response:
        """Apply heads to images (`items` or uploaded `image` files) and stored items (`ids` of `collection`)."""
        body, uploads = await read(request, schema.PredictRequest, schema.PredictRequest)
        items = await anyio.to_thread.run_sync(convert.items, body.items) + uploads
        async with caller(request) as call:
            result = await run(service.predict, body.head_ids, items=items, ids=body.ids,
                               collection=body.collection, top_k=body.top_k, call=call)
        return json_response(schema.PredictResponse(predictions=[convert.prediction(r) for r in result.rows],
                                                    head_ids=result.head_ids, model_id=result.model_id))

    @route("GET", "/heads", schema.HeadsResponse)
    async def list_heads(request: Request) -> Response:
        heads = await run(service.list_heads, who(request))
        return json_response(schema.HeadsResponse(heads=[convert.head(h) for h in heads]))

    @route("DELETE", "/heads/{head_id}", schema.StatusOut)
    async def delete_head(head_id: str, request: Request) -> Response:
        await run(service.delete_head, head_id, call=who(request))
        return json_response(schema.StatusOut(status="deleted"))

    # ------------------------------------------------------------------ jobs

    @route("POST", "/collections/{collection:path}/finetune", schema.JobOut, schema.FineTuneRequest)
    async def finetune(collection: str, request: Request) -> Response:
        """Start a fine-tune (or AdaBN) job on the collection's kept images; poll it with GET /v1/jobs/{id}."""
        body, _ = await read(request, schema.FineTuneRequest)
        params = body.model_dump()
        job = await run(service.finetune, collection, params.pop("suffix"), **params, call=who(request))
        return json_response(convert.job(job), status=202)

    @route("GET", "/jobs/{job_id}", schema.JobOut)
    async def get_job(job_id: str, request: Request) -> Response:
        return json_response(convert.job(await run(service.get_job, job_id, call=who(request))))

    @route("POST", "/jobs/{job_id}/cancel", schema.JobOut)
    async def cancel_job(job_id: str, request: Request) -> Response:
        return json_response(convert.job(await run(service.cancel_job, job_id, call=who(request))))

    # ------------------------------------------------------------------ the app

    app = FastAPI(title="embedder", version=__version__, redoc_url=None,
                  description="Image embeddings, collections, search and classifier heads over HTTP/JSON; the "
                              "same service as the gRPC port (embedder.v1.Embedder). With a server token or API keys, "
                              "send `Authorization: Bearer <token or key>`.")
    app.include_router(router)
    app.include_router(page.router)

    @app.get("/healthz", response_model=schema.StatusOut, tags=["probes"])
    async def healthz() -> Response:
        """Live: the process answers."""
        return json_response(schema.StatusOut(status="ok"))

    @app.get("/readyz", response_model=schema.StatusOut, tags=["probes"],
             responses={503: {"model": schema.ErrorResponse, "description": "loading or shutting down"}})
    async def readyz() -> Response:
        """Ready: the model is loaded and warm, and the server is not shutting down."""
        if is_ready():
            return json_response(schema.StatusOut(status="ready"))
        category = Category.UNAVAILABLE
        return json_response(schema.ErrorResponse(error=convert.item_error(
            category, "not ready: the model is loading or the server is shutting down")), TABLE[category].http)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """The router's own refusals (no such path, wrong method, a malformed form) in the same JSON shape."""
        category = _BY_HTTP.get(exc.status_code, Category.INVALID_ARGUMENT)
        message = f"{exc.detail}: {request.method} {request.url.path}"
        if exc.status_code in (404, 405):
            message += " (every route is listed at /openapi.json and /docs)"
        return json_response(schema.ErrorResponse(error=convert.item_error(category, message)), exc.status_code)

    app.add_exception_handler(HTTPException, http_error)
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    # added innermost first: a request meets Measure, LimitConcurrency, SameOrigin, KnownHosts, Authenticate,
    # LimitBody, AnswerErrors, then its route
    app.add_middleware(AnswerErrors)
    app.add_middleware(LimitBody, limit=config.max_message_bytes, idle_seconds=config.stream_idle_seconds)
    gate = gate or Gate.from_config(config)
    app.add_middleware(Authenticate, gate=gate)  # open while no --token and no key
    app.add_middleware(KnownHosts, gate=gate, allowed=config.allowed_hosts)
    app.add_middleware(SameOrigin)
    app.add_middleware(LimitConcurrency, limit=config.max_concurrent_rpcs)
    if metrics is not None:
        app.add_middleware(Measure, metrics=metrics)
    return app


@asynccontextmanager
async def caller(request: Request) -> AsyncIterator[Call]:
    """The core's view of this HTTP caller: cancelled once the client disconnects (its queued items are dropped
    before the model). HTTP has no deadline of its own, so there is none."""
    gone = threading.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        yield Call(is_cancelled=gone.is_set, principal=request.scope.get(PRINCIPAL))
    finally:
        watcher.cancel()


def who(request: Request) -> Call:
    """The core's view of a caller whose call is quick (no cancellation to watch): its API key."""
    return Call(principal=request.scope.get(PRINCIPAL))


def _item_count(body: BaseModel) -> int:
    """How many items, inputs and ids a parsed body carries (what ``max_items`` bounds)."""
    return sum(len(v) for v in (getattr(body, name, None) for name in ("items", "input", "ids")) if isinstance(v, list))


def _all_or_nothing(errors: list[BaseException | None]) -> None:
    """OpenAI clients expect every vector or an error: raise the first item's error, naming its index."""
    bad = [(i, e) for i, e in enumerate(errors) if e is not None]
    if bad:
        i, error = bad[0]
        more = f" ({len(bad) - 1} more inputs failed too)" if len(bad) > 1 else ""
        error.args = (f"input[{i}]: {error}{more}",)  # a fresh error of this call, as the core does for queries
        raise error


def _service_ready(service: Service) -> bool:
    try:
        service.list_models()
    except NotReadyError:
        return False
    return True


def _body_doc(model: type[BaseModel], form: type[BaseModel] | None) -> dict[str, Any]:
    """The requestBody content of a route that reads its body itself: JSON, and multipart with `image` files."""
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if form is not None:
        fields = form.model_json_schema(ref_template="#/components/schemas/{model}")
        fields.pop("$defs", None)
        fields["properties"].pop("items", None)
        fields["properties"]["image"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                                         "description": "image files; each file's name is its item id"}
        content["multipart/form-data"] = {"schema": fields}
    return content


def _query_doc(query: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI parameters of a query string that a route reads itself (as ``query.model_validate``)."""
    fields = query.model_json_schema()
    return {"parameters": [{"name": name, "in": "query", "required": name in fields.get("required", ()),
                            "description": prop.pop("description", ""), "schema": prop}
                           for name, prop in fields["properties"].items()]}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies routes read themselves, and the bearer token."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        bodies = [schema.EmbeddingsRequest, schema.EmbedRequest, schema.AddRequest, schema.GetRequest,
                  schema.IdsRequest, schema.LabelsRequest, schema.SearchRequest, schema.TrainRequest,
                  schema.LearningCurveRequest, schema.PredictRequest, schema.FineTuneRequest,
                  schema.SuggestRequest, schema.LabelIssuesRequest]
        _, defs = models_json_schema([(m, "validation") for m in bodies],
                                     ref_template="#/components/schemas/{model}")
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs["$defs"])
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        app.openapi_schema = doc
    return app.openapi_schema
