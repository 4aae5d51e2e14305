"""The checks every head shares: features, labels and the backbone they came from, and the errors they raise."""
from __future__ import annotations

from typing import Any

import numpy as np

from embedder.errors import Category, EmbedderError, ModelMismatchError


class HeadError(EmbedderError, ValueError):
    """Training data or a prediction input a head cannot use; the message says how to fix it."""

    category = Category.INVALID_ARGUMENT


class InsufficientDataError(HeadError):
    """Too few classes, or too few examples of a class, to train or evaluate: label more data."""

    category = Category.FAILED_PRECONDITION


def check_features(X: Any, *, dim: int | None = None, model_id: str | None = None) -> np.ndarray:
    """``X`` as a C-contiguous float32 ``(N, dim)`` array of finite values, or a :class:`HeadError` saying why not."""
    try:
        X = np.ascontiguousarray(X, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise HeadError(f"features must be a numeric (N, dim) array; could not convert them: {e}") from None
    if X.ndim != 2:
        raise HeadError(f"features must be a 2-D (N, dim) array, got shape {X.shape}; "
                        "for one vector pass X.reshape(1, -1)")
    if X.shape[0] == 0:
        raise HeadError("got no feature rows (X has shape (0, dim))")
    if dim is not None and X.shape[1] != dim:
        trained = f" of model {model_id!r}" if model_id else ""
        raise HeadError(f"features have dim {X.shape[1]} but the head was trained on {dim}-d features{trained}; "
                        "embed the images with the model the head was trained on")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
        raise HeadError(f"{len(rows)} feature rows contain NaN or infinity (rows {shown}); "
                        "drop those items or embed them again")
    return X


def check_same_model(head_model_id: str | None, model_id: str | None) -> None:
    """Refuse features of another backbone than the one a head was trained on (either id may be unknown)."""
    if model_id is not None and head_model_id is not None and model_id != head_model_id:
        raise ModelMismatchError(
            f"these features come from model {model_id!r} but the head was trained on features of model "
            f"{head_model_id!r}; embed the images with {head_model_id!r}, or train a new head on "
            f"{model_id!r} features", expected_model_id=head_model_id, other_model_id=model_id)


def _check_labels(y: Any, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise HeadError(f"labels must be a 1-D sequence, got shape {y.shape}")
    if len(y) != n:
        raise HeadError(f"got {n} feature rows but {len(y)} labels; pass one label per row")
    if y.dtype.kind not in "iuUO":
        raise HeadError(f"labels must be strings or integers, got dtype {y.dtype}; "
                        "convert them, e.g. y.astype(int) or [str(v) for v in y]")
    if y.dtype.kind == "O":
        if all(isinstance(v, str) for v in y):
            return y.astype(str)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in y):
            return y.astype(np.int64)
        raise HeadError("labels must be all strings or all integers, not a mix")
    return y


def _plain(value: Any) -> Any:
    """A numpy scalar as the matching Python value, so labels serialise to JSON."""
    return value.item() if isinstance(value, np.generic) else value
