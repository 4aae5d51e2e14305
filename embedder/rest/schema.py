"""The JSON shapes of the HTTP front door: request bodies (validated) and responses (serialized), one model each.

Field names follow the gRPC messages (``embedder.v1``) with JSON in place of ``*_json`` strings, images as
base64 or ``data:`` URIs and vectors as float arrays or base64 little-endian float32 (``encoding_format``).
They are also what ``/openapi.json`` describes.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.service import DEFAULT_K

Encoding = Literal["float", "base64"]
Vector = list[float] | str  # a JSON float array, or base64 of little-endian float32 values
# A query vector has a model's dimension (1,280 to a few thousand): 65,536 floats is far beyond any, and a
# longer array is refused before a Python list of it is built (a 20 MB body of zeros held ~1 GB).
MAX_QUERY_DIM = 65536
QueryVector = (Annotated[list[float], Field(max_length=MAX_QUERY_DIM)]
               | Annotated[str, Field(max_length=(MAX_QUERY_DIM * 4 + 2) // 3 * 4)])

Where = str | dict[str, Any] | None  # a metadata filter: text or a JSON object (embedder.filters)


def _where(what: str) -> Any:
    return Field(None, description=f"only {what} whose metadata passes this filter: text, e.g. "
                                   "`camera == \"a\" and year >= 2020`, or a JSON object, e.g. "
                                   "`{\"camera\": \"a\", \"year\": {\">=\": 2020}}`")


_ENCODING = Field("float", description="`float`: vectors as JSON arrays; `base64`: base64 of little-endian float32")


class Request(BaseModel):
    """A request body: unknown fields are refused, so a misspelt one is not silently ignored."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------- requests

class TensorIn(Request):
    shape: list[int] = Field(description="[H, W] or [H, W, C], C in 1, 3, 4 (channels last)")
    dtype: Literal["uint8", "float32"] = Field(description="uint8 (0..255) or float32 (0..1, little-endian)")
    data: str = Field(description="base64 of the raw pixels, row-major")


class ItemIn(Request):
    """One input: set exactly one of ``image``, ``sha256``, ``tensor`` and ``text``."""

    id: str = ""
    image: str | None = Field(None, description="an encoded image (JPEG, PNG, WebP, ...) as base64 or a data: "
                                                "URI; URLs are refused (the server fetches nothing)")
    sha256: str | None = Field(None, description="sha256 of image bytes the server has embedded before")
    tensor: TensorIn | None = None
    text: str | None = Field(None, description="text, for a text-image model (CLIP, SigLIP): embedded into the "
                                               "space of its images")


class AddItemIn(ItemIn):
    label: str | None = None
    metadata: dict[str, Any] | None = Field(None, description="a JSON object, stored and returned as is")


class EmbedRequest(Request):
    items: list[ItemIn] = []
    model: str = Field("", description="backbone name or model id; empty: the server's default")
    encoding_format: Encoding = _ENCODING


class AddRequest(Request):
    items: list[AddItemIn] = []
    model: str = Field("", description="for a new collection: the model it is bound to; empty: the default")
    index: str = Field("", description="for a new collection: flat (default) or "
                                        "hnsw[:m=..,ef_construction=..], e.g. hnsw:codes=sq8,rerank=40")


class AddForm(Request):
    """``multipart/form-data`` for add: every uploaded image gets the same label and metadata."""

    model: str = ""
    index: str = ""
    label: str | None = None
    metadata: str | None = Field(None, description="a JSON object")


class IdsRequest(Request):
    ids: list[str]


class ItemsQuery(Request):
    """The query string of a listing: one page of items in insertion order."""

    offset: int = Field(0, description="items to skip")
    limit: int = Field(0, description="items per page; 0 means 100, at most 1000")
    label: str | None = Field(None, description="only items with this label")
    unlabelled: bool = Field(False, description="only items without a label")
    where: str | None = _where("items")


class ImageQuery(Request):
    id: str = Field(description="the item's id")
    size: int = Field(0, description="a JPEG thumbnail that fits size x size pixels (16 to 1024); 0: the image "
                                     "as added")


class CreateCollectionRequest(Request):
    model: str = Field("", description="the backbone the collection is bound to; empty: the server's default")
    index: str = Field("", description="flat (default) or hnsw[:m=..,ef_construction=..]")


class ForgetRequest(Request):
    sha256s: list[str] = Field(description="hex sha256 of each image's bytes")


class ForgetResponse(BaseModel):
    forgotten: int = Field(description="cache rows deleted (one per image and model)")


class GetRequest(IdsRequest):
    omit_vectors: bool = False
    encoding_format: Encoding = _ENCODING


class LabelsRequest(Request):
    labels: dict[str, str] = Field({}, description="item id -> new label")
    clear: list[str] = Field([], description="item ids whose label is removed")


class SearchRequest(Request):
    """The query is exactly one of ``item`` (an image), ``item_id`` (a stored item) and ``vector``."""

    collection: str | None = Field(None, description="empty: every collection of the query's model")
    item: ItemIn | None = None
    item_id: str | None = None
    vector: QueryVector | None = None
    model: str = ""
    k: int = DEFAULT_K
    label: str | None = Field(None, description="only items with this label")
    ef_search: int | None = Field(None, description="HNSW collections: the search breadth for this call")
    where: Where = _where("items")


class TrainRequest(Request):
    head: str = Field("", description="logreg (default), linear_svm, svm, zero_shot, few_shot")
    labels: list[str] = []
    ids: list[str] = []
    params: dict[str, Any] = {}
    test_size: float = 0.0
    seed: int = 0
    head_id: str = ""
    adapt_to: str = ""
    adapt_method: str = ""
    where: Where = _where("labelled items (not with `ids`)")
    class_prompts: dict[str, list[str]] = Field({}, description="zero_shot / few_shot heads: per label, texts that "
                                                                 "describe it, e.g. [\"a photo of a cat\"]")


class PredictRequest(Request):
    head_ids: list[str] = Field(description="heads of one backbone; each item is embedded once for all")
    items: list[ItemIn] = []
    collection: str = Field("", description="with `ids`: the collection holding them")
    ids: list[str] = []
    top_k: int = 1


class LearningCurveRequest(Request):
    head: str = ""
    labels: list[str] = []
    params: dict[str, Any] = {}
    per_class: list[int] = []
    repeats: int = 0
    test_size: float = 0.0
    seed: int = 0


class SuggestRequest(Request):
    n: int = Field(0, description="how many to suggest; 0 means 20, at most 1000")
    strategy: str = Field("", description="auto (default), hybrid, margin, entropy, diversity, representative")
    head_id: str = Field("", description="score uncertainty with this head; empty: one trained on the labels")
    ids: list[str] = Field([], description="only these items (their unlabelled ones); empty: every unlabelled one")
    seed: int = 0
    where: Where = _where("unlabelled items (not with `ids`)")


class LabelIssuesRequest(Request):
    limit: int = Field(0, description="most issues of each kind; 0 means 100")
    labels: list[str] = Field([], description="only these classes; empty: every label")
    folds: int = Field(0, description="out-of-fold folds; 0 means 5")
    near_duplicate: float = Field(0.0, description="cosine at or above which two items are near-identical; "
                                                   "0 means 0.995")
    seed: int = 0
    where: Where = _where("labelled items")


class FineTuneRequest(Request):
    suffix: str = Field(description='the new backbone is "<parent>.<suffix>"')
    method: str = Field("", description="finetune (default) or adabn")
    unfreeze: int = 0
    epochs: int = 0
    params: dict[str, Any] = {}
    labels: list[str] = []
    ids: list[str] = []


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; each ``input`` string is one image (a data: URI or base64) or, for a
    text-image model, a text."""

    model_config = ConfigDict(extra="allow")  # OpenAI clients may send fields we have no use for

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Encoding = "float"
    dimensions: int | None = None
    user: str | None = None
    modality: Literal["image", "text"] | None = Field(
        None, description="what every input is (an extension; OpenAI clients send it with extra_body). Left out: "
        "an image, except that for a text-image model a string that is neither a data: URI nor base64 of an "
        "image is a text")


# --------------------------------------------------------------------------------------------- responses

class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="the error category, e.g. invalid_argument, not_found")
    code: str = Field(description="the gRPC status code name the same failure gets on the gRPC port")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Result(BaseModel):
    id: str
    sha256: str
    cached: bool
    vector: Vector | None = None
    error: ErrorBody | None = None


class EmbedResponse(BaseModel):
    results: list[Result]
    model_id: str
    dim: int


class AddResponse(BaseModel):
    results: list[Result]
    added: int
    replaced: int
    collection: str
    model_id: str


class DeleteResponse(BaseModel):
    deleted: int
    missing: list[str] = []


class LabelsResponse(BaseModel):
    updated: int


class StoredItemOut(BaseModel):
    id: str
    collection: str
    dim: int
    vector: Vector | None
    sha256: str | None
    label: str | None
    metadata: dict[str, Any]
    created: float
    updated: float


class GetResponse(BaseModel):
    items: list[StoredItemOut]
    missing: list[str]


class ListedItemOut(BaseModel):
    id: str
    sha256: str | None
    label: str | None
    metadata: dict[str, Any]
    created: float
    updated: float
    image: bool = Field(description="its image is kept: GET /v1/collections/{collection}/image?id=... serves it")


class ItemsResponse(BaseModel):
    items: list[ListedItemOut]
    total: int = Field(description="items that match the filter, in every page")
    offset: int


class HitOut(BaseModel):
    id: str
    score: float
    collection: str
    label: str | None
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    hits: list[HitOut]
    model_id: str
    cached: bool


class CollectionOut(BaseModel):
    name: str
    model_id: str
    dim: int
    index: str
    count: int
    labels: dict[str, int]
    unlabeled: int
    created: float


class StatsResponse(BaseModel):
    collections: list[CollectionOut]
    items: int
    cache_items: int
    cache_max_items: int
    disk_bytes: int
    heads: int


class HeadOut(BaseModel):
    head_id: str
    kind: str
    model_id: str
    dim: int
    classes: list[str]
    class_counts: list[int]
    params: dict[str, Any]
    metrics: dict[str, Any] | None
    created: str
    collection: str
    adaptation: dict[str, Any] | None


class TrainResponse(BaseModel):
    head: HeadOut
    samples: int
    train_seconds: float
    total_seconds: float


class HeadsResponse(BaseModel):
    heads: list[HeadOut]


class LabelScore(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    id: str
    cached: bool
    heads: dict[str, list[LabelScore]] = Field(description="head id -> its top labels, best first")
    error: ErrorBody | None = None


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="items first, then ids, in request order")
    head_ids: list[str]
    model_id: str


class CurvePointOut(BaseModel):
    per_class: int
    n_train: int
    accuracy_mean: float
    accuracy_std: float
    ci_low: float
    ci_high: float
    repeats: int
    fit_seconds: float


class LearningCurveResponse(BaseModel):
    points: list[CurvePointOut]


class SuggestionOut(BaseModel):
    id: str
    score: float = Field(description="higher: more worth labelling (the strategy's own scale)")
    reason: str


class SuggestResponse(BaseModel):
    suggestions: list[SuggestionOut]
    strategy: str
    candidates: int
    labelled: int


class LabelIssueOut(BaseModel):
    id: str
    label: str
    suggested: str
    score: float = Field(description="in [0, 1]; higher: more likely wrong")
    kind: str = Field(description="confident_learning, same_image or near_duplicate")
    other: str = Field(description="a duplicate: the item carrying the other label")


class LabelIssuesResponse(BaseModel):
    issues: list[LabelIssueOut]
    duplicates: list[LabelIssueOut]
    checked: int
    folds: int
    noise_rate: float
    thresholds: dict[str, float]


class JobOut(BaseModel):
    job_id: str
    kind: str
    state: str
    params: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created: float
    updated: float


class ModelOut(BaseModel):
    """OpenAI's model object (``id`` is the backbone name) with the server's model info beside it."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "embedder"


class Limits(BaseModel):
    max_message_bytes: int
    max_items: int
    max_pixels: int


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
    limits: Limits


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: Vector
    index: int


class Usage(BaseModel):
    prompt_tokens: int = 0  # images are not tokens; OpenAI clients expect the fields
    total_tokens: int = 0


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage = Usage()


class StatusOut(BaseModel):
    status: str
