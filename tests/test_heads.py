"""Classifier heads on real mobilenet_v2 features of scikit-learn's handwritten digits."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from classifier import LABEL_HEADS, HeadError, LogRegHead, SVMHead, head_params, make_head
from embedder.errors import ModelMismatchError

PER_CLASS = 40  # 400 images: embedding them takes ~1-5 s on a 2-core CPU
NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Train with one torch thread: on a 2-core machine busy with other work, two OpenMP threads wait on each
    other at every barrier and a small fit takes 10-30x longer (measured). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def embed_digits(embedder) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(400, 1280)`` and int labels of the first 40 of each digit, 8x8 images upscaled to 32x32.

    Cached per embedder, so the other test modules import this and embed only once per session.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = np.concatenate([np.flatnonzero(digits.target == c)[:PER_CLASS] for c in range(10)])
    images = [np.asarray(Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize(
        (32, 32), Image.Resampling.BILINEAR)) for i in idx]
    return embedder.embed(images), digits.target[idx]


@pytest.fixture(scope="session")
def digits(embedder):
    """Stratified 300/100 split of the digit features: (X_train, X_test, y_train, y_test)."""
    X, y = embed_digits(embedder)
    return train_test_split(X, y, test_size=100, stratify=y, random_state=0)


@pytest.mark.parametrize("kind", list(LABEL_HEADS))
def test_each_head_learns_digits(digits, kind):
    X_train, X_test, y_train, y_test = digits
    head = make_head(kind).fit(X_train, y_train)
    proba = head.predict_proba(X_test)
    assert proba.shape == (100, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert (proba >= 0).all()
    pred = head.predict(X_test)
    np.testing.assert_array_equal(pred, head.classes_[proba.argmax(axis=1)])
    # chance is 10%; these features give ~95%
    assert (pred == y_test).mean() >= 0.8
    assert head.score(X_test, y_test) == (pred == y_test).mean()


@pytest.mark.parametrize("kind", list(LABEL_HEADS))
def test_string_labels_come_back_as_strings(digits, kind):
    X_train, X_test, y_train, y_test = digits
    head = make_head(kind).fit(X_train, list(NAMES[y_train]))
    assert sorted(head.classes_) == sorted(NAMES)
    pred = head.predict(X_test)
    assert pred.dtype.kind == "U"
    assert (pred == NAMES[y_test]).mean() >= 0.8


@pytest.mark.parametrize("kind", list(LABEL_HEADS))
def test_two_classes(digits, kind):
    X_train, X_test, y_train, y_test = digits
    train, test = y_train < 2, y_test < 2
    head = make_head(kind).fit(X_train[train], NAMES[y_train[train]])
    proba = head.predict_proba(X_test[test])
    assert proba.shape == (test.sum(), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert (head.predict(X_test[test]) == NAMES[y_test[test]]).mean() >= 0.9


def test_logreg_reaches_the_same_optimum_as_scikit_learn(digits):
    """Same objective as LogisticRegression(C) on the standardised features: probabilities agree."""
    X_train, X_test, y_train, _ = digits
    head = LogRegHead(tol=1e-9, max_iter=2000).fit(X_train, y_train)
    ref = LogisticRegression(C=head.C, tol=1e-10, max_iter=10000).fit(head._standardize(X_train), y_train)
    np.testing.assert_allclose(head.predict_proba(X_test), ref.predict_proba(head._standardize(X_test)),
                               atol=2e-3)


def test_svm_decision_values_match_libsvm(digits):
    X_train, X_test, y_train, _ = digits
    head = SVMHead().fit(X_train, y_train)
    Xs_train, Xs_test = head._standardize(X_train), head._standardize(X_test)
    ref = SVC(C=head.C, gamma=float(head.gamma_), decision_function_shape="ovr").fit(Xs_train, y_train)
    np.testing.assert_allclose(head.decision_function(X_test), ref.decision_function(Xs_test), atol=1e-9)


def test_class_weight_balanced_trains_on_imbalanced_data(digits):
    X_train, X_test, y_train, y_test = digits
    keep = (y_train != 3) | (np.cumsum(y_train == 3) <= 5)  # only 5 threes
    for kind in LABEL_HEADS:
        head = make_head(kind, class_weight="balanced").fit(X_train[keep], y_train[keep])
        assert (head.predict(X_test) == y_test).mean() >= 0.75


def test_one_class_is_refused(digits):
    X_train, _, y_train, _ = digits
    with pytest.raises(HeadError, match="at least two classes.*'seven'"):
        make_head("logreg").fit(X_train[:20], ["seven"] * 20)


@pytest.mark.parametrize("kind, need", [("logreg", 2), ("linear_svm", 3), ("svm", 3)])
def test_class_with_too_few_samples_is_named(digits, kind, need):
    X_train, _, y_train, _ = digits
    labels = list(NAMES[y_train])
    first_four = [i for i, v in enumerate(labels) if v == "four"][0]
    keep = [i for i, v in enumerate(labels) if v != "four" or i == first_four]
    with pytest.raises(HeadError, match=f"at least {need} examples per class.*'four' has 1"):
        make_head(kind).fit(X_train[keep], [labels[i] for i in keep])


def test_wrong_dim_is_refused(digits):
    X_train, X_test, y_train, _ = digits
    head = make_head("logreg").fit(X_train, y_train, model_id="mobilenet_v2:abc")
    with pytest.raises(HeadError, match="dim 512 but the head was trained on 1280-d features.*mobilenet_v2:abc"):
        head.predict(X_test[:, :512])
    with pytest.raises(HeadError, match="2-D"):
        head.predict(X_test[0])


def test_nan_features_are_refused_with_their_rows(digits):
    X_train, X_test, y_train, _ = digits
    bad = X_train.copy()
    bad[[3, 7], 0] = np.nan
    with pytest.raises(HeadError, match=r"2 feature rows contain NaN or infinity \(rows 3, 7\)"):
        make_head("logreg").fit(bad, y_train)
    head = make_head("logreg").fit(X_train, y_train)
    test = X_test.copy()
    test[1, 5] = np.inf
    with pytest.raises(HeadError, match=r"rows 1\)"):
        head.predict_proba(test)


def test_labels_must_match_rows_and_be_strings_or_ints(digits):
    X_train, _, y_train, _ = digits
    with pytest.raises(HeadError, match="300 feature rows but 299 labels"):
        make_head("logreg").fit(X_train, y_train[:-1])
    with pytest.raises(HeadError, match="strings or integers"):
        make_head("logreg").fit(X_train, y_train.astype(float))
    with pytest.raises(HeadError, match="not a mix"):
        make_head("logreg").fit(X_train[:4], np.array(["a", 1, "a", 1], dtype=object))


def test_features_of_another_model_are_refused(digits):
    X_train, X_test, y_train, _ = digits
    head = make_head("logreg").fit(X_train, y_train, model_id="mobilenet_v2:aaa")
    head.predict(X_test, model_id="mobilenet_v2:aaa")
    with pytest.raises(ModelMismatchError, match="'efficientnet_lite0:bbb'.*'mobilenet_v2:aaa'") as err:
        head.predict(X_test, model_id="efficientnet_lite0:bbb")
    assert (err.value.expected_model_id, err.value.other_model_id) == ("mobilenet_v2:aaa", "efficientnet_lite0:bbb")


def test_svm_refuses_large_sets(digits):
    X_train, _, y_train, _ = digits
    with pytest.raises(HeadError, match="max_samples=100.*logreg or linear_svm"):
        make_head("svm", max_samples=100).fit(X_train, y_train)


def test_make_head_rejects_unknown_kinds_and_options():
    with pytest.raises(HeadError, match="unknown head kind 'mlp'; choose one of logreg, linear_svm, svm"):
        make_head("mlp")
    with pytest.raises(HeadError, match="no option 'seed'; its options are C, class_weight, tol, max_iter, device"):
        make_head("logreg", seed=1)
    with pytest.raises(HeadError, match="C must be a number from 1e-12 to 1e"):
        make_head("linear_svm", C=0)
    with pytest.raises(HeadError, match="C must be a number from"):  # its L2 weight 1 / (C n) overflowed float32
        make_head("logreg", C=1e-45)
    with pytest.raises(HeadError, match="class_weight must be None or 'balanced'"):
        make_head("svm", class_weight="auto")
    assert head_params("svm") == {"C": 1.0, "gamma": "scale", "class_weight": None, "max_samples": 5000, "seed": 0}


def test_unfitted_head_says_to_fit():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="call fit"):
        make_head("logreg").predict(np.zeros((1, 4), np.float32))
