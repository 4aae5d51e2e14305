"""What the :class:`~embedder.store.Store` facade needs from a collections backend, and the choice of one.

Two backends hold the collections (names bound to a model and dim, items with vector, sha256, label, metadata,
kept images; search with label and metadata filters):

- :class:`~embedder.store.local.LocalCollections`: FAISS in RAM, SQLite as the truth, in the data dir. The
  default: embedded, no server, one process per data dir.
- :class:`~embedder.store.milvus.MilvusCollections`: Milvus through ``pymilvus``; ``milvus:///abs/path.db`` is
  milvus-lite (an embedded Milvus in a local file), ``http(s)://host:port`` a Milvus server or cluster that
  every ``--role all`` replica may share.

The facade validates every argument before it calls a backend, so backends receive checked values only: names,
ids and labels of the allowed lengths, ``(N, dim)`` finite float32 vectors, metadata as its canonical JSON text.
"""
from __future__ import annotations

from typing import AbstractSet, Any, Protocol, Sequence

import numpy as np

from ..errors import DimensionMismatchError, InvalidArgumentError, ModelMismatchError
from ..filters import Filter
from ..index import IndexSpec
from ..results import AddResult, CollectionInfo, DeleteResult, Hit, ItemPage, StoredItem


class Collections(Protocol):
    """A collections backend; thread-safe. Errors: NotFoundError (collection or ids), ModelMismatchError /
    DimensionMismatchError (binding), StoreClosedError after :meth:`close`, DataLossError (damaged rows)."""

    def create_collection(self, name: str, model_id: str, dim: int, spec: IndexSpec) -> CollectionInfo: ...

    def add(self, name: str, ids: list[str], x: np.ndarray, model_id: str, shas: list[str | None],
            labels: list[str | None], metas: list[str], images: list[bytes | None]) -> AddResult: ...

    def delete(self, name: str, ids: list[str]) -> DeleteResult: ...

    def set_labels(self, name: str, labels: dict[str, str | None]) -> int: ...

    def delete_collection(self, name: str) -> None: ...

    def get(self, name: str, ids: list[str]) -> list[StoredItem | None]: ...

    def training_rows(self, name: str, ids: list[str] | None,
                      where: Filter | None = None) -> tuple[list[str], np.ndarray, list[str | None]]:
        """``(ids, vectors, labels)`` in insertion order: of the labelled items (passing ``where``), or of the
        ``ids`` that exist, labelled or not (the facade names the missing and unlabelled ones)."""

    def images(self, name: str, ids: list[str]) -> list[bytes | None]: ...

    def page(self, name: str, offset: int, limit: int, label: str | None, unlabelled: bool,
             where: Filter | None) -> ItemPage:
        """Items ``offset`` to ``offset + limit`` in insertion order of those labelled ``label`` / ``unlabelled`` /
        any, passing ``where``, with their total and whether each image is kept."""

    def vectors(self, name: str, where: Filter | None = None) -> tuple[list[str], np.ndarray]: ...

    def search(self, collection: str | None, q: np.ndarray, k: int, label: str | None, model_id: str | None,
               ef_search: int | None, only: AbstractSet[str] | None,
               where: Filter | None = None) -> list[list[Hit]]: ...

    def collection(self, name: str) -> CollectionInfo: ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def members(self, model_id: str, shas: Sequence[str], visible: AbstractSet[str] | None) -> dict[str, np.ndarray]:
        """The vector of each of ``shas`` that an item of a collection of ``model_id`` in ``visible`` (None: any)
        holds: the cache's second place to look."""

    def disk_bytes(self) -> int: ...

    def shared_files(self, folder: str) -> Any:
        """Where files every replica must read alike are kept (a :class:`classifier.places.HeadPlace`), None when
        this backend is one node's (then they stay in its data dir)."""

    def save(self) -> None: ...

    def close(self) -> None: ...


def check_binding(name: str, have_model: str, have_dim: int, model_id: str, dim: int) -> None:
    """Refuse vectors of another model or dim than collection ``name`` holds."""
    if model_id != have_model:
        raise ModelMismatchError(f"collection {name!r} holds vectors of model {have_model}, not {model_id}; vectors "
                                 "of different models are not comparable. Use another collection.")
    if dim != have_dim:
        raise DimensionMismatchError(f"collection {name!r} holds {have_dim}-d vectors, got {dim}-d; use another "
                                     "collection, or vectors of its model")


def pick_model(models: AbstractSet[str], model_id: str | None) -> str | None:
    """The model a search without a collection covers: ``model_id``, or the one model all collections share."""
    if model_id is None and len(models) > 1:
        raise InvalidArgumentError(f"collections hold vectors of {len(models)} models ({', '.join(sorted(models))}); "
                                   "pass model_id= to choose the ones to search")
    return model_id if model_id is not None else next(iter(models), None)
