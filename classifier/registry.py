"""The heads of one place, as a service uses them: train + evaluate + save, cached loading, top-k predict.

    registry = HeadRegistry("embedder-data/heads")      # a folder; or any classifier.places.HeadPlace
    result = registry.train(vectors, labels, model_id=embedder.model_id, kind="logreg",
                            source={"collection": "shoes"})
    top = registry.predict(result.info.head_id, new_vectors, model_id=embedder.model_id, top_k=3)

Plain arrays in and out: no gRPC and no store here (the service reads the vectors from its store, and hands in
the place its heads live: a folder, or Milvus when replicas share one). Loaded heads stay in memory, each with
its version tag; every ``get`` asks the place for the current tag (one stat, or one primary-key query in
Milvus), so a head replaced or deleted by another replica is reloaded or gone on the next call.
Thread-safe. Trainings run one at a time, since each already uses every core; predictions run alongside.
A ``should_stop`` callable (the caller's deadline or cancellation, the server stopping) is asked while a
training waits for its turn and between its steps; when it says yes the work ends with DeadlineError.
"""
from __future__ import annotations

import json
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
from .persist import (ARRAYS_FILE, HeadInfo, HeadNotFoundError, check_head_id, decode_head, decode_info,
                      encode_head)
from .places import META_FILE, HeadFolder, HeadPlace

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
    """Saved heads in ``place`` (a folder path, or a :class:`~classifier.places.HeadPlace`); up to ``max_loaded``
    of them stay loaded in memory (least recently used out)."""

    def __init__(self, place: str | Path | HeadPlace, *, max_loaded: int = 16) -> None:
        if isinstance(place, (str, Path)):
            Path(place).mkdir(parents=True, exist_ok=True)
            place = HeadFolder(place)
        self.place: HeadPlace = place
        for action in place.recover():
            log.warning("heads in %s: %s", place, action)
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, tuple[str, Head]] = OrderedDict()  # head id -> (version tag, head)
        self._lock = threading.Lock()  # the loaded heads
        self._train_lock = threading.Lock()

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
            info = self._save(head, head_id, metrics, source)
            total = time.perf_counter() - started
        samples = int(head.class_counts_.sum())
        log.info("trained %s head %s on %d vectors in %.2f s (hold-out accuracy %s)", kind, info.head_id, samples,
                 total, metrics.get("accuracy", "n/a"))
        return TrainResult(info, samples, train_seconds, total)

    def add(self, head: Head, *, head_id: str | None = None, source: Mapping[str, Any] | None = None,
            metrics: Mapping[str, Any] | None = None) -> TrainResult:
        """Save a head built rather than trained (a zero-shot head from class prompts); an existing head named
        ``head_id`` is replaced."""
        if head_id is not None:
            check_head_id(head_id)
        started = time.perf_counter()
        info = self._save(head, head_id, metrics, source)
        log.info("saved %s head %s (%d classes)", head.kind, info.head_id, len(head.classes_))
        return TrainResult(info, 0, 0.0, time.perf_counter() - started)

    def learning_curve(self, X: np.ndarray, y: Sequence[Any], *, kind: str = "logreg",
                       params: Mapping[str, Any] | None = None, should_stop: Callable[[], bool] | None = None,
                       **options: Any) -> list[CurvePoint]:
        """:func:`classifier.evaluate.learning_curve` of a ``kind`` head, in turn with trainings."""
        head = make_head(kind, **_capped(params))
        with self._turn(_Stopper(should_stop, "learning curve")):
            return learning_curve(head, X, y, should_stop=should_stop, **options)

    def get(self, head_id: str) -> Head:
        """The head ``head_id``, loaded again when its place holds another version than the one in memory (it was
        replaced, here or by another replica); :class:`HeadNotFoundError` if there is none."""
        version = self.place.version(check_head_id(head_id))  # outside the lock: other predictions go on
        with self._lock:
            loaded = self._loaded.get(head_id)
            if version is None:
                self._loaded.pop(head_id, None)  # deleted, here or elsewhere
                raise unknown_head(head_id)
            if loaded is not None and loaded[0] == version:
                self._loaded.move_to_end(head_id)
                return loaded[1]
        found = self.place.read(head_id, [META_FILE, ARRAYS_FILE])
        if found is None:
            raise unknown_head(head_id)
        files, version = found
        head = decode_head(files, head_id, where=self.place.where(head_id))
        with self._lock:
            self._remember(head_id, version, head)
        return head

    def info(self, head_id: str) -> HeadInfo:
        found = self.place.read(check_head_id(head_id), [META_FILE])
        if found is None:
            raise unknown_head(head_id)
        return self._info(head_id, found[0][META_FILE])

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
        """Every valid saved head, sorted by id; unreadable ones are logged and skipped."""
        infos = []
        for head_id in self.place.ids():
            found = self.place.read(head_id, [META_FILE])
            if found is None:
                continue  # deleted since it was listed
            try:
                infos.append(self._info(head_id, found[0][META_FILE]))
            except HeadError as e:
                log.warning("skipping head %s: %s", self.place.where(head_id), e)
        return infos

    def delete(self, head_id: str) -> None:
        """Delete a saved head; :class:`HeadNotFoundError` if there is none."""
        if not self.place.remove(check_head_id(head_id)):
            raise unknown_head(head_id)
        with self._lock:
            self._loaded.pop(head_id, None)

    def _save(self, head: Head, head_id: str | None, metrics: Mapping[str, Any] | None,
              source: Mapping[str, Any] | None) -> HeadInfo:
        """Write ``head`` to the place (replacing an existing ``head_id``; a fresh id when None), keep it loaded."""
        files = encode_head(head, head_id=head_id, metrics=metrics, source=source)
        info = self._info(json.loads(files[META_FILE])["head_id"], files[META_FILE])
        version = self.place.write(info.head_id, files, overwrite=head_id is not None)
        with self._lock:
            self._remember(info.head_id, version, head)
        return info

    def _info(self, head_id: str, meta: bytes) -> HeadInfo:
        return decode_info(meta, head_id, where=self.place.where(head_id), path=self.place.path(head_id))

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

    def _remember(self, head_id: str, version: str, head: Head) -> None:
        self._loaded[head_id] = (version, head)
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
