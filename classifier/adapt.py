"""Domain adaptation on cached feature vectors: align labelled (source) features with unlabelled target ones.

When the images a head will see (the target domain: another camera, lighting, background) differ from the
labelled ones it is trained on (the source domain), a :class:`DomainAdapter` fitted on both sets of vectors
maps them closer together, without any target labels::

    adapter = DomainAdapter("coral").fit(source_vectors, target_vectors)
    head = make_head("logreg").fit(adapter.transform_source(source_vectors), labels, model_id=...)
    head.predict(adapter.transform_target(new_target_vectors), model_id=...)

Two methods (``METHODS``):

``standardize``
    Per-domain feature standardisation: each domain's features to zero mean and unit variance with that
    domain's own statistics (StandardScaler's, constant features keep scale 1). First-order alignment.
``coral``
    CORAL (Sun, Feng & Saenko 2016, "Return of frustratingly easy domain adaptation"): whiten the source
    covariance and re-colour it with the target's, ``(x - mu_s) C_s^{-1/2} C_t^{1/2} + mu_t`` with
    ``C = cov + eps I``; target features pass unchanged. The matrix powers come from symmetric
    eigendecompositions in float64: 1280-d features of 10k source and 10k target rows fit in ~1.2 s on a
    2-core CPU (~0.7 s with 300 target rows).

    Mind the scale of ``eps``: it is absolute, and L2-normalised 1280-d embeddings (the default) have
    per-feature variances around 1e-5 to 1e-4, so the paper's ``eps=1`` swamps both covariances and CORAL
    then amounts to moving the source mean onto the target's. Pass an ``eps`` near the features' variance
    (e.g. 1e-4) for full second-order alignment. On mobilenet_v2 features of scikit-learn's digits with
    inverted polarity both settings, and ``standardize``, helped about equally (``tests/test_adapt.py``).

Plain numpy arrays in and out, float32. :meth:`DomainAdapter.to_arrays` / :meth:`DomainAdapter.from_arrays`
and :meth:`DomainAdapter.describe` let a caller store the adapter next to a head (arrays in safetensors, the
description in JSON); ``from_arrays`` checks every array, since files on disk may have been edited.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np
import scipy.linalg

from .heads import HeadError, check_features, standardization
from .heads.base import STATS_ROW_BLOCK

log = logging.getLogger(__name__)

METHODS = ("standardize", "coral")
_ARRAYS: dict[str, tuple[str, ...]] = {  # fitted attributes (without the trailing _) saved as arrays
    "standardize": ("source_mean", "source_scale", "target_mean", "target_scale", "counts"),
    "coral": ("matrix", "source_mean", "target_mean", "counts"),
}
_PARAMS: dict[str, tuple[str, ...]] = {"standardize": (), "coral": ("eps",)}  # the options each method uses
MIN_ROWS = 2  # per domain: a mean and a spread need at least two rows


class AdaptationError(HeadError):
    """Source/target features, options or saved arrays a :class:`DomainAdapter` cannot use; the message says why."""


class DomainAdapter:
    """Fit on source and target feature matrices; ``transform_source`` is applied to training features,
    ``transform_target`` to the features the head predicts on.

    Fitted attributes: ``dim_``, ``n_source_``, ``n_target_`` and the method's arrays (see :meth:`to_arrays`).
    """

    def __init__(self, method: str = "coral", *, eps: float = 1.0) -> None:
        self.method = _check_method(method)
        self.eps = _check_eps(eps)

    def __repr__(self) -> str:
        options = "".join(f", {name}={getattr(self, name)!r}" for name in _PARAMS[self.method])
        return f"DomainAdapter({self.method!r}{options})"

    @property
    def params(self) -> dict[str, Any]:
        """The options this adapter's method uses, by name (JSON-able)."""
        return {name: getattr(self, name) for name in _PARAMS[self.method]}

    def fit(self, source: Any, target: Any) -> "DomainAdapter":
        """Estimate the mapping from source features ``(N_s, dim)`` and unlabelled target features ``(N_t, dim)``.

        Raises :class:`AdaptationError` for NaN/inf values, dims that differ, or fewer than two rows in a domain.
        """
        started = time.perf_counter()
        source = _features(source, "source")
        target = _features(target, "target")
        if source.shape[1] != target.shape[1]:
            raise AdaptationError(f"source features have dim {source.shape[1]} but target features have dim "
                                  f"{target.shape[1]}; embed both domains with the same model")
        d = source.shape[1]
        for name, X in (("source", source), ("target", target)):
            if len(X) < MIN_ROWS:
                raise AdaptationError(f"need at least {MIN_ROWS} {name} feature rows to estimate that domain's "
                                      f"statistics, got {len(X)}; embed more {name} images")
            if self.method == "coral" and len(X) < d / 10:
                log.warning("coral: the %s covariance of %d-d features is estimated from only %d rows; at least "
                            "%d (dim / 10) are recommended, so the adaptation may be unreliable: embed more %s "
                            "images or use method='standardize'", name, d, len(X), int(np.ceil(d / 10)), name)
        if self.method == "standardize":
            self.source_mean_, self.source_scale_ = standardization(source)
            self.target_mean_, self.target_scale_ = standardization(target)
        else:
            self.matrix_, self.source_mean_, self.target_mean_ = _coral(source, target, self.eps)
        self.counts_ = np.array([len(source), len(target)], dtype=np.int64)
        self._set_shape()
        log.info("fitted %r on %d source and %d target rows of %d-d features in %.2f s", self, self.n_source_,
                 self.n_target_, d, time.perf_counter() - started)
        return self

    def transform_source(self, X: Any) -> np.ndarray:
        """Source-domain (training) features ``(N, dim)`` mapped for the head, float32 ``(N, dim)``."""
        X = self._prepare(X)
        if self.method == "standardize":
            return (X - self.source_mean_) / self.source_scale_
        out = (X - self.source_mean_) @ self.matrix_
        out += self.target_mean_
        return out

    def transform_target(self, X: Any) -> np.ndarray:
        """Target-domain features ``(N, dim)`` (what the head predicts on) mapped for the head, float32 ``(N, dim)``."""
        X = self._prepare(X)
        if self.method == "standardize":
            return (X - self.target_mean_) / self.target_scale_
        return X.copy()  # coral moves the source onto the target; a copy, so the output never aliases the input

    def describe(self) -> dict[str, Any]:
        """How the adapter was fitted, JSON-able: method, params, n_source, n_target, dim."""
        self._check_fitted()
        return {"method": self.method, "params": self.params, "n_source": self.n_source_,
                "n_target": self.n_target_, "dim": self.dim_}

    # --- persistence hooks ---

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every array the transforms need, by name; :meth:`from_arrays` rebuilds the adapter from them."""
        self._check_fitted()
        return {name: np.array(getattr(self, name + "_"), order="C") for name in _ARRAYS[self.method]}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, method: str,
                    params: Mapping[str, Any]) -> "DomainAdapter":
        """Rebuild a fitted adapter from :meth:`to_arrays` output, its method and its ``params``.

        Every array is checked (names, dtypes, finite values, shapes that fit together, positive scales and
        counts): they may come from a file that was edited. Raises :class:`AdaptationError` naming the problem.
        """
        method = _check_method(method)
        if not isinstance(params, Mapping):
            raise AdaptationError(f"params must be a dict of options, got {type(params).__name__}")
        unknown = sorted(set(params) - set(_PARAMS[method]))
        if unknown:
            raise AdaptationError(f"the {method} adapter has no option {', '.join(map(repr, unknown))}; its options "
                                  f"are {list(_PARAMS[method])}")
        adapter = cls(method, **params)
        if not isinstance(arrays, Mapping):
            raise AdaptationError(f"arrays must be a dict of named arrays, got {type(arrays).__name__}")
        expected = set(_ARRAYS[method])
        if set(arrays) != expected:
            raise AdaptationError(f"a {method} adapter needs arrays {sorted(expected)}, got {sorted(arrays)}")
        for name in _ARRAYS[method]:
            value = np.asarray(arrays[name])
            integers = name == "counts"
            if value.dtype.kind not in ("iu" if integers else "f"):
                raise AdaptationError(f"array {name!r} must hold {'integers' if integers else 'floats'}, "
                                      f"got dtype {value.dtype}")
            if not np.isfinite(value).all():
                raise AdaptationError(f"array {name!r} holds NaN or infinity; the saved adapter is corrupt, "
                                      "fit it again")
            setattr(adapter, name + "_", value.astype(np.int64 if integers else np.float32, order="C"))
        mean = adapter.source_mean_
        if mean.ndim != 1 or mean.shape[0] < 1:
            raise AdaptationError(f"array 'source_mean' must have shape (dim,), got {mean.shape}")
        d = mean.shape[0]
        shapes = {name: (d, d) if name == "matrix" else (2,) if name == "counts" else (d,)
                  for name in _ARRAYS[method]}
        for name, shape in shapes.items():
            if getattr(adapter, name + "_").shape != shape:
                raise AdaptationError(f"array {name!r} has shape {getattr(adapter, name + '_').shape}, expected "
                                      f"{shape} for {d}-d features")
        if (adapter.counts_ < MIN_ROWS).any():
            raise AdaptationError(f"array 'counts' must hold the source and target row counts (each >= {MIN_ROWS}), "
                                  f"got {adapter.counts_.tolist()}")
        for name in ("source_scale", "target_scale"):
            if name in shapes and not (getattr(adapter, name + "_") > 0).all():
                raise AdaptationError(f"array {name!r} must hold positive scales")
        adapter._set_shape()
        return adapter

    # --- internals ---

    def _set_shape(self) -> None:
        self.dim_ = int(self.source_mean_.shape[0])
        self.n_source_, self.n_target_ = (int(n) for n in self.counts_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "dim_"):
            raise AdaptationError("this DomainAdapter is not fitted yet; call fit(source, target) first "
                                  "(or rebuild a saved one with DomainAdapter.from_arrays)")

    def _prepare(self, X: Any) -> np.ndarray:
        self._check_fitted()
        X = _features(X)
        if X.shape[1] != self.dim_:
            raise AdaptationError(f"features have dim {X.shape[1]} but the adapter was fitted on {self.dim_}-d "
                                  "features; embed the images with the model the adapter was fitted on")
        return X


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise AdaptationError(f"unknown adaptation method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _check_eps(eps: Any) -> float:
    if (isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating))
            or not 0 < eps < np.inf):
        raise AdaptationError(f"eps must be a positive number (the ridge added to each covariance), got {eps!r}")
    return float(eps)


def _features(X: Any, domain: str | None = None) -> np.ndarray:
    """``check_features`` raising :class:`AdaptationError`, with the domain (when given) named in its message."""
    try:
        return check_features(X)
    except HeadError as e:
        raise AdaptationError(f"{domain}: {e}" if domain else str(e)) from None


def _mean(X: np.ndarray) -> np.ndarray:
    """float64 column means of float32 ``X``, summed in row blocks."""
    mean = np.zeros(X.shape[1])
    for start in range(0, len(X), STATS_ROW_BLOCK):
        mean += X[start:start + STATS_ROW_BLOCK].sum(axis=0, dtype=np.float64)
    return mean / len(X)


def _eigh(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # LAPACK's divide-and-conquer driver (syevd): ~1.4x faster at 1280-d here than scipy's default (syevr)
    return scipy.linalg.eigh(A, driver="evd", overwrite_a=True, check_finite=False)


def _mean_and_power(X: np.ndarray, eps: float, power: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean ``(d,)`` of float32 ``X`` and ``(cov + eps I) ** power`` ``(d, d)``, cov with ``ddof=1``.

    By symmetric eigendecomposition: of the ``(d, d)`` covariance, or, with fewer rows than dimensions, of the
    smaller ``(n, n)`` Gram matrix, which has the covariance's nonzero spectrum (300 target rows of 1280-d
    features: ~0.05 s instead of ~1 s).
    """
    n, d = X.shape
    mean = _mean(X)
    if n >= d:
        cov = np.zeros((d, d))
        for start in range(0, n, STATS_ROW_BLOCK):
            block = X[start:start + STATS_ROW_BLOCK] - mean  # float64
            cov += block.T @ block  # numpy runs a.T @ a as one symmetric rank-k update (syrk)
        cov /= n - 1
        cov[np.diag_indices_from(cov)] += eps
        values, vectors = _eigh(cov)
        # cov + eps I has no eigenvalue below eps: clipping only removes rounding error
        return mean, (vectors * np.maximum(values, eps) ** power) @ vectors.T
    # Xc = X - mean = P S Q^T; cov = Q diag(mu) Q^T with mu = S^2 / (n - 1) the eigenvalues of the Gram matrix
    # Xc Xc^T / (n - 1) (eigenvectors P), and Q = Xc^T P S^-1. So (cov + eps I)^p
    #   = eps^p I + Q diag((mu + eps)^p - eps^p) Q^T = eps^p I + Xc^T P diag(g) P^T Xc
    # with g = ((mu + eps)^p - eps^p) / (mu (n - 1)), which stays bounded as mu -> 0 (limit p eps^(p-1) / (n-1)).
    Xc = X - mean
    mu, P = _eigh(Xc @ Xc.T / (n - 1))
    mu = np.maximum(mu, 0.0)
    safe = np.where(mu > 0, mu, 1.0)
    g = np.where(mu > 0, eps ** power * np.expm1(power * np.log1p(mu / eps)) / safe, power * eps ** (power - 1))
    out = Xc.T @ (((P * (g / (n - 1))) @ P.T) @ Xc)
    out[np.diag_indices_from(out)] += eps ** power
    return mean, out


def _coral(source: np.ndarray, target: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CORAL's ``C_s^{-1/2} C_t^{1/2}`` as float32 ``(d, d)``, and the source and target means (float32)."""
    mean_s, whiten = _mean_and_power(source, eps, -0.5)
    mean_t, colour = _mean_and_power(target, eps, 0.5)
    return (whiten @ colour).astype(np.float32), mean_s.astype(np.float32), mean_t.astype(np.float32)
