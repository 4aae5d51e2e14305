"""What the web page needs from the HTTP door, on a real loopback port: a paged listing of a collection's items,
their kept images, creating a collection, the page's own files served without the token, and the guard that
refuses writes sent from another site's page.
"""
from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import replace

import grpc
import numpy as np
import pytest
import requests
from conftest import http_door, running_server
from PIL import Image
from test_http import Api, refused

from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.client import AsyncEmbedderClient, EmbedderClient
from embedder.keys import KeyStore

TOKEN = "page-api-token"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("page-api-data")


@pytest.fixture(scope="module")
def server(embedder, data_dir):
    with running_server(embedder, token=TOKEN, data_dir=data_dir) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with http_door(server) as door:
        yield door


@pytest.fixture(scope="module")
def api(http) -> Api:
    return Api(http.url, TOKEN)


@pytest.fixture(scope="module")
def images(digit_images) -> list[bytes]:
    return digit_images[0][:25]


@pytest.fixture(scope="module")
def shelf(api, images) -> list[dict]:
    """Collection "shelf": 25 images in insertion order, labelled a, b, none in turn, metadata {"n": their index};
    and one item sent as a tensor (no image kept)."""
    labels = ["a", "b", None]
    items = [{"id": f"img-{i:02d}", "image": base64.b64encode(x).decode(), "label": labels[i % 3],
              "metadata": {"n": i}} for i, x in enumerate(images)]
    assert api.ok("POST", "/v1/collections/shelf/add", json={"items": items})["added"] == 25
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    tensor = {"shape": [32, 32, 3], "dtype": "uint8", "data": base64.b64encode(pixels.tobytes()).decode()}
    assert api.ok("POST", "/v1/collections/shelf/add", json={"items": [{"id": "tensor", "tensor": tensor}]})["added"]
    return items


def test_a_listing_pages_in_insertion_order_with_the_total(api, shelf):
    first = api.ok("GET", "/v1/collections/shelf/items?limit=10")
    assert first["total"] == 26 and first["offset"] == 0
    assert [i["id"] for i in first["items"]] == [f"img-{i:02d}" for i in range(10)]
    assert all(i["image"] and i["sha256"] and "vector" not in i for i in first["items"])
    assert [i["label"] for i in first["items"][:3]] == ["a", "b", None]
    last = api.ok("GET", "/v1/collections/shelf/items?offset=20&limit=10")
    assert [i["id"] for i in last["items"]] == [f"img-{i:02d}" for i in range(20, 25)] + ["tensor"]
    assert last["items"][-1]["image"] is False and last["items"][-1]["label"] is None
    assert api.ok("GET", "/v1/collections/shelf/items?offset=26")["items"] == []


def test_a_listing_filters_by_label_or_unlabelled(api, shelf):
    b = api.ok("GET", "/v1/collections/shelf/items", params={"label": "b", "limit": 3, "offset": 2})
    ids_b = [x["id"] for x in shelf if x["label"] == "b"]
    assert b["total"] == len(ids_b) and [i["id"] for i in b["items"]] == ids_b[2:5]
    none = api.ok("GET", "/v1/collections/shelf/items", params={"unlabelled": "true", "limit": 1000})
    assert [i["id"] for i in none["items"]] == [x["id"] for x in shelf if x["label"] is None] + ["tensor"]
    assert none["total"] == len(none["items"])
    assert api.ok("GET", "/v1/collections/shelf/items?label=zebra") == {"items": [], "total": 0, "offset": 0}


def test_a_listing_filters_by_metadata(api, shelf):
    late = api.ok("GET", "/v1/collections/shelf/items", params={"where": "n >= 20", "limit": 3, "offset": 1})
    assert late["total"] == 5 and [i["id"] for i in late["items"]] == ["img-21", "img-22", "img-23"]
    assert late["items"][0]["metadata"] == {"n": 21}
    both = api.ok("GET", "/v1/collections/shelf/items", params={"where": '{"n": {"<": 9}}', "label": "b"})
    assert [i["id"] for i in both["items"]] == ["img-01", "img-04", "img-07"] and both["total"] == 3
    refused(api("GET", "/v1/collections/shelf/items", params={"where": "n >>= 3"}), 400, "invalid_argument")


@pytest.mark.parametrize("query, text", [
    ("limit=-1", "limit must be a whole number from 1 to 1000"),
    ("limit=1001", "page through a large collection with offset"),
    ("offset=-1", "offset must be a whole number from 0"),
    ("limit=ten", "limit"),
    ("label=a&unlabelled=true", "not both"),
    ("lable=a", "lable"),
])
def test_a_bad_listing_query_says_what_to_send(api, shelf, query, text):
    refused(api("GET", f"/v1/collections/shelf/items?{query}"), 400, "invalid_argument", text)


def test_a_listing_of_no_collection_is_not_found(api):
    refused(api("GET", "/v1/collections/nowhere/items"), 404, "not_found", "no collection 'nowhere'")


def test_a_kept_image_comes_back_as_added_and_the_others_say_why_not(api, http, shelf, images):
    r = api.session.get(f"{http.url}/v1/collections/shelf/image", params={"id": "img-03"}, timeout=60)
    assert r.status_code == 200 and r.content == images[3]
    assert r.headers["content-type"] == "image/jpeg" and r.headers["x-content-type-options"] == "nosniff"
    r = api.session.get(f"{http.url}/v1/collections/shelf/image", params={"id": "img-03", "size": 32}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as thumb:  # the 64x64 digit, halved
        assert thumb.format == "JPEG" and thumb.size == (32, 32)
    r = api.session.get(f"{http.url}/v1/collections/shelf/image", params={"id": "img-03", "size": 500}, timeout=60)
    with Image.open(io.BytesIO(r.content)) as thumb:
        assert thumb.size == (64, 64)  # never scaled up
    refused(api("GET", "/v1/collections/shelf/image?id=img-03&size=5"), 400, "invalid_argument", "from 16 to 1024")
    refused(api("GET", "/v1/collections/shelf/image?id=tensor"), 404, "not_found", "has no kept image")
    refused(api("GET", "/v1/collections/shelf/image?id=ghost"), 404, "not_found", "no item 'ghost'")
    refused(api("GET", "/v1/collections/shelf/image"), 400, "invalid_argument", "id")


def test_creating_a_collection_binds_it_to_the_model_and_is_idempotent(api, server):
    made = api.ok("PUT", "/v1/collections/empty-one", json={"index": "hnsw"})
    assert made["count"] == 0 and made["model_id"] == server.service.default.model_id
    assert made["index"].startswith("hnsw")
    assert api.ok("PUT", "/v1/collections/empty-one", json={"index": "hnsw"}) == made
    refused(api("PUT", "/v1/collections/empty-one", json={}), 400, "invalid_argument", "exists with index")
    assert api.ok("GET", "/v1/collections/empty-one/items") == {"items": [], "total": 0, "offset": 0}
    refused(api("PUT", "/v1/collections/x", json={"model": "no-such-net"}), 404, "not_found", "no-such-net")


def test_a_key_lists_and_reads_images_of_its_own_collections_only(http, data_dir, shelf):
    keys = KeyStore(data_dir)
    elsewhere = Api(http.url, keys.add("page-other", "write", ["other"])[1])
    refused(elsewhere("GET", "/v1/collections/shelf/items"), 403, "permission_denied", "allow-list")
    refused(elsewhere("GET", "/v1/collections/shelf/image?id=img-00"), 403, "permission_denied", "allow-list")
    refused(Api(http.url, keys.add("page-reader", "read")[1])("PUT", "/v1/collections/other", json={}),
            403, "permission_denied", "needs 'write'")
    refused(Api(http.url, None)("GET", "/v1/collections/shelf/items"), 401, "unauthenticated")


def test_a_write_from_another_sites_page_is_refused(api, http, shelf):
    host = http.url.split("://")[1]
    labels = {"labels": {"img-02": "c"}}
    for origin in ("http://evil.example", f"http://{host}.evil.example", "null"):
        message = refused(api("POST", "/v1/collections/shelf/labels", json=labels, headers={"Origin": origin}),
                          403, "permission_denied", "cross-site request refused")
        assert origin in message
    assert api.ok("GET", "/v1/collections/shelf/items?label=c")["total"] == 0  # nothing was written
    # the server's own page, and clients that are not browsers (no Origin), write; reads pass from anywhere
    assert api.ok("POST", "/v1/collections/shelf/labels", json=labels, headers={"Origin": http.url}) == {"updated": 1}
    assert api.ok("POST", "/v1/collections/shelf/labels", json={"clear": ["img-02"]}) == {"updated": 1}
    # behind a reverse proxy that rewrites Host, the page's origin is the host the proxy forwards for
    proxied = {"Origin": "https://embedder.example", "X-Forwarded-Host": "embedder.example"}
    assert api.ok("POST", "/v1/collections/shelf/labels", json={"clear": ["img-02"]}, headers=proxied)
    assert api.ok("GET", "/v1/collections/shelf/items?label=c", headers={"Origin": "http://evil.example"})


def test_the_page_is_served_without_the_token_and_talks_to_this_server_only(http):
    r = requests.get(http.url + "/", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/page/page.js"' in r.text
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        r = requests.get(f"{http.url}/page/{name}", timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000
    for name in ("nope.js", "..%2F__init__.py", "%2E%2E/app.py"):
        r = requests.get(f"{http.url}/page/{name}", timeout=60)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", name
    assert requests.get(http.url + "/v1/stats", timeout=60).status_code == 401


def test_the_grpc_port_lists_pages_serves_images_and_creates_collections(server, api, shelf, images):
    with grpc.insecure_channel(server.address) as channel:
        stub, auth = pb_grpc.EmbedderStub(channel), (("authorization", f"Bearer {TOKEN}"),)
        page = stub.ListItems(pb.ListItemsRequest(collection="shelf", offset=3, limit=4), metadata=auth, timeout=60)
        assert [i.item.id for i in page.items] == [f"img-{i:02d}" for i in range(3, 7)] and page.total == 26
        assert all(i.image_kept and not i.item.vector and i.item.sha256 for i in page.items)
        assert [i.item.label if i.item.HasField("label") else None for i in page.items] == ["a", "b", None, "a"]
        http_page = api.ok("GET", "/v1/collections/shelf/items?label=a")
        grpc_page = stub.ListItems(pb.ListItemsRequest(collection="shelf", label="a"), metadata=auth, timeout=60)
        assert [i.item.id for i in grpc_page.items] == [i["id"] for i in http_page["items"]]  # 0: the default page
        none = stub.ListItems(pb.ListItemsRequest(collection="shelf", unlabelled=True, offset=8), metadata=auth,
                              timeout=60)
        assert [i.item.id for i in none.items] == ["tensor"] and not none.items[0].image_kept
        image = stub.GetImage(pb.GetImageRequest(collection="shelf", id="img-05"), metadata=auth, timeout=60)
        assert image.image == images[5]
        made = stub.CreateCollection(pb.CreateCollectionRequest(collection="grpc-made"), metadata=auth, timeout=60)
        assert made.name == "grpc-made" and made.count == 0 and made.index == "flat"
        for call, request, code, text in (
                (stub.ListItems, pb.ListItemsRequest(collection="shelf", limit=1001), "INVALID_ARGUMENT", "limit"),
                (stub.ListItems, pb.ListItemsRequest(collection="gone"), "NOT_FOUND", "no collection"),
                (stub.GetImage, pb.GetImageRequest(collection="shelf", id="tensor"), "NOT_FOUND", "no kept image")):
            with pytest.raises(grpc.RpcError) as e:
                call(request, metadata=auth, timeout=60)
            assert e.value.code().name == code and text in e.value.details()


def test_the_clients_page_read_images_and_create(server, shelf, images):
    with EmbedderClient(server.address, token=TOKEN, timeout=60) as client:
        page = client.list_items("shelf", offset=24, limit=5)
        assert [s.id for s in page.items] == ["img-24", "tensor"] and page.kept == [True, False]
        assert page.total == 26 and page.offset == 24 and page.items[0].label == "a" and not len(page.items[0].vector)
        assert client.list_items("shelf", label="b").total == 8
        assert [s.id for s in client.list_items("shelf", where={"n": {"<": 2}}).items] == ["img-00", "img-01"]
        assert client.get_image("shelf", "img-07") == images[7]
        with Image.open(io.BytesIO(client.get_image("shelf", "img-07", size=16))) as thumb:
            assert thumb.size == (16, 16)
        made = client.create_collection("client-made", index="hnsw")
        assert made.name == "client-made" and made.index.startswith("hnsw") and made.count == 0

    async def unlabelled() -> list[str]:
        async with AsyncEmbedderClient(server.address, token=TOKEN, timeout=60) as client:
            return [s.id for s in (await client.list_items("shelf", unlabelled=True, limit=3)).items]

    assert asyncio.run(unlabelled()) == ["img-02", "img-05", "img-08"]


def test_without_auth_only_requests_addressed_by_ip_or_an_allowed_name_are_answered(embedder, tmp_path):
    """DNS rebinding: another site's page reaches a server without a token through a name it controls, and then
    Origin and Host agree; so without auth the door answers only IP addresses, localhost and allowed names."""
    with running_server(embedder, data_dir=tmp_path / "open") as server:
        for allowed, name_passes in (("", False), ("embedder.lan", True), ("*", True)):
            with http_door(server, replace(server.config, allowed_hosts=allowed)) as door:
                port = door.url.rsplit(":", 1)[1]
                for host, passes in ((f"evil.example:{port}", allowed == "*"), (f"embedder.lan:{port}", name_passes),
                                     (f"127.0.0.1:{port}", True), (f"localhost:{port}", True), (f"[::1]:{port}", True)):
                    for method, path in (("GET", "/v1/stats"), ("PUT", "/v1/collections/rebind")):
                        r = requests.request(method, door.url + path, json={}, timeout=60,
                                             headers={"Host": host, "Origin": f"http://{host}"})
                        assert (r.status_code == 200) == passes, (host, method, r.text)
                        if not passes:
                            assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]["message"]
                assert requests.get(door.url + "/healthz", headers={"Host": "evil.example"}, timeout=60).ok  # probes
        keys = KeyStore(server.config.data_dir)
        key = keys.add("rebind", "read")[1]  # auth on: the key decides, whatever the name
        with http_door(server) as door:
            r = requests.get(door.url + "/v1/stats", timeout=60,
                             headers={"Host": "evil.example", "Authorization": f"Bearer {key}"})
        assert r.status_code == 200


def test_thumbnails_decode_two_images_at_once_at_most(monkeypatch):
    """A thumbnail decodes the whole image outside the batcher's pixel budget: a 62-megapixel PNG of 200 KB takes
    ~190 MB while it is made, so 100 parallel requests could take the machine's memory; two decode at once."""
    import threading
    import time

    from embedder.core import thumbnails

    running, most, lock = 0, 0, threading.Lock()
    real = thumbnails.decode

    def counted(data, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        try:
            return real(data, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(thumbnails, "decode", counted)
    png = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(png, "PNG")
    threads = [threading.Thread(target=thumbnails.thumbnail, args=(png.getvalue(), 16), kwargs={"max_pixels": 10**6})
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 2


def test_a_jpeg_thumbnail_is_decoded_at_the_smallest_scale_that_still_fits(photo_arrays):
    """libjpeg scales while it decodes: a 4800x3200 JPEG previewed at 256 is decoded at 1/8 (600x400), 64x fewer
    pixels (a 6000x6000 one took ~0.2 s a thumbnail, ~0.07 s now), and the preview is the same size as before."""
    from embedder.core.thumbnails import thumbnail
    from embedder.preprocess import decode

    big = io.BytesIO()
    Image.fromarray(next(iter(photo_arrays.values()))).resize((4800, 3200)).save(big, "JPEG", quality=90)
    assert decode(big.getvalue(), max_pixels=10**8).size == (4800, 3200)  # the embedder's path: full size
    assert decode(big.getvalue(), max_pixels=10**8, draft=256).size == (600, 400)
    assert decode(big.getvalue(), max_pixels=10**8, draft=500).size == (1200, 800)  # never below the side asked
    with Image.open(io.BytesIO(thumbnail(big.getvalue(), 256, max_pixels=10**8))) as thumb:
        assert thumb.size == (256, 171)
