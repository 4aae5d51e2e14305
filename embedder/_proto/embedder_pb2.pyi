from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_FLOAT32: DType

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "image", "tensor", "content_sha256", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    tensor: Tensor
    content_sha256: str
    text: str
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., content_sha256: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("id", "vector", "dim", "model_id", "status", "cached", "sha256")
    ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    id: str
    vector: bytes
    dim: int
    model_id: str
    status: Status
    cached: bool
    sha256: str
    def __init__(self, id: _Optional[str] = ..., vector: _Optional[bytes] = ..., dim: _Optional[int] = ..., model_id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., cached: _Optional[bool] = ..., sha256: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("items", "model")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    model: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("results", "model_id", "dim")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    model_id: str
    dim: int
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., model_id: _Optional[str] = ..., dim: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "model_id", "dim", "device", "runtime", "precision", "input_size", "normalize", "text")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    dim: int
    device: str
    runtime: str
    precision: str
    input_size: int
    normalize: bool
    text: bool
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., dim: _Optional[int] = ..., device: _Optional[str] = ..., runtime: _Optional[str] = ..., precision: _Optional[str] = ..., input_size: _Optional[int] = ..., normalize: _Optional[bool] = ..., text: _Optional[bool] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_items", "max_pixels")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_items: int
    max_pixels: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_items: _Optional[int] = ..., max_pixels: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    limits: ServerLimits
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...

class AddItem(_message.Message):
    __slots__ = ("item", "label", "metadata_json")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    item: Item
    label: str
    metadata_json: str
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ..., label: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("collection", "items", "index", "model")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    items: _containers.RepeatedCompositeFieldContainer[AddItem]
    index: str
    model: str
    def __init__(self, collection: _Optional[str] = ..., items: _Optional[_Iterable[_Union[AddItem, _Mapping]]] = ..., index: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("results", "added", "replaced", "collection")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    added: int
    replaced: int
    collection: str
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., added: _Optional[int] = ..., replaced: _Optional[int] = ..., collection: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids", "whole_collection")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WHOLE_COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    whole_collection: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., whole_collection: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "missing")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class SetLabelsRequest(_message.Message):
    __slots__ = ("collection", "labels", "clear")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    collection: str
    labels: _containers.ScalarMap[str, str]
    clear: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., clear: _Optional[_Iterable[str]] = ...) -> None: ...

class SetLabelsResponse(_message.Message):
    __slots__ = ("updated",)
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    updated: int
    def __init__(self, updated: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("collection", "ids", "omit_vectors")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    OMIT_VECTORS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    omit_vectors: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., omit_vectors: _Optional[bool] = ...) -> None: ...

class StoredItem(_message.Message):
    __slots__ = ("id", "collection", "vector", "dim", "sha256", "label", "metadata_json", "created", "updated")
    ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    collection: str
    vector: bytes
    dim: int
    sha256: str
    label: str
    metadata_json: str
    created: float
    updated: float
    def __init__(self, id: _Optional[str] = ..., collection: _Optional[str] = ..., vector: _Optional[bytes] = ..., dim: _Optional[int] = ..., sha256: _Optional[str] = ..., label: _Optional[str] = ..., metadata_json: _Optional[str] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("items", "missing")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StoredItem]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[StoredItem, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "item", "item_id", "vector", "k", "label", "ef_search", "model", "where")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    item: Item
    item_id: str
    vector: bytes
    k: int
    label: str
    ef_search: int
    model: str
    where: str
    def __init__(self, collection: _Optional[str] = ..., item: _Optional[_Union[Item, _Mapping]] = ..., item_id: _Optional[str] = ..., vector: _Optional[bytes] = ..., k: _Optional[int] = ..., label: _Optional[str] = ..., ef_search: _Optional[int] = ..., model: _Optional[str] = ..., where: _Optional[str] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "collection", "label", "metadata_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    collection: str
    label: str
    metadata_json: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., collection: _Optional[str] = ..., label: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "model_id", "cached")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    model_id: str
    cached: bool
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., model_id: _Optional[str] = ..., cached: _Optional[bool] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("collection", "offset", "limit", "label", "unlabelled", "where")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    UNLABELLED_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    offset: int
    limit: int
    label: str
    unlabelled: bool
    where: str
    def __init__(self, collection: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ..., label: _Optional[str] = ..., unlabelled: _Optional[bool] = ..., where: _Optional[str] = ...) -> None: ...

class ListedItem(_message.Message):
    __slots__ = ("item", "image_kept")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEPT_FIELD_NUMBER: _ClassVar[int]
    item: StoredItem
    image_kept: bool
    def __init__(self, item: _Optional[_Union[StoredItem, _Mapping]] = ..., image_kept: _Optional[bool] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items", "total", "offset")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ListedItem]
    total: int
    offset: int
    def __init__(self, items: _Optional[_Iterable[_Union[ListedItem, _Mapping]]] = ..., total: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("collection", "id", "size")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    id: str
    size: int
    def __init__(self, collection: _Optional[str] = ..., id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class GetImageResponse(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    def __init__(self, image: _Optional[bytes] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("collection", "model", "index")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    collection: str
    model: str
    index: str
    def __init__(self, collection: _Optional[str] = ..., model: _Optional[str] = ..., index: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("sha256s",)
    SHA256S_FIELD_NUMBER: _ClassVar[int]
    sha256s: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256s: _Optional[_Iterable[str]] = ...) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("forgotten",)
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    forgotten: int
    def __init__(self, forgotten: _Optional[int] = ...) -> None: ...

class CollectionStats(_message.Message):
    __slots__ = ("name", "model_id", "dim", "index", "count", "labels", "unlabeled", "created")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    UNLABELED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    dim: int
    index: str
    count: int
    labels: _containers.ScalarMap[str, int]
    unlabeled: int
    created: float
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., dim: _Optional[int] = ..., index: _Optional[str] = ..., count: _Optional[int] = ..., labels: _Optional[_Mapping[str, int]] = ..., unlabeled: _Optional[int] = ..., created: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("collections", "items", "cache_items", "cache_max_items", "disk_bytes", "heads")
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CACHE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionStats]
    items: int
    cache_items: int
    cache_max_items: int
    disk_bytes: int
    heads: int
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionStats, _Mapping]]] = ..., items: _Optional[int] = ..., cache_items: _Optional[int] = ..., cache_max_items: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., heads: _Optional[int] = ...) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("head_id", "kind", "model_id", "dim", "classes", "class_counts", "params_json", "metrics_json", "created", "collection", "adaptation_json")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_JSON_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    kind: str
    model_id: str
    dim: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    class_counts: _containers.RepeatedScalarFieldContainer[int]
    params_json: str
    metrics_json: str
    created: str
    collection: str
    adaptation_json: str
    def __init__(self, head_id: _Optional[str] = ..., kind: _Optional[str] = ..., model_id: _Optional[str] = ..., dim: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., class_counts: _Optional[_Iterable[int]] = ..., params_json: _Optional[str] = ..., metrics_json: _Optional[str] = ..., created: _Optional[str] = ..., collection: _Optional[str] = ..., adaptation_json: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("collection", "head", "labels", "ids", "params_json", "test_size", "seed", "head_id", "adapt_to", "adapt_method", "where", "class_prompts", "model")
    class ClassPromptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Prompts
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Prompts, _Mapping]] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    TEST_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPT_TO_FIELD_NUMBER: _ClassVar[int]
    ADAPT_METHOD_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    head: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    ids: _containers.RepeatedScalarFieldContainer[str]
    params_json: str
    test_size: float
    seed: int
    head_id: str
    adapt_to: str
    adapt_method: str
    where: str
    class_prompts: _containers.MessageMap[str, Prompts]
    model: str
    def __init__(self, collection: _Optional[str] = ..., head: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., ids: _Optional[_Iterable[str]] = ..., params_json: _Optional[str] = ..., test_size: _Optional[float] = ..., seed: _Optional[int] = ..., head_id: _Optional[str] = ..., adapt_to: _Optional[str] = ..., adapt_method: _Optional[str] = ..., where: _Optional[str] = ..., class_prompts: _Optional[_Mapping[str, Prompts]] = ..., model: _Optional[str] = ...) -> None: ...

class Prompts(_message.Message):
    __slots__ = ("prompts",)
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("head", "samples", "train_seconds", "total_seconds")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    head: HeadInfo
    samples: int
    train_seconds: float
    total_seconds: float
    def __init__(self, head: _Optional[_Union[HeadInfo, _Mapping]] = ..., samples: _Optional[int] = ..., train_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("head_id", "items", "collection", "ids", "top_k", "head_ids")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HEAD_IDS_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    head_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, head_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., head_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class HeadResult(_message.Message):
    __slots__ = ("head_id", "top")
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    def __init__(self, head_id: _Optional[str] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("id", "status", "top", "cached", "heads")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    cached: bool
    heads: _containers.RepeatedCompositeFieldContainer[HeadResult]
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., cached: _Optional[bool] = ..., heads: _Optional[_Iterable[_Union[HeadResult, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "head_id", "model_id")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    head_id: str
    model_id: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., head_id: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class ListHeadsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHeadsResponse(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    def __init__(self, heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ...) -> None: ...

class DeleteHeadRequest(_message.Message):
    __slots__ = ("head_id",)
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    head_id: str
    def __init__(self, head_id: _Optional[str] = ...) -> None: ...

class DeleteHeadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LearningCurveRequest(_message.Message):
    __slots__ = ("collection", "head", "labels", "per_class", "repeats", "test_size", "seed", "params_json")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    TEST_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    collection: str
    head: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    per_class: _containers.RepeatedScalarFieldContainer[int]
    repeats: int
    test_size: float
    seed: int
    params_json: str
    def __init__(self, collection: _Optional[str] = ..., head: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., per_class: _Optional[_Iterable[int]] = ..., repeats: _Optional[int] = ..., test_size: _Optional[float] = ..., seed: _Optional[int] = ..., params_json: _Optional[str] = ...) -> None: ...

class CurvePoint(_message.Message):
    __slots__ = ("per_class", "n_train", "accuracy_mean", "accuracy_std", "ci_low", "ci_high", "repeats", "fit_seconds")
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    N_TRAIN_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_MEAN_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_STD_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    FIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    per_class: int
    n_train: int
    accuracy_mean: float
    accuracy_std: float
    ci_low: float
    ci_high: float
    repeats: int
    fit_seconds: float
    def __init__(self, per_class: _Optional[int] = ..., n_train: _Optional[int] = ..., accuracy_mean: _Optional[float] = ..., accuracy_std: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., repeats: _Optional[int] = ..., fit_seconds: _Optional[float] = ...) -> None: ...

class LearningCurveResponse(_message.Message):
    __slots__ = ("points",)
    POINTS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[CurvePoint]
    def __init__(self, points: _Optional[_Iterable[_Union[CurvePoint, _Mapping]]] = ...) -> None: ...

class SuggestRequest(_message.Message):
    __slots__ = ("collection", "n", "strategy", "head_id", "ids", "seed", "where")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    n: int
    strategy: str
    head_id: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    where: str
    def __init__(self, collection: _Optional[str] = ..., n: _Optional[int] = ..., strategy: _Optional[str] = ..., head_id: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., where: _Optional[str] = ...) -> None: ...

class Suggestion(_message.Message):
    __slots__ = ("id", "score", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    reason: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class SuggestResponse(_message.Message):
    __slots__ = ("suggestions", "strategy", "candidates", "labelled")
    SUGGESTIONS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    suggestions: _containers.RepeatedCompositeFieldContainer[Suggestion]
    strategy: str
    candidates: int
    labelled: int
    def __init__(self, suggestions: _Optional[_Iterable[_Union[Suggestion, _Mapping]]] = ..., strategy: _Optional[str] = ..., candidates: _Optional[int] = ..., labelled: _Optional[int] = ...) -> None: ...

class LabelIssuesRequest(_message.Message):
    __slots__ = ("collection", "limit", "labels", "folds", "near_duplicate", "seed", "where")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FOLDS_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    limit: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    folds: int
    near_duplicate: float
    seed: int
    where: str
    def __init__(self, collection: _Optional[str] = ..., limit: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., folds: _Optional[int] = ..., near_duplicate: _Optional[float] = ..., seed: _Optional[int] = ..., where: _Optional[str] = ...) -> None: ...

class LabelIssue(_message.Message):
    __slots__ = ("id", "label", "suggested", "score", "kind", "other")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    suggested: str
    score: float
    kind: str
    other: str
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., suggested: _Optional[str] = ..., score: _Optional[float] = ..., kind: _Optional[str] = ..., other: _Optional[str] = ...) -> None: ...

class LabelIssuesResponse(_message.Message):
    __slots__ = ("issues", "duplicates", "checked", "folds", "noise_rate", "thresholds")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    FOLDS_FIELD_NUMBER: _ClassVar[int]
    NOISE_RATE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    issues: _containers.RepeatedCompositeFieldContainer[LabelIssue]
    duplicates: _containers.RepeatedCompositeFieldContainer[LabelIssue]
    checked: int
    folds: int
    noise_rate: float
    thresholds: _containers.ScalarMap[str, float]
    def __init__(self, issues: _Optional[_Iterable[_Union[LabelIssue, _Mapping]]] = ..., duplicates: _Optional[_Iterable[_Union[LabelIssue, _Mapping]]] = ..., checked: _Optional[int] = ..., folds: _Optional[int] = ..., noise_rate: _Optional[float] = ..., thresholds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class FineTuneRequest(_message.Message):
    __slots__ = ("collection", "labels", "ids", "suffix", "unfreeze", "epochs", "params_json", "method")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    UNFREEZE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    collection: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    ids: _containers.RepeatedScalarFieldContainer[str]
    suffix: str
    unfreeze: int
    epochs: int
    params_json: str
    method: str
    def __init__(self, collection: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., ids: _Optional[_Iterable[str]] = ..., suffix: _Optional[str] = ..., unfreeze: _Optional[int] = ..., epochs: _Optional[int] = ..., params_json: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "kind", "state", "progress_json", "result_json", "error", "created", "updated", "params_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    state: str
    progress_json: str
    result_json: str
    error: str
    created: float
    updated: float
    params_json: str
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., progress_json: _Optional[str] = ..., result_json: _Optional[str] = ..., error: _Optional[str] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., params_json: _Optional[str] = ...) -> None: ...
