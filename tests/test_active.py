"""Active learning and label checks: the algorithms on synthetic vectors, and the service methods on real digits.

The service tests store scikit-learn's digits (0, 1, 7) through the real model, counted by
:class:`conftest.CountingModel`: Suggest and LabelIssues must read stored vectors only.
"""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import requests

from classifier import InsufficientDataError, active
from classifier.persist import HeadNotFoundError
from conftest import CountingModel, http_door, running_server
from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.cli import main
from embedder.client import EmbedderClient
from embedder.config import Config
from embedder.core import AddItem, Call, Item, Service
from embedder.errors import Category, InvalidArgumentError, NotFoundError, PermissionDeniedError, category_of
from embedder.keys import Principal

LABELLED_PER_CLASS = 8
FLIPPED = (3, 14, 25, 36, 47, 58, 69, 80, 88)  # 9 of 90: 10% noise


# ------------------------------------------------------------------ algorithms, synthetic vectors

def _two_classes(n: int = 2000, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian points labelled by the sign of their first coordinate: the boundary is x0 = 0."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    return X, np.where(X[:, 0] > 0, "a", "b")


def test_uncertainty_picks_items_nearer_the_boundary_than_random():
    X, y = _two_classes()
    labelled = np.random.default_rng(1).choice(len(X), 60, replace=False)
    rest = np.setdiff1d(np.arange(len(X)), labelled)
    for strategy in ("margin", "entropy", "hybrid"):
        result = active.suggest([str(i) for i in rest], X[rest], X[labelled], list(y[labelled]), n=20,
                                strategy=strategy)
        picked = [int(s.id) for s in result.suggestions]
        assert np.abs(X[picked, 0]).mean() < 0.7 * np.abs(X[rest, 0]).mean(), strategy  # random: the mean


def test_diversity_avoids_near_duplicates():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(30, 16)).astype(np.float32)
    copies = distinct[0] + 1e-3 * rng.normal(size=(50, 16)).astype(np.float32)  # 50 near-copies of one item
    X = np.vstack([copies, distinct[1:]])
    result = active.suggest([str(i) for i in range(len(X))], X, np.zeros((0, 16)), [], n=10, strategy="diversity")
    picked = [int(s.id) for s in result.suggestions]
    assert len(set(picked)) == 10 and sum(i < 50 for i in picked) <= 1
    assert all("diversity" in s.reason for s in result.suggestions)


def test_hybrid_spreads_a_batch_that_margin_spends_on_copies():
    X, y = _two_classes()
    labelled, rest = np.arange(60), X[60:]
    ids = [str(i) for i in range(len(rest))]
    top = int(active.suggest(ids, rest, X[labelled], list(y[labelled]), n=1, strategy="margin").suggestions[0].id)
    copies = rest[top] + 1e-4 * np.random.default_rng(2).normal(size=(40, 8)).astype(np.float32)
    pool = np.vstack([copies, rest])  # 40 near-copies of the most uncertain item
    ids = [str(i) for i in range(len(pool))]
    margin = active.suggest(ids, pool, X[labelled], list(y[labelled]), n=10, strategy="margin")
    hybrid = active.suggest(ids, pool, X[labelled], list(y[labelled]), n=10, strategy="hybrid")
    assert sum(int(s.id) < 40 for s in margin.suggestions) >= 5  # uncertainty alone takes the copies
    assert sum(int(s.id) < 40 for s in hybrid.suggestions) <= 1


def test_cold_start_takes_one_item_per_cluster():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 32)).astype(np.float32) * 5
    truth = np.repeat(np.arange(5), [400, 300, 200, 100, 50])
    X = centers[truth] + rng.normal(size=(len(truth), 32)).astype(np.float32)
    result = active.suggest([str(i) for i in range(len(X))], X, np.zeros((0, 32)), [], n=5)
    assert result.strategy == "representative"
    assert sorted(truth[int(s.id)] for s in result.suggestions) == [0, 1, 2, 3, 4]
    assert all(s.reason.startswith("cold start") for s in result.suggestions)


def test_confident_learning_finds_flipped_labels():
    X, y = _two_classes(n=1000, seed=3)
    flipped = np.random.default_rng(4).choice(len(y), 100, replace=False)
    noisy = y.copy()
    noisy[flipped] = np.where(noisy[flipped] == "a", "b", "a")
    result = active.find_label_issues([str(i) for i in range(len(y))], X, list(noisy), [None] * len(y),
                                      limit=1000)
    found = {int(i.id) for i in result.issues}
    precision = len(found & set(flipped)) / len(found)
    assert precision >= 0.6 and len(found & set(flipped)) >= 50  # chance precision is 0.1
    assert 0.05 < result.noise_rate < 0.2
    issue = result.issues[0]
    assert issue.suggested != issue.label and issue.suggested == y[int(issue.id)] and 0 < issue.score <= 1


def test_near_duplicates_with_different_labels_are_found_exactly():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 200)).astype(np.float32)
    X[1] = X[0] + 0.01 * rng.normal(size=200)  # near-copy, another label
    X[3] = X[2] + 0.01 * rng.normal(size=200)  # near-copy, same label: not an issue
    labels = ["x"] * 500
    labels[1] = "y"
    found = active.duplicates([str(i) for i in range(500)], X, labels, [None] * 500, threshold=0.98)
    assert {(d.id, d.other, d.kind) for d in found} == {("0", "1", "near_duplicate"), ("1", "0", "near_duplicate")}
    assert all(d.score >= 0.98 and d.suggested != d.label for d in found)


@pytest.mark.parametrize("call, fix", [
    (lambda: active.suggest(["a"], np.ones((1, 4)), np.zeros((0, 4)), [], n=0), "n must be"),
    (lambda: active.suggest(["a"], np.ones((1, 4)), np.zeros((0, 4)), [], n=1001), "n must be"),
    (lambda: active.suggest(["a"], np.ones((1, 4)), np.zeros((0, 4)), [], n=1, strategy="luck"), "strategy"),
    (lambda: active.find_label_issues(["a"], np.ones((1, 4)), ["x"], [None], limit=1, near_duplicate=2.0),
     "near_duplicate"),
])
def test_bad_arguments_are_refused(call, fix):
    with pytest.raises(InvalidArgumentError, match=fix):
        call()


# ------------------------------------------------------------------ the service, real digits

@pytest.fixture(scope="module")
def counting(embedder):
    return CountingModel(embedder)


@pytest.fixture(scope="module")
def service(tmp_path_factory, counting, digit_images):
    """Collections over the 90 digits: "digits" (8 of each class labelled), "cold" (no labels), "noisy" (every
    label, 9 flipped) and "dups" (one image twice with two labels)."""
    images, labels = digit_images
    config = Config.from_env(environ={}, data_dir=tmp_path_factory.mktemp("active") / "data", grace_seconds=2.0)
    with Service.open(config, embedder=counting) as service:
        seen: dict[str, int] = {}
        digits = []
        for i, (image, label) in enumerate(zip(images, labels)):
            seen[label] = seen.get(label, 0) + 1
            digits.append(AddItem(Item(f"d{i}", image=image), label=label if seen[label] <= LABELLED_PER_CLASS
                                  else None))
        assert service.add("digits", digits).added == len(images)
        service.add("cold", [AddItem(Item(f"d{i}", image=image)) for i, image in enumerate(images)])
        service.add("noisy", [AddItem(Item(f"d{i}", image=image), label=_flip(label) if i in FLIPPED else label)
                              for i, (image, label) in enumerate(zip(images, labels))])
        service.add("dups", [AddItem(Item(f"d{i}", image=image), label=label)
                             for i, (image, label) in enumerate(zip(images, labels)) if i % 3 == 0]
                    + [AddItem(Item("copy-of-d0", image=images[0]), label="7")])
        yield service


def _flip(label: str) -> str:
    return {"0": "1", "1": "7", "7": "0"}[label]


def test_suggest_returns_distinct_unlabelled_items_with_reasons_without_a_backbone_pass(service, counting,
                                                                                          digit_images):
    unlabelled = {f"d{i}" for i in range(len(digit_images[1]))} - set(service.store.labelled("digits")[0])
    decoded, embedded = counting.decoded, counting.embedded
    for strategy in active.STRATEGIES:
        result = service.suggest("digits", n=10, strategy=strategy)
        ids = [s.id for s in result.suggestions]
        assert len(ids) == len(set(ids)) == 10 and set(ids) <= unlabelled, strategy
        assert all(s.reason for s in result.suggestions) and result.candidates == len(unlabelled)
        assert result.strategy == ("hybrid" if strategy == "auto" else strategy)
    assert len(service.suggest("digits").suggestions) == active.DEFAULT_SUGGEST
    assert (counting.decoded, counting.embedded) == (decoded, embedded)


def test_suggest_among_named_ids_takes_only_their_unlabelled_items(service):
    result = service.suggest("digits", n=5, ids=["d0", "d1", "d20", "d21"])  # d0, d1 are labelled
    assert {s.id for s in result.suggestions} == {"d20", "d21"}


def test_cold_start_covers_the_digits(service, digit_images):
    result = service.suggest("cold", n=3)
    assert result.strategy == "representative"
    truth = {digit_images[1][int(s.id[1:])] for s in result.suggestions}
    assert len(truth) >= 2  # three clusters of real features; chance of covering two or more is high but not all


def test_label_issues_find_flipped_labels_without_a_backbone_pass(service, counting):
    decoded, embedded = counting.decoded, counting.embedded
    result = service.label_issues("noisy")
    found = {int(i.id[1:]) for i in result.issues}
    hits = found & set(FLIPPED)
    assert len(hits) >= 4 and len(hits) / len(found) >= 0.5  # chance precision is 0.1
    assert result.checked == 90 and result.folds == 5 and not result.duplicates  # no near-identical images
    looser = service.label_issues("noisy", near_duplicate=0.98).duplicates  # distinct digits of a class reach it
    assert looser and all(int(d.id[1:]) in FLIPPED or int(d.other[1:]) in FLIPPED for d in looser)
    assert (counting.decoded, counting.embedded) == (decoded, embedded)


def test_label_issues_report_the_same_image_with_two_labels(service):
    dups = service.label_issues("dups").duplicates
    assert {(d.id, d.other, d.kind, d.score) for d in dups} == {("d0", "copy-of-d0", "same_image", 1.0),
                                                                 ("copy-of-d0", "d0", "same_image", 1.0)}
    assert {d.suggested for d in dups} == {"0", "7"}


def test_refusals_say_what_to_do(service):
    refusals = [
        (lambda: service.suggest("nowhere"), NotFoundError, "nowhere"),
        (lambda: service.label_issues("nowhere"), NotFoundError, "nowhere"),
        (lambda: service.suggest("noisy"), InsufficientDataError, "no unlabelled items"),
        (lambda: service.suggest("cold", strategy="margin"), InsufficientDataError, "representative"),
        (lambda: service.label_issues("cold"), InsufficientDataError, "at least two classes"),
        (lambda: service.label_issues("noisy", labels=["0"]), InsufficientDataError, "only one class"),
        (lambda: service.suggest("digits", n=-1), InvalidArgumentError, "n must be"),
        (lambda: service.suggest("digits", n=5000), InvalidArgumentError, "n must be"),
        (lambda: service.label_issues("noisy", limit=10**6), InvalidArgumentError, "limit must be"),
        (lambda: service.suggest("digits", ids=["ghost"]), NotFoundError, "ghost"),
        (lambda: service.suggest("digits", call=Call(principal=Principal("k1", "read"))), PermissionDeniedError,
         "write"),
        (lambda: service.label_issues("noisy", call=Call(principal=Principal("k1", "write", frozenset({"x"})))),
         PermissionDeniedError, "allow-list"),
    ]
    service.train("noisy", head_id="noisy-head")
    digits_only = Call(principal=Principal("k2", "write", frozenset({"digits"})))
    refusals.append((lambda: service.suggest("digits", head_id="noisy-head", call=digits_only), HeadNotFoundError,
                     "no head 'noisy-head'"))  # another collection's head: answered as an unknown one
    assert service.suggest("digits", n=3, head_id="noisy-head").strategy == "hybrid"  # no key: any head
    for call, error, fix in refusals:
        with pytest.raises(error, match=fix):
            call()
    with pytest.raises(InsufficientDataError) as e:
        service.suggest("noisy")
    assert category_of(e.value) is Category.FAILED_PRECONDITION



def test_suggest_and_label_issues_wait_their_turn_with_trainings(service):
    """Both train heads (on the fly, one per fold), so they run in turn with trainings, which use every core:
    while a training holds the turn they wait, and give up when their deadline passes."""
    from embedder.errors import DeadlineError

    with service.heads.turn(None, "a training"):
        for run in (lambda call: service.suggest("digits", n=3, call=call),
                    lambda call: service.label_issues("noisy", call=call)):
            with pytest.raises(DeadlineError, match="waiting for the training before it"):
                run(Call.within(0.3))
    assert len(service.suggest("digits", n=3, call=Call.within(30)).suggestions) == 3  # the turn is free again


# ------------------------------------------------------------------ the wire

def test_suggest_and_label_issues_over_grpc(counting, digit_images, capsys):
    images, labels = digit_images
    with running_server(counting) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        items = [pb.AddItem(item=pb.Item(id=f"d{i}", image=image), **({"label": label} if i % 30 < 6 else {}))
                 for i, (image, label) in enumerate(zip(images, labels))]
        assert stub.Add(pb.AddRequest(collection="digits", items=items), timeout=120).added == len(images)
        answer = stub.Suggest(pb.SuggestRequest(collection="digits", n=5), timeout=60)
        assert answer.strategy == "hybrid" and answer.labelled == 18 and answer.candidates == 72
        assert len({s.id for s in answer.suggestions}) == 5 and all(s.reason for s in answer.suggestions)
        issues = stub.LabelIssues(pb.LabelIssuesRequest(collection="digits"), timeout=60)
        assert issues.checked == 18 and issues.folds == 5 and set(issues.thresholds) == {"0", "1", "7"}
        for request, code in [
            (pb.SuggestRequest(collection="ghost"), grpc.StatusCode.NOT_FOUND),
            (pb.SuggestRequest(collection="digits", n=-1), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.SuggestRequest(collection="digits", ids=["d0"]), grpc.StatusCode.FAILED_PRECONDITION),  # labelled
        ]:
            with pytest.raises(grpc.RpcError) as e:
                stub.Suggest(request, timeout=60)
            assert e.value.code() == code, request
        with pytest.raises(grpc.RpcError) as e:
            stub.LabelIssues(pb.LabelIssuesRequest(collection="digits", labels=["0"]), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "only one class" in e.value.details()
        _over_http(server)
        with EmbedderClient(server.address, timeout=60) as client:
            assert len(client.suggest("digits", 3, strategy="entropy")["suggestions"]) == 3
            assert client.label_issues("digits", limit=2)["checked"] == 18
        capsys.readouterr()
        assert main(["suggest", "--collection", "digits", "-n", "3", "--server", server.address, "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["suggestions"]) == 3
        assert main(["label-issues", "--collection", "digits", "--server", server.address]) == 0
        assert capsys.readouterr().out.startswith("checked 18 labelled items (5 folds)")
        assert main(["suggest", "--collection", "ghost", "--server", server.address]) == 2


def _over_http(server) -> None:
    """The same calls through the HTTP door over the server's service."""
    with http_door(server, metrics=server.metrics) as http:
        url = http.url + "/v1/collections/digits"
        answer = requests.post(url + "/suggest", json={"n": 4, "strategy": "diversity"}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["suggestions"]) == 4, answer.text
        issues = requests.post(url + "/label-issues", json={"limit": 5}, timeout=60).json()
        assert issues["checked"] == 18 and set(issues["thresholds"]) == {"0", "1", "7"}
        refused = requests.post(url + "/suggest", json={"n": 5000}, timeout=60)
        assert refused.status_code == 400 and "n must be" in refused.json()["error"]["message"]
        missing = requests.post(http.url + "/v1/collections/ghost/label-issues", json={}, timeout=60)
        assert missing.status_code == 404
