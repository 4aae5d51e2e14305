"""The vector store over gRPC: the cache in front of Embed, and Add/Delete/SetLabels/Get/Search/Stats.

A real in-process server on a loopback port, the real model (wrapped to count what reaches it), a real
SQLite + FAISS data dir per server.
"""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from conftest import CountingModel, jpeg_bytes, running_server

from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.inputs import content_hash
from embedder.store import Store

OK = grpc.StatusCode.OK.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture(scope="module")
def counting(embedder):
    return CountingModel(embedder)


@pytest.fixture(scope="module")
def server(counting):
    with running_server(counting) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbedderStub(channel)


def vec(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


def add_items(images, ids, labels=None, metadata=None):
    items = []
    for i, (img, item_id) in enumerate(zip(images, ids)):
        item = pb.AddItem(item=pb.Item(id=item_id, image=img) if isinstance(img, bytes) else img)
        item.item.id = item_id
        if labels is not None and labels[i] is not None:
            item.label = labels[i]
        if metadata is not None:
            item.metadata_json = metadata[i]
        items.append(item)
    return items


def search_ids(response: pb.SearchResponse) -> list[str]:
    return [h.id for h in response.hits]


# ------------------------------------------------------------------------------------------ the cache


def test_a_repeated_image_is_served_from_the_cache_without_decode_or_model(stub, counting, photo_arrays):
    image = jpeg_bytes(photo_arrays["chelsea"][:120, :160])  # a crop no other test sends
    first = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="a", image=image)]), timeout=60).results[0]
    decoded, embedded = counting.decoded, counting.embedded
    second = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="b", image=image)]), timeout=60).results[0]
    assert (first.cached, second.cached) == (False, True)
    assert (counting.decoded, counting.embedded) == (decoded, embedded)  # no decode, no model pass
    assert first.sha256 == second.sha256 == content_hash(image)
    assert second.vector == first.vector and second.id == "b"


def test_content_sha256_reuses_a_cached_vector_and_unknown_hashes_are_not_found(stub, photos):
    known = stub.Embed(pb.EmbedRequest(items=[pb.Item(image=photos[1])]), timeout=60).results[0]
    response = stub.Embed(pb.EmbedRequest(items=[
        pb.Item(id="known", content_sha256=content_hash(photos[1]).upper()),  # hex case does not matter
        pb.Item(id="unknown", content_sha256="0" * 64),
        pb.Item(id="malformed", content_sha256="xyz"),
    ]), timeout=60)
    got = {r.id: r for r in response.results}
    assert got["known"].status.code == OK and got["known"].cached and got["known"].vector == known.vector
    assert got["unknown"].status.code == NOT_FOUND and "send the image bytes" in got["unknown"].status.message
    assert got["malformed"].status.code == INVALID and "64 hex digits" in got["malformed"].status.message


def test_raw_tensors_are_never_cached(stub, counting):
    arr = np.random.default_rng(5).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    item = pb.Item(tensor=pb.Tensor(shape=[48, 48, 3], dtype=pb.DTYPE_UINT8, data=arr.tobytes()))
    embedded = counting.embedded
    results = [stub.Embed(pb.EmbedRequest(items=[item]), timeout=60).results[0] for _ in range(2)]
    assert [r.cached for r in results] == [False, False] and results[0].sha256 == ""
    assert counting.embedded == embedded + 2


def test_the_cache_is_bounded_with_lru_eviction(embedder, photos):
    with running_server(embedder, cache_max_items=2) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        for p in (photos[0], photos[1], photos[0], photos[2]):  # photos[1] is now least recently used
            stub.Embed(pb.EmbedRequest(items=[pb.Item(image=p)]), timeout=60)
        assert stub.Stats(pb.StatsRequest(), timeout=30).cache_items == 2
        again = stub.Embed(pb.EmbedRequest(items=[pb.Item(image=p) for p in photos[:3]]), timeout=60)
        assert [r.cached for r in again.results] == [True, False, True]


# ------------------------------------------------------------------------------------------ Add


def test_add_stores_good_items_and_reports_bad_ones_per_item(stub, photos):
    response = stub.Add(pb.AddRequest(collection="add-mixed", items=add_items(
        [photos[0], b"not an image", photos[1]], ["p0", "junk", "p1"], labels=["cat", None, None],
        metadata=['{"source": "cam-1"}', "", "[1, 2]"])), timeout=60)
    codes = [r.status.code for r in response.results]
    assert codes == [OK, INVALID, INVALID]
    assert "JSON object" in response.results[2].status.message  # bad metadata fails only its item
    assert (response.added, response.replaced, response.collection) == (1, 0, "add-mixed")
    assert all(r.vector == b"" for r in response.results)  # Add answers stay small
    got = stub.Get(pb.GetRequest(collection="add-mixed", ids=["p0", "junk", "p1"]), timeout=30)
    assert [i.id for i in got.items] == ["p0"] and list(got.missing) == ["junk", "p1"]
    item = got.items[0]
    assert item.label == "cat" and json.loads(item.metadata_json) == {"source": "cam-1"}
    assert item.sha256 == content_hash(photos[0])


def test_add_is_an_upsert_and_vectors_round_trip_exactly(stub, photos):
    embedded = stub.Embed(pb.EmbedRequest(items=[pb.Item(image=p) for p in photos[:2]]), timeout=60)
    first = stub.Add(pb.AddRequest(collection="upsert", items=add_items(photos[:2], ["a", "b"])), timeout=60)
    assert (first.added, first.replaced) == (2, 0) and all(r.cached for r in first.results)
    again = stub.Add(pb.AddRequest(collection="upsert", items=add_items([photos[2]], ["a"], labels=["dog"])),
                     timeout=60)
    assert (again.added, again.replaced) == (0, 1)
    items = {i.id: i for i in stub.Get(pb.GetRequest(collection="upsert", ids=["a", "b"]), timeout=30).items}
    assert items["b"].vector == embedded.results[1].vector  # exactly what Embed returned
    assert items["a"].sha256 == content_hash(photos[2]) and items["a"].label == "dog"
    assert stub.Stats(pb.StatsRequest(), timeout=30).collections  # the collection is listed
    meta_only = stub.Get(pb.GetRequest(collection="upsert", ids=["b"], omit_vectors=True), timeout=30).items[0]
    assert meta_only.vector == b"" and meta_only.dim == len(vec(items["b"].vector))


def test_add_by_content_sha256_runs_no_model(stub, counting, photos):
    stub.Embed(pb.EmbedRequest(items=[pb.Item(image=photos[3])]), timeout=60)
    decoded = counting.decoded
    response = stub.Add(pb.AddRequest(collection="by-hash", items=[
        pb.AddItem(item=pb.Item(id="x", content_sha256=content_hash(photos[3])), label="rocket")]), timeout=60)
    assert response.added == 1 and response.results[0].cached
    assert counting.decoded == decoded


@pytest.mark.parametrize("request_, fix", [
    (pb.AddRequest(collection="", items=[pb.AddItem(item=pb.Item(id="a", image=b"x"))]), "collection"),
    (pb.AddRequest(collection="c", items=[pb.AddItem(item=pb.Item(image=b"x"))]), "needs an id"),
    (pb.AddRequest(collection="c", items=[pb.AddItem(item=pb.Item(id="a", image=b"x"))] * 2), "more than once"),
    (pb.AddRequest(collection="c", index="ivf", items=[pb.AddItem(item=pb.Item(id="a", image=b"x"))]), "ivf"),
])
def test_malformed_add_requests_are_invalid_argument(stub, request_, fix):
    with pytest.raises(grpc.RpcError) as e:
        stub.Add(request_, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fix in e.value.details()


def test_a_collection_of_another_model_is_failed_precondition(embedder, photos, tmp_path):
    with Store(tmp_path) as store:  # written by a server that ran another backbone
        store.add("theirs", ["t"], np.ones((1, 1280), np.float32), model_id="efficientnet_lite0:abc:pp2-x")
    with running_server(embedder, data_dir=tmp_path) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Add(pb.AddRequest(collection="theirs", items=add_items([photos[0]], ["p"])), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "efficientnet_lite0" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Search(pb.SearchRequest(collection="theirs", item=pb.Item(image=photos[0])), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ------------------------------------------------------------------------------------------ Search


@pytest.fixture(scope="module")
def searchable(stub, photos):
    labels = ["cat", "mug", "person", "rocket", "city", "flower"]
    stub.Add(pb.AddRequest(collection="photos", items=add_items(
        photos, [f"p{i}" for i in range(len(photos))], labels=labels,
        metadata=[json.dumps({"n": i}) for i in range(len(photos))])), timeout=120)
    return labels


def test_search_by_image_finds_the_same_image_first(stub, photos, searchable):
    response = stub.Search(pb.SearchRequest(collection="photos", item=pb.Item(image=photos[2]), k=3), timeout=60)
    assert response.hits[0].id == "p2" and response.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert response.hits[0].label == "person" and json.loads(response.hits[0].metadata_json) == {"n": 2}
    assert len(response.hits) == 3 and response.cached  # the photo was embedded when it was added
    scores = [h.score for h in response.hits]
    assert scores == sorted(scores, reverse=True)


def test_search_by_stored_id_leaves_the_item_itself_out(stub, searchable):
    response = stub.Search(pb.SearchRequest(collection="photos", item_id="p0", k=5), timeout=30)
    assert "p0" not in search_ids(response) and len(response.hits) == 5


def test_search_by_vector_with_label_filter(stub, searchable):
    stored = stub.Get(pb.GetRequest(collection="photos", ids=["p4"]), timeout=30).items[0]
    response = stub.Search(pb.SearchRequest(collection="photos", vector=stored.vector, k=10), timeout=30)
    assert search_ids(response)[0] == "p4" and len(response.hits) == 6
    filtered = stub.Search(pb.SearchRequest(collection="photos", vector=stored.vector, label="flower"), timeout=30)
    assert search_ids(filtered) == ["p5"]


def test_search_without_collection_covers_every_collection_of_the_model(stub, photos, searchable):
    response = stub.Search(pb.SearchRequest(item=pb.Item(image=photos[2]), k=20), timeout=60)
    assert {h.collection for h in response.hits} >= {"photos", "upsert"}


def test_a_request_naming_another_model_than_its_collections_is_refused(stub, photos, searchable):
    """The request's model was silently replaced by the collection's; now the two must agree."""
    with pytest.raises(grpc.RpcError) as e:
        stub.Add(pb.AddRequest(collection="photos", model="efficientnet_lite0", items=add_items([photos[0]], ["x"])),
                 timeout=60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "names model 'efficientnet_lite0'" in e.value.details() and "leave the model out" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(pb.SearchRequest(collection="photos", model="efficientnet_lite0", item=pb.Item(image=photos[1])),
                    timeout=60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_the_client_and_cli_search_the_collections_of_the_model_they_name(server, photos, searchable, tmp_path,
                                                                          capsys):
    from embedder.cli import main
    from embedder.client import EmbedderClient

    with EmbedderClient(server.address) as client:
        client.add("lite", [photos[0]], ["l0"], model="efficientnet_lite0")
        assert {h.collection for h in client.search(photos[0], k=50)} >= {"photos"}
        assert "lite" not in {h.collection for h in client.search(photos[0], k=50)}
        assert [(h.collection, h.id) for h in client.search(photos[0], model="efficientnet_lite0")] == [("lite", "l0")]
    query = tmp_path / "q.jpg"
    query.write_bytes(photos[0])
    assert main(["search", str(query), "--model", "efficientnet_lite0", "--json", "--server", server.address]) == 0
    assert [(h["collection"], h["id"]) for h in json.loads(capsys.readouterr().out)] == [("lite", "l0")]
    with EmbedderClient(server.address, model="efficientnet_lite0") as client:  # the client's own model
        assert [h.id for h in client.search(photos[0])] == ["l0"]


@pytest.mark.parametrize("request_, code, fix", [
    (pb.SearchRequest(collection="photos"), grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
    (pb.SearchRequest(collection="photos", vector=b"\0\0\x80?" * 7), grpc.StatusCode.FAILED_PRECONDITION, "7-d"),
    (pb.SearchRequest(collection="photos", vector=b"abc"), grpc.StatusCode.INVALID_ARGUMENT, "multiple of 4"),
    (pb.SearchRequest(collection="nope", item_id="p0"), grpc.StatusCode.NOT_FOUND, "no collection"),
    (pb.SearchRequest(collection="photos", item_id="nope"), grpc.StatusCode.NOT_FOUND, "no item"),
    (pb.SearchRequest(item_id="p0"), grpc.StatusCode.INVALID_ARGUMENT, "needs `collection`"),
    (pb.SearchRequest(collection="photos", item_id="p0", k=100_000), grpc.StatusCode.INVALID_ARGUMENT, "k must"),
    (pb.SearchRequest(collection="photos", item=pb.Item(image=b"junk")), grpc.StatusCode.INVALID_ARGUMENT,
     "query image"),
])
def test_bad_searches_get_the_right_status(stub, searchable, request_, code, fix):
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(request_, timeout=30)
    assert e.value.code() == code and fix in e.value.details()


# ------------------------------------------------------------------------------------------ Delete, SetLabels, Stats


def test_set_labels_is_all_or_nothing_and_clears(stub, photos):
    stub.Add(pb.AddRequest(collection="labels", items=add_items(photos[:2], ["a", "b"], labels=["x", "y"])),
             timeout=60)
    with pytest.raises(grpc.RpcError) as e:
        stub.SetLabels(pb.SetLabelsRequest(collection="labels", labels={"a": "z", "ghost": "z"}), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in e.value.details()
    assert stub.Get(pb.GetRequest(collection="labels", ids=["a"]), timeout=30).items[0].label == "x"  # unchanged
    done = stub.SetLabels(pb.SetLabelsRequest(collection="labels", labels={"a": "z"}, clear=["b"]), timeout=30)
    assert done.updated == 2
    got = {i.id: i for i in stub.Get(pb.GetRequest(collection="labels", ids=["a", "b"]), timeout=30).items}
    assert got["a"].label == "z" and not got["b"].HasField("label")
    stats = {c.name: c for c in stub.Stats(pb.StatsRequest(), timeout=30).collections}
    assert dict(stats["labels"].labels) == {"z": 1} and stats["labels"].unlabeled == 1


def test_delete_items_and_whole_collections(stub, photos):
    stub.Add(pb.AddRequest(collection="doomed", items=add_items(photos[:3], ["a", "b", "c"])), timeout=60)
    response = stub.Delete(pb.DeleteRequest(collection="doomed", ids=["a", "ghost"]), timeout=30)
    assert response.deleted == 1 and list(response.missing) == ["ghost"]
    hits = stub.Search(pb.SearchRequest(collection="doomed", item=pb.Item(image=photos[0]), k=10), timeout=60)
    assert sorted(search_ids(hits)) == ["b", "c"]
    assert stub.Delete(pb.DeleteRequest(collection="doomed", whole_collection=True), timeout=30).deleted == 2
    assert "doomed" not in {c.name for c in stub.Stats(pb.StatsRequest(), timeout=30).collections}
    with pytest.raises(grpc.RpcError) as e:
        stub.Delete(pb.DeleteRequest(collection="doomed", ids=["b"]), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------------------------------ restart


def test_a_restarted_server_answers_searches_identically(embedder, photos, tmp_path):
    queries = [pb.SearchRequest(collection="keep", item=pb.Item(image=p), k=4) for p in photos]

    def answers(stub):
        return [[(h.id, h.score, h.label) for h in stub.Search(q, timeout=60).hits] for q in queries]

    with running_server(embedder, data_dir=tmp_path) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        stub.Add(pb.AddRequest(collection="keep", items=add_items(photos, [f"k{i}" for i in range(6)],
                                                                   labels=["a", "b"] * 3)), timeout=120)
        stub.Delete(pb.DeleteRequest(collection="keep", ids=["k5"]), timeout=30)
        before = answers(stub)
    with running_server(embedder, data_dir=tmp_path) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        assert answers(stub) == before
        assert all(r.cached for r in stub.Embed(pb.EmbedRequest(items=[pb.Item(image=p) for p in photos[:5]]),
                                                timeout=60).results)  # no image needs the model again


# ------------------------------------------------------------------------------------------ damaged data


def test_a_damaged_item_is_data_loss_naming_the_item_and_no_server_path(embedder, photos, tmp_path):
    with running_server(embedder, data_dir=tmp_path) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        stub.Add(pb.AddRequest(collection="rot", items=add_items(photos[:3], ["r0", "r1", "r2"])), timeout=120)
        stored = stub.Get(pb.GetRequest(collection="rot", ids=["r0"]), timeout=30).items[0].vector
    database = tmp_path / "store.sqlite3"
    data = bytearray(database.read_bytes())
    at = data.find(stored[:64])  # 5 KB spill over SQLite pages: its start is enough to find it
    assert at >= 0 and data.find(stored[:64], at + 1) < 0
    data[at + 23] ^= 0x40  # one exponent bit of component 5
    database.write_bytes(data)

    with running_server(embedder, data_dir=tmp_path) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        for call in (lambda: stub.Get(pb.GetRequest(collection="rot", ids=["r0"]), timeout=30),
                     lambda: stub.Search(pb.SearchRequest(collection="rot", item=pb.Item(image=photos[0]), k=3),
                                         timeout=60)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.DATA_LOSS
            assert "'r0'" in e.value.details() and "'rot'" in e.value.details() and "add it again" in \
                e.value.details().lower()
            assert str(tmp_path) not in e.value.details() and "sqlite" not in e.value.details()
        assert [i.id for i in stub.Get(pb.GetRequest(collection="rot", ids=["r1", "r2"]), timeout=30).items] == \
            ["r1", "r2"]
