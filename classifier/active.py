"""Which unlabelled items to label next, and which labels look wrong: algorithms on stored vectors.

Plain arrays in and out (numpy, scikit-learn and the heads of :mod:`classifier.heads`); the service reads
vectors and labels from its store and calls these, so nothing here runs a backbone. Distances are cosine
(vectors are L2-normalised first) and computed in row blocks, so 100k x 1280 candidates fit in memory.

:func:`suggest` ranks unlabelled items by one of :data:`STRATEGIES`:

``margin`` / ``entropy``
    uncertainty of a head (given, or trained on the fly on the labelled items): a small gap between its top
    two probabilities, or a high normalised entropy.
``diversity``
    k-center greedy: each pick is the candidate farthest (cosine) from every labelled and already picked item.
``hybrid``
    the ``POOL_FACTOR * n`` most uncertain by margin, clustered by k-means into n groups, and the most uncertain
    item of each group (cluster-margin, after Citovsky et al., NeurIPS 2021), so a batch is not n near-duplicates
    of one confusing image. k-means keeps the picks typical where k-center greedy over the same pool picked
    outliers: on Fashion-MNIST hybrid needs 720 labels to reach 85% (margin 787, k-center in the pool 1,370,
    random 1,637; bench_active).
``representative``
    cold start: k-means (k-means++ seeding) on the candidates; the item nearest each centroid.
``auto`` (the default)
    ``hybrid`` once a head can be trained on the labels, ``representative`` before.

:func:`find_label_issues` flags labelled items whose label is likely wrong by confident learning on
out-of-fold probabilities (:func:`confident_learning`), and pairs of identical images (same sha256) or
near-identical vectors (cosine at least a threshold) that carry different labels.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.extmath import randomized_svd

from embedder.errors import DeadlineError, InvalidArgumentError

from .heads import Head, InsufficientDataError, make_head

STRATEGIES = ("auto", "hybrid", "margin", "entropy", "diversity", "representative")
DEFAULT_SUGGEST = 20
MAX_SUGGEST = 1000
DEFAULT_ISSUES = 100
MAX_ISSUES = 10_000
DEFAULT_FOLDS = 5
DEFAULT_NEAR_DUPLICATE = 0.995  # distinct 64x64 digits of one class reach 0.988 on mobilenet_v2
POOL_FACTOR = 10  # hybrid: k-means clusters this many times n of the most uncertain candidates
MAX_SEEDS = 2048  # labelled items that seed k-center distances (a seeded sample beyond: cost is candidates x seeds)
KMEANS_SAMPLE = 20_000  # candidates k-means is fitted on; every candidate is then assigned
BLOCK_FLOATS = 2**25  # floats in one block of a distance matrix (128 MiB)
PROJECTED_DIM = 64  # principal directions kept where only neighbourhoods matter (near-duplicates, hybrid groups)

ShouldStop = Callable[[], bool] | None


@dataclass(frozen=True)
class Suggestion:
    """An item worth labelling: ``score`` (higher: more worth it; the strategy's own scale) and why, in words."""

    id: str
    score: float
    reason: str


@dataclass
class SuggestResult:
    suggestions: list[Suggestion]
    strategy: str  # the strategy that ran (``auto`` resolved)
    candidates: int  # unlabelled items considered
    labelled: int


@dataclass(frozen=True)
class LabelIssue:
    """A labelled item whose label looks wrong: ``suggested`` label, ``score`` in [0, 1] (higher: more likely
    wrong), ``kind`` (``confident_learning``, ``same_image``, ``near_duplicate``) and, for a duplicate, ``other``
    (the id of the item that carries the other label)."""

    id: str
    label: str
    suggested: str
    score: float
    kind: str
    other: str = ""


@dataclass
class LabelIssuesResult:
    issues: list[LabelIssue]  # confident learning, most likely wrong first
    duplicates: list[LabelIssue]  # same image or near-identical vectors with different labels
    checked: int  # labelled items examined
    folds: int
    noise_rate: float  # estimated fraction of wrong labels (the confident joint's off-diagonal mass)
    thresholds: dict[str, float] = field(default_factory=dict)  # per-class confidence thresholds


# ------------------------------------------------------------------ suggest

def suggest(ids: Sequence[str], X: np.ndarray, X_labelled: np.ndarray, y_labelled: Sequence[str], *, n: int,
            strategy: str = "auto", head: Head | None = None, kind: str = "logreg", model_id: str | None = None,
            seed: int = 0, should_stop: ShouldStop = None) -> SuggestResult:
    """The ``n`` candidates (``ids``, vectors ``X``) most worth labelling, best first (fewer if there are fewer).

    ``head`` scores uncertainty; without one a ``kind`` head is trained on ``X_labelled``/``y_labelled``."""
    check_count(n, "n", MAX_SUGGEST)
    check_seed(seed)
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(f"unknown strategy {strategy[:50]!r}; use one of {', '.join(STRATEGIES)}")
    if len(ids) == 0:
        raise InsufficientDataError("there are no unlabelled items to suggest from; add items without labels, "
                                    "or name unlabelled ids")
    n = min(n, len(ids))
    if strategy == "auto":
        strategy = "hybrid" if head is not None or _can_train(y_labelled, kind) else "representative"
    Xn = _normalized(X)
    if strategy == "representative":
        picks, reasons, scores = _representative(Xn, n, seed, should_stop)
    elif strategy == "diversity":
        seeds = _seeds(X_labelled, seed)
        picks, dists = k_center(Xn, n, seeds=seeds, should_stop=should_stop)
        scores = dists / 2  # squared distance of unit vectors is 2 - 2 cos: this is 1 - cos
        reasons = [f"diversity: cosine distance {s:.3f} to the nearest labelled or already suggested item"
                   for s in scores]
    else:
        head = head or _fit_for_uncertainty(X_labelled, y_labelled, kind, model_id)
        proba = head.predict_proba(X, model_id=model_id)
        picks, reasons, scores = _uncertain(Xn, proba, head.classes_, n, strategy, seed, should_stop)
    return SuggestResult([Suggestion(ids[i], float(s), r) for i, s, r in zip(picks, scores, reasons)], strategy,
                         len(ids), len(y_labelled))


def k_center(Xn: np.ndarray, n: int, *, seeds: np.ndarray | None = None,
             should_stop: ShouldStop = None) -> tuple[list[int], np.ndarray]:
    """k-center greedy on unit rows ``Xn``: ``n`` row indices, each farthest from the seeds and earlier picks,
    and each pick's squared distance to them then. Without seeds it starts at the row nearest the mean (a
    typical item, not an outlier)."""
    if seeds is not None and len(seeds):
        nearest = _min_sq_dist(Xn, seeds, should_stop)
    else:
        nearest = np.full(len(Xn), 4.0, dtype=np.float32)  # the largest squared distance of unit vectors
        nearest[np.argmax(Xn @ Xn.mean(axis=0))] = 4.5
    picks, dists = [], []
    for _ in range(n):
        _check_stop(should_stop, "k-center selection")
        i = int(np.argmax(nearest))
        picks.append(i)
        dists.append(min(float(nearest[i]), 4.0))
        nearest = np.minimum(nearest, _sq_dist_to(Xn, Xn[i]))
        nearest[picks] = -1.0  # an exact duplicate of a pick is at 0, but never the pick itself again
    return picks, np.asarray(dists)


def _uncertain(Xn: np.ndarray, proba: np.ndarray, classes: np.ndarray, n: int, strategy: str, seed: int,
               should_stop: ShouldStop) -> tuple[list[int], list[str], np.ndarray]:
    """Margin, entropy or hybrid picks from a head's probabilities."""
    order = np.argsort(-proba, axis=1)[:, :2]
    top = np.take_along_axis(proba, order, axis=1)
    margin = 1.0 - (top[:, 0] - top[:, 1])
    entropy = -(proba * np.log(np.clip(proba, 1e-12, 1.0))).sum(axis=1) / np.log(proba.shape[1])
    score = entropy if strategy == "entropy" else margin
    ranked = np.argsort(-score, kind="stable")

    def why(i: int) -> str:
        a, b = str(classes[order[i, 0]]), str(classes[order[i, 1]])
        if strategy == "entropy":
            return f"entropy: {entropy[i]:.3f} of the maximum over {proba.shape[1]} classes (top {a!r} {top[i, 0]:.2f})"
        return f"margin: the head's top two classes are close ({a!r} {top[i, 0]:.2f}, {b!r} {top[i, 1]:.2f})"

    if strategy != "hybrid":
        picks = [int(i) for i in ranked[:n]]
        return picks, [why(i) for i in picks], score[picks]
    pool = ranked[:POOL_FACTOR * n]
    groups = _kmeans(_projected(Xn[pool], seed), n, seed).labels_  # grouping needs no more than 64 directions
    _check_stop(should_stop, "clustering the uncertain items")
    picks = [int(pool[np.flatnonzero(groups == g)[0]]) for g in np.unique(groups)]  # pool is most uncertain first
    reasons = [f"{why(i)}; the most uncertain of its group ({n} groups among the {len(pool)} most uncertain, so "
               "the batch spreads over different confusions)" for i in picks]
    if len(picks) < n:  # fewer distinct groups than n (duplicates in the pool): the next most uncertain
        taken = set(picks)
        more = [int(i) for i in pool if int(i) not in taken][:n - len(picks)]
        picks += more
        reasons += [why(i) for i in more]
    order = np.argsort(-score[picks], kind="stable")  # best first, as the other strategies answer
    return [picks[i] for i in order], [reasons[i] for i in order], score[picks][order]


def _representative(Xn: np.ndarray, n: int, seed: int,
                    should_stop: ShouldStop) -> tuple[list[int], list[str], np.ndarray]:
    """Cold start: the candidate nearest each k-means centroid, biggest cluster first; k-center tops up where
    two centroids share their nearest candidate (duplicates in the data)."""
    rng = np.random.default_rng(seed)
    sample = Xn if len(Xn) <= KMEANS_SAMPLE else Xn[rng.choice(len(Xn), KMEANS_SAMPLE, replace=False)]
    km = _kmeans(sample, n, seed)
    _check_stop(should_stop, "k-means")
    share = np.bincount(km.labels_, minlength=n) / len(sample)
    centers = km.cluster_centers_.astype(np.float32)
    nearest = _nearest_rows(Xn, centers, should_stop)
    picks: list[int] = []
    reasons: list[str] = []
    scores: list[float] = []
    for c in np.argsort(-share, kind="stable"):
        if int(nearest[c]) not in picks:
            picks.append(int(nearest[c]))
            reasons.append(f"cold start: the item nearest the centre of a cluster holding {share[c]:.1%} of the "
                           "candidates")
            scores.append(float(share[c]))
    if len(picks) < n:
        more, dists = k_center(Xn, n, seeds=Xn[picks], should_stop=should_stop)
        for i, d in zip(more[:n - len(picks)], dists):
            picks.append(i)
            reasons.append(f"cold start: far from every other suggestion (cosine distance {d / 2:.3f})")
            scores.append(0.0)
    return picks, reasons, np.asarray(scores)


def _kmeans(Xn: np.ndarray, n: int, seed: int) -> KMeans:
    """k-means (k-means++ seeding, one run) of unit rows into ``n`` clusters; callers top up where fewer came."""
    with warnings.catch_warnings():  # fewer distinct points than clusters
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=min(n, len(Xn)), n_init=1, max_iter=50, random_state=seed).fit(Xn)


def _fit_for_uncertainty(X: np.ndarray, y: Sequence[str], kind: str, model_id: str | None) -> Head:
    if len(y) == 0:
        raise InsufficientDataError("uncertainty needs a head, and the collection has no labelled items; label "
                                    "some, pass a trained head, or use strategy 'representative' (cold start)")
    try:
        return make_head(kind).fit(X, list(y), model_id=model_id)
    except InsufficientDataError as e:
        raise InsufficientDataError(f"too few labels to train a head for uncertainty: {e}; or pass a trained "
                                    "head, or use strategy 'representative' or 'diversity'") from None


def _can_train(y: Sequence[str], kind: str) -> bool:
    counts = Counter(y)
    return len(counts) >= 2 and min(counts.values()) >= make_head(kind).min_per_class


def _seeds(X_labelled: np.ndarray, seed: int) -> np.ndarray | None:
    """The labelled vectors k-center measures distance from (a seeded sample of at most MAX_SEEDS)."""
    if len(X_labelled) == 0:
        return None
    if len(X_labelled) > MAX_SEEDS:
        X_labelled = X_labelled[np.random.default_rng(seed).choice(len(X_labelled), MAX_SEEDS, replace=False)]
    return _normalized(X_labelled)


# ------------------------------------------------------------------ label issues

def find_label_issues(ids: Sequence[str], X: np.ndarray, labels: Sequence[str], sha256s: Sequence[str | None], *,
                      limit: int, folds: int = DEFAULT_FOLDS, near_duplicate: float = DEFAULT_NEAR_DUPLICATE,
                      kind: str = "logreg", seed: int = 0, should_stop: ShouldStop = None) -> LabelIssuesResult:
    """Labelled items (``ids``, ``X``, ``labels``, ``sha256s``) whose label looks wrong: at most ``limit`` of each
    kind, most likely wrong first."""
    check_count(limit, "limit", MAX_ISSUES)
    check_count(folds, "folds", 20)
    check_seed(seed)
    if folds < 2:
        raise InvalidArgumentError(f"folds must be at least 2 (out-of-fold probabilities), got {folds}")
    if not 0.0 < near_duplicate <= 1.0:
        raise InvalidArgumentError(f"near_duplicate is a cosine similarity in (0, 1], got {near_duplicate}")
    labels = np.asarray(labels, dtype=str)
    proba, classes, used = out_of_fold_proba(X, labels, kind=kind, folds=folds, seed=seed, should_stop=should_stop)
    given = np.searchsorted(classes, labels)
    flagged, joint, thresholds = confident_learning(proba, given)
    guess = proba.argmax(axis=1)
    score = 1.0 - proba[np.arange(len(given)), given]  # low self-confidence: likely wrong
    order = flagged[np.argsort(-score[flagged], kind="stable")][:limit]
    issues = [LabelIssue(ids[i], str(labels[i]), str(classes[guess[i]]), float(score[i]), "confident_learning")
              for i in order]
    dups = duplicates(ids, X, labels, sha256s, threshold=near_duplicate, seed=seed, should_stop=should_stop)
    noise = float(1.0 - np.trace(joint) / max(joint.sum(), 1e-12))
    return LabelIssuesResult(issues, dups[:limit], len(ids), used, noise,
                             {str(c): float(t) for c, t in zip(classes, thresholds)})


def out_of_fold_proba(X: np.ndarray, y: np.ndarray, *, kind: str = "logreg", folds: int = DEFAULT_FOLDS,
                      seed: int = 0, should_stop: ShouldStop = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Each row's class probabilities from a ``kind`` head that did not see it (stratified k-fold): ``(proba,
    classes, folds used)``. Folds drop to the smallest class's count, which must be at least 3 (so every
    training fold holds two of each class)."""
    classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    few = [(str(c), int(k)) for c, k in zip(classes, counts) if k < 3]
    if len(classes) < 2 or few:
        what = (f"class(es) with fewer than 3: {', '.join(f'{c!r} has {k}' for c, k in few[:10])}" if few
                else f"only one class ({str(classes[0])!r})" if len(classes) else "no labelled items")
        raise InsufficientDataError(f"label issues need at least two classes of at least 3 labelled items each "
                                    f"(out-of-fold predictions), got {what}; label more, or leave those classes out")
    used = int(min(folds, counts.min()))
    proba = np.zeros((len(y), len(classes)))
    split = StratifiedKFold(n_splits=used, shuffle=True, random_state=seed).split(X, y_idx)
    for k, (train, test) in enumerate(split):
        _check_stop(should_stop, f"{k} of {used} folds")
        head = make_head(kind).fit(X[train], list(y[train]))
        proba[np.ix_(test, np.searchsorted(classes, head.classes_))] = head.predict_proba(X[test])
    return proba, classes, used


def confident_learning(proba: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of likely label errors by confident learning, pruned by noise rate; the calibrated joint and the
    per-class thresholds.

    Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 70 (2021),
    sections 3.1-3.2 (the method ``cleanlab.filter.find_label_issues(filter_by="prune_by_noise_rate")``
    implements): the threshold of class j is the mean probability of j over the items labelled j; the confident
    joint counts items labelled i whose most probable class at or above its threshold is j; calibrated so row i
    sums to the count of label i, its off-diagonal cell (i, j) says how many items labelled i are really j, and
    that many items labelled i with the largest margin p_j - p_i are flagged. An item whose given label is also
    its most probable class is never flagged."""
    n, c = proba.shape
    counts = np.bincount(given, minlength=c)
    thresholds = np.array([proba[given == j, j].mean() if counts[j] else 1.0 for j in range(c)])
    above = proba >= thresholds - 1e-6  # the paper's >=, with float slack
    confident = above.any(axis=1)
    true_guess = np.where(above, proba, -np.inf).argmax(axis=1)
    joint = np.zeros((c, c))
    np.add.at(joint, (given[confident], true_guess[confident]), 1)
    joint = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1) * counts[:, None]
    prune = np.rint(joint).astype(int)
    flagged = np.zeros(n, dtype=bool)
    for i in range(c):
        rows = np.flatnonzero(given == i)
        for j in range(c):
            if j != i and prune[i, j] > 0:
                margin = proba[rows, j] - proba[rows, i]
                flagged[rows[np.argsort(-margin, kind="stable")[:prune[i, j]]]] = True
    flagged &= proba.argmax(axis=1) != given
    return np.flatnonzero(flagged), joint, thresholds


def duplicates(ids: Sequence[str], X: np.ndarray, labels: Sequence[str], sha256s: Sequence[str | None], *,
               threshold: float = DEFAULT_NEAR_DUPLICATE, seed: int = 0,
               should_stop: ShouldStop = None) -> list[LabelIssue]:
    """Items that carry a label different from an identical image (same sha256, score 1) or a near-identical
    vector (cosine >= ``threshold``, score the cosine); each item once, against its closest other."""
    best: dict[int, tuple[float, int, str]] = {}
    by_sha: dict[str, list[int]] = {}
    for i, sha in enumerate(sha256s):
        if sha:
            by_sha.setdefault(sha, []).append(i)
    for members in by_sha.values():
        for i in members:
            other = next((j for j in members if labels[j] != labels[i]), None)
            if other is not None:
                best[i] = (1.0, other, "same_image")
    for i, j, cos in zip(*near_pairs(_normalized(X), np.asarray(labels, dtype=str), threshold, seed,
                                     should_stop)):
        if sha256s[i] and sha256s[i] == sha256s[j]:
            continue  # reported as the same image
        for a, b in ((i, j), (j, i)):
            if a not in best or best[a][0] < cos:
                best[a] = (float(cos), int(b), "near_duplicate")
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [LabelIssue(ids[i], str(labels[i]), str(labels[o]), min(s, 1.0), kind, ids[o])
            for i, (s, o, kind) in ranked]


def near_pairs(Xn: np.ndarray, labels: np.ndarray, threshold: float, seed: int = 0,
               should_stop: ShouldStop = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, cosine)``, i < j, of unit rows with cosine >= ``threshold`` and different labels.

    Exact, without the n x n x dim product: an orthogonal projection never lengthens a difference, so every
    pair within the radius is within it in the top principal directions too; those candidates are checked
    in full."""
    radius = 2.0 - 2.0 * threshold + 1e-5  # squared distance of unit vectors at that cosine, with float slack
    Z = _projected(Xn, seed)
    zz = (Z * Z).sum(axis=1)
    found: list[tuple[np.ndarray, np.ndarray]] = []
    rows = max(1, BLOCK_FLOATS // max(len(Z), 1))
    for start in range(0, len(Z), rows):
        _check_stop(should_stop, "the near-duplicate search")
        stop = min(start + rows, len(Z))
        d2 = zz[start:stop, None] + zz[None, start:] - 2.0 * (Z[start:stop] @ Z[start:].T)
        i, j = np.nonzero(d2 <= radius)
        i, j = i + start, j + start
        keep = (j > i) & (labels[i] != labels[j])
        found.append((i[keep], j[keep]))
    i = np.concatenate([f[0] for f in found]) if found else np.zeros(0, dtype=int)
    j = np.concatenate([f[1] for f in found]) if found else np.zeros(0, dtype=int)
    cos = np.einsum("ij,ij->i", Xn[i], Xn[j]) if len(i) else np.zeros(0)
    keep = cos >= threshold
    return i[keep], j[keep], cos[keep]


# ------------------------------------------------------------------ shared

def check_count(value: Any, name: str, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= most:
        raise InvalidArgumentError(f"{name} must be a whole number from 1 to {most:,}, got {value!r}")


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def _check_stop(should_stop: ShouldStop, after: str) -> None:
    if should_stop is not None and should_stop():
        raise DeadlineError(f"stopped after {after}: the call's deadline passed, it was cancelled, or the server "
                            "is stopping; allow a longer deadline")


def _normalized(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _sq_dist_to(Xn: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.maximum(2.0 - 2.0 * (Xn @ x), 0.0).astype(np.float32)


def _min_sq_dist(Xn: np.ndarray, seeds: np.ndarray, should_stop: ShouldStop) -> np.ndarray:
    """Each row's squared distance to its nearest seed, in row blocks."""
    out = np.empty(len(Xn), dtype=np.float32)
    rows = max(1, BLOCK_FLOATS // len(seeds))
    for start in range(0, len(Xn), rows):
        _check_stop(should_stop, "the distances to the labelled items")
        out[start:start + rows] = np.maximum(2.0 - 2.0 * (Xn[start:start + rows] @ seeds.T).max(axis=1), 0.0)
    return out


def _nearest_rows(Xn: np.ndarray, centers: np.ndarray, should_stop: ShouldStop) -> np.ndarray:
    """For each centre, the index of the nearest row of ``Xn`` (euclidean), in row blocks."""
    best = np.full(len(centers), np.inf)
    where = np.zeros(len(centers), dtype=int)
    cc = (centers * centers).sum(axis=1)
    rows = max(1, BLOCK_FLOATS // len(centers))
    for start in range(0, len(Xn), rows):
        _check_stop(should_stop, "assigning candidates to clusters")
        block = Xn[start:start + rows]
        d2 = (block * block).sum(axis=1)[:, None] + cc[None, :] - 2.0 * (block @ centers.T)
        arg = d2.argmin(axis=0)
        low = d2[arg, np.arange(len(centers))]
        better = low < best
        best[better], where[better] = low[better], arg[better] + start
    return where


def _projected(Xn: np.ndarray, seed: int) -> np.ndarray:
    """``Xn`` in its top PROJECTED_DIM principal directions (fitted on a sample); itself when that is no smaller."""
    if Xn.shape[1] <= PROJECTED_DIM or len(Xn) <= PROJECTED_DIM:
        return Xn
    rng = np.random.default_rng(seed)
    sample = Xn if len(Xn) <= 5000 else Xn[rng.choice(len(Xn), 5000, replace=False)]
    _, _, vt = randomized_svd(sample - sample.mean(axis=0), PROJECTED_DIM, random_state=seed)
    return np.ascontiguousarray(Xn @ vt.T.astype(np.float32))
