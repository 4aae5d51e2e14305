"""AsyncEmbedderClient against real in-process servers on loopback: the blocking client's results and errors,
from coroutines, with many calls at once in one event loop."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
import pytest
from conftest import running_server
from PIL import Image

from embedder.client import AsyncEmbedderClient, EmbedderClient, ItemResult, RemoteBatchError, ServiceError
from embedder.errors import Category
from embedder.results import BatchResult

MAX_MESSAGE = 2 * 1024 * 1024
MAX_ITEMS = 16


@pytest.fixture(scope="module")
def server(embedder):
    with running_server(embedder, max_message_bytes=MAX_MESSAGE, max_items=MAX_ITEMS) as s:
        yield s


@pytest.fixture(scope="module")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def sync_client(target):
    with EmbedderClient(target, max_message_bytes=MAX_MESSAGE, max_items=MAX_ITEMS) as c:
        yield c


@pytest.fixture(scope="module")
def expected(embedder, photos):
    return embedder.embed(photos)


def run(target: str, body: Callable[[AsyncEmbedderClient], Awaitable[Any]], **kwargs: Any) -> Any:
    """``body(client)`` in a fresh event loop, with a client made in that loop (an aio channel belongs to one)."""
    async def main() -> Any:
        async with AsyncEmbedderClient(target, **{"max_message_bytes": MAX_MESSAGE, "max_items": MAX_ITEMS,
                                                  **kwargs}) as client:
            return await body(client)

    return asyncio.run(main())


def test_embed_bytes_paths_and_arrays_match_the_blocking_client(target, sync_client, photos, photo_arrays, expected,
                                                                tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(photos[1])
    arr = photo_arrays["chelsea"]
    inputs = [photos[0], path, str(path), arr, Image.fromarray(arr), arr.astype(np.float32) / 255]
    got = run(target, lambda c: c.embed(inputs))
    assert got.dtype == np.float32 and got.shape == (6, expected.shape[1])
    np.testing.assert_array_equal(got, sync_client.embed(inputs))
    np.testing.assert_allclose(got[:3], expected[[0, 1, 1]], atol=1e-6)


def test_per_item_errors_are_returned_or_raised_like_the_blocking_client(target, sync_client, photos, expected,
                                                                          tmp_path):
    inputs = [photos[0], b"junk", tmp_path / "missing.jpg", np.zeros((4, 4), np.int64), photos[2]]
    result = run(target, lambda c: c.embed(inputs, errors="return"))
    assert isinstance(result, BatchResult)
    assert result.ok.tolist() == [True, False, False, False, True]
    assert result.errors == sync_client.embed(inputs, errors="return").errors
    assert "not a recognised image format" in result.errors[1] and "could not read file" in result.errors[2]
    np.testing.assert_allclose(result.vectors[[0, 4]], expected[[0, 2]], atol=1e-6)
    assert not result.vectors[1:4].any()
    with pytest.raises(RemoteBatchError) as e:
        run(target, lambda c: c.embed([photos[0], b"junk"], ids=["a", "b"]))
    assert list(e.value.errors) == [1] and "'b'" in str(e.value)
    with pytest.raises(ValueError, match="errors must be"):
        run(target, lambda c: c.embed(photos[:1], errors="ignore"))


def test_large_inputs_go_over_a_stream_and_embed_iter_is_an_async_iterator(target, photos, expected):
    n = len(photos)
    order = [i % n for i in range(2 * MAX_ITEMS + 3)]  # more than one request may carry: a stream

    async def body(client: AsyncEmbedderClient) -> tuple[np.ndarray, list[ItemResult]]:
        big = await client.embed([photos[i] for i in order])
        source = ((f"id{k}", photos[k % n] if k != 4 else b"broken") for k in range(11))
        return big, [r async for r in client.embed_iter(source, chunk=3, window=2)]

    big, streamed = run(target, body)
    np.testing.assert_allclose(big, expected[order], atol=1e-6)
    assert [r.id for r in streamed] == [f"id{k}" for k in range(11)]
    assert [k for k, r in enumerate(streamed) if not r.ok] == [4]
    np.testing.assert_allclose(np.stack([r.vector for k, r in enumerate(streamed) if k != 4]),
                               expected[[k % n for k in range(11) if k != 4]], atol=1e-6)


def test_add_search_train_predict_as_the_blocking_client_sees_them(target, sync_client, digit_images):
    images, labels = digit_images
    ids = [f"d{i}" for i in range(len(images))]

    async def body(client: AsyncEmbedderClient) -> dict[str, Any]:
        added = await client.add("async-digits", images, ids, labels=labels, metadata=[{"i": i} for i in ids])
        hits = await client.search(images[0], collection="async-digits", k=3)
        head = await client.train("async-digits", "logreg", head_id="async-digits")
        predictions = await client.predict(head["head_id"], [images[0], b"junk"], ids=ids[-2:],
                                           collection="async-digits", top_k=2)
        stored = await client.get("async-digits", [ids[0], "nope"])
        return {"added": added, "hits": hits, "head": head, "predictions": predictions, "stored": stored,
                "stats": await client.stats(), "heads": await client.list_heads()}

    got = run(target, body)
    assert got["added"].added == len(images) and not got["added"].failed
    assert got["hits"][0].id == "d0" and got["hits"][0].score == pytest.approx(1.0, abs=1e-4)
    assert got["hits"] == sync_client.search(images[0], collection="async-digits", k=3)
    assert got["head"]["classes"] == ["0", "1", "7"] and got["head"]["metrics"]["accuracy"] > 0.9
    assert got["head"]["head_id"] in [h["head_id"] for h in got["heads"]]
    first, junk, *stored = got["predictions"]
    assert first.label == labels[0] and len(first.labels) == 2
    assert junk.error is not None and "not a recognised image format" in junk.error
    assert [p.label for p in stored] == labels[-2:]
    assert got["predictions"] == sync_client.predict("async-digits", [images[0], b"junk"], ids=ids[-2:],
                                                     collection="async-digits", top_k=2)
    assert got["stored"][0].label == labels[0] and got["stored"][0].metadata == {"i": "d0"} and got["stored"][1] is None
    assert {c.name for c in got["stats"]["collections"]} >= {"async-digits"}


@pytest.mark.parametrize("call", [
    lambda c: c.search(vector=np.ones(4), collection="no-such-collection"),
    lambda c: c.predict("no-such-head", [b"x"]),
    lambda c: c.train("no-such-collection"),
    lambda c: c.delete_head("no-such-head"),
], ids=["search", "predict", "train", "delete_head"])
def test_whole_call_failures_raise_the_blocking_clients_service_error(target, sync_client, call):
    with pytest.raises(ServiceError) as e:
        run(target, call)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.category is Category.NOT_FOUND
    with pytest.raises(ServiceError) as blocking:
        call(sync_client)
    assert str(e.value) == str(blocking.value)


def test_a_client_set_above_the_servers_limits_splits_to_them(server, target, photos, expected):
    """A client set for more items and bytes than the server takes learns the server's limits (one ListModels)
    and splits to them: embed over a stream and embed_iter, no request refused."""
    order = [i % len(photos) for i in range(MAX_ITEMS + 1)]
    inputs = [photos[i] for i in order]

    async def body(client: AsyncEmbedderClient) -> tuple[np.ndarray, np.ndarray]:
        vectors = await client.embed(inputs, chunk=4 * MAX_ITEMS)
        streamed = [r.vector async for r in client.embed_iter(inputs, chunk=4 * MAX_ITEMS)]
        return vectors, np.stack(streamed)

    streams = requests_seen(server, "EmbedStream")
    vectors, streamed = run(target, body, max_items=4 * MAX_ITEMS, max_message_bytes=4 * MAX_MESSAGE)
    np.testing.assert_allclose(vectors, expected[order], atol=1e-6)
    np.testing.assert_allclose(streamed, expected[order], atol=1e-6)
    assert requests_seen(server, "EmbedStream") == streams + 2  # both answered OK: nothing refused


def requests_seen(server, method: str, code: str = "OK") -> float:
    labels = {"door": "grpc", "method": method, "code": code}
    return server.metrics.registry.get_sample_value("embedder_requests_total", labels) or 0


def test_token_and_unreachable_server_errors(embedder, photos):
    with running_server(embedder, token="s3cret") as s:
        target = f"127.0.0.1:{s.port}"
        assert run(target, lambda c: c.embed(photos[:1]), token="s3cret").shape[0] == 1
        for call in (lambda c: c.embed(photos[:1]), lambda c: c.embed(photos[:3], chunk=1)):  # unary, stream
            with pytest.raises(ServiceError) as e:
                run(target, call, token="wrong")
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.category is Category.UNAUTHENTICATED
            assert "EMBEDDER_TOKEN" in str(e.value)
    with pytest.raises(ServiceError) as e:
        run(target, lambda c: c.list_models(), retries=1, backoff=0.01, timeout=5)
    assert e.value.category is Category.UNAVAILABLE and "after 2 attempts" in str(e.value)


def test_retries_while_the_server_warms_up(embedder, photos, expected):
    with running_server(embedder, load=False) as s:
        async def body(client: AsyncEmbedderClient) -> tuple[np.ndarray, list[np.ndarray]]:
            unary = asyncio.ensure_future(client.embed(photos[:2]))
            stream = asyncio.ensure_future(client.embed(photos[:3], chunk=1))
            await asyncio.sleep(0.3)  # refused while the model loads...
            await asyncio.to_thread(s.load)  # ...and answered once it is warm
            return await unary, await stream

        unary, stream = run(f"127.0.0.1:{s.port}", body, retries=20, backoff=0.05, max_backoff=0.2)
        # each call first asks for the server's limits (ListModels), refused like an Embed while warming up
        assert requests_seen(s, "ListModels", "UNAVAILABLE")
    np.testing.assert_allclose(unary, expected[:2], atol=1e-6)
    np.testing.assert_allclose(stream, expected[:3], atol=1e-6)


def test_many_concurrent_calls_on_one_loop_and_channel(target, photos, expected):
    n = len(photos)

    async def body(client: AsyncEmbedderClient) -> list[Any]:
        embeds = [client.embed([photos[k % n], photos[(k + 1) % n]]) for k in range(48)]
        streams = [client.embed([photos[j % n] for j in range(k, k + MAX_ITEMS + 2)], chunk=4) for k in range(4)]
        others = [client.list_models(), client.server_limits()]
        return await asyncio.gather(*embeds, *streams, *others)

    results = run(target, body)
    for k, got in enumerate(results[:48]):
        np.testing.assert_allclose(got, expected[[k % n, (k + 1) % n]], atol=1e-6)
    for k, got in enumerate(results[48:52]):
        np.testing.assert_allclose(got, expected[[j % n for j in range(k, k + MAX_ITEMS + 2)]], atol=1e-6)
    assert results[-1]["max_items"] == MAX_ITEMS


def test_the_same_methods_and_arguments_as_the_blocking_client():
    import inspect

    public = {name for name in dir(EmbedderClient) if not name.startswith("_")}
    assert public <= {name for name in dir(AsyncEmbedderClient) if not name.startswith("_")}
    for name in public:
        sync, aio = getattr(EmbedderClient, name), getattr(AsyncEmbedderClient, name)
        assert inspect.signature(sync).parameters.keys() == inspect.signature(aio).parameters.keys(), name
        assert inspect.iscoroutinefunction(aio) == (name != "embed_iter"), name
