"""Every call's work is bounded: JSON fields under one rule, capped curve and training parameters, and head
trainings that end when their caller's deadline passes, it cancels or the server stops (SIGTERM included).

Real servers throughout: in-process on a loopback port, and an ``embedder serve`` subprocess for SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.core import Call
from embedder.errors import DeadlineError
from embedder.jsonrule import MAX_JSON_DEPTH, UNREADABLE, dump_stored, load_stored_object, parse_json_object
from embedder.store import Store
from embedder.store import validation as store_validation

OK = grpc.StatusCode.OK.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def nested(depth: int) -> str:
    """A JSON object ``depth`` levels deep: {"a": {"a": ... {}}}."""
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


def blobs(k: int = 4, n: int = 1500, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``k`` overlapping Gaussian classes: each logreg fit on them takes a noticeable fraction of a second."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 0.3
    X = np.concatenate([c + rng.normal(size=(n, dim)) for c in centers]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, [f"c{i}" for i in range(k) for _ in range(n)]


def fill(store: Store, collection: str, model_id: str) -> None:
    X, y = blobs()
    store.add(collection, [f"v{i}" for i in range(len(X))], X, model_id=model_id, labels=y)


# ------------------------------------------------------------------------------------------ one JSON rule


def test_the_json_rule_caps_depth_and_size():
    assert parse_json_object(nested(MAX_JSON_DEPTH), "m")["a"]
    for text in (nested(MAX_JSON_DEPTH + 1), nested(982), "[" * 60_000):
        with pytest.raises(ValueError, match=f"more than {MAX_JSON_DEPTH} levels"):
            parse_json_object(text, "m")
    with pytest.raises(ValueError, match=r"70,009 bytes, above the limit of 65,536.*--max-metadata-bytes"):
        parse_json_object(json.dumps({"x": "y" * 70_000}), "m", raise_with="--max-metadata-bytes")
    assert parse_json_object(json.dumps({"x": "y" * 70_000}), "m", max_bytes=None)["x"]
    deep: dict = {}
    for _ in range(981):
        deep = {"a": deep}
    # on the way out: a value that breaks the rule is replaced by a note, never raised
    assert UNREADABLE in json.loads(dump_stored(deep, "metadata")) and dump_stored({"a": 1}, "m") == '{"a": 1}'
    assert UNREADABLE in load_stored_object(nested(982), "metadata")
    assert load_stored_object(json.dumps({"x": "y" * 70_000}), "m")["x"]  # stored before a lower cap: returned
    # integers the store keeps exactly only (a filter on 2**64 + 1 compared a rounded copy)
    assert parse_json_object(json.dumps({"p": [2**63 - 1, -2**63]}), "m")["p"][0] == 2**63 - 1
    for big in (2**63, -2**63 - 1, 2**64 + 1):
        with pytest.raises(ValueError, match=f"integer {big}, outside the 64-bit range"):
            parse_json_object(json.dumps({"a": {"b": [1, big]}}), "m")
    assert load_stored_object(json.dumps({"p": 2**64}), "m") == {"p": 2**64}  # stored before the rule: returned
    expands = "{\"x\": [" + ",".join(["1e15"] * 10_000) + "]}"  # 50 KB as sent, 190 KB as stored and returned
    with pytest.raises(ValueError, match="above the limit of 65,536"):
        parse_json_object(expands, "m")


@pytest.fixture(scope="module")
def server(embedder):
    with running_server(embedder) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * 2**20)]) as ch:
        yield pb_grpc.EmbedderStub(ch)


def test_deep_or_huge_metadata_is_refused_per_item_and_search_keeps_working(stub, photos):
    metadata = [nested(982), json.dumps({"blob": "x" * 30_000_000}), '{"ok": 1}']
    items = [pb.AddItem(item=pb.Item(id=f"p{i}", image=photos[i]), metadata_json=m) for i, m in enumerate(metadata)]
    response = stub.Add(pb.AddRequest(collection="json-rule", items=items), timeout=120)
    assert [r.status.code for r in response.results] == [INVALID, INVALID, OK]
    assert "levels deep" in response.results[0].status.message
    assert "above the limit of 65,536" in response.results[1].status.message
    hits = stub.Search(pb.SearchRequest(collection="json-rule", item=pb.Item(image=photos[2]), k=3), timeout=60).hits
    assert [h.id for h in hits] == ["p2"] and json.loads(hits[0].metadata_json) == {"ok": 1}
    for params, why in ((nested(982), "levels deep"), (json.dumps({"x": "y" * 100_000}), "above the limit")):
        with pytest.raises(grpc.RpcError) as e:  # Train's params: the same rule
            stub.Train(pb.TrainRequest(collection="json-rule", params_json=params), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details()


def test_deep_metadata_stored_before_the_rule_cannot_break_get_or_search(embedder, photos, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    with running_server(embedder, data_dir=data_dir) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        items = [pb.AddItem(item=pb.Item(id=f"p{i}", image=photos[i])) for i in range(3)]
        assert stub.Add(pb.AddRequest(collection="old", items=items), timeout=120).added == 3
        vector = s.service.store.get("old", ["p1"])[0].vector
        model_id = s.service.store.collection("old").model_id
    deep: dict = {}
    for _ in range(981):  # what an older server let in: 982 levels
        deep = {"a": deep}

    # an older store, which had no depth rule (today's refuses such metadata on every path in)
    monkeypatch.setattr(store_validation, "check_json_object", lambda *args, **kwargs: None)

    def rewrite() -> None:  # a fresh thread: a shallow stack, as the Add handler had
        with Store(data_dir) as store:
            store.add("old", ["p1"], vector[None], model_id=model_id, metadata=[deep])

    writer = threading.Thread(target=rewrite)
    writer.start()
    writer.join()
    monkeypatch.undo()
    with running_server(embedder, data_dir=data_dir) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        for request in (pb.SearchRequest(collection="old", item=pb.Item(image=photos[1]), k=3),
                        pb.SearchRequest(item=pb.Item(image=photos[1]), k=3)):  # one collection, and all
            hits = stub.Search(request, timeout=60).hits
            assert hits[0].id == "p1" and UNREADABLE in json.loads(hits[0].metadata_json)
            assert {h.id for h in hits} == {"p0", "p1", "p2"}
        got = stub.Get(pb.GetRequest(collection="old", ids=["p1", "p2"]), timeout=60).items
        assert UNREADABLE in json.loads(got[0].metadata_json) and json.loads(got[1].metadata_json) == {}


# ------------------------------------------------------------------------------------------ caps


@pytest.fixture(scope="module")
def curves(server):
    """The in-process server with a collection of 6000 labelled vectors (4 classes) to train on."""
    fill(server.service.store, "blobs", server.service.default.model_id)
    return server


@pytest.mark.parametrize("request_fields, expected", [
    ({"repeats": 1_000_000}, "repeats must be an integer from 2"),
    ({"per_class": list(range(2, 40))}, "at most 32"),
    ({"params_json": '{"max_iter": 1000000000}'}, "cap of 10,000"),
])
def test_learning_curve_asks_are_capped(curves, stub, request_fields, expected):
    with pytest.raises(grpc.RpcError) as e:
        stub.LearningCurve(pb.LearningCurveRequest(collection="blobs", **request_fields), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in e.value.details()


def test_train_params_are_capped(curves, stub):
    for head, params in (("logreg", {"max_iter": 10**9}), ("svm", {"max_samples": 10**7})):
        with pytest.raises(grpc.RpcError) as e:
            stub.Train(pb.TrainRequest(collection="blobs", head=head, params_json=json.dumps(params)), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cap of" in e.value.details()


# ------------------------------------------------------------------------------------------ deadlines


def test_a_learning_curve_ends_at_its_callers_deadline(curves):
    started = time.monotonic()
    with pytest.raises(DeadlineError, match="stopped after"):
        curves.service.learning_curve("blobs", repeats=100, call=Call.within(1.5))
    assert time.monotonic() - started < 6  # the whole curve: minutes


def test_a_cancelled_curve_ends_and_a_train_waiting_behind_it_gives_up_at_its_deadline(curves):
    cancelled = threading.Event()
    outcome: list[BaseException] = []

    def curve() -> None:
        try:
            curves.service.learning_curve("blobs", repeats=100, call=Call(None, cancelled.is_set))
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=curve)
    worker.start()
    try:
        time.sleep(1.0)  # the curve holds the training turn
        started = time.monotonic()
        with pytest.raises(DeadlineError, match="waiting for the training before it"):
            curves.service.train("blobs", head_id="never-saved", call=Call.within(1.0))
        assert time.monotonic() - started < 4
        assert "never-saved" not in [h.head_id for h in curves.service.list_heads()]
    finally:
        cancelled.set()
        worker.join(timeout=30)
    assert not worker.is_alive() and isinstance(outcome[0], DeadlineError)


def test_sigterm_ends_a_server_with_a_cpu_bound_learning_curve_in_flight(embedder, cache_dir, tmp_path):
    data_dir, grace = tmp_path / "data", 2.0
    with Store(data_dir) as store:
        fill(store, "blobs", embedder.model_id)
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "EMBEDDER_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--grace-seconds",
                             str(grace)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = proc.stdout.readline().split()[-1]
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while health.Check(health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.2)
            # a curve of 3000 fits, within every cap: many minutes of CPU
            future = pb_grpc.EmbedderStub(ch).LearningCurve.future(pb.LearningCurveRequest(
                collection="blobs", repeats=100, per_class=list(range(20, 1100, 36))), timeout=600)
            time.sleep(8)  # past the first fit (which imports torch)
            assert not future.done(), future.exception()
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert proc.wait(timeout=grace + 20) == 0
            assert time.monotonic() - signalled < grace + 15  # the curve alone would take many minutes
            assert future.exception() is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
