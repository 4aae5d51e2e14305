"""API keys per caller, on a real loopback server (gRPC and HTTP doors over one service) and real SQLite.

Roles and collection allow-lists are enforced by the core for both doors; revoked keys are refused from the
next call on (the CLI writes the data dir's key file while the server runs); the key file holds hashes only;
one key cannot tell from the cache whether another embedded an image; cached vectors can be forgotten and
expire by age; the server's single ``--token`` stays an admin key.
"""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from contextlib import closing

import grpc
import numpy as np
import pytest
import requests
from conftest import http_door, jpeg_bytes, running_server

from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.cli import main as cli_main
from embedder.client import EmbedderClient
from embedder.errors import UnauthenticatedError
from embedder.keys import Gate, KeyStore
from embedder.store import Store

TOKEN = "keys-test-admin-token"
M = "model-a"


def image(seed: int) -> bytes:
    """A JPEG no other test embeds (the cache is per server, tests share the module's server)."""
    return jpeg_bytes(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Rpc:
    """Raw ``embedder.v1`` calls with one key, so ``Result.cached`` and per-item statuses can be read."""

    def __init__(self, address: str, key: str | None) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.EmbedderStub(self._channel)
        self._metadata = [] if key is None else [("authorization", f"Bearer {key}")]

    def __call__(self, method: str, request):
        return getattr(self._stub, method)(request, metadata=self._metadata, timeout=120)

    def code(self, method: str, request) -> grpc.StatusCode:
        """The status code the call ends with (OK when it answers)."""
        try:
            self(method, request)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    def details(self, method: str, request, head_id: str) -> str:
        """The error message of ``request`` sent for ``head_id`` instead."""
        other = type(request)()
        other.CopyFrom(request)
        other.head_id = head_id
        try:
            self(method, other)
        except grpc.RpcError as e:
            return e.details().replace(repr(head_id), repr(request.head_id))
        raise AssertionError(f"{method} answered for {head_id}")

    def embed(self, *items: pb.Item) -> list[pb.Result]:
        return list(self("Embed", pb.EmbedRequest(items=list(items))).results)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("keys-data")


@pytest.fixture(scope="module")
def server(embedder, data_dir):
    with running_server(embedder, token=TOKEN, data_dir=data_dir) as server:
        with EmbedderClient(server.address, token=TOKEN, timeout=120) as admin:  # two collections, by the token
            admin.add("pets", [image(1), image(2)], ["p1", "p2"])
            admin.add("toys", [image(3)], ["t1"])
        yield server


@pytest.fixture(scope="module")
def http(server):
    with http_door(server) as door:
        yield door


@pytest.fixture(scope="module")
def keys(data_dir) -> KeyStore:
    """The data dir's keys, written while the server runs (as `embedder keys add` does)."""
    return KeyStore(data_dir)


def new_key(keys: KeyStore, role: str, collections: list[str] | None = None) -> str:
    return keys.add(f"test-{role}", role, collections)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusal(address: str, http_url: str, key: str | None) -> tuple[str, str]:
    """The UNAUTHENTICATED message of a call through gRPC, and the 401 one through HTTP (both must be refusals)."""
    try:
        Rpc(address, key)("ListModels", pb.ListModelsRequest())
        raise AssertionError("gRPC answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        over_grpc = e.details()
    r = requests.get(f"{http_url}/v1/stats", headers={} if key is None else {"Authorization": f"Bearer {key}"},
                     timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthenticated", (r.status_code, r.text)
    return over_grpc, r.json()["error"]["message"]


def test_the_key_file_holds_hashes_only_and_the_cli_manages_it(data_dir, capsys):
    assert cli_main(["keys", "add", "cli-bot", "--role", "write", "--collection", "pets",
                     "--data-dir", str(data_dir)]) == 0
    key = capsys.readouterr().out.split()[-1]
    path = data_dir / "keys.json"
    text = path.read_text()
    secret = key.split("_", 2)[2]  # emb_<id>_<secret>; the secret itself may hold "_"
    assert len(secret) == 32 and key not in text and secret not in text  # neither the key nor its secret
    (key_id, record), = [(k, r) for k, r in json.loads(text)["keys"].items() if r["name"] == "cli-bot"]
    assert record["sha256"] == sha(key.encode()) and record["collections"] == ["pets"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cli_main(["keys", "list", "--data-dir", str(data_dir)]) == 0
    assert key_id in capsys.readouterr().out
    assert cli_main(["keys", "revoke", key_id, "--data-dir", str(data_dir)]) == 0
    assert KeyStore(data_dir).authenticate(key) is None
    assert cli_main(["keys", "revoke", "no-such-id", "--data-dir", str(data_dir)]) == 2


def test_a_read_key_reads_but_cannot_write_and_a_revoked_key_is_refused(server, keys):
    key = new_key(keys, "read")
    rpc = Rpc(server.address, key)
    assert rpc.embed(pb.Item(image=image(10)))[0].status.code == 0
    assert len(rpc("Search", pb.SearchRequest(collection="pets", item_id="p1", k=1)).hits) == 1
    add = pb.AddRequest(collection="pets", items=[pb.AddItem(item=pb.Item(id="x", image=image(11)))])
    try:
        rpc("Add", add)
        raise AssertionError("a read key added an item")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'write'" in e.details()
    assert rpc.code("Delete", pb.DeleteRequest(collection="pets", ids=["p1"])) == grpc.StatusCode.PERMISSION_DENIED
    assert rpc.code("Forget", pb.ForgetRequest(sha256s=[sha(image(10))])) == grpc.StatusCode.PERMISSION_DENIED

    keys.revoke(key.split("_")[1])  # keys are emb_<id>_<secret>
    assert rpc.code("ListModels", pb.ListModelsRequest()) == grpc.StatusCode.UNAUTHENTICATED
    assert Rpc(server.address, "emb_made_up").code("ListModels", pb.ListModelsRequest()) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert Rpc(server.address, None).code("ListModels", pb.ListModelsRequest()) == grpc.StatusCode.UNAUTHENTICATED


def test_revoking_the_last_key_of_a_server_without_a_token_keeps_auth_on(embedder, tmp_path, capsys):
    """A server without --token needs a key once one was added, and still after every key is revoked (revoking a
    leaked key used to open the server to anyone, the revoked key included)."""
    with running_server(embedder, data_dir=tmp_path) as server:
        assert Rpc(server.address, None).code("ListModels", pb.ListModelsRequest()) == grpc.StatusCode.OK  # no keys: open
        key = new_key(KeyStore(tmp_path), "write")
        assert Rpc(server.address, None).code("ListModels", pb.ListModelsRequest()) == grpc.StatusCode.UNAUTHENTICATED
        assert cli_main(["keys", "revoke", key.split("_")[1], "--data-dir", str(tmp_path)]) == 0
        assert "no live key is left" in capsys.readouterr().err
        for who in (None, key):
            assert Rpc(server.address, who).code("ListModels", pb.ListModelsRequest()) == \
                grpc.StatusCode.UNAUTHENTICATED


def test_two_authorization_values_in_one_call_are_refused(server, http, keys):
    """A read key beside the admin token: which one counted depended on their order (the last won); now neither."""
    from http.client import HTTPConnection

    read = new_key(keys, "read")
    both = Rpc(server.address, read)
    both._metadata = [("authorization", f"Bearer {read}"), ("authorization", f"Bearer {TOKEN}")]
    try:
        both("ListModels", pb.ListModelsRequest())
        raise AssertionError("two authorization values were taken")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "send one" in e.details()
    conn = HTTPConnection("127.0.0.1", http.port, timeout=60)
    conn.putrequest("GET", "/v1/stats")
    for value in (f"Bearer {read}", f"Bearer {TOKEN}"):
        conn.putheader("Authorization", value)
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 401 and "send one" in json.loads(answer.read())["error"]["message"]


def test_an_allow_listed_key_sees_only_its_collections(server, keys):
    rpc = Rpc(server.address, new_key(keys, "write", ["pets"]))
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert rpc.code("Get", pb.GetRequest(collection="toys", ids=["t1"])) == denied
    assert rpc.code("Search", pb.SearchRequest(collection="toys", item_id="t1")) == denied
    assert rpc.code("Add", pb.AddRequest(collection="toys", items=[
        pb.AddItem(item=pb.Item(id="x", image=image(12)))])) == denied
    assert rpc.code("Delete", pb.DeleteRequest(collection="toys", whole_collection=True)) == denied
    assert rpc.code("Get", pb.GetRequest(collection="pets", ids=["p1"])) == grpc.StatusCode.OK
    # the toys item's image is no cache hit for this key (items answer lookups only where visible) ...
    looked_up = rpc.embed(pb.Item(content_sha256=sha(image(3))), pb.Item(content_sha256=sha(image(1))))
    assert [r.status.code for r in looked_up] == [grpc.StatusCode.NOT_FOUND.value[0], 0]
    # ... and a search over every collection searches only the allowed ones, even with the other's own image
    found = rpc("Search", pb.SearchRequest(item=pb.Item(image=image(3)), k=10))
    assert {h.collection for h in found.hits} == {"pets"} and not found.cached
    assert [c.name for c in rpc("Stats", pb.StatsRequest()).collections] == ["pets"]


def test_an_allow_listed_key_cannot_see_or_replace_another_collections_heads(server, keys, digit_images):
    images, labels = digit_images
    with EmbedderClient(server.address, token=TOKEN, timeout=120) as admin:
        admin.add("digits-a", images[:20] + images[30:50], [f"a{i}" for i in range(40)],
                  labels=labels[:20] + labels[30:50])
        admin.add("digits-b", images[:20] + images[30:50], [f"b{i}" for i in range(40)],
                  labels=labels[:20] + labels[30:50])
        admin.train("digits-b", head_id="b-head")
        admin.train("digits-a", head_id="a-to-b", adapt_to="digits-b")  # made from a collection it may not see
    rpc = Rpc(server.address, new_key(keys, "write", ["digits-a"]))
    denied, unknown = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND
    assert {"b-head", "a-to-b"}.isdisjoint(h.head_id for h in rpc("ListHeads", pb.ListHeadsRequest()).heads)
    try:  # no overwrite, and the refusal names no collection
        rpc("Train", pb.TrainRequest(collection="digits-a", head_id="b-head"))
        raise AssertionError("replaced another collection's head")
    except grpc.RpcError as e:
        assert e.code() == denied and "digits-b" not in e.details()
    for head in ("b-head", "a-to-b"):  # answered as an unknown head is: the key cannot tell that it exists
        for method, request in [("DeleteHead", pb.DeleteHeadRequest(head_id=head)),
                                ("Predict", pb.PredictRequest(head_id=head, items=[pb.Item(image=images[0])]))]:
            try:
                rpc(method, request)
                raise AssertionError(f"{method} used head {head}")
            except grpc.RpcError as e:
                assert e.code() == unknown and e.details() == rpc.details(method, request, "no-such-head")
    assert rpc.code("Predict", pb.PredictRequest(items=[pb.Item(image=images[0])])) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc("Train", pb.TrainRequest(collection="digits-a", head_id="a-head")).head.head_id == "a-head"
    assert {h.head_id for h in rpc("ListHeads", pb.ListHeadsRequest()).heads} == {"a-head"}


def test_one_key_cannot_tell_whether_another_embedded_an_image(server, keys):
    a, b = Rpc(server.address, new_key(keys, "read")), Rpc(server.address, new_key(keys, "read"))
    token = Rpc(server.address, TOKEN)
    x = image(20)
    assert not a.embed(pb.Item(image=x))[0].cached
    assert a.embed(pb.Item(image=x))[0].cached  # A's own repeat is a hit
    assert a.embed(pb.Item(content_sha256=sha(x)))[0].status.code == 0
    for other in (b, token):
        assert other.embed(pb.Item(content_sha256=sha(x)))[0].status.code == grpc.StatusCode.NOT_FOUND.value[0]
    first = b.embed(pb.Item(image=x))[0]
    assert not first.cached and first.status.code == 0  # embedded afresh for B
    assert b.embed(pb.Item(image=x))[0].cached


def test_forget_removes_cached_vectors_the_own_or_as_admin_everyones(server, keys, capsys):
    a, b = Rpc(server.address, new_key(keys, "write")), Rpc(server.address, new_key(keys, "write"))
    x = image(30)
    a.embed(pb.Item(image=x))
    b.embed(pb.Item(image=x))
    assert a("Forget", pb.ForgetRequest(sha256s=[sha(x)])).forgotten == 1  # only A's row
    missing = grpc.StatusCode.NOT_FOUND.value[0]
    assert a.embed(pb.Item(content_sha256=sha(x)))[0].status.code == missing
    assert b.embed(pb.Item(content_sha256=sha(x)))[0].status.code == 0
    with EmbedderClient(server.address, token=TOKEN, timeout=60) as admin:  # the token is an admin key
        assert admin.forget([sha(x)]) == 1  # B's row
    assert b.embed(pb.Item(content_sha256=sha(x)))[0].status.code == missing
    y = image(31)
    b.embed(pb.Item(image=y))
    assert cli_main(["forget", sha(y), "--server", server.address, "--token", TOKEN]) == 0
    assert "forgot 1 cached vector" in capsys.readouterr().out
    assert b.embed(pb.Item(content_sha256=sha(y)))[0].status.code == missing
    assert a.code("Forget", pb.ForgetRequest(sha256s=["not-hex"])) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_token_stays_an_admin_key(server):
    rpc = Rpc(server.address, TOKEN)
    add = pb.AddRequest(collection="token-only", items=[pb.AddItem(item=pb.Item(id="i", image=image(40)))])
    assert rpc("Add", add).added == 1
    assert {c.name for c in rpc("Stats", pb.StatsRequest()).collections} >= {"pets", "toys", "token-only"}
    assert rpc("Delete", pb.DeleteRequest(collection="token-only", whole_collection=True)).deleted == 1


def test_the_http_door_takes_the_same_keys(server, http, keys):
    def api(key: str | None):
        def call(method: str, path: str, **kwargs) -> tuple[int, dict]:
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            r = requests.request(method, http.url + path, headers=headers, timeout=120, **kwargs)
            return r.status_code, r.json()
        return call

    reader, pets_writer = api(new_key(keys, "read")), api(new_key(keys, "write", ["pets"]))
    x = image(50)
    item = {"id": "h", "image": base64.b64encode(x).decode()}
    status, body = reader("POST", "/v1/collections/pets/add", json={"items": [item]})
    assert status == 403 and body["error"]["type"] == "permission_denied"
    assert pets_writer("POST", "/v1/collections/toys/get", json={"ids": ["t1"]})[0] == 403
    status, body = pets_writer("POST", "/v1/search", json={"item": {"image": item["image"]}, "k": 10})
    assert status == 200 and {h["collection"] for h in body["hits"]} <= {"pets"}
    status, body = pets_writer("GET", "/v1/stats")
    assert [c["name"] for c in body["collections"]] == ["pets"]
    everything = api(TOKEN)("GET", "/v1/stats")[1]  # the admin token sees what other keys use
    assert everything["cache_items"] > 0 and everything["disk_bytes"] > 0
    assert body["cache_items"] == body["disk_bytes"] == 0 and body["heads"] <= everything["heads"]
    # privacy: the search above cached x for pets_writer only
    status, body = reader("POST", "/v1/embed", json={"items": [{"sha256": sha(x)}]})
    assert status == 200 and body["results"][0]["error"]["type"] == "not_found"
    status, body = reader("POST", "/v1/embed", json={"items": [{"image": item["image"]}]})
    assert status == 200 and body["results"][0]["cached"] is False
    assert reader("POST", "/v1/cache/forget", json={"sha256s": [sha(x)]})[0] == 403
    assert pets_writer("POST", "/v1/cache/forget", json={"sha256s": [sha(x)]}) == (200, {"forgotten": 1})
    assert api(TOKEN)("GET", "/v1/heads")[0] == 200
    assert api(None)("GET", "/v1/stats")[0] == 401
    assert api("emb_nope_nope")("GET", "/v1/stats")[0] == 401


def test_cached_vectors_expire_by_age(tmp_path):
    v = np.eye(4, dtype=np.float32)
    with Store(tmp_path, cache_max_age_seconds=0.5) as store:
        store.put(M, [sha(b"old")], v[:1])
        assert store.lookup(M, [sha(b"old")])[0] is not None
        time.sleep(0.7)
        assert store.lookup(M, [sha(b"old")])[0] is None  # expired: a miss
        store.put(M, [sha(b"new")], v[1:2])  # ... and the put deletes it
        assert store.stats().cache_items == 1
        assert store.lookup(M, [sha(b"new")])[0] is not None
    with closing(sqlite3.connect(tmp_path / "store.sqlite3")) as db:
        assert db.execute("SELECT sha256 FROM cache").fetchall() == [(sha(b"new"),)]


def test_cache_rows_are_per_owner_and_shared_when_configured(tmp_path):
    v = np.eye(4, dtype=np.float32)[:1]
    with Store(tmp_path / "private") as store:
        store.put(M, [sha(b"x")], v, owner="a")
        assert store.lookup(M, [sha(b"x")], owner="b")[0] is None
        assert store.lookup(M, [sha(b"x")], owner="a")[0] is not None
        assert store.forget([sha(b"x")], owner="b") == 0 and store.forget([sha(b"x")]) == 1
    with Store(tmp_path / "shared", cache_shared=True) as store:
        store.put(M, [sha(b"x")], v, owner="a")
        assert store.lookup(M, [sha(b"x")], owner="b")[0] is not None


def test_a_version_3_cache_is_upgraded_and_shared(tmp_path):
    v = np.eye(4, dtype=np.float32)[:1]
    with Store(tmp_path) as store:
        store.put(M, [sha(b"x")], v)
    with closing(sqlite3.connect(tmp_path / "store.sqlite3")) as db, db:  # the cache table as version 3 had it
        db.executescript("""
            CREATE TABLE old (model_id TEXT NOT NULL, sha256 TEXT NOT NULL, vector BLOB NOT NULL,
                              last_used INTEGER NOT NULL, crc INTEGER NOT NULL DEFAULT 0,
                              PRIMARY KEY (model_id, sha256));
            INSERT INTO old SELECT model_id, sha256, vector, last_used, crc FROM cache;
            DROP TABLE cache; ALTER TABLE old RENAME TO cache; CREATE INDEX cache_lru ON cache (last_used);
            PRAGMA user_version = 3;""")
    with Store(tmp_path) as store:
        np.testing.assert_array_equal(store.lookup(M, [sha(b"x")])[0], v[0])
        assert store.lookup(M, [sha(b"x")], owner="some-key")[0] is None


def test_a_damaged_key_file_refuses_every_caller(tmp_path):
    keys = KeyStore(tmp_path)
    key = keys.add("bot", "admin")[1]
    gate = Gate("", keys)
    assert gate.principal(f"Bearer {key}").role == "admin"
    good = (tmp_path / "keys.json").read_text()
    record = json.loads(good)["keys"]
    key_id = next(iter(record))
    for damaged in ("{not json", "[]", {"version": 1, "keys": []}, {"version": 2, "keys": record},
                    {"version": 1, "keys": {key_id: {**record[key_id], "role": "root"}}},
                    {"version": 1, "keys": {key_id: {**record[key_id], "collections": "pets"}}},
                    {"version": 1, "keys": {key_id: {"role": "admin"}}}):  # hand edits fail closed, never open
        (tmp_path / "keys.json").write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
        with pytest.raises(UnauthenticatedError, match="unreadable"):
            gate.principal(f"Bearer {key}")
        assert Gate("", KeyStore(tmp_path)).required  # a server started on it asks for keys too
    assert Gate("", KeyStore(tmp_path / "none")).principal(None) is None  # no token, no keys: nothing checked


@pytest.mark.parametrize("loss, problem", [("moved away", "is missing"), ("emptied", "holds no keys"),
                                          ("version 2", "is unreadable (version 2; this server reads version 1)")])
def test_a_server_that_had_keys_keeps_auth_on_when_the_key_file_goes(embedder, tmp_path, loss, problem):
    """Moving keys.json away, or replacing it with no keys or with a version the server does not read, made every
    call succeed without a key. Now both doors refuse every call, saying what is wrong with the file, until keys
    are added again. The HTTP door is the server's own (--http-port): it shares the gRPC port's gate, so a key
    only gRPC calls saw keeps HTTP closed too."""
    with running_server(embedder, data_dir=tmp_path, http_port=free_port()) as server:
        http_url = f"http://127.0.0.1:{server.http_port}"
        assert Rpc(server.address, None).code("ListModels", pb.ListModelsRequest()) == grpc.StatusCode.OK  # no keys
        key = new_key(KeyStore(tmp_path), "read")
        assert Rpc(server.address, key).code("ListModels", pb.ListModelsRequest()) == grpc.StatusCode.OK
        path = tmp_path / "keys.json"
        if loss == "moved away":
            path.rename(tmp_path / "keys.json.away")
        else:
            path.write_text(json.dumps({"version": 1 if loss == "emptied" else 2, "keys": {}}))
        for who in (None, key, "emb_made_up_key"):
            for message in refusal(server.address, http_url, who):
                assert f"key file {problem}" in message and "refused" in message, message
        path.unlink(missing_ok=True)  # what the message says: write a new file with `embedder keys add`
        again = new_key(KeyStore(tmp_path), "read")
        assert Rpc(server.address, again).code("ListModels", pb.ListModelsRequest()) == grpc.StatusCode.OK
        assert requests.get(f"{http_url}/v1/stats", headers={"Authorization": f"Bearer {again}"},
                            timeout=60).status_code == 200
        assert "missing `authorization`" in refusal(server.address, http_url, None)[1]


def test_a_damaged_key_file_is_a_401_json_error_over_http_and_stays_so_when_moved_away(embedder, tmp_path):
    """HTTP answered a damaged key file with a plain-text 500 (the DNS-rebinding guard asked the gate outside the
    error mapping) while gRPC said UNAUTHENTICATED; and moving the file away, as the message advised, opened the
    server until keys were added again."""
    (tmp_path / "keys.json").write_text('{"keys": [')
    with running_server(embedder, data_dir=tmp_path) as server, http_door(server) as door:
        for who in (None, "emb_made_up_key"):
            for message in refusal(server.address, door.url, who):
                assert "key file is unreadable (JSONDecodeError)" in message and "moved away first" in message
        (tmp_path / "keys.json").rename(tmp_path / "keys.json.damaged")
        for message in refusal(server.address, door.url, None):
            assert "key file is missing" in message


def test_a_keys_file_named_at_start_must_exist_and_hold_keys(embedder, tmp_path, capsys):
    """`serve --keys-file` naming no file started a server without auth, and `keys list` on it printed nothing
    with exit 0. Now the server refuses to start and `keys list` says there is no file (exit 2, NOT_FOUND); a
    named file that holds no keys (an empty Secret) refuses every call instead of opening the server."""
    secret = tmp_path / "secret" / "keys.json"
    started = subprocess.run([sys.executable, "-m", "embedder.cli", "serve", "--keys-file", str(secret), "--port", "0",
                              "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert started.returncode == 2, started.stderr
    assert "does not exist" in started.stderr and f"embedder keys add NAME --role ROLE --keys-file {secret}" in \
        started.stderr and "listening" not in started.stdout
    assert cli_main(["keys", "list", "--keys-file", str(secret)]) == 2
    assert "no keys file at" in capsys.readouterr().err
    secret.parent.mkdir()
    secret.write_text(json.dumps({"version": 1, "keys": {}}))
    with running_server(embedder, data_dir=tmp_path / "data", keys_file=str(secret)) as server, \
            http_door(server) as door:
        for message in refusal(server.address, door.url, None):
            assert "key file holds no keys" in message
        key = KeyStore(tmp_path, path=secret).add("bot", "read")[1]
        assert Rpc(server.address, key).code("ListModels", pb.ListModelsRequest()) == grpc.StatusCode.OK


def test_a_job_outside_a_keys_collections_is_answered_as_an_unknown_job(server, http, keys):
    """A key allowed only `pets` asking for a job on `toys` got PERMISSION_DENIED naming `toys`: it learnt that the
    job exists and its collection. Now it reads exactly what an unknown job id reads, through both doors."""
    jobs = server.service.jobs
    theirs = jobs.submit("finetune", {"collection": "toys"}, lambda job, cancel, progress: {})
    mine = jobs.submit("finetune", {"collection": "pets"}, lambda job, cancel, progress: {})
    key = new_key(keys, "write", ["pets"])
    rpc = Rpc(server.address, key)
    for method in ("GetJob", "CancelJob"):
        answers = []
        for job_id in (theirs.job_id, "finetune-no-such-job"):
            try:
                rpc(method, pb.GetJobRequest(job_id=job_id))
                raise AssertionError(f"{method} answered for {job_id}")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
                answers.append(e.details().replace(job_id, "ID"))
        assert answers[0] == answers[1] and "toys" not in answers[0]
    assert rpc("GetJob", pb.GetJobRequest(job_id=mine.job_id)).job_id == mine.job_id
    headers = {"Authorization": f"Bearer {key}"}
    for method, path in (("GET", "/v1/jobs/{}"), ("POST", "/v1/jobs/{}/cancel")):
        answers = []
        for job_id in (theirs.job_id, "finetune-no-such-job"):
            r = requests.request(method, http.url + path.format(job_id), headers=headers, timeout=60)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", r.text
            answers.append(r.json()["error"]["message"].replace(job_id, "ID"))
        assert answers[0] == answers[1] and "toys" not in answers[0]
    assert requests.get(f"{http.url}/v1/jobs/{mine.job_id}", headers=headers, timeout=60).status_code == 200
