"""How well a head does on held-out data: accuracy, macro-F1, a per-class report and the confusion matrix.

    ev = evaluate(make_head("logreg"), X, y, folds=5)     # or test_size=0.2 for one stratified hold-out
    print(ev.accuracy, ev.macro_f1)
    json.dumps(ev.to_dict())                              # plain JSON; save_head(..., metrics=ev.to_dict())
    plot_confusion(ev.confusion, ev.classes, "confusion.png")

The head passed in is never fitted: each split trains a fresh clone of it.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.base import clone
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold, train_test_split

from embedder.errors import DeadlineError
from embedder.results import CurvePoint

from .heads import Head, HeadError, InsufficientDataError, check_features
from .heads.validation import _plain


@dataclass(frozen=True)
class ClassReport:
    """Precision, recall and F1 of one class, and how many true examples it had (``support``)."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    """Metrics of a head on held-out data. ``confusion[i][j]``: true ``classes[i]`` predicted as ``classes[j]``.

    ``per_class`` is keyed by ``str(label)`` so that it serialises to JSON as is.
    """

    accuracy: float
    macro_f1: float
    classes: list[Any]
    per_class: dict[str, ClassReport]
    confusion: list[list[int]]
    method: str  # "holdout" or "kfold"
    n_evaluated: int  # predictions the metrics are computed from
    folds: int | None = None
    test_size: float | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and numbers, ready for ``json.dumps``."""
        return asdict(self)


def evaluate(head: Head, X: Any, y: Sequence[Any], *, folds: int | None = None, test_size: float = 0.2,
             seed: int = 0) -> Evaluation:
    """Evaluate a clone of ``head`` on ``X``/``y`` by stratified k-fold (``folds=k``) or one stratified hold-out.

    With ``folds``, every row is predicted once by a head trained on the other folds (out-of-fold), and the
    metrics are over all rows; otherwise a ``test_size`` fraction is held out. Classes keep their proportions
    in every split.
    """
    X = check_features(X)
    y = np.asarray(y)
    if len(y) != len(X):
        raise HeadError(f"got {len(X)} feature rows but {len(y)} labels; pass one label per row")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InsufficientDataError("need at least two classes to evaluate a classifier; "
                                    "add labelled examples of another class")
    if folds is not None:
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise HeadError(f"folds must be an integer >= 2, got {folds!r}")
        _require_per_class(classes, counts, folds, f"{folds}-fold cross-validation")
        pred = np.empty(len(y), dtype=y.dtype)
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
            pred[test] = clone(head).fit(X[train], y[train]).predict(X[test])
        return evaluation_from_predictions(y, pred, classes=classes, method="kfold", folds=folds, seed=seed)
    if not 0 < test_size < 1:
        raise HeadError(f"test_size must be a fraction between 0 and 1, got {test_size!r}")
    _require_per_class(classes, counts, 2, "a stratified hold-out")
    n_test = int(np.ceil(test_size * len(y)))
    if n_test < len(classes) or len(y) - n_test < len(classes):
        raise InsufficientDataError(f"a hold-out of {n_test} of {len(y)} rows cannot hold every one of the "
                                    f"{len(classes)} classes on both sides; change test_size, use folds=..., "
                                    "or label more examples")
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    pred = clone(head).fit(X_train, y_train).predict(X_test)
    return evaluation_from_predictions(y_test, pred, classes=classes, method="holdout", test_size=test_size,
                                       seed=seed)


def evaluation_from_predictions(y_true: Sequence[Any], y_pred: Sequence[Any], *, classes: Sequence[Any],
                                method: str = "holdout", folds: int | None = None,
                                test_size: float | None = None, seed: int = 0) -> Evaluation:
    """Metrics of predictions ``y_pred`` against ``y_true``, rows and columns in the order of ``classes``."""
    y_true, y_pred, labels = np.asarray(y_true), np.asarray(y_pred), np.asarray(classes)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=0)
    names = [_plain(c) for c in labels]
    return Evaluation(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        classes=names,
        per_class={str(c): ClassReport(float(p), float(r), float(f), int(s))
                   for c, p, r, f, s in zip(names, precision, recall, f1, support)},
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        method=method, n_evaluated=len(y_true), folds=folds, test_size=test_size, seed=seed,
    )


DEFAULT_CURVE = (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# A curve costs sizes x repeats fits: these bound what one call can ask for (the defaults are 11 x 5).
MAX_REPEATS = 100
MAX_CURVE_SIZES = 32


def learning_curve(head: Head, X: Any, y: Sequence[Any], *, per_class: Sequence[int] | None = None,
                   repeats: int = 5, test_size: float = 0.2, seed: int = 0,
                   should_stop: Callable[[], bool] | None = None) -> list[CurvePoint]:
    """Accuracy at growing numbers of labels per class: does labelling more pay off?

    One stratified hold-out (``test_size``) is fixed; for each size a fresh ``head`` clone is trained on
    ``repeats`` seeded random draws of that many examples per class from the rest. Sizes the smallest class
    cannot fill, or below the head's minimum per class, are left out. At most :data:`MAX_REPEATS` repeats and
    :data:`MAX_CURVE_SIZES` sizes. ``should_stop`` is asked before every fit; when it says yes (the caller's
    deadline passed, it cancelled, the server is stopping) the curve ends with :class:`DeadlineError`.
    """
    from scipy import stats

    X = check_features(X)
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InsufficientDataError("need at least two classes for a learning curve; label another class")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 2 <= repeats <= MAX_REPEATS:
        raise HeadError(f"repeats must be an integer from 2 (for a confidence interval) to {MAX_REPEATS}, got "
                        f"{repeats!r}")
    if per_class is not None and len(per_class) > MAX_CURVE_SIZES:
        raise HeadError(f"per_class has {len(per_class)} sizes; a curve takes at most {MAX_CURVE_SIZES} (each costs "
                        "`repeats` fits): ask for fewer sizes")
    if per_class is not None and any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1
                                     for n in per_class):
        raise HeadError(f"per_class sizes must be whole numbers >= 1 (labelled examples per class), got "
                        f"{list(per_class)!r}")
    _require_per_class(classes, counts, 3, "a learning curve")
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y, random_state=seed)
    pools = {c: train_idx[y[train_idx] == c] for c in classes}
    most = min(len(p) for p in pools.values())
    sizes = sorted({int(n) for n in (per_class or DEFAULT_CURVE) if head.min_per_class <= n <= most})
    if not sizes:
        raise InsufficientDataError(f"the smallest class has {most} training examples after the hold-out; a "
                                    f"curve needs at least {head.min_per_class} per class: label more examples")
    rng = np.random.default_rng(seed)
    points = []
    for done, n in enumerate(sizes):
        scores, seconds = [], []
        for r in range(repeats):
            if should_stop is not None and should_stop():
                raise DeadlineError(f"the learning curve stopped after {done * repeats + r} of "
                                    f"{len(sizes) * repeats} fits: its call's deadline passed, it was cancelled, "
                                    "or the server is stopping; allow a longer deadline or ask for fewer sizes "
                                    "or repeats")
            pick = np.concatenate([rng.choice(pool, n, replace=False) for pool in pools.values()])
            started = time.perf_counter()
            fitted = clone(head).fit(X[pick], y[pick])
            seconds.append(time.perf_counter() - started)
            scores.append(float(accuracy_score(y[test_idx], fitted.predict(X[test_idx]))))
        mean, std = float(np.mean(scores)), float(np.std(scores, ddof=1))
        half = float(stats.t.ppf(0.975, repeats - 1) * std / np.sqrt(repeats))
        points.append(CurvePoint(n, n * len(classes), mean, std, max(0.0, mean - half), min(1.0, mean + half),
                                 repeats, float(np.mean(seconds))))
    return points


def plot_learning_curve(points: Sequence[CurvePoint], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write accuracy vs labels per class (log scale, 95% confidence band) as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise HeadError("no curve points to plot")
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [p.per_class for p in points]
    ax.fill_between(x, [p.ci_low for p in points], [p.ci_high for p in points], alpha=0.25, label="95% CI")
    ax.plot(x, [p.accuracy_mean for p in points], marker="o", label="hold-out accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path


def plot_confusion(matrix: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[Any],
                   path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the confusion matrix as a PNG at ``path``; returns the path.

    Cells are coloured by the row-normalised rate (recall per true class), so rare classes stay visible,
    and labelled with counts when there are at most 30 classes. Rendering uses matplotlib's Agg canvas
    directly, never pyplot, so it is safe in servers and threads and leaves the global backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.int64)
    k = len(classes)
    if m.shape != (k, k):
        raise HeadError(f"confusion matrix has shape {m.shape} but there are {k} classes; pass one row per class")
    rows = m.sum(axis=1, keepdims=True)
    rate = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    size = min(4 + 0.45 * k, 30)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    labels = [str(c) for c in classes]
    ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(m.sum())
    accuracy = np.trace(m) / total if total else 0.0
    ax.set_title(title or f"confusion matrix ({total} predictions, accuracy {accuracy:.1%})")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rate[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path


def _require_per_class(classes: np.ndarray, counts: np.ndarray, need: int, what: str) -> None:
    few = [(_plain(c), int(n)) for c, n in zip(classes, counts) if n < need]
    if few:
        shown = ", ".join(f"{c!r} has {n}" for c, n in few[:10]) + (" ..." if len(few) > 10 else "")
        raise InsufficientDataError(f"{what} needs at least {need} examples per class: {shown}; "
                        "label more examples of those classes, leave them out, or use fewer folds")

