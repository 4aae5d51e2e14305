"""The heads of one directory, as a service uses them: train + evaluate + save, cached loading, top-k predict.

    registry = HeadRegistry("embedder-data/heads")
    result = registry.train(vectors, labels, model_id=embedder.model_id, kind="logreg",
                            source={"collection": "shoes"})
    top = registry.predict(result.info.head_id, new_vectors, model_id=embedder.model_id, top_k=3)

Plain arrays in and out: no gRPC and no store here (the service reads the vectors from its store).
Thread-safe. Trainings run one at a time, since each already uses every core; predictions run alongside.
A ``should_stop`` callable (the caller's deadline or cancellation, the server stopping) is asked while a
training waits for its turn and between its steps; when it says yes the work ends with DeadlineError.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from embedder.errors import DeadlineError
from embedder.results import CurvePoint

from .adapt import DomainAdapter

from .evaluate import evaluate, learning_curve
from .heads import Head, HeadError, InsufficientDataError, head_params, make_head
from .heads.validation import _plain
from .persist import (META_FILE, HeadInfo, HeadNotFoundError, check_head_id, delete_head, list_heads, load_head, read_head_info,
                      recover_interrupted, save_head)

log = logging.getLogger(__name__)

# Head options whose cost has no bound of its own (the defaults are 500 and 5000): one call may not ask more.
PARAM_CAPS = {"max_iter": 10_000, "max_samples": 20_000}
_POLL_SECONDS = 0.1  # how often a training waiting for its turn asks whether its caller is still there


@dataclass(frozen=True)
class TrainResult:
    info: HeadInfo
    samples: int  # rows the saved head was fitted on
    train_seconds: float  # the final fit
    total_seconds: float  # hold-out evaluation + final fit + save


@dataclass(frozen=True)
class TopK:
    """Best ``k`` labels per row, best first, with their probabilities."""

    labels: list[list[Any]]
    probabilities: np.ndarray  # float (N, k)


class HeadRegistry:
    """Saved heads under ``root``; up to ``max_loaded`` of them stay loaded in memory (least recently used out)."""

    def __init__(self, root: str | Path, *, max_loaded: int = 16) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for action in recover_interrupted(self.root):
            log.warning("heads in %s: %s", self.root, action)
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Head] = OrderedDict()
        self._lock = threading.Lock()  # the loaded heads
        self._train_lock = threading.Lock()
        # Replacing a head renames it aside and the new one in: readers of the directory wait for both renames,
        # so a head being replaced never looks missing.
        self._disk_lock = threading.Lock()

    def train(self, X: np.ndarray, y: Sequence[Any], *, model_id: str, kind: str = "logreg",
              params: Mapping[str, Any] | None = None, test_size: float = 0.2, seed: int = 0,
              head_id: str | None = None, source: Mapping[str, Any] | None = None,
              adapt_to: np.ndarray | None = None, adapt_method: str = "coral",
              should_stop: Callable[[], bool] | None = None) -> TrainResult:
        """Evaluate ``kind`` on a stratified hold-out of ``X``/``y``, fit it on all of them, save it.

        The metrics in the saved head come from the hold-out; the saved head is fitted on every row.
        When the data is too small for a hold-out but enough to train, the head is trained and its metrics
        say why there are none. An existing head named ``head_id`` is replaced.

        ``adapt_to``: unlabelled vectors of the domain the head will predict on. A
        :class:`~classifier.adapt.DomainAdapter` (``adapt_method``) fitted on ``X`` and them maps the training
        vectors before training (and the hold-out metrics are on those); the saved head maps every vector it
        predicts on the target way, and records how it was adapted.

        ``should_stop`` is asked while waiting for the training lock and between adapting, evaluating,
        fitting and saving; nothing is saved once it says yes.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise HeadError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        params = _capped(params)
        if "seed" in head_params(kind) and "seed" not in params:
            params["seed"] = seed
        head = make_head(kind, **params)  # HeadError for an unknown kind or bad params, before any work
        if head_id is not None:
            check_head_id(head_id)
        stop = _Stopper(should_stop, "training (no head saved)")
        with self._turn(stop):
            started = time.perf_counter()
            adapter = None
            if adapt_to is not None:
                adapter = DomainAdapter(adapt_method).fit(X, adapt_to)
                X = adapter.transform_source(X)
                stop.check("adapting")
            try:
                metrics: dict[str, Any] = evaluate(head, X, y, test_size=test_size, seed=seed).to_dict()
            except InsufficientDataError as e:
                metrics = {"method": "none", "reason": f"no hold-out evaluation: {e}"}
            stop.check("the hold-out evaluation")
            fit_start = time.perf_counter()
            head.fit(X, y, model_id=model_id)  # InsufficientDataError when the head itself cannot train
            head.adapter_ = adapter
            train_seconds = time.perf_counter() - fit_start
            stop.check("the final fit")
            with self._disk_lock:
                path = save_head(head, self.root, head_id=head_id, metrics=metrics, source=source,
                                 overwrite=head_id is not None)
            total = time.perf_counter() - started
        with self._lock:
            self._remember(path.name, head)
        samples = int(head.class_counts_.sum())
        log.info("trained %s head %s on %d vectors in %.2f s (hold-out accuracy %s)", kind, path.name, samples,
                 total, metrics.get("accuracy", "n/a"))
        return TrainResult(read_head_info(path), samples, train_seconds, total)

    def add(self, head: Head, *, head_id: str | None = None, source: Mapping[str, Any] | None = None,
            metrics: Mapping[str, Any] | None = None) -> TrainResult:
        """Save a head built rather than trained (a zero-shot head from class prompts); an existing head named
        ``head_id`` is replaced."""
        if head_id is not None:
            check_head_id(head_id)
        started = time.perf_counter()
        with self._disk_lock:
            path = save_head(head, self.root, head_id=head_id, metrics=metrics, source=source,
                             overwrite=head_id is not None)
        with self._lock:
            self._remember(path.name, head)
        log.info("saved %s head %s (%d classes)", head.kind, path.name, len(head.classes_))
        return TrainResult(read_head_info(path), 0, 0.0, time.perf_counter() - started)

    def learning_curve(self, X: np.ndarray, y: Sequence[Any], *, kind: str = "logreg",
                       params: Mapping[str, Any] | None = None, should_stop: Callable[[], bool] | None = None,
                       **options: Any) -> list[CurvePoint]:
        """:func:`classifier.evaluate.learning_curve` of a ``kind`` head, in turn with trainings."""
        head = make_head(kind, **_capped(params))
        with self._turn(_Stopper(should_stop, "learning curve")):
            return learning_curve(head, X, y, should_stop=should_stop, **options)

    def get(self, head_id: str) -> Head:
        """The loaded head ``head_id``; :class:`HeadNotFoundError` if there is none."""
        with self._lock:
            head = self._loaded.get(head_id)
            if head is not None:
                self._loaded.move_to_end(head_id)
                return head
        with self._disk_lock:  # not the loaded-heads lock: predictions of loaded heads go on meanwhile
            head = load_head(self._path(head_id))
        with self._lock:
            if (self.root / head_id).is_dir():  # not deleted meanwhile
                self._remember(head_id, head)
        return head

    def info(self, head_id: str) -> HeadInfo:
        with self._disk_lock:
            return read_head_info(self._path(head_id))

    def predict(self, head_id: str, X: np.ndarray, *, model_id: str, top_k: int = 1) -> TopK:
        """The ``top_k`` most probable labels of each row of ``X`` (features of ``model_id``)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise HeadError(f"top_k must be a positive integer, got {top_k!r}")
        head = self.get(head_id)
        proba = head.predict_proba(X, model_id=model_id)  # ModelMismatchError for another backbone's vectors
        k = min(top_k, proba.shape[1])
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        labels = [[_plain(head.classes_[j]) for j in row] for row in order]
        return TopK(labels, np.take_along_axis(proba, order, axis=1))

    def list(self) -> list[HeadInfo]:
        with self._disk_lock:
            return list_heads(self.root)

    def delete(self, head_id: str) -> None:
        """Delete a saved head; :class:`HeadNotFoundError` if there is none."""
        with self._disk_lock:
            self._path(head_id)
            delete_head(self.root, head_id)
        with self._lock:
            self._loaded.pop(head_id, None)

    def _path(self, head_id: str) -> Path:
        """The directory of an existing head. Errors name the id only: callers may be remote, paths are ours."""
        path = self.root / check_head_id(head_id)
        if not (path / META_FILE).is_file():
            raise unknown_head(head_id)
        return path

    def turn(self, should_stop: Callable[[], bool] | None, what: str) -> AbstractContextManager[None]:
        """Run ``what`` (other work that trains, e.g. out-of-fold heads for label issues) in turn with trainings,
        which each already use every core; DeadlineError once ``should_stop`` says so while waiting."""
        return self._turn(_Stopper(should_stop, what))

    @contextmanager
    def _turn(self, stop: _Stopper) -> Iterator[None]:
        """Hold the training lock; while waiting for it, give up as soon as ``stop`` says so."""
        while not self._train_lock.acquire(timeout=_POLL_SECONDS):
            stop.check("waiting for the training before it (trainings run one at a time)")
        try:
            stop.check("waiting for its turn")
            yield
        finally:
            self._train_lock.release()

    def _remember(self, head_id: str, head: Head) -> None:
        self._loaded[head_id] = head
        self._loaded.move_to_end(head_id)
        while len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)


class _Stopper:
    """Ends a training or curve with DeadlineError once ``should_stop`` (None: never) says so."""

    def __init__(self, should_stop: Callable[[], bool] | None, what: str) -> None:
        self.should_stop, self.what = should_stop, what

    def check(self, after: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise DeadlineError(f"the {self.what} stopped after {after}: its call's deadline passed, it was "
                                "cancelled, or the server is stopping; allow a longer deadline")


def unknown_head(head_id: str) -> HeadNotFoundError:
    """The answer for a head that is not there (or that the caller may not see: the same words)."""
    return HeadNotFoundError(f"no head {head_id!r}; list the heads there are with ListHeads (`embedder heads`)")


def _capped(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``params`` as a dict, refused where they exceed :data:`PARAM_CAPS`."""
    params = dict(params or {})
    for name, cap in PARAM_CAPS.items():
        value = params.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            raise HeadError(f"{name}={value!r} is above this service's cap of {cap:,}; training cost grows with "
                            f"it, so ask for at most {cap:,}")
    return params
