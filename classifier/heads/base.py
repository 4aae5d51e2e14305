"""The :class:`Head` base class (fit, predict, persistence hooks, option checks) and the standardisation."""
from __future__ import annotations

import inspect
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError

from .validation import HeadError, InsufficientDataError, _check_labels, _plain, check_features, check_same_model

STATS_ROW_BLOCK = 8192  # rows per block when computing the standardisation statistics
# C outside this range means no fit at all: 1 / (C * n), the float32 L2 weight, overflows near C = 1e-39 / n,
# far beyond any useful value (the defaults are 0.01 and 0.001 on standardised features).
C_RANGE = (1e-12, 1e12)


class Head(ClassifierMixin, BaseEstimator):
    """Base class: validation, standardisation, labels and the model-id check shared by every head.

    Fitted attributes: ``classes_`` (labels, sorted), ``n_features_in_``, ``mean_``/``scale_`` (the
    standardisation), ``model_id_`` (the backbone the features came from, or None) and
    ``class_counts_``. Subclasses implement ``_fit`` and ``_proba`` on standardised float32 features.
    """

    kind: ClassVar[str]
    min_per_class: ClassVar[int] = 2
    standardize: ClassVar[bool] = True  # False: the head reads features as they are (cosine heads)
    adapter_: Any = None  # a fitted classifier.adapt.DomainAdapter when the head was trained for another domain
    _model_arrays: ClassVar[tuple[str, ...]]  # fitted attributes (without the trailing _) saved as arrays

    def fit(self, X: Any, y: Sequence[Any], *, model_id: str | None = None) -> "Head":
        """Train on features ``X`` (N, dim) and labels ``y`` (N,); ``model_id`` ties the head to its backbone.

        Raises :class:`HeadError` naming the problem: fewer than two classes, a class with too few examples,
        NaN/inf features, or labels that do not match the rows.
        """
        self._validate_params()
        X = check_features(X)
        y = _check_labels(y, len(X))
        classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
        self._check_counts(classes, counts)
        d = X.shape[1]
        self.mean_, self.scale_ = standardization(X) if self.standardize else (np.zeros(d, np.float32),
                                                                                np.ones(d, np.float32))
        self.classes_ = classes
        self.class_counts_ = counts
        self.n_features_in_ = X.shape[1]
        self.model_id_ = model_id
        self._fit(self._standardize(X), y_idx.astype(np.int64))
        return self

    def predict_proba(self, X: Any, *, model_id: str | None = None) -> np.ndarray:
        """Class probabilities, float64 ``(N, n_classes)``, columns in the order of ``classes_``; rows sum to 1.

        ``model_id``, when given, is the backbone that produced ``X``; it must be the one the head was
        trained on (:class:`ModelMismatchError` otherwise).
        """
        return self._proba(self._prepare(X, model_id))

    def predict(self, X: Any, *, model_id: str | None = None) -> np.ndarray:
        """Predicted labels ``(N,)``: the most probable class of each row."""
        proba = self.predict_proba(X, model_id=model_id)
        return self.classes_[np.argmax(proba, axis=1)]

    # --- persistence hooks (used by classifier.persist) ---

    def saved_params(self) -> dict[str, Any]:
        """The options saved with the head (JSON): ``get_params()``, less what only fitting needs."""
        return self.get_params()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every array prediction needs, by name; :meth:`from_arrays` rebuilds the head from them."""
        self._check_fitted()
        names = ("mean", "scale", "class_counts", *self._model_arrays)
        return {name: np.asarray(getattr(self, name + "_"), order="C") for name in names}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, classes: Sequence[Any], params: dict[str, Any],
                    model_id: str | None) -> "Head":
        """Rebuild a fitted head from :meth:`to_arrays` output, its labels, ``get_params()`` and model id."""
        head = cls._create(**params)
        expected = {"mean", "scale", "class_counts", *cls._model_arrays}
        if set(arrays) != expected:
            raise HeadError(f"a {cls.kind} head needs arrays {sorted(expected)}, got {sorted(arrays)}")
        for name, value in arrays.items():
            if value.dtype.kind not in "fiu" or not np.isfinite(value).all():
                raise HeadError(f"array {name!r} must hold finite numbers, got dtype {value.dtype}")
            setattr(head, name + "_", value)
        head.classes_ = np.asarray(list(classes))
        head.n_features_in_ = int(head.mean_.shape[0])
        head.model_id_ = model_id
        head._check_shapes()
        return head

    # --- internals ---

    @classmethod
    def _options(cls) -> dict[str, Any]:
        """This kind's options (``__init__``'s keyword arguments) and their defaults."""
        sig = inspect.signature(cls.__init__)
        return {name: p.default for name, p in sig.parameters.items() if name != "self"}

    @classmethod
    def _create(cls, **params: Any) -> "Head":
        """A new, unfitted head with ``params``; a :class:`HeadError` names an unknown or invalid option."""
        allowed = cls._options()
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise HeadError(f"the {cls.kind} head has no option {', '.join(map(repr, unknown))}; "
                            f"its options are {', '.join(allowed)}")
        head = cls(**params)
        head._validate_params()
        return head

    def _prepare(self, X: Any, model_id: str | None) -> np.ndarray:
        """Check a prediction input against the fitted head; return it standardised."""
        self._check_fitted()
        check_same_model(self.model_id_, model_id)
        X = check_features(X, dim=self.n_features_in_, model_id=self.model_id_)
        if self.adapter_ is not None:  # trained on adapted source features: map target features the same way
            X = self.adapter_.transform_target(X)
        return self._standardize(X)

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")

    def _check_counts(self, classes: np.ndarray, counts: np.ndarray) -> None:
        if len(classes) < 2:
            raise InsufficientDataError(f"need at least two classes to train a classifier, got only "
                                        f"{_plain(classes[0])!r}; add labelled examples of another class")
        need = self.min_per_class
        few = [(_plain(c), int(n)) for c, n in zip(classes, counts) if n < need]
        if few:
            shown = ", ".join(f"{c!r} has {n}" for c, n in few[:10]) + (" ..." if len(few) > 10 else "")
            raise InsufficientDataError(f"the {self.kind} head needs at least {need} examples per class"
                                        f"{self._why_min()}: {shown}; label more examples of those classes "
                                        "or leave them out")

    def _why_min(self) -> str:
        return ""

    def _check_shapes(self) -> None:
        """Raise if the restored arrays do not fit together (a corrupt or edited file)."""
        d, k = self.n_features_in_, len(self.classes_)
        if self.mean_.shape != (d,) or self.scale_.shape != (d,) or self.class_counts_.shape != (k,):
            raise HeadError(f"standardisation arrays do not match {d}-d features and {k} classes")

    def _validate_params(self) -> None:
        for name, value in self.get_params().items():
            _check_param(self, name, value)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _check_param(head: Head, name: str, value: Any) -> None:
    def fail(expected: str) -> None:
        raise HeadError(f"{head.kind}: {name} must be {expected}, got {value!r}")

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    if name == "class_weight" and value not in (None, "balanced"):
        fail("None or 'balanced'")
    elif name == "device" and not (isinstance(value, str) and (value in ("auto", "cpu") or value.startswith("cuda"))):
        fail("'auto', 'cpu' or 'cuda[:N]'")
    elif name in ("max_iter", "max_samples") and not (is_number(value) and int(value) == value >= 1):
        fail("an integer >= 1")
    elif name == "seed" and not (is_number(value) and int(value) == value >= 0):
        fail("an integer >= 0")
    elif name == "C" and not (is_number(value) and C_RANGE[0] <= value <= C_RANGE[1]):
        fail(f"a number from {C_RANGE[0]:g} to {C_RANGE[1]:g}")
    elif name in ("tol", "logit_scale") and not (is_number(value) and 0 < value < np.inf):
        fail("a positive number")
    elif name == "prior_weight" and not (is_number(value) and 0 <= value < np.inf):
        fail("a number >= 0")
    elif name == "prior" and value is not None and not isinstance(value, Mapping):
        fail("a mapping of label to class vector")
    elif name == "gamma" and value != "scale" and not (is_number(value) and 0 < value < np.inf):
        fail("'scale' or a positive number")


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits ``z`` (shifted by each row's max, so large logits cannot overflow)."""
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def check_linear(head: Head) -> None:
    """A linear head's ``coef_`` (classes x features) and ``intercept_`` (classes) match its features and classes."""
    d, k = head.n_features_in_, len(head.classes_)
    if head.coef_.shape != (k, d) or head.intercept_.shape != (k,):
        raise HeadError(f"{head.kind} arrays do not match {d}-d features and {k} classes")


def standardization(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's ``mean_`` and ``scale_`` of float32 ``X``, as float32; constant features get scale 1.

    Two passes over row blocks, summing in float64: as exact as StandardScaler without its full-size float64
    temporaries (60k x 1280 here: 0.4 s against StandardScaler's 0.5-1.7 s).
    """
    n = len(X)
    mean = np.zeros(X.shape[1])
    for start in range(0, n, STATS_ROW_BLOCK):
        mean += X[start:start + STATS_ROW_BLOCK].sum(axis=0, dtype=np.float64)
    mean /= n
    sq = np.zeros(X.shape[1])
    for start in range(0, n, STATS_ROW_BLOCK):
        sq += np.square(X[start:start + STATS_ROW_BLOCK] - mean, dtype=np.float64).sum(axis=0)
    std = np.sqrt(sq / n)
    # StandardScaler's rule: a variance at rounding-error level means the feature is constant
    constant = std <= 10 * np.finfo(np.float32).eps * np.maximum(np.abs(mean), 1.0)
    return mean.astype(np.float32), np.where(constant, 1.0, std).astype(np.float32)
