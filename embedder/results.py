"""Result types every layer shares: plain dataclasses over numpy, no ML stack.

The client, the service core, the store and the heads all return these, so a caller that installed only the
client gets the same objects as one that runs the library in process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class BatchResult:
    """Per-item outcome of :meth:`Embedder.embed_batch`.

    ``vectors`` is float32 ``(N, dim)``; the row of a failed item is all zeros and ``errors[i]`` says why.
    """

    vectors: np.ndarray
    errors: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


@dataclass(frozen=True, repr=False)
class Hit:
    """One search result; ``score`` is the cosine similarity to the query."""

    id: str
    score: float
    collection: str
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        extra = f", metadata={self.metadata!r}" if self.metadata else ""
        return (f"Hit(id={self.id!r}, score={self.score:.4f}, collection={self.collection!r}, "
                f"label={self.label!r}{extra})")


@dataclass(frozen=True, eq=False, repr=False)
class StoredItem:
    """An item as stored: its vector exactly as added, and its metadata."""

    id: str
    collection: str
    vector: np.ndarray
    sha256: str | None
    label: str | None
    metadata: dict[str, Any]
    created: float
    updated: float

    def __repr__(self) -> str:
        return (f"StoredItem(id={self.id!r}, collection={self.collection!r}, vector=<float32[{len(self.vector)}]>, "
                f"label={self.label!r}, metadata={self.metadata!r})")


@dataclass(frozen=True)
class ItemPage:
    """One page of a collection's items, in insertion order: ``items[i]`` and whether its image is kept
    (``kept[i]``); ``total`` items match the filter; the page starts at ``offset`` of them."""

    items: list[StoredItem]
    kept: list[bool]
    total: int
    offset: int


@dataclass(frozen=True)
class AddResult:
    collection: str
    added: int  # new ids
    replaced: int  # ids that existed: vector, label and metadata replaced


@dataclass(frozen=True)
class DeleteResult:
    collection: str
    deleted: int
    missing: list[str]  # ids that were not in the collection (deleting them is a no-op, not an error)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    model_id: str
    dim: int
    index: str  # IndexSpec string: "flat" or "hnsw:m=..,ef_construction=..,ef_search=.."
    count: int
    labels: dict[str, int]  # items per label; unlabelled items are counted in `unlabeled`
    unlabeled: int
    created: float


@dataclass(frozen=True)
class StoreStats:
    collections: list[CollectionInfo]
    items: int  # in all collections
    cache_items: int  # cached vectors outside every collection
    cache_max_items: int
    disk_bytes: int  # SQLite (with WAL) and snapshots


@dataclass(frozen=True)
class CurvePoint:
    """Hold-out accuracy of a head trained on ``per_class`` labelled examples of each class, over ``repeats``
    random draws; ``ci_low``/``ci_high`` bound the mean with 95% confidence (Student's t)."""

    per_class: int
    n_train: int
    accuracy_mean: float
    accuracy_std: float
    ci_low: float
    ci_high: float
    repeats: int
    fit_seconds: float  # mean per fit
