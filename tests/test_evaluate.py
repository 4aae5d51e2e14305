"""Evaluation metrics agree with sklearn.metrics; the confusion plot is a real PNG."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from test_heads import NAMES, embed_digits, single_torch_thread  # noqa: F401 (autouse)

from classifier import HeadError, evaluate, make_head, plot_confusion


@pytest.fixture(scope="module")
def digits(embedder):
    X, y = embed_digits(embedder)
    return X, NAMES[y]


def _assert_matches_sklearn(ev, y_true, y_pred):
    labels = sorted(set(y_true))
    assert ev.classes == labels
    assert ev.accuracy == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    assert ev.macro_f1 == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro"))
    assert ev.confusion == metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    report = metrics.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    for label in labels:
        ours, ref = ev.per_class[label], report[label]
        assert (ours.precision, ours.recall, ours.f1) == pytest.approx((ref["precision"], ref["recall"],
                                                                        ref["f1-score"]))
        assert ours.support == ref["support"]
    assert ev.n_evaluated == len(y_true)


def test_holdout_metrics_match_sklearn(digits):
    X, y = digits
    ev = evaluate(make_head("logreg"), X, y, test_size=0.25, seed=3)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=3)
    y_pred = make_head("logreg").fit(X_train, y_train).predict(X_test)
    _assert_matches_sklearn(ev, y_test, y_pred)
    assert ev.method == "holdout" and ev.n_evaluated == 100
    assert ev.accuracy >= 0.8


def test_kfold_metrics_match_sklearn_cross_val_predict(digits):
    X, y = digits
    head = make_head("logreg")
    ev = evaluate(head, X, y, folds=4, seed=1)
    y_pred = cross_val_predict(make_head("logreg"), X, y, cv=StratifiedKFold(4, shuffle=True, random_state=1))
    _assert_matches_sklearn(ev, y, y_pred)
    assert ev.method == "kfold" and ev.folds == 4 and ev.n_evaluated == len(y)
    assert not hasattr(head, "classes_")  # the head passed in is never fitted


def test_evaluation_serialises_to_json(digits):
    X, y = digits
    ev = evaluate(make_head("logreg"), X, y)
    back = json.loads(json.dumps(ev.to_dict()))
    assert back["accuracy"] == ev.accuracy
    assert back["per_class"]["seven"]["support"] == 8
    assert back["confusion"] == ev.confusion


def test_integer_labels_serialise_too(digits):
    X, _ = digits
    y = np.repeat(np.arange(10), 40)
    back = json.loads(json.dumps(evaluate(make_head("logreg"), X, y).to_dict()))
    assert back["classes"] == list(range(10)) and set(back["per_class"]) == {str(c) for c in range(10)}


def test_too_few_examples_for_the_split_are_named(digits):
    X, y = digits
    keep = np.flatnonzero(y != "two")[:300].tolist() + np.flatnonzero(y == "two")[:3].tolist()
    with pytest.raises(HeadError, match="5-fold cross-validation needs at least 5 examples per class: 'two' has 3"):
        evaluate(make_head("logreg"), X[keep], y[keep], folds=5)
    with pytest.raises(HeadError, match="at least two classes"):
        evaluate(make_head("logreg"), X[:10], ["a"] * 10)
    with pytest.raises(HeadError, match="test_size"):
        evaluate(make_head("logreg"), X, y, test_size=1.5)


def test_plot_confusion_writes_a_png(tmp_path, digits):
    X, y = digits
    ev = evaluate(make_head("logreg"), X, y)
    path = plot_confusion(ev.confusion, ev.classes, tmp_path / "plots" / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 300
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temporary file left


def test_plot_confusion_checks_the_shape(tmp_path):
    with pytest.raises(HeadError, match="shape \\(2, 2\\) but there are 3 classes"):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "x.png")


def test_learning_curve_rises_with_labels_and_bounds_its_mean():
    from classifier import learning_curve, make_head

    rng = np.random.default_rng(0)
    X = rng.standard_normal((900, 16)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] + 0.7 * rng.standard_normal(900) > 0).astype(int)
    points = learning_curve(make_head("logreg"), X, y, per_class=[1, 2, 10, 100, 10_000], repeats=4, seed=3)
    assert [p.per_class for p in points] == [2, 10, 100]  # 1 < the head's minimum; 10,000 > the smallest class
    assert points[-1].accuracy_mean > points[0].accuracy_mean + 0.1
    assert all(p.ci_low <= p.accuracy_mean <= p.ci_high and p.n_train == 2 * p.per_class for p in points)
    again = learning_curve(make_head("logreg"), X, y, per_class=[2, 10, 100], repeats=4, seed=3)
    assert [p.accuracy_mean for p in again] == [p.accuracy_mean for p in points]  # seeded
    with pytest.raises(HeadError, match="repeats"):
        learning_curve(make_head("logreg"), X, y, repeats=1)
    for bad in ([0], [-1, 5], [2.5]):
        with pytest.raises(HeadError, match="per_class sizes must be whole numbers >= 1"):
            learning_curve(make_head("logreg"), X, y, per_class=bad)


def test_learning_curve_is_capped_and_stops_when_asked():
    from classifier import learning_curve, make_head
    from classifier.evaluate import MAX_CURVE_SIZES, MAX_REPEATS
    from embedder.errors import DeadlineError

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    with pytest.raises(HeadError, match=f"to {MAX_REPEATS}"):
        learning_curve(make_head("logreg"), X, y, repeats=MAX_REPEATS + 1)
    with pytest.raises(HeadError, match=f"at most {MAX_CURVE_SIZES}"):
        learning_curve(make_head("logreg"), X, y, per_class=range(2, MAX_CURVE_SIZES + 3))
    asked = []

    def stop_after_three() -> bool:
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(DeadlineError, match="stopped after 3 of 20 fits"):
        learning_curve(make_head("logreg"), X, y, per_class=[2, 5, 10, 20], repeats=5, should_stop=stop_after_three)
