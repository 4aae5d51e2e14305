"""The service core without a transport: the cache-aside path, the model pool and the error table.

Every test runs the real model (counted by :class:`conftest.CountingModel`) and a real store; none starts a
gRPC server: the wire tests live in test_service.py and friends.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import CountingModel, jpeg_bytes
from embedder.config import Config
from embedder.core import AddItem, Call, Item, Service
from embedder.errors import (TABLE, Category, EmbedderError, ItemError, ItemNotFoundError, NotReadyError,
                             ReplicaOnlyError, ResponseTooLargeError, TooManyModelsError, category_for_grpc,
                             category_of)
from embedder.inputs import content_hash


@pytest.fixture
def counting(embedder):
    return CountingModel(embedder)


def _service(tmp_path, model, **settings) -> Service:
    config = Config.from_env(environ={}, data_dir=tmp_path / "data", grace_seconds=2.0, **settings)
    return Service.open(config, embedder=model)


def test_an_image_repeated_in_one_call_is_embedded_once_and_hits_skip_the_model(tmp_path, counting, embedder,
                                                                                 photos):
    with _service(tmp_path, counting) as service:
        counting.decoded = counting.embedded = 0  # not the warm-up
        first = service.embed([*photos, photos[0], b"not an image"]).outcomes
        assert counting.decoded == len(photos)  # the repeat rode with its first copy; the junk failed its probe
        assert [o.cached for o in first] == [False] * (len(photos) + 2)
        assert isinstance(first[-1].error, ItemError) and all(o.ok for o in first[:-1])
        np.testing.assert_array_equal(first[len(photos)].vector, first[0].vector)
        np.testing.assert_allclose(np.stack([o.vector for o in first[:len(photos)]]), embedder.embed(photos),
                                   atol=1e-5)

        again = service.embed(photos[::-1]).outcomes
        assert counting.decoded == len(photos)  # nothing reached decode or the model
        assert all(o.cached for o in again)
        np.testing.assert_array_equal(np.stack([o.vector for o in again]),
                                      np.stack([o.vector for o in first[:len(photos)]])[::-1])
        assert service.store.stats().cache_items == len(photos)  # the failed item was not cached

    with _service(tmp_path, counting) as service:  # the cache is on disk
        counting.decoded = 0
        assert all(o.cached for o in service.embed(photos[:2]).outcomes) and counting.decoded == 0


def test_a_hash_is_served_from_the_cache_or_from_the_same_call(tmp_path, counting, photos):
    sha = content_hash(photos[1])
    with _service(tmp_path, counting) as service:
        missing, = service.embed([Item("h", sha256=sha)]).outcomes
        assert isinstance(missing.error, ItemNotFoundError) and category_of(missing.error) is Category.NOT_FOUND
        by_hash, by_bytes = service.embed([Item("h", sha256=sha.upper()), Item("b", image=photos[1])]).outcomes
        assert by_hash.ok and by_hash.sha256 == sha  # the image beside it brought the vector
        np.testing.assert_array_equal(by_hash.vector, by_bytes.vector)
        later, = service.embed([Item("h", sha256=sha)]).outcomes
        assert later.cached and np.array_equal(later.vector, by_bytes.vector)
        bad, = service.embed([Item("x", sha256="not-hex")]).outcomes
        assert isinstance(bad.error, ItemError) and "64 hex digits" in str(bad.error)


def test_collection_items_answer_lookups_and_search_finds_a_reencoded_photo(tmp_path, counting, photos,
                                                                            photo_arrays):
    names = list(photo_arrays)
    with _service(tmp_path, counting) as service:
        added = service.add("photos", [AddItem(Item(n, image=p), label=n) for n, p in zip(names, photos)])
        assert (added.added, added.replaced) == (len(photos), 0)
        assert service.store.stats().cache_items == 0  # the items hold those vectors now
        counting.decoded = 0
        assert all(o.cached for o in service.embed(photos).outcomes) and counting.decoded == 0
        query = Item(image=jpeg_bytes(photo_arrays["chelsea"], quality=60))
        found = service.search(collection="photos", item=query, k=3)
        assert found.hits[0].id == "chelsea" and found.hits[0].score > 0.9 > found.hits[1].score
        assert not found.cached and found.model_id == service.default.model_id


def test_a_passed_deadline_fails_the_call_and_a_bad_item_fails_alone(tmp_path, counting, photos):
    with _service(tmp_path, counting) as service:
        with pytest.raises(EmbedderError) as late:  # dropped before the model, or not done in time
            service.embed([jpeg_bytes(np.full((64, 64, 3), 9, np.uint8))], call=Call(deadline=time.monotonic()))
        assert category_of(late.value) is Category.DEADLINE
        good, bad = service.add("c", [AddItem(Item("a", image=photos[0])),
                                      AddItem(Item("b", error=ItemError("metadata_json is not storable JSON")))]
                                ).outcomes
        assert good.ok and "metadata_json" in str(bad.error)
        assert [s is not None for s in service.get("c", ["a", "b"])] == [True, False]


def test_model_pool_evicts_the_least_recently_used_idle_model_and_never_one_in_use(tmp_path, embedder, photos,
                                                                                    cache_dir):
    with _service(tmp_path, embedder, max_models=2, cache_dir=cache_dir) as service:
        lite = service.embed(photos[:1], model="efficientnet_lite0")
        assert lite.model.name == "efficientnet_lite0"
        with service.models.lease("efficientnet_lite0"):  # in use: nothing can be evicted for another
            with pytest.raises(TooManyModelsError, match="--max-models"):
                service.embed(photos[:1], model="efficientnet_lite2")
        other = service.embed(photos[:1], model="efficientnet_lite2")  # lite0 idle now: it makes room
        assert other.outcomes[0].ok
        assert [m.name for m in service.models.models] == ["mobilenet_v2", "efficientnet_lite2"]
        assert other.model.name == "efficientnet_lite2" and other.outcomes[0].vector.shape == (other.model.dim,)


def test_one_recipe_in_two_spellings_is_one_model_in_the_pool(tmp_path, embedder, photos, cache_dir):
    with _service(tmp_path, embedder, cache_dir=cache_dir, runtime="torch") as service:
        first = service.embed(photos[:1], model="mobilenet_v2@stages=6-7,flip").model
        again = service.embed(photos[:1], model="mobilenet_v2@flip,stages=6-7").model
        assert again is first and first.name == "mobilenet_v2@stages=6-7,flip"
        assert [m.name for m in service.models.models] == ["mobilenet_v2", first.name]


def test_replica_and_lifecycle_errors(tmp_path, counting, photos):
    config = Config.from_env(environ={}, role="embed", data_dir=tmp_path / "unused")
    service = Service(config)
    with pytest.raises(NotReadyError, match="still loading"):
        service.embed(photos[:1])
    service.start(counting)
    try:
        assert service.embed(photos[:1]).outcomes[0].ok
        no_cache, = service.embed([Item(sha256=content_hash(photos[0]))]).outcomes
        assert isinstance(no_cache.error, ItemNotFoundError) and "--role embed" in str(no_cache.error)
        with pytest.raises(ReplicaOnlyError, match="embedding replica"):
            service.search(vector=np.ones(1280, np.float32))
    finally:
        service.close()
    with pytest.raises(NotReadyError, match="shutting down"):
        service.embed(photos[:1])
    assert not (tmp_path / "unused").exists()  # a replica opens no data dir


def test_every_category_has_one_answer_on_every_front_door():
    assert set(TABLE) == set(Category)
    for category, answer in TABLE.items():
        assert category_for_grpc(answer.grpc) is category
        assert 400 <= answer.http < 600 and answer.exit_code >= 2
    assert category_of(ValueError("x")) is Category.INVALID_ARGUMENT
    assert category_of(RuntimeError("x")) is Category.INTERNAL
    assert category_of(TooManyModelsError("x")) is Category.RESOURCE_EXHAUSTED


def test_an_answer_that_would_not_fit_one_message_is_refused_before_it_is_sent(tmp_path, counting, photos):
    with _service(tmp_path, counting, max_message_bytes=200_000, max_metadata_bytes=50_000) as service:
        big = {"notes": "x" * 40_000}
        added = service.add("c", [AddItem(Item(f"p{i}", image=p), metadata=big) for i, p in enumerate(photos[:5])])
        assert added.added == 5
        assert all(s is not None for s in service.get("c", ["p0", "p1", "p2"]))
        with pytest.raises(ResponseTooLargeError, match="fewer ids") as e:
            service.get("c", [f"p{i}" for i in range(5)])
        assert category_of(e.value) is Category.RESOURCE_EXHAUSTED and "--max-message-bytes" in str(e.value)
        query = service.get("c", ["p0"])[0].vector
        assert len(service.search(collection="c", vector=query, k=2).hits) == 2
        with pytest.raises(ResponseTooLargeError, match="smaller k"):
            service.search(collection="c", vector=query, k=5)
        too_big, = service.add("c", [AddItem(Item("p9", image=photos[5]), metadata={"x": "y" * 60_000})]).outcomes
        assert isinstance(too_big.error, ItemError) and "--max-metadata-bytes" in str(too_big.error)
