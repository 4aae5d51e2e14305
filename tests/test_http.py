"""The HTTP/JSON front door on a real loopback port, beside the gRPC port, over the same service.

The official ``openai`` package talks to ``/v1/embeddings`` and gets the vectors gRPC and the core give; every
REST route round-trips; each refusal gets its status and the JSON error of the one table.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import socket
import time

import numpy as np
import openai
import pytest
import requests
from conftest import cosine, running_server
from PIL import Image
from test_client import self_signed

from embedder.client import EmbedderClient
from embedder.rest import HttpServer, create_app
from embedder.store import validation as store_validation

TOKEN = "http-test-token"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + b64(data)


def floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


class Api:
    """Calls to one HTTP port with the token; answers are (status, JSON)."""

    def __init__(self, url: str, token: str | None = TOKEN) -> None:
        self.url, self.session = url, requests.Session()
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, method: str, path: str, **kwargs) -> tuple[int, dict]:
        r = self.session.request(method, self.url + path, timeout=300, **kwargs)
        assert r.headers["content-type"].startswith("application/json"), r.text[:300]
        return r.status_code, r.json()

    def ok(self, method: str, path: str, **kwargs) -> dict:
        status, body = self(method, path, **kwargs)
        assert status == 200, body
        return body


def refused(answer: tuple[int, dict], status: int, kind: str, text: str = "") -> str:
    """Assert the answer is ``status`` with a JSON error of category ``kind``; returns its message."""
    got, body = answer
    assert got == status, body
    error = body["error"]
    assert error["type"] == kind and error["code"] == kind.upper().replace("DEADLINE", "DEADLINE_EXCEEDED")
    assert text in error["message"] and "Traceback" not in error["message"]
    return error["message"]


@pytest.fixture(scope="module")
def grpc_server(embedder, tmp_path_factory):
    with running_server(embedder, token=TOKEN, data_dir=tmp_path_factory.mktemp("http-data")) as server:
        yield server


def _http(server, config=None) -> HttpServer:
    """An HTTP door over ``server``'s service; with its own ``config``, a second door (without metrics: the
    first one counts in the registry)."""
    metrics = server.metrics if config is None else None
    config = config or server.config
    http = HttpServer(create_app(server.service, config, metrics=metrics), config, port=0)
    http.start()
    return http


@pytest.fixture(scope="module")
def http(grpc_server):
    """The HTTP door over the gRPC server's own service (as ``embedder serve --http-port`` runs it)."""
    http = _http(grpc_server)
    yield http
    http.stop(grace=1)


@pytest.fixture(scope="module")
def api(http) -> Api:
    return Api(http.url)


@pytest.fixture(scope="module")
def oai(http) -> openai.OpenAI:
    return openai.OpenAI(base_url=http.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def grpc_vectors(grpc_server, photos) -> np.ndarray:
    with EmbedderClient(grpc_server.address, token=TOKEN, timeout=120) as client:
        return client.embed(photos)


# ----------------------------------------------------------------------------------------- OpenAI

def test_the_openai_client_gets_the_grpc_and_core_vectors(oai, grpc_server, grpc_vectors, photos):
    core = np.stack([o.vector for o in grpc_server.service.embed(photos).outcomes])
    inputs = [data_uri(p) if i % 2 else b64(p) for i, p in enumerate(photos)]  # both ways of sending an image
    default = oai.embeddings.create(input=inputs, model="mobilenet_v2")  # the client asks for base64
    as_floats = oai.embeddings.create(input=inputs, model="mobilenet_v2", encoding_format="float", user="me")
    for response in (default, as_floats):
        got = np.array([d.embedding for d in response.data])
        assert got.shape == grpc_vectors.shape
        assert [d.index for d in response.data] == list(range(len(photos)))
        assert cosine(got, grpc_vectors).min() >= 0.9999 and cosine(got, core).min() >= 0.9999
        assert response.model == "mobilenet_v2" and response.object == "list"
        assert response.usage.prompt_tokens == 0 and response.usage.total_tokens == 0
    np.testing.assert_array_equal(np.array([d.embedding for d in default.data], np.float32),
                                  np.array([d.embedding for d in as_floats.data], np.float32))

    model_id = grpc_server.service.default.model_id
    one = oai.embeddings.create(input=b64(photos[2]), model=model_id, dimensions=grpc_vectors.shape[1])
    assert len(one.data) == 1 and one.model == model_id
    assert cosine(np.array([one.data[0].embedding]), grpc_vectors[2:3])[0] >= 0.9999


def test_openai_errors_are_all_or_nothing_and_in_openais_shape(oai, http, photos):
    good = b64(photos[0])
    with pytest.raises(openai.NotFoundError) as e:
        oai.embeddings.create(input=[good], model="text-embedding-3-small")
    assert e.value.status_code == 404 and e.value.response.json()["error"]["type"] == "not_found"
    assert "text-embedding-3-small" in e.value.message
    cases = [
        ([good, b64(b"not an image at all")], "input[1]: "),
        ([good, good, "%%%"], "input[2]: image is not valid base64"),
        (["https://example.com/cat.jpg"], "input[0]: image URLs are not fetched"),
        (["data:image/jpeg,abc"], "must be base64"),
        ([[101, 102]], "token ids"),
        ([], "`input` is empty"),  # OpenAI answers 400 too; a 200 with no data makes its client raise
    ]
    for inputs, text in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oai.embeddings.create(input=inputs, model="mobilenet_v2")
        assert text in e.value.message, (inputs, e.value.message)
        assert e.value.response.json()["error"]["code"] == "INVALID_ARGUMENT"
    for inputs, modality in [(["a photo of a cat"], "text"), ([b64(photos[0])], "text"), (["a photo of a cat"], None)]:
        with pytest.raises(openai.APIStatusError) as e:  # texts need a text-image model
            oai.embeddings.create(input=inputs, model="mobilenet_v2", extra_body={"modality": modality})
        assert "input[0]: " in e.value.message and "images only" in e.value.message, e.value.message
        assert e.value.status_code == (412 if modality else 400)
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(input=[good], model="mobilenet_v2", dimensions=256)
    assert "dimensions=256" in e.value.message and "1280" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=http.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            input=[good], model="mobilenet_v2")


def test_models_lists_the_loaded_models_and_the_limits(oai, api, grpc_server):
    assert [m.id for m in oai.models.list()] == ["mobilenet_v2"]
    body = api.ok("GET", "/v1/models")
    info = grpc_server.service.default.info
    assert body["data"][0]["model_id"] == info["model_id"] and body["data"][0]["dim"] == info["dim"]
    assert body["limits"] == grpc_server.service.limits()


# ----------------------------------------------------------------------------------------- native REST

def test_embed_takes_json_and_multipart_and_fails_items_alone(api, grpc_vectors, photos):
    pixels = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    items = [{"id": "b64", "image": b64(photos[0])}, {"id": "uri", "image": data_uri(photos[1])},
             {"id": "hash", "sha256": hashlib.sha256(photos[0]).hexdigest()},
             {"id": "tensor", "tensor": {"shape": [32, 32, 3], "dtype": "uint8", "data": b64(pixels.tobytes())}},
             {"id": "junk", "image": b64(b"not an image")}, {"id": "bad", "image": "###"},
             {"id": "url", "image": "http://169.254.169.254/latest"}, {"id": "both", "image": b64(photos[0]),
                                                                       "sha256": "0" * 64}]
    body = api.ok("POST", "/v1/embed", json={"items": items})
    results = {r["id"]: r for r in body["results"]}
    assert [r["id"] for r in body["results"]] == [i["id"] for i in items] and body["dim"] == 1280
    vectors = {k: np.array(r["vector"]) for k, r in results.items() if r["error"] is None}
    assert set(vectors) == {"b64", "uri", "hash", "tensor"}
    assert cosine(np.stack([vectors["b64"], vectors["uri"]]), grpc_vectors[:2]).min() >= 0.9999
    np.testing.assert_array_equal(vectors["hash"], vectors["b64"])
    assert results["hash"]["cached"] and results["b64"]["sha256"] == hashlib.sha256(photos[0]).hexdigest()
    for key, text in [("junk", ""), ("bad", "not valid base64"), ("url", "not fetched"), ("both", "exactly one")]:
        assert results[key]["vector"] is None and results[key]["error"]["type"] == "invalid_argument", key
        assert text in results[key]["error"]["message"]

    packed = api.ok("POST", "/v1/embed", json={"items": items[:2], "encoding_format": "base64"})["results"]
    np.testing.assert_array_equal(np.stack([floats(r["vector"]) for r in packed]),
                                  np.stack([vectors["b64"], vectors["uri"]]).astype(np.float32))

    files = [("image", ("cat.jpg", photos[3])), ("image", ("dog.jpg", photos[4]))]
    uploaded = api.ok("POST", "/v1/embed", files=files, data={"encoding_format": "base64"})["results"]
    assert [r["id"] for r in uploaded] == ["cat.jpg", "dog.jpg"]
    assert cosine(np.stack([floats(r["vector"]) for r in uploaded]), grpc_vectors[3:5]).min() >= 0.9999


def test_collections_round_trip(api, grpc_vectors, photos):
    added = api.ok("POST", "/v1/collections/pets/add", json={"items": [
        {"id": f"p{i}", "image": b64(p), "label": "even" if i % 2 == 0 else None, "metadata": {"n": i}}
        for i, p in enumerate(photos[:4])] + [{"id": "junk", "image": b64(b"nope")}]})
    assert (added["added"], added["replaced"], added["collection"]) == (4, 0, "pets")
    assert added["results"][-1]["error"]["type"] == "invalid_argument" and added["results"][0]["vector"] is None
    files = [("image", (f"up{i}", photos[i])) for i in (4, 5)]
    up = api.ok("POST", "/v1/collections/pets/add", files=files, data={"label": "odd", "metadata": '{"via": "form"}'})
    assert up["added"] == 2

    got = api.ok("POST", "/v1/collections/pets/get", json={"ids": ["p1", "up5", "ghost"]})
    assert [i["id"] for i in got["items"]] == ["p1", "up5"] and got["missing"] == ["ghost"]
    assert got["items"][0]["metadata"] == {"n": 1} and got["items"][0]["label"] is None
    assert got["items"][1]["label"] == "odd" and got["items"][1]["metadata"] == {"via": "form"}
    assert cosine(np.array([got["items"][0]["vector"], got["items"][1]["vector"]]),
                  grpc_vectors[[1, 5]]).min() >= 0.9999
    bare = api.ok("POST", "/v1/collections/pets/get", json={"ids": ["p1"], "omit_vectors": True})["items"][0]
    assert bare["vector"] is None and bare["dim"] == 1280

    assert api.ok("POST", "/v1/collections/pets/labels", json={"labels": {"p1": "odd"}, "clear": ["p0"]}) == {
        "updated": 2}
    stored = api.ok("POST", "/v1/collections/pets/get", json={"ids": ["p0", "p1"], "omit_vectors": True})
    assert [i["label"] for i in stored["items"]] == [None, "odd"]

    by_image = api.ok("POST", "/v1/search", json={"collection": "pets", "item": {"image": b64(photos[2])}, "k": 2})
    assert by_image["hits"][0]["id"] == "p2" and by_image["hits"][0]["metadata"] == {"n": 2} and by_image["cached"]
    by_id = api.ok("POST", "/v1/search", json={"collection": "pets", "item_id": "p2", "k": 10, "label": "odd"})
    assert {h["id"] for h in by_id["hits"]} == {"p1", "up4", "up5"}
    vector = grpc_vectors[3].astype("<f4")
    for query in (vector.tolist(), b64(vector.tobytes())):
        assert api.ok("POST", "/v1/search", json={"vector": query, "k": 1})["hits"][0]["id"] == "p3"
    uploaded = api.ok("POST", "/v1/search", files=[("image", ("q.jpg", photos[5]))], data={"k": "1"})
    assert uploaded["hits"][0]["id"] == "up5" and uploaded["hits"][0]["collection"] == "pets"

    stats = api.ok("GET", "/v1/stats")
    pets = next(c for c in stats["collections"] if c["name"] == "pets")
    assert pets["count"] == 6 and pets["labels"] == {"even": 1, "odd": 3} and pets["unlabeled"] == 2

    assert api.ok("POST", "/v1/collections/pets/delete", json={"ids": ["p3", "ghost"]}) == {
        "deleted": 1, "missing": ["ghost"]}
    assert api.ok("DELETE", "/v1/collections/pets") == {"deleted": 5, "missing": []}
    refused(api("POST", "/v1/collections/pets/get", json={"ids": ["p0"]}), 404, "not_found", "pets")


def test_a_collection_name_with_a_slash_is_one_path_parameter(api, photos):
    assert api.ok("POST", "/v1/collections/team%2Fa/add", json={"items": [{"id": "x", "image": b64(photos[0])}]}
                  )["collection"] == "team/a"
    assert api.ok("POST", "/v1/collections/team/a/get", json={"ids": ["x"]})["items"][0]["collection"] == "team/a"
    assert api.ok("DELETE", "/v1/collections/team/a")["deleted"] == 1


@pytest.fixture(scope="module")
def digits(api, digit_images) -> list[int]:
    """The first 24 of each digit stored with labels in collection "digits"; returns their indexes."""
    images, labels = digit_images
    train = [i for i in range(len(images)) if i % 30 < 24]
    items = [{"id": f"d{i}", "image": b64(images[i]), "label": labels[i]} for i in train]
    assert api.ok("POST", "/v1/collections/digits/add", json={"items": items})["added"] == len(train)
    return train


def test_heads_round_trip(api, digits, digit_images):
    images, labels = digit_images
    train = digits

    trained = api.ok("POST", "/v1/collections/digits/train",
                     json={"head": "logreg", "head_id": "digits-http", "params": {"C": 1.0}, "seed": 1})
    head = trained["head"]
    assert head["head_id"] == "digits-http" and head["classes"] == ["0", "1", "7"] and head["collection"] == "digits"
    assert trained["samples"] == len(train) and head["metrics"]["accuracy"] > 0.8 and head["params"]["C"] == 1.0
    assert "digits-http" in [h["head_id"] for h in api.ok("GET", "/v1/heads")["heads"]]

    held_out = [i for i in range(len(images)) if i % 30 >= 24]
    predicted = api.ok("POST", "/v1/predict", json={
        "head_ids": ["digits-http"], "items": [{"id": f"q{i}", "image": b64(images[i])} for i in held_out],
        "collection": "digits", "ids": ["d0", "ghost"], "top_k": 2})
    rows = predicted["predictions"]
    assert predicted["head_ids"] == ["digits-http"] and len(rows) == len(held_out) + 2
    right = sum(r["heads"]["digits-http"][0]["label"] == labels[i] for r, i in zip(rows, held_out))
    assert right >= 0.8 * len(held_out) and len(rows[0]["heads"]["digits-http"]) == 2
    assert rows[-2]["id"] == "d0" and rows[-2]["cached"] and rows[-2]["heads"]["digits-http"][0]["label"] == "0"
    assert rows[-1]["error"]["type"] == "not_found" and rows[-1]["heads"] == {}
    uploaded = api.ok("POST", "/v1/predict", files=[("image", ("seven.jpg", images[held_out[-1]]))],
                      data={"head_ids": "digits-http"})["predictions"]
    assert uploaded[0]["id"] == "seven.jpg" and uploaded[0]["heads"]["digits-http"][0]["label"] == "7"

    curve = api.ok("POST", "/v1/collections/digits/learning-curve", json={"per_class": [2, 10], "repeats": 2})
    assert [p["per_class"] for p in curve["points"]] == [2, 10] and curve["points"][1]["accuracy_mean"] > 0.5

    assert api.ok("DELETE", "/v1/heads/digits-http") == {"status": "deleted"}
    refused(api("POST", "/v1/predict", json={"head_ids": ["digits-http"], "items": [{"image": b64(images[0])}]}),
            404, "not_found", "digits-http")
    refused(api("DELETE", "/v1/heads/digits-http"), 404, "not_found")
    # a message that quotes the request is shortened, not a 10 MB echo of a million labels
    message = refused(api("POST", "/v1/collections/digits/train", json={"labels": [f"l{i}" for i in range(5000)]}),
                      412, "failed_precondition", "'l0', 'l1'")
    assert len(message) <= 2000 and message.endswith("(shortened)")
    refused(api("POST", "/v1/collections/digits/train", json={"params": {"C": 1e-45}}), 400, "invalid_argument",
            "C must be a number from")  # was a server fault: the L2 weight overflowed float32


def test_jobs_round_trip(api, digits):
    job = api("POST", "/v1/collections/digits/finetune", json={"suffix": "http", "epochs": 50})
    assert job[0] == 202 and job[1]["kind"] == "finetune" and job[1]["state"] in ("queued", "running")
    job_id = job[1]["job_id"]
    api.ok("POST", f"/v1/jobs/{job_id}/cancel")
    deadline = time.monotonic() + 300
    while (state := api.ok("GET", f"/v1/jobs/{job_id}"))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert state["state"] == "cancelled" and state["result"] is None
    refused(api("GET", "/v1/jobs/nope"), 404, "not_found")
    refused(api("POST", "/v1/collections/digits/finetune", json={"suffix": "../x"}), 400, "invalid_argument")


# ----------------------------------------------------------------------------------------- refusals

def test_refusals_get_their_status_and_json_error(api, http, photos):
    refused(Api(http.url, token=None)("GET", "/v1/stats"), 401, "unauthenticated", "missing")
    refused(Api(http.url, token="wrong")("POST", "/v1/embeddings", json={"input": "x", "model": "m"}), 401,
            "unauthenticated", "wrong token")
    assert Api(http.url, token=None).session.get(http.url + "/v1/stats", headers={
        "Authorization": f"bearer {TOKEN}"}).status_code == 200  # the scheme is case-insensitive

    refused(api("POST", "/v1/embed", data=b"{not json", headers={"content-type": "application/json"}), 400,
            "invalid_argument", "Invalid JSON")
    refused(api("POST", "/v1/embed", json={"items": [], "colour": "red"}), 400, "invalid_argument", "colour")
    refused(api("POST", "/v1/embed", json={"items": "x"}), 400, "invalid_argument", "items")
    refused(api("POST", "/v1/embed", json={"items": [{"image": 5}]}), 400, "invalid_argument", "items.0.image")
    refused(api("POST", "/v1/embed", json={"items": [{"image": b64(photos[0])}], "model": "nope"}), 404,
            "not_found", "nope")
    refused(api("POST", "/v1/embed", json={"items": [{"id": str(i), "sha256": "0" * 64} for i in range(1025)]}),
            400, "invalid_argument", "max_items")
    refused(api("POST", "/v1/embed", files=[("photo", ("a.jpg", photos[0]))]), 400, "invalid_argument", "`image`")
    refused(api("POST", "/v1/search", json={"collection": "ghost", "item_id": "x"}), 404, "not_found", "ghost")
    refused(api("POST", "/v1/search", json={"vector": "abc"}), 400, "invalid_argument", "base64")
    # a query vector longer than any model's is refused by the schema, before the core sees the collection
    refused(api("POST", "/v1/search", json={"collection": "ghost", "vector": [0.0] * 70000}), 400,
            "invalid_argument", "at most 65536")
    refused(api("POST", "/v1/collections/ghost/train", json={}), 404, "not_found", "ghost")
    refused(api("GET", "/v1/nowhere"), 404, "not_found", "/v1/nowhere")
    refused(api("PUT", "/v1/stats"), 405, "invalid_argument", "PUT")


def test_oversized_bodies_are_refused_with_413_before_the_route_runs(grpc_server, photos):
    config = dataclasses.replace(grpc_server.config, max_message_bytes=100_000)
    small = _http(grpc_server, config)
    try:
        api = Api(small.url)
        big = {"items": [{"image": b64(photos[0])}] * 3}
        refused(api("POST", "/v1/embed", json=big), 413, "resource_exhausted", "max_message_bytes")
        chunked = (bytes([c]) * 40_000 for c in b"abc")  # no Content-Length: counted while reading
        refused(api("POST", "/v1/embed", data=chunked, headers={"content-type": "application/json"}), 413,
                "resource_exhausted", "100,000")
        assert api.ok("POST", "/v1/embed", json={"items": [{"image": b64(photos[0])}]})["results"][0]["error"] is None
    finally:
        small.stop(grace=1)


def test_metadata_beyond_the_json_rule_fails_its_item(api, photos):
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    body = api.ok("POST", "/v1/collections/deep/add", json={"items": [
        {"id": "deep", "image": b64(photos[0]), "metadata": deep}, {"id": "fine", "image": b64(photos[1])}]})
    assert body["added"] == 1 and "nested" in body["results"][0]["error"]["message"]


def test_metadata_stored_before_the_rule_comes_back_as_grpc_sends_it(api, grpc_server, grpc_vectors, monkeypatch):
    deep: dict = {}
    for _ in range(40):  # what an older server let in
        deep = {"a": deep}
    monkeypatch.setattr(store_validation, "check_json_object", lambda *args, **kwargs: None)  # an older store's add
    grpc_server.service.store.add("legacy", ["old"], grpc_vectors[:1], model_id=grpc_server.service.default.model_id,
                                  metadata=[deep])
    monkeypatch.undo()
    got = api.ok("POST", "/v1/collections/legacy/get", json={"ids": ["old"], "omit_vectors": True})["items"][0]
    hit = api.ok("POST", "/v1/search", json={"collection": "legacy", "item_id": "old", "k": 1})
    found = api.ok("POST", "/v1/search", json={"collection": "legacy", "vector": grpc_vectors[0].tolist(), "k": 1})
    assert hit["hits"] == [] and found["hits"][0]["id"] == "old"
    for metadata in (got["metadata"], found["hits"][0]["metadata"]):
        assert list(metadata) == ["_unreadable"] and "levels deep" in metadata["_unreadable"]


# ----------------------------------------------------------------------------------------- probes, docs, metrics

def test_readyz_follows_the_service_and_healthz_is_always_open(embedder):
    with running_server(embedder, load=False, token=TOKEN) as server:
        http = _http(server)
        try:
            anonymous = Api(http.url, token=None)
            assert anonymous.ok("GET", "/healthz") == {"status": "ok"}
            refused(anonymous("GET", "/readyz"), 503, "unavailable", "not ready")
            refused(Api(http.url)("POST", "/v1/embed", json={"items": []}), 503, "unavailable", "loading")
            server.load()
            assert anonymous.ok("GET", "/readyz") == {"status": "ready"}
            server.service.close(grace=0)  # shutting down
            refused(anonymous("GET", "/readyz"), 503, "unavailable")
        finally:
            http.stop(grace=1)


def test_openapi_describes_every_route_and_the_docs_page_is_open(http, api):
    anonymous = requests.get(http.url + "/openapi.json", timeout=30)
    assert anonymous.status_code == 200
    doc = anonymous.json()
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert {("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("POST", "/v1/embed"),
            ("POST", "/v1/collections/{collection}/add"), ("POST", "/v1/search"), ("POST", "/v1/predict"),
            ("POST", "/v1/collections/{collection}/train"), ("GET", "/healthz"), ("GET", "/readyz")} <= routes
    embed = doc["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert embed["application/json"]["schema"]["$ref"] == "#/components/schemas/EmbedRequest"
    assert embed["multipart/form-data"]["schema"]["properties"]["image"]["items"]["format"] == "binary"
    assert {"EmbedRequest", "ItemIn", "TensorIn", "EmbeddingsRequest", "EmbedResponse"} <= set(
        doc["components"]["schemas"])
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    page = requests.get(http.url + "/docs", timeout=30)
    assert page.status_code == 200 and "swagger" in page.text.lower()


def test_http_requests_are_counted_by_route_and_status(api, grpc_server, photos):
    registry = grpc_server.metrics.registry

    def count(route: str, status: str) -> float:
        return registry.get_sample_value("embedder_requests_total",
                                         {"door": "http", "method": route, "code": status}) or 0

    before = count("embed", "200"), count("unmatched", "401"), count("unmatched", "404")
    api.ok("POST", "/v1/embed", json={"items": [{"image": b64(photos[0])}]})
    Api(api.url, token=None)("GET", "/v1/stats")
    api("GET", "/v1/nowhere")
    # refused before routing (no token, no such path): no route to name
    assert (count("embed", "200"), count("unmatched", "401"), count("unmatched", "404")) == tuple(
        b + 1 for b in before)


def test_tls_uses_the_grpc_ports_certificate(embedder, photos, tmp_path):
    cert, key = self_signed(tmp_path)
    with running_server(embedder, tls_cert=str(cert), tls_key=str(key)) as server:
        http = _http(server)
        try:
            assert http.url.startswith("https://")
            answer = requests.post(http.url + "/v1/embed", json={"items": [{"image": b64(photos[0])}]}, verify=cert,
                                   timeout=60)
            assert answer.status_code == 200 and answer.json()["results"][0]["error"] is None
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(http.url.replace("https://", "http://") + "/healthz", timeout=10)
        finally:
            http.stop(grace=1)


def test_a_client_that_disconnects_has_its_queued_images_dropped(embedder, photo_arrays):
    images = []
    for quality in range(60, 96, 2):  # distinct bytes: repeats inside one call would be embedded once
        for arr in photo_arrays.values():
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=quality)
            images.append(buf.getvalue())
    body = json.dumps({"input": [b64(i) for i in images], "model": "mobilenet_v2"}).encode()
    with running_server(embedder, cache_max_items=0) as server:
        http = _http(server)
        try:
            batcher = server.service.default.batcher
            with socket.create_connection(("127.0.0.1", http.port)) as sock:
                sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                deadline = time.monotonic() + 60
                while batcher.queue_depth == 0:  # the call is in the batcher: now leave
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
            while batcher.queue_depth and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = batcher.stats()
            assert stats["dropped"] > 0 and stats["embedded"] < len(images) + 1, stats  # + 1: the warm-up
        finally:
            http.stop(grace=1)


def test_embedder_serve_http_port_serves_both_doors_and_drains_on_sigterm(embedder, cache_dir, photos, tmp_path):
    """`embedder serve --http-port P` prints where the HTTP door is, /readyz turns 200 once the model is warm, both
    doors give the same vectors, and SIGTERM drains both and exits 0."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:  # a free port for the HTTP door (its 0 means "off")
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "EMBEDDER_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--http-port",
                             str(http_port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        grpc_line, http_line = proc.stdout.readline(), proc.stdout.readline()
        assert grpc_line.startswith("listening on ") and f"http://127.0.0.1:{http_port}" in http_line, http_line
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 180
        while requests.get(f"{base}/readyz", timeout=10).status_code != 200:  # the model loads after binding
            assert time.monotonic() < deadline and proc.poll() is None, "never ready"
            time.sleep(0.3)
        body = requests.post(f"{base}/v1/embeddings", json={"model": "mobilenet_v2", "input": [b64(photos[0])]},
                             timeout=120).json()
        with EmbedderClient(grpc_line.split()[-1]) as client:
            over_grpc = client.embed(photos[:1])
        assert cosine(np.array([body["data"][0]["embedding"]]), over_grpc)[0] > 0.9999
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_too_many_items_are_refused_before_any_is_read(http, monkeypatch):
    """A body with more than max_items items or inputs is refused before any is converted (100k bad inputs took
    14 s of the event loop, probes included, to be refused)."""
    from embedder.rest import convert

    read = []
    item, input_item = convert.item, convert.input_item
    monkeypatch.setattr(convert, "item", lambda x: read.append(x) or item(x))
    monkeypatch.setattr(convert, "input_item", lambda *a, **k: read.append(a) or input_item(*a, **k))
    api = Api(http.url, token=TOKEN)
    for path, body in [("/v1/embed", {"items": [{"image": "x"}] * 1025}),
                       ("/v1/embeddings", {"model": "mobilenet_v2", "input": ["x"] * 1025}),
                       ("/v1/predict", {"head_ids": ["h"], "items": [{"image": "x"}] * 2, "ids": ["i"] * 1024})]:
        refused(api("POST", path, json=body), 400, "invalid_argument", "max_items")
    assert read == []
    assert api("POST", "/v1/embed", json={"items": [{"image": "x"}]})[0] == 200 and len(read) == 1


def test_a_form_with_more_files_than_max_items_is_refused_naming_the_flag(grpc_server, photos):
    http = _http(grpc_server, dataclasses.replace(grpc_server.config, max_items=2))
    try:
        files = [("image", (f"{i}.jpg", photos[i])) for i in range(3)]
        message = refused(Api(http.url)("POST", "/v1/embed", files=files), 400, "invalid_argument", "Too many files")
        assert "--max-items" in message
        twice = [("image", ("0.jpg", photos[0])), ("label", (None, "a")), ("label", (None, "b"))]
        refused(Api(http.url)("POST", "/v1/collections/twice/add", files=twice), 400, "invalid_argument",
                "form field 'label' is sent twice")
    finally:
        http.stop(grace=1)
