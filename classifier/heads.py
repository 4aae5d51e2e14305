"""Classifier heads: small scikit-learn-style estimators trained on cached embeddings.

Three kinds, built with :func:`make_head` (``make_head("logreg", C=0.01)``):

``logreg``
    Multinomial logistic regression (softmax + L2). Solved by full-batch L-BFGS in torch on standardised
    float32 features, fusing each forward and backward pass over cache-sized row blocks so the features are
    read once per iteration. It stops when the loss improves by less than ``tol``. On a 2-core CPU it
    trains 60k x 1280 (Fashion-MNIST features) in ~5 s where scikit-learn's float64 lbfgs needs ~43 s for
    the same objective, at the same accuracy (``benchmarks/bench_train.py``). On CUDA it runs on the GPU.
``linear_svm``
    One-vs-rest linear SVM with LinearSVC's squared-hinge loss, solved the same way. Probabilities come from
    one Platt sigmoid per class fitted on 3-fold out-of-fold decision values, normalised to sum to one
    (what ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` does).
``svm``
    RBF-kernel SVC (libsvm), its one-vs-one decision values turned into one-vs-rest scores and calibrated
    the same way. Its cost grows at least quadratically with the number of samples, so it refuses sets
    larger than ``max_samples`` (5,000 by default, ~14 s to train on a 2-core CPU): use it for small sets.

Every head standardises the features (StandardScaler's statistics) and predicts with plain numpy from
the arrays returned by :meth:`Head.to_arrays`, so a head rebuilt from those arrays (see
:mod:`classifier.persist`) gives bit-identical predictions. Labels may be strings or integers.
``predict`` is always the arg-max of ``predict_proba``, so the two never disagree.

Threads: training uses torch's intra-op threads as the process has them set; this module never changes
them (``torch.set_num_threads`` is process-wide and also clears oneDNN's primitive cache). On a small CPU
that is busy with other work (e.g. embedding), give the training process one torch thread: two OpenMP
threads then wait on each other at every barrier, and small fits were measured 10-40x slower.
"""
from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from embedder.errors import Category, EmbedderError, ModelMismatchError

if TYPE_CHECKING:  # torch is imported where a head trains with it, so `import classifier` stays light
    import torch

log = logging.getLogger(__name__)

CPU_ROW_BLOCK = 4096  # rows per fused forward/backward block on CPU: measured ~2x faster than whole-batch passes
STATS_ROW_BLOCK = 8192  # rows per block when computing the standardisation statistics
SVM_ROW_BLOCK = 1024  # rows per kernel block when the svm head predicts


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


class Head(ClassifierMixin, BaseEstimator):
    """Base class: validation, standardisation, labels and the model-id check shared by every head.

    Fitted attributes: ``classes_`` (labels, sorted), ``n_features_in_``, ``mean_``/``scale_`` (the
    standardisation), ``model_id_`` (the backbone the features came from, or None) and
    ``class_counts_``. Subclasses implement ``_fit`` and ``_proba`` on standardised float32 features.
    """

    kind: ClassVar[str]
    min_per_class: ClassVar[int] = 2
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
        self.mean_, self.scale_ = standardization(X)
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

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every array prediction needs, by name; :meth:`from_arrays` rebuilds the head from them."""
        self._check_fitted()
        names = ("mean", "scale", "class_counts", *self._model_arrays)
        return {name: np.asarray(getattr(self, name + "_"), order="C") for name in names}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, classes: Sequence[Any], params: dict[str, Any],
                    model_id: str | None) -> "Head":
        """Rebuild a fitted head from :meth:`to_arrays` output, its labels, ``get_params()`` and model id."""
        head = make_head(cls.kind, **params)
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
    elif name in ("C", "tol") and not (is_number(value) and 0 < value < np.inf):
        fail("a positive number")
    elif name == "gamma" and value != "scale" and not (is_number(value) and 0 < value < np.inf):
        fail("'scale' or a positive number")


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


def _balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's ``class_weight="balanced"``: n / (n_classes * count of the sample's class)."""
    counts = np.bincount(y, minlength=n_classes)
    return (len(y) / (n_classes * counts))[y]


def _resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise HeadError(f"device {device!r} is not available here ({found}); use device='auto' or 'cpu'")
    return dev


def _softmax_loss(z: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy and its gradient with respect to the logits ``z``."""
    lse = z.logsumexp(dim=1)
    loss = lse - (z * onehot).sum(1)
    return loss, (z - lse[:, None]).exp_().sub_(onehot)


def _squared_hinge_loss(z: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row one-vs-rest squared hinge (LinearSVC's loss) summed over classes, and its gradient."""
    sign = onehot * 2 - 1
    slack = (1 - sign * z).clamp_(min=0)
    return (slack * slack).sum(1), slack.mul_(sign).mul_(-2)


_LOSSES = {"softmax": _softmax_loss, "squared_hinge": _squared_hinge_loss}


def fit_linear(X: np.ndarray, y: np.ndarray, n_classes: int, *, loss: str, C: float,
               sample_weight: np.ndarray | None = None, tol: float = 1e-4, max_iter: int = 500,
               device: str = "auto", init: tuple[np.ndarray, np.ndarray] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise ``mean_i w_i * loss(x_i W^T + b, y_i) + ||W||^2 / (2 C n)`` by full-batch L-BFGS.

    That is scikit-learn's objective (``C * sum of losses + ||W||^2 / 2``) divided by ``C n``, so ``C`` means
    the same as in LogisticRegression/LinearSVC; the intercept is not penalised. ``X`` is float32
    ``(n, d)`` (standardised), ``y`` int64 class indices. Returns ``(coef (k, d), intercept (k,), iterations)``,
    float32. Stops when the loss changes by less than ``tol`` between iterations, or after ``max_iter``.
    ``init`` (coef, intercept) warm-starts from a nearby solution instead of zeros.
    """
    import torch

    dev = _resolve_device(device)
    n, d = X.shape
    Xt = torch.from_numpy(X).to(dev)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y).to(dev), n_classes).to(torch.float32)
    weights = np.full(n, 1.0 / n) if sample_weight is None else sample_weight / n
    wt = torch.from_numpy(weights.astype(np.float32)).to(dev)
    if init is None:
        W = torch.zeros(n_classes, d, device=dev, requires_grad=True)
        b = torch.zeros(n_classes, device=dev, requires_grad=True)
    else:
        W = torch.tensor(init[0], dtype=torch.float32, device=dev, requires_grad=True)
        b = torch.tensor(init[1], dtype=torch.float32, device=dev, requires_grad=True)
    alpha = 1.0 / (C * n)
    loss_fn = _LOSSES[loss]
    # On CPU, the forward and backward matmuls of a block of rows run back to back while the block is still
    # in cache, so each iteration reads X once; a GPU has the bandwidth to take the whole batch at once.
    block = CPU_ROW_BLOCK if dev.type == "cpu" else n
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=tol,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64, device=dev)
            gW = torch.zeros_like(W)
            gb = torch.zeros_like(b)
            for start in range(0, n, block):
                x, w = Xt[start:start + block], wt[start:start + block]
                rows_loss, dz = loss_fn(torch.addmm(b, x, W.T), onehot[start:start + block])
                total += (rows_loss * w).sum(dtype=torch.float64)
                dz.mul_(w[:, None])
                gW.addmm_(dz.T, x)
                gb += dz.sum(0)
            W.grad = gW.add_(W, alpha=alpha)
            b.grad = gb
            return total + 0.5 * alpha * (W.double() ** 2).sum()

    opt.step(closure)
    n_iter = int(opt.state[W]["n_iter"])
    if n_iter >= max_iter:
        log.warning("%s solver stopped at max_iter=%d before the loss settled within tol=%g; "
                    "raise max_iter or tol", loss, max_iter, tol)
    return W.detach().cpu().numpy(), b.detach().cpu().numpy(), n_iter


class LogRegHead(Head):
    """Multinomial logistic regression on standardised features; softmax probabilities.

    ``C`` is the inverse L2 strength as in scikit-learn (default 0.01: the best of 0.001-1 measured on
    mobilenet_v2 features of Fashion-MNIST at 1k, 10k and 60k samples; standardised 1280-d features need
    more regularisation than scikit-learn's default C=1 gives).
    """

    kind = "logreg"
    min_per_class = 2
    _model_arrays = ("coef", "intercept")

    def __init__(self, *, C: float = 0.01, class_weight: str | None = None, tol: float = 1e-4,
                 max_iter: int = 500, device: str = "auto") -> None:
        self.C = C
        self.class_weight = class_weight
        self.tol = tol
        self.max_iter = max_iter
        self.device = device

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        k = len(self.classes_)
        sw = _balanced_weights(y, k) if self.class_weight == "balanced" else None
        self.coef_, self.intercept_, self.n_iter_ = fit_linear(
            X, y, k, loss="softmax", C=self.C, sample_weight=sw, tol=self.tol, max_iter=self.max_iter,
            device=self.device)

    def _proba(self, X: np.ndarray) -> np.ndarray:
        z = (X @ self.coef_.T + self.intercept_).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def _check_shapes(self) -> None:
        super()._check_shapes()
        d, k = self.n_features_in_, len(self.classes_)
        if self.coef_.shape != (k, d) or self.intercept_.shape != (k,):
            raise HeadError(f"logreg arrays do not match {d}-d features and {k} classes")


class _PlattHead(Head):
    """A head whose probabilities are per-class Platt sigmoids over one-vs-rest decision values.

    Each class's decision value ``d`` goes through its own sigmoid ``1 / (1 + exp(a d + b))``, fitted on
    out-of-fold decision values of a ``calibration_folds``-fold stratified split, and each row is then
    normalised to sum to one: what ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` does.
    Training costs ``calibration_folds + 1`` fits, each offered the previous one's solution as a warm start.
    Subclasses implement ``_train`` (fitted arrays by name) and ``_decision_from`` (decision values from them).
    """

    calibration_folds: ClassVar[int] = 3
    min_per_class = calibration_folds
    seed: int

    def _why_min(self) -> str:
        return f" (its probabilities are calibrated by {self.calibration_folds}-fold cross-validation)"

    def decision_function(self, X: Any, *, model_id: str | None = None) -> np.ndarray:
        """One-vs-rest decision values ``(N, n_classes)``; larger means more like that class."""
        return self._decision(self._prepare(X, model_id))

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        k = len(self.classes_)
        oof = np.empty((len(y), k))
        folds = StratifiedKFold(self.calibration_folds, shuffle=True, random_state=self.seed)
        fitted = None
        for train, held in folds.split(X, y):
            fitted = self._train(np.ascontiguousarray(X[train]), y[train], warm=fitted)
            oof[held] = self._decision_from(fitted, X[held])
        self.platt_a_, self.platt_b_ = _fit_platt(oof, y, k)
        for name, value in self._train(X, y, warm=fitted).items():
            setattr(self, name + "_", value)

    def _decision(self, X: np.ndarray) -> np.ndarray:
        fitted = {name: getattr(self, name + "_") for name in self._model_arrays if not name.startswith("platt")}
        return self._decision_from(fitted, X)

    def _proba(self, X: np.ndarray) -> np.ndarray:
        p = expit(-(self._decision(X) * self.platt_a_ + self.platt_b_))
        total = p.sum(axis=1, keepdims=True)
        # every sigmoid underflowing to 0 means no class claims the row: say so with a uniform row
        return np.divide(p, total, out=np.full_like(p, 1.0 / p.shape[1]), where=total > 0)

    def _train(self, X: np.ndarray, y: np.ndarray, *, warm: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _decision_from(self, fitted: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check_shapes(self) -> None:
        super()._check_shapes()
        k = len(self.classes_)
        if self.platt_a_.shape != (k,) or self.platt_b_.shape != (k,):
            raise HeadError(f"{self.kind} calibration arrays do not match {k} classes")


def _fit_platt(decision: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, Platt's sigmoid ``P(class | d) = 1 / (1 + exp(a d + b))`` with his smoothed targets."""
    a, b = np.empty(k), np.empty(k)
    for c in range(k):
        f = decision[:, c]
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        t = np.where(pos, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

        def nll(ab: np.ndarray) -> tuple[float, np.ndarray]:
            u = ab[0] * f + ab[1]
            # -[t log p + (1 - t) log(1 - p)] with p = sigmoid(-u), written stably
            g = expit(u) - (1 - t)
            return float((np.logaddexp(0, u) - (1 - t) * u).sum()), np.array([g @ f, g.sum()])

        start = np.array([0.0, np.log((n_neg + 1.0) / (n_pos + 1.0))])
        a[c], b[c] = minimize(nll, start, jac=True, method="L-BFGS-B").x
    return a, b


class LinearSVMHead(_PlattHead):
    """One-vs-rest linear SVM (LinearSVC's squared hinge + L2) with Platt-calibrated probabilities.

    ``C`` as in LinearSVC (default 0.001: the best of 0.001-1 measured on mobilenet_v2 features of
    Fashion-MNIST; standardised features need far more regularisation than LinearSVC's C=1).
    """

    kind = "linear_svm"
    _model_arrays = ("coef", "intercept", "platt_a", "platt_b")

    def __init__(self, *, C: float = 0.001, class_weight: str | None = None, tol: float = 1e-4,
                 max_iter: int = 500, seed: int = 0, device: str = "auto") -> None:
        self.C = C
        self.class_weight = class_weight
        self.tol = tol
        self.max_iter = max_iter
        self.seed = seed
        self.device = device

    def _train(self, X: np.ndarray, y: np.ndarray, *, warm: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        k = len(self.classes_)
        sw = _balanced_weights(y, k) if self.class_weight == "balanced" else None
        # the folds' solutions are close to each other's and to the final one: ~35% fewer iterations in all
        init = None if warm is None else (warm["coef"], warm["intercept"])
        coef, intercept, self.n_iter_ = fit_linear(X, y, k, loss="squared_hinge", C=self.C, sample_weight=sw,
                                                   tol=self.tol, max_iter=self.max_iter, device=self.device,
                                                   init=init)
        return {"coef": coef, "intercept": intercept}

    def _decision_from(self, fitted: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        return (X @ fitted["coef"].T + fitted["intercept"]).astype(np.float64)

    def _check_shapes(self) -> None:
        super()._check_shapes()
        d, k = self.n_features_in_, len(self.classes_)
        if self.coef_.shape != (k, d) or self.intercept_.shape != (k,):
            raise HeadError(f"linear_svm arrays do not match {d}-d features and {k} classes")


class SVMHead(_PlattHead):
    """RBF-kernel SVC (libsvm, one-vs-one) for small sets, with Platt-calibrated probabilities.

    The one-vs-one decision values are turned into scikit-learn's one-vs-rest shape (votes plus a bounded
    confidence) and calibrated as in :class:`_PlattHead` (scikit-learn's recommended replacement for the
    deprecated ``SVC(probability=True)``). ``max_samples`` guards against sets where training would take
    minutes (the cost grows at least quadratically with N): use ``logreg`` or ``linear_svm`` for those.
    """

    kind = "svm"
    _model_arrays = ("support_vectors", "dual_coef", "intercept", "n_support", "gamma", "platt_a", "platt_b")

    def __init__(self, *, C: float = 1.0, gamma: float | str = "scale", class_weight: str | None = None,
                 max_samples: int = 5000, seed: int = 0) -> None:
        self.C = C
        self.gamma = gamma
        self.class_weight = class_weight
        self.max_samples = max_samples
        self.seed = seed

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        if len(X) > self.max_samples:
            raise HeadError(f"the svm head (RBF kernel) is for small sets: got {len(X)} samples, more than "
                            f"max_samples={self.max_samples}; its training time grows at least quadratically. "
                            "Use the logreg or linear_svm head, or pass a larger max_samples")
        super()._fit(X, y)

    def _train(self, X: np.ndarray, y: np.ndarray, *, warm: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        # libsvm cannot warm-start, so ``warm`` goes unused.
        # gamma="scale" is resolved as scikit-learn does, so the value can be saved.
        gamma = 1.0 / (X.shape[1] * X.var(dtype=np.float64)) if self.gamma == "scale" else float(self.gamma)
        svc = SVC(C=self.C, kernel="rbf", gamma=gamma, class_weight=self.class_weight, cache_size=500).fit(X, y)
        # libsvm's sign convention (positive favours the first class of each pair); scikit-learn flips its
        # public binary attributes so that positive means the second class
        sign = -1.0 if len(self.classes_) == 2 else 1.0
        return {"support_vectors": svc.support_vectors_, "dual_coef": sign * svc.dual_coef_,
                "intercept": sign * svc.intercept_, "n_support": svc.n_support_.astype(np.int64),
                "gamma": np.array(gamma)}

    def _decision_from(self, fitted: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        # in row blocks: a block's kernel matrix is (rows, support vectors) float64
        return np.concatenate([_ovr_shape(self._pairwise(fitted, X[s:s + SVM_ROW_BLOCK]), len(self.classes_))
                               for s in range(0, len(X), SVM_ROW_BLOCK)])

    def _pairwise(self, fitted: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        """libsvm's one-vs-one decision values ``(N, k (k - 1) / 2)``, pairs in the order (0,1), (0,2), ..."""
        sv, coef = fitted["support_vectors"], fitted["dual_coef"]
        X64 = X.astype(np.float64)
        sq = (X64 * X64).sum(1)[:, None] + (sv * sv).sum(1)[None, :] - 2.0 * X64 @ sv.T
        K = np.exp(-float(fitted["gamma"]) * np.maximum(sq, 0.0))
        starts = np.concatenate([[0], np.cumsum(fitted["n_support"])])
        k = len(self.classes_)
        out = np.empty((len(X), k * (k - 1) // 2))
        p = 0
        for i in range(k):
            for j in range(i + 1, k):
                si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
                out[:, p] = K[:, si] @ coef[j - 1, si] + K[:, sj] @ coef[i, sj] + fitted["intercept"][p]
                p += 1
        return out

    def _check_shapes(self) -> None:
        super()._check_shapes()
        d, k = self.n_features_in_, len(self.classes_)
        n_sv, pairs = self.support_vectors_.shape[0], k * (k - 1) // 2
        if (self.support_vectors_.shape != (n_sv, d) or self.dual_coef_.shape != (k - 1, n_sv)
                or self.intercept_.shape != (pairs,) or self.n_support_.shape != (k,)
                or self.n_support_.dtype.kind not in "iu" or int(self.n_support_.sum()) != n_sv
                or self.gamma_.shape != ()):
            raise HeadError(f"svm arrays do not match {d}-d features and {k} classes")


def _ovr_shape(pairwise: np.ndarray, k: int) -> np.ndarray:
    """One-vs-one decision values -> scikit-learn's one-vs-rest shape: votes + confidence / (3 (|confidence| + 1)).

    The confidence term stays within +-1/3, so it only orders classes with equal votes.
    """
    votes = np.zeros((len(pairwise), k))
    confidence = np.zeros((len(pairwise), k))
    p = 0
    for i in range(k):
        for j in range(i + 1, k):
            d = pairwise[:, p]
            votes[:, i] += d >= 0
            votes[:, j] += d < 0
            confidence[:, i] += d
            confidence[:, j] -= d
            p += 1
    return votes + confidence / (3 * (np.abs(confidence) + 1))


HEADS: dict[str, type[Head]] = {h.kind: h for h in (LogRegHead, LinearSVMHead, SVMHead)}


def make_head(kind: str, **params: Any) -> Head:
    """A new, unfitted head of ``kind`` (``logreg``, ``linear_svm`` or ``svm``) with ``params``."""
    cls = HEADS.get(kind)
    if cls is None:
        raise HeadError(f"unknown head kind {kind!r}; choose one of {', '.join(HEADS)}")
    allowed = head_params(kind)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise HeadError(f"the {kind} head has no option {', '.join(map(repr, unknown))}; "
                        f"its options are {', '.join(allowed)}")
    head = cls(**params)
    head._validate_params()
    return head


def head_params(kind: str) -> dict[str, Any]:
    """The options of head ``kind`` and their defaults."""
    if kind not in HEADS:
        raise HeadError(f"unknown head kind {kind!r}; choose one of {', '.join(HEADS)}")
    sig = inspect.signature(HEADS[kind].__init__)
    return {name: p.default for name, p in sig.parameters.items() if name != "self"}
