"""Argument checks of the store's public methods. Messages name what was received and how to fix it.

Every check raises :class:`InvalidArgumentError` (a ``ValueError``, so ``except ValueError`` still catches it).
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from ..errors import InvalidArgumentError
from ..inputs import MAX_NAME, shown
from ..index import HNSW_CAPS
from ..jsonrule import check_json_object

MAX_K = 10_000  # hits per query; a bound on what one request can make the server allocate
MAX_ID = 1024  # item ids
MAX_PAGE = 1000  # items per page of a listing: a page is a screenful, never the whole collection
_SHA256 = re.compile(r"[0-9a-f]{64}")
_T = TypeVar("_T")


def check_list(values: Any, what: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidArgumentError(f"{what} must be a list, got {type(values).__name__}; "
                                   "wrap a single value in [...]")
    return list(values)


def check_ids(ids: Any) -> list[str]:
    ids = check_list(ids, "ids")
    for i in ids:
        if not isinstance(i, str) or not i or len(i) > MAX_ID:
            raise InvalidArgumentError(f"item ids must be strings of 1 to {MAX_ID} characters, got {shown(i)}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise InvalidArgumentError(f"item id {shown(dup)} appears more than once in one call; pass each id once")
    return ids


def check_sha256(sha: Any) -> str:
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
        raise InvalidArgumentError("a sha256 must be 64 hex digits (hashlib.sha256(image_bytes).hexdigest()), "
                                   f"got {shown(sha)}")
    return sha.lower()


def check_model_id(model_id: Any) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise InvalidArgumentError(f"model_id must be a non-empty string (Embedder.model_id), got {shown(model_id)}")
    return model_id


def check_label(label: Any) -> str | None:
    if label is not None and (not isinstance(label, str) or not label or len(label) > MAX_NAME):
        raise InvalidArgumentError(f"a label must be a string of 1 to {MAX_NAME} characters, or None for no label; "
                                   f"got {shown(label)}")
    return label


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise InvalidArgumentError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    return int(k)


def check_ef(ef_search: Any) -> int | None:
    cap = HNSW_CAPS["ef_search"]
    if ef_search is not None and (isinstance(ef_search, bool) or not isinstance(ef_search, int)
                                  or not 1 <= ef_search <= cap):
        raise InvalidArgumentError(f"ef_search must be an int in [1, {cap}] (its cap: embedder.index.HNSW_CAPS) "
                                   f"or None, got {ef_search!r}")
    return ef_search


def check_vectors(x: Any, *, n: int | None = None, name: str = "vectors", nonzero: bool = True) -> np.ndarray:
    """``x`` as C-contiguous float32 ``(N, D)``, finite (and without zero rows when ``nonzero``)."""
    try:
        arr = np.ascontiguousarray(x, dtype="float32")
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{name} must be a float array of shape (N, dim): {e}") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidArgumentError(f"{name} must have shape (N, dim), got {arr.shape}; "
                                   "pass v[None] for a single vector")
    if n is not None and len(arr) != n:
        raise InvalidArgumentError(f"{name} has {len(arr)} rows but {n} ids were given; pass one row per id")
    bad = ~np.isfinite(arr).all(axis=1)
    if nonzero:
        bad |= ~arr.any(axis=1)
    if bad.any():
        raise InvalidArgumentError(f"row {int(np.argmax(bad))} of {name} is not finite or is all zeros; "
                                   "cosine similarity needs finite, non-zero vectors")
    return arr


def check_column(values: Sequence[_T] | None, ids: list[str], what: str, check: Callable[[Any], _T]) -> list[_T]:
    """One optional per-item argument of :meth:`Store.add`: ``check`` applied to each, or all None."""
    if values is None:
        return [None] * len(ids)  # type: ignore[list-item]
    values = check_list(values, what)
    if len(values) != len(ids):
        raise InvalidArgumentError(f"{what} has {len(values)} entries but {len(ids)} ids were given; "
                                   "pass one per id (or None)")
    return [check(v) for v in values]


def metadata_json(metadata: Any, item_id: str) -> str:
    """An item's metadata as the JSON text stored in SQLite."""
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"metadata of item {shown(item_id)} must be a dict, "
                                   f"got {type(metadata).__name__}")
    try:  # the one JSON rule (depth first: deeper values would raise RecursionError wherever they are read)
        check_json_object(dict(metadata), f"metadata of item {shown(item_id)}", max_bytes=None)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    try:
        text = json.dumps(dict(metadata), sort_keys=True, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # a lone surrogate cannot be stored as UTF-8
        return text
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidArgumentError(f"metadata of item {shown(item_id)} is not storable JSON ({type(e).__name__}: "
                                   f"{str(e)[:200]}); use str, finite numbers, bool, None, list and dict "
                                   "values") from None


def missing_message(ids: list[str], collection: str) -> str:
    """The message of a :class:`NotFoundError` for item ids absent from a collection."""
    listed = ", ".join(shown(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return f"no item {listed} in collection {shown(collection)}"


def check_page(offset: Any, limit: Any) -> tuple[int, int]:
    """A listing's ``offset`` (>= 0) and ``limit`` (1 to :data:`MAX_PAGE`)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**53:
        raise InvalidArgumentError(f"offset must be a whole number from 0 to 2**53 - 1 (items to skip), got "
                                   f"{shown(offset)}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidArgumentError(f"limit must be a whole number from 1 to {MAX_PAGE} (items per page), got "
                                   f"{shown(limit)}; page through a large collection with offset")
    return offset, limit
