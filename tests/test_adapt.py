"""Domain adaptation: CORAL and per-domain standardisation on synthetic Gaussians with known statistics, and on
real mobilenet_v2 features of scikit-learn's digits whose target domain has inverted polarity."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image
from test_heads import single_torch_thread  # noqa: F401 (autouse)

from classifier import HeadError, make_head
from classifier.adapt import METHODS, AdaptationError, DomainAdapter

PER_CLASS = 30  # 300 source + 300 target images: embedding them takes ~5 s on an idle 2-core CPU
MARGIN = 0.05  # measured: 0.29 unadapted target accuracy against 0.41-0.43 adapted (tests' digits and seeds)


def _digit(image: np.ndarray, *, invert: bool) -> np.ndarray:
    """An 8x8 digit (0..16) as a 32x32 grayscale RGB uint8 image; ``invert`` flips its polarity."""
    gray = np.asarray(Image.fromarray((image * 15).astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR))
    if invert:
        gray = 255 - gray
    return np.stack([gray] * 3, axis=-1)


@pytest.fixture(scope="module")
def polarity_shift(embedder) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_source, y_source, X_target, y_target): normal digits, and inverted images of *other* digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_class = [np.flatnonzero(digits.target == c) for c in range(10)]
    source = np.concatenate([idx[:PER_CLASS] for idx in by_class])
    target = np.concatenate([idx[PER_CLASS:2 * PER_CLASS] for idx in by_class])
    X_source = embedder.embed([_digit(digits.images[i], invert=False) for i in source])
    X_target = embedder.embed([_digit(digits.images[i], invert=True) for i in target])
    return X_source, digits.target[source], X_target, digits.target[target]


def _accuracy(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray) -> float:
    return float((make_head("logreg").fit(X_train, y_train).predict(X_test) == y_test).mean())


@pytest.fixture(scope="module")
def unadapted_accuracy(polarity_shift) -> float:
    X_source, y_source, X_target, y_target = polarity_shift
    return _accuracy(X_source, y_source, X_target, y_target)


def test_polarity_shift_hurts_an_unadapted_head(polarity_shift, unadapted_accuracy):
    X_source, y_source, _, _ = polarity_shift
    # in-domain reference without more embedding: train on two thirds of the source, test on the rest
    held = np.arange(len(y_source)) % 3 == 0
    in_domain = _accuracy(X_source[~held], y_source[~held], X_source[held], y_source[held])
    assert in_domain >= 0.8  # measured 0.95
    assert unadapted_accuracy <= in_domain - 0.4  # measured 0.29: the shift is real


@pytest.mark.parametrize(("method", "options"), [("standardize", {}), ("coral", {}), ("coral", {"eps": 1e-4})],
                         ids=["standardize", "coral", "coral-eps1e-4"])
def test_adaptation_improves_target_accuracy(polarity_shift, unadapted_accuracy, method, options):
    X_source, y_source, X_target, y_target = polarity_shift
    adapter = DomainAdapter(method, **options).fit(X_source, X_target)  # no target labels
    adapted = _accuracy(adapter.transform_source(X_source), y_source, adapter.transform_target(X_target), y_target)
    # measured: unadapted 0.287, standardize 0.410, coral 0.430, coral eps=1e-4 0.400
    assert adapted >= unadapted_accuracy + MARGIN


# --- synthetic data with known statistics ---


def _gaussians(n_source: int = 4000, n_target: int = 3000, d: int = 12, seed: int = 0):
    """Source ~ N(m_s, A_s^T A_s), target ~ N(m_t, A_t^T A_t), float32; returns them and the target's true cov."""
    rng = np.random.default_rng(seed)
    A_s, A_t = rng.normal(size=(d, d)), rng.normal(size=(d, d)) * 0.5 + np.eye(d)
    source = rng.normal(size=(n_source, d)) @ A_s + rng.normal(size=d) * 3
    target = rng.normal(size=(n_target, d)) @ A_t + rng.normal(size=d) * 3
    return source.astype(np.float32), target.astype(np.float32), A_t.T @ A_t


def test_coral_matches_target_mean_and_covariance():
    source, target, true_cov = _gaussians()
    adapted = DomainAdapter("coral", eps=1e-6).fit(source, target).transform_source(source).astype(np.float64)
    cov_t = np.cov(target.astype(np.float64), rowvar=False)
    assert np.abs(np.cov(source.astype(np.float64), rowvar=False) - cov_t).max() > 1.0  # they started apart
    np.testing.assert_allclose(adapted.mean(0), target.mean(0, dtype=np.float64), atol=1e-4)
    np.testing.assert_allclose(np.cov(adapted, rowvar=False), cov_t, atol=1e-4 * np.abs(cov_t).max())
    # and close to the target's true covariance, up to sampling error
    assert np.linalg.norm(np.cov(adapted, rowvar=False) - true_cov) / np.linalg.norm(true_cov) < 0.1


def test_coral_eps_shrinks_towards_mean_alignment():
    source, target, _ = _gaussians()
    huge = DomainAdapter("coral", eps=1e6).fit(source, target)
    # C + eps I ~ eps I on both sides: the matrix tends to the identity, leaving only the mean shift
    np.testing.assert_allclose(huge.to_arrays()["matrix"], np.eye(source.shape[1]), atol=1e-4)
    np.testing.assert_allclose(huge.transform_source(source), source - source.mean(0) + target.mean(0), atol=1e-3)


def _reference_coral(source: np.ndarray, target: np.ndarray, eps: float) -> np.ndarray:
    def power(X: np.ndarray, p: float) -> np.ndarray:
        values, vectors = np.linalg.eigh(np.cov(X.astype(np.float64), rowvar=False) + eps * np.eye(X.shape[1]))
        return (vectors * values ** p) @ vectors.T

    return power(source, -0.5) @ power(target, 0.5)


@pytest.mark.parametrize(("n_source", "n_target", "eps"), [(300, 40, 1.0), (40, 300, 1e-3), (20, 30, 1e-6),
                                                           (300, 300, 1e-4)])
def test_coral_matrix_matches_reference_with_few_or_many_rows(n_source, n_target, eps):
    # fewer rows than dims takes the (n, n) Gram-matrix route; it must give the same matrix as the full one
    rng = np.random.default_rng(n_source + n_target)
    d = 64
    source = (rng.normal(size=(n_source, d)) @ rng.normal(size=(d, d)) * 0.1).astype(np.float32)
    target = (rng.normal(size=(n_target, d)) * 0.3 + 1).astype(np.float32)
    matrix = DomainAdapter("coral", eps=eps).fit(source, target).to_arrays()["matrix"]
    expected = _reference_coral(source, target, eps)
    assert matrix.dtype == np.float32 and matrix.shape == (d, d)
    np.testing.assert_allclose(matrix, expected, atol=1e-5 * np.abs(expected).max())


def test_coral_on_identical_domains_changes_nothing():
    source, _, _ = _gaussians()
    adapter = DomainAdapter("coral", eps=1e-3).fit(source, source)
    np.testing.assert_allclose(adapter.transform_source(source), source, atol=1e-4 * np.abs(source).max())


def test_coral_passes_target_features_through_as_a_copy():
    source, target, _ = _gaussians()
    adapter = DomainAdapter("coral").fit(source, target)
    out = adapter.transform_target(target)
    np.testing.assert_array_equal(out, target)
    assert out.dtype == np.float32 and not np.shares_memory(out, target)


def test_standardize_gives_zero_mean_unit_variance_per_domain():
    source, target, _ = _gaussians()
    target[:, 3] = 7.0  # a constant target feature: its scale is guarded, not divided by zero
    adapter = DomainAdapter("standardize").fit(source, target)
    for X in (adapter.transform_source(source), adapter.transform_target(target)):
        assert X.dtype == np.float32 and np.isfinite(X).all()
        np.testing.assert_allclose(X.mean(0, dtype=np.float64), 0.0, atol=1e-5)
    np.testing.assert_allclose(adapter.transform_source(source).std(0, dtype=np.float64), 1.0, rtol=1e-4)
    target_std = adapter.transform_target(target).std(0, dtype=np.float64)
    np.testing.assert_allclose(np.delete(target_std, 3), 1.0, rtol=1e-4)
    assert target_std[3] == 0.0
    assert adapter.describe()["params"] == {}


@pytest.mark.parametrize(("method", "options"), [("standardize", {}), ("coral", {"eps": 0.25})])
def test_round_trip_through_arrays_gives_identical_transforms(method, options):
    source, target, _ = _gaussians(n_target=50)
    adapter = DomainAdapter(method, **options).fit(source, target)
    info = json.loads(json.dumps(adapter.describe()))  # JSON-able, as a head's metadata would store it
    assert info == {"method": method, "params": options, "n_source": 4000, "n_target": 50, "dim": 12}
    arrays = adapter.to_arrays()
    assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays.values())
    loaded = DomainAdapter.from_arrays(arrays, method=info["method"], params=info["params"])
    assert loaded.describe() == adapter.describe()
    probe = np.random.default_rng(5).normal(size=(30, 12)).astype(np.float32)
    np.testing.assert_array_equal(loaded.transform_source(probe), adapter.transform_source(probe))
    np.testing.assert_array_equal(loaded.transform_target(probe), adapter.transform_target(probe))
    arrays[next(iter(arrays))][...] = 0  # to_arrays hands out copies: the adapter is unaffected
    np.testing.assert_array_equal(adapter.transform_source(probe), loaded.transform_source(probe))


def _tamper(arrays: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    arrays = dict(arrays)
    if how == "matrix-shape":
        arrays["matrix"] = arrays["matrix"][:, :-1]
    elif how == "mean-shape":
        arrays["target_mean"] = arrays["target_mean"][:-1]
    elif how == "mean-2d":
        arrays["source_mean"] = arrays["source_mean"][None, :]
    elif how == "nan":
        arrays["matrix"] = arrays["matrix"].copy()
        arrays["matrix"][2, 3] = np.nan
    elif how == "inf":
        arrays["target_mean"] = arrays["target_mean"].copy()
        arrays["target_mean"][0] = np.inf
    elif how == "int-dtype":
        arrays["source_mean"] = arrays["source_mean"].astype(np.int32)
    elif how == "float-counts":
        arrays["counts"] = arrays["counts"].astype(np.float32)
    elif how == "small-counts":
        arrays["counts"] = np.array([4000, 1])
    elif how == "missing":
        del arrays["matrix"]
    elif how == "extra":
        arrays["source_scale"] = np.ones(12, np.float32)
    return arrays


@pytest.mark.parametrize(("how", "message"), [
    ("matrix-shape", "'matrix' has shape (12, 11)"), ("mean-shape", "'target_mean' has shape (11,)"),
    ("mean-2d", "'source_mean' must have shape (dim,)"), ("nan", "'matrix' holds NaN"),
    ("inf", "'target_mean' holds NaN or infinity"), ("int-dtype", "'source_mean' must hold floats"),
    ("float-counts", "'counts' must hold integers"), ("small-counts", "each >= 2"),
    ("missing", "needs arrays"), ("extra", "needs arrays"),
])
def test_from_arrays_refuses_tampered_coral_arrays(how, message):
    source, target, _ = _gaussians()
    arrays = DomainAdapter("coral").fit(source, target).to_arrays()
    with pytest.raises(AdaptationError) as e:
        DomainAdapter.from_arrays(_tamper(arrays, how), method="coral", params={"eps": 1.0})
    assert message in str(e.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"target_scale": "zero"}, "'target_scale' must hold positive scales"),
    ({"method": "coral"}, "a coral adapter needs arrays"),
    ({"method": "whiten"}, "unknown adaptation method 'whiten'; choose one of standardize, coral"),
    ({"params": {"eps": 1.0}}, "the standardize adapter has no option 'eps'"),
])
def test_from_arrays_refuses_mismatched_standardize_input(change, message):
    source, target, _ = _gaussians()
    arrays = DomainAdapter("standardize").fit(source, target).to_arrays()
    if change.get("target_scale") == "zero":
        arrays["target_scale"][5] = 0.0
    with pytest.raises(AdaptationError) as e:
        DomainAdapter.from_arrays(arrays, method=change.get("method", "standardize"),
                                  params=change.get("params", {}))
    assert message in str(e.value)


def test_from_arrays_refuses_a_bad_eps():
    source, target, _ = _gaussians()
    arrays = DomainAdapter("coral").fit(source, target).to_arrays()
    with pytest.raises(AdaptationError, match="eps must be a positive number"):
        DomainAdapter.from_arrays(arrays, method="coral", params={"eps": -1.0})


# --- validation ---


def test_errors_are_head_errors():
    assert issubclass(AdaptationError, HeadError) and issubclass(AdaptationError, ValueError)
    assert METHODS == ("standardize", "coral")


@pytest.mark.parametrize("method", ["CORAL", "", None, "mmd"])
def test_unknown_method_names_the_choices(method):
    with pytest.raises(HeadError, match="unknown adaptation method .*; choose one of standardize, coral"):
        DomainAdapter(method)


@pytest.mark.parametrize("eps", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_eps_is_refused(eps):
    with pytest.raises(AdaptationError, match="eps must be a positive number"):
        DomainAdapter("coral", eps=eps)


def _bad(kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    if kind == "dims":
        target = target[:, :6]
    elif kind == "one-target-row":
        target = target[:1]
    elif kind == "one-source-row":
        source = source[:1]
    elif kind == "nan-source":
        source[7, 2] = np.nan
    elif kind == "inf-target":
        target[3, 0] = -np.inf
    elif kind == "empty-target":
        target = target[:0]
    elif kind == "1d-source":
        source = source[0]
    elif kind == "text":
        source = [["a"] * 8] * 3
    return source, target


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("kind", "message"), [
    ("dims", "source features have dim 8 but target features have dim 6"),
    ("one-target-row", "need at least 2 target feature rows"),
    ("one-source-row", "need at least 2 source feature rows"),
    ("nan-source", "source: 1 feature rows contain NaN or infinity (rows 7)"),
    ("inf-target", "target: 1 feature rows contain NaN or infinity (rows 3)"),
    ("empty-target", "target: got no feature rows"),
    ("1d-source", "source: features must be a 2-D (N, dim) array"),
    ("text", "source: features must be a numeric (N, dim) array"),
])
def test_fit_refuses_bad_features(method, kind, message):
    source, target = _bad(kind)
    adapter = DomainAdapter(method)
    with pytest.raises(AdaptationError) as e:
        adapter.fit(source, target)
    assert message in str(e.value)
    assert not hasattr(adapter, "dim_")  # a failed fit leaves the adapter unfitted


@pytest.mark.parametrize("method", METHODS)
def test_use_before_fit_says_to_fit(method):
    adapter = DomainAdapter(method)
    X = np.zeros((3, 4), np.float32)
    for call in (lambda: adapter.transform_source(X), lambda: adapter.transform_target(X), adapter.to_arrays,
                 adapter.describe):
        with pytest.raises(AdaptationError, match=r"not fitted yet; call fit\(source, target\) first"):
            call()


@pytest.mark.parametrize("method", METHODS)
def test_transform_refuses_wrong_dim_and_nan(method):
    source, target, _ = _gaussians(n_source=100, n_target=100)
    adapter = DomainAdapter(method).fit(source, target)
    for transform in (adapter.transform_source, adapter.transform_target):
        with pytest.raises(AdaptationError, match="features have dim 10 but the adapter was fitted on 12-d"):
            transform(np.zeros((5, 10), np.float32))
        bad = np.zeros((5, 12), np.float32)
        bad[4, 0] = np.nan
        with pytest.raises(AdaptationError, match=r"1 feature rows contain NaN or infinity \(rows 4\)"):
            transform(bad)


def test_coral_warns_when_target_rows_are_few_for_the_dim(caplog):
    rng = np.random.default_rng(0)
    source = rng.normal(size=(500, 100)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="classifier.adapt"):
        DomainAdapter("coral").fit(source, rng.normal(size=(5, 100)).astype(np.float32))  # < 100 / 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "target covariance" in warnings[0].getMessage()
    assert "only 5 rows" in warnings[0].getMessage() and "at least 10" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="classifier.adapt"):
        DomainAdapter("coral").fit(source, rng.normal(size=(10, 100)).astype(np.float32))
        DomainAdapter("standardize").fit(source, rng.normal(size=(5, 100)).astype(np.float32))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
