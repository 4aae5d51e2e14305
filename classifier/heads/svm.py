"""The SVM heads, ``linear_svm`` and ``svm`` (RBF), and the Platt calibration that gives both their probabilities."""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from .base import Head
from .linear_solver import _balanced_weights, fit_linear
from .validation import HeadError

SVM_ROW_BLOCK = 1024  # rows per kernel block when the svm head predicts


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
