"""The Milvus backend on real milvus-lite: filters against their reference meaning, kill -9 mid-add, a restart,
the ``--store`` setting's errors, two replicas on one Milvus server (milvus-lite's gRPC server in its own process,
reached by ``http://`` as a cluster is), and the whole service (``embedder serve --store milvus:///...``) under a
client.

The behaviour both backends share is tested in tests/test_store.py, parametrized over both.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import acked_until_killed
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_filters import HOSTILE, TREES
from test_filters import METADATA as RANDOM_METADATA

from embedder.config import Config
from embedder.errors import InvalidArgumentError, ModelMismatchError, NotFoundError, StoreUnavailableError
from embedder.filters import Compare, Exists, Not, describe, matches, parse
from embedder.store import Store
from embedder.store.milvus_where import quote, to_milvus_expression

M = "test-model@1"

# Every kind a value can have, missing fields, nulls, nesting, and strings that try to end their literal.
METADATA = [
    {"camera": "a", "year": 2020, "iso": 100, "ok": True, "exif": {"iso": 800, "lens": "50mm"}},
    {"camera": "b", "year": 2019, "iso": 1600.5, "ok": False, "tag": "cat"},
    {"camera": "a", "year": "2021", "tag": "dog", "exif": {"iso": "800"}},
    {"camera": 'quo"te\\', "year": 2021.0, "ok": 1, "reviewed": None},
    {"year": True, "tag": ["cat"], "exif": None, "camera": "b\nc"},
    {},
    {"camera": "ü-ß", "year": 2025, "iso": -3, "tag": "cat", "reviewed": "yes", "exif": {"lens": "35mm"}},
    {"camera": "a", "year": 1999, "dotted.key": 5, "nested": {"deep": {"x": 1}}},
]
FILTERS = [
    'camera == "a"', 'camera != "a"', "year >= 2020", "year < 2020", 'year == "2021"', "year == 2021",
    "year == true", "ok == true", "ok == 1", "ok != true", "iso > 99.5", "iso <= -3", 'camera < "b"',
    'camera >= "b"', 'tag in ["cat", "dog"]', 'tag in ["cat", 1, true]', "exists(reviewed)", "exists(exif)",
    "not exists(tag)", "exif.iso == 800", 'exif.iso == "800"', "exists(exif.lens)", "not exif.iso >= 100",
    "not year >= 2020", '(camera == "a" or camera == "b") and not exists(tag)', "nested.deep.x == 1",
    'camera == "quo\\"te\\\\"', 'camera == "b\\nc"', 'camera == "ü-ß"', "ok < true", "not ok > false",
    '{"camera": "a", "year": {">=": 2000}}',
    '{"$or": [{"tag": "cat"}, {"iso": {"<": 0}}], "reviewed": {"exists": false}}',
    'camera == "a\\" or true or \\"" or year == 1999', "year != 2020 or not exists(year)",
]


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "data", backend=f"milvus://{tmp_path}/m.db") as s:
        yield s


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_filters_compile_to_milvus_with_the_meaning_of_matches(store):
    ids = [f"m{i}" for i in range(len(METADATA))]
    labels = ["x" if i % 2 else None for i in range(len(METADATA))]
    store.add("c", ids, unit(len(ids), 8), model_id=M, metadata=METADATA, labels=labels)
    for text in FILTERS:
        tree = parse(text)
        want = [i for i, m in zip(ids, METADATA) if matches(tree, m)]
        assert {h.id for h in store.search("c", unit(1, 8, seed=1), k=len(ids), where=text)[0]} == set(want), \
            (text, to_milvus_expression(tree))
        assert store.vectors("c", where=text)[0] == want, describe(tree)
        assert store.labelled("c", where=text)[0] == [i for i, lab in zip(ids, labels) if i in want and lab]
    assert {h.id for h in store.search("c", unit(1, 8), k=8, label="x", where="year >= 2020")[0]} == {"m3"}


def test_quoting_keeps_caller_text_inside_its_literal(store):
    nasty = ['a"b', "a\\", '\\"', "x\n\r\t\x01\x7f", "' or id != '", '" or id != "', "ü\u2028"]
    store.add("c", nasty + ["plain"], unit(len(nasty) + 1, 4), model_id=M, labels=nasty + ["plain"])
    assert [i.id for i in store.get("c", nasty)] == nasty
    for label in nasty:
        assert [h.id for h in store.search("c", unit(1, 4), k=10, label=label)[0]] == [label]
    assert quote('a"b\\') == '"a\\"b\\\\"'


def test_kinds_guard_what_milvus_alone_would_get_wrong(store):
    store.add("c", ["num", "bool", "null", "none"], unit(4, 4), model_id=M,
              metadata=[{"v": 1}, {"v": True}, {"v": None}, {}])

    def ids(text: str) -> set[str]:
        return {h.id for h in store.search("c", unit(1, 4), k=4, where=text)[0]}

    assert ids("v == 1") == {"num"}  # Milvus alone: 1 == true
    assert ids("exists(v)") == {"num", "bool", "null"}  # Milvus alone: a null does not exist
    assert ids("not v == 1") == {"bool", "null", "none"}  # Milvus alone: not (missing == 1) is null, dropped


def test_collection_of_another_model_is_refused(store):
    store.add("c", ["a"], unit(1, 4), model_id=M)
    with pytest.raises(ModelMismatchError, match="holds vectors of model test-model@1"):
        store.add("c", ["b"], unit(1, 4), model_id="other@1")


def test_faiss_index_options_are_refused_not_ignored(store):
    for spec in ("flat:codes=sq8", "hnsw:codes=fp16", "hnsw:codes=sq8,rerank=40"):
        with pytest.raises(InvalidArgumentError, match="options of the FAISS backend"):
            store.create_collection("c", model_id="m", dim=4, index=spec)
    store.create_collection("c", model_id="m", dim=4, index="hnsw")


def test_store_setting_errors_say_what_to_do(tmp_path):
    for uri, message in [("milvus://relative.db", "absolute path ending in .db"),
                         ("milvus:///tmp/no-such-folder-here/x.db", "does not exist"),
                         ("milvus:///tmp/x.sqlite", "ending in .db"), ("ftp://host:1", "not a store"),
                         ("http://", "http\\(s\\)://host:port")]:
        with pytest.raises(InvalidArgumentError, match=message):
            Config(store=uri)
    with pytest.raises(ValueError, match="--store-token goes with a Milvus server"):
        Config(store_token="secret")
    assert Config.from_env({"EMBEDDER_STORE": f"milvus://{tmp_path}/x.db"}).store == f"milvus://{tmp_path}/x.db"
    with pytest.raises(StoreUnavailableError, match="cannot reach Milvus at http://127.0.0.1:1.*check that it runs"):
        Store(tmp_path / "data", backend="http://127.0.0.1:1")
    Store(tmp_path / "data").close()  # the failed open released the data dir
    without_pymilvus = ("import sys; sys.modules['pymilvus'] = None\n"  # as on an install without the extra
                        "from embedder.store import Store\n"
                        f"Store({str(tmp_path / 'data')!r}, backend='milvus://{tmp_path}/m.db')")
    run = subprocess.run([sys.executable, "-c", without_pymilvus], capture_output=True, text=True)
    assert "SettingError" in run.stderr and "pip install 'embedder[milvus]'" in run.stderr


CHILD = r"""
import sys
import numpy as np
from embedder.store import Store

data_dir, uri, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store(data_dir, backend=uri)  # never closed: the parent kills us
for i in range(start, start + 1_000_000):
    vector = np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)
    store.add("c", [f"id{i}"], vector, model_id="m", labels=[f"l{i % 3}"], metadata=[{"i": i}])
    print(i, flush=True)
    if i % 40 == 39:
        store.save()
"""


def _add_until_killed(data_dir, uri: str, start: int, kill_after: int) -> list[int]:
    return acked_until_killed([CHILD, str(data_dir), uri, str(start)], kill_after)


def test_kill_9_mid_adds_loses_nothing_acknowledged_and_a_restart_answers_the_same(tmp_path):
    uri = f"milvus://{tmp_path}/m.db"
    first = _add_until_killed(tmp_path / "data", uri, 0, kill_after=60)
    second = _add_until_killed(tmp_path / "data", uri, first[-1] + 1, kill_after=47)  # on the crashed store
    acked = first + second
    assert acked == list(range(len(acked)))
    q = np.random.default_rng(99).standard_normal((5, 64)).astype(np.float32)
    with Store(tmp_path / "data", backend=uri) as store:
        count = store.collection("c").count
        assert len(acked) <= count <= len(acked) + 2  # at most the add in flight per run, unanswered
        items = store.get("c", [f"id{i}" for i in range(acked[-1] + 3)])
        for i, item in enumerate(items):
            if i in set(acked):
                assert item is not None, f"acknowledged id{i} is missing"
            if item is not None:  # present means complete
                np.testing.assert_array_equal(item.vector, np.random.default_rng(i).standard_normal(64)
                                              .astype(np.float32))
                assert (item.label, item.metadata) == (f"l{i % 3}", {"i": i})
        before = store.search("c", q, k=10), store.search("c", q, k=5, label="l1")
    with Store(tmp_path / "data", backend=uri) as store:
        after = store.search("c", q, k=10), store.search("c", q, k=5, label="l1")
    for b, a in zip(before, after):
        assert [[h.id for h in row] for row in a] == [[h.id for h in row] for row in b]
        np.testing.assert_allclose([[h.score for h in row] for row in a], [[h.score for h in row] for row in b],
                                   atol=1e-6)


def test_the_service_runs_on_milvus_lite(tmp_path, cache_dir, embedder, photo_arrays):
    """``embedder serve --store milvus:///...`` on loopback: Add, Search, Get, Train, Stats through the client."""
    from conftest import jpeg_bytes

    from embedder.client import EmbedderClient

    base = photo_arrays["astronaut"]
    images = [jpeg_bytes(base[i * 7:i * 7 + 96, 3 * i:3 * i + 96]) for i in range(24)]
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "EMBEDDER_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--host", "127.0.0.1",
                             "--store", f"milvus://{tmp_path}/m.db"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        with EmbedderClient(line.split()[-1], timeout=60, retries=20) as client:
            labels = ["up" if i % 2 else "down" for i in range(len(images))]
            client.add("crops", images, [f"c{i}" for i in range(len(images))], labels=labels,
                       metadata=[{"i": i} for i in range(len(images))])
            hits = client.search(images[5], collection="crops", k=3)
            assert hits[0].id == "c5" and hits[0].score > 0.999 and hits[0].metadata == {"i": 5}
            hits = client.search(images[5], collection="crops", k=5, where={"i": {">=": 20}})  # filtered in Milvus
            assert sorted(h.metadata["i"] for h in hits) == [20, 21, 22, 23]
            assert [h.id for h in client.search(collection="crops", item_id="c5", k=3)][0] != "c5"
            item = client.get("crops", ["c7"])[0]
            np.testing.assert_allclose(item.vector, embedder.embed([images[7]])[0], atol=1e-5)
            head = client.train("crops", "logreg")
            assert sorted(head["classes"]) == ["down", "up"] and head["samples"] == len(images)
            stats = client.stats()
            assert [(c.name, c.count) for c in stats["collections"]] == [("crops", len(images))]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    with Store(tmp_path / "data", backend=f"milvus://{tmp_path}/m.db") as store:  # it all lives in Milvus
        assert store.collection("crops").labels == {"down": 12, "up": 12}
        assert store.images("crops", ["c3"]) == [images[3]]  # kept images too


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    """One milvus-lite collection that each example refills: filters are compiled, not looked up."""
    root = tmp_path_factory.mktemp("milvus-filters")
    with Store(root / "data", backend=f"milvus://{root}/m.db") as s:
        yield s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(TREES, st.lists(RANDOM_METADATA, min_size=1, max_size=8))
@example(Not(Compare(("a",), "==", 1)), [{}, {"a": True}, {"a": 1.0}, {"a": "1"}, {"a": None}])
@example(Exists(("a", "b")), [{"a": {"b": None}}, {"a": {"c": 1}}, {"a": [{"b": 1}]}, {"a": None}])
def test_milvus_expression_agrees_with_matches(filtered, f, rows):
    ids = [f"r{i}" for i in range(len(rows))]
    filtered.add("t", ids, unit(len(rows), 4), model_id=M, metadata=rows)
    filtered.delete("t", [f"r{i}" for i in range(len(rows), 8)])
    assert filtered._backend.vectors("t", f)[0] == [i for i, m in zip(ids, rows) if matches(f, m)], \
        to_milvus_expression(f)


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_values_match_literally_in_milvus(filtered, text):
    rows = [{"a": text}, {"a": text + "!"}, {"a": "other"}, {"b": text}]
    filtered.add("h", [f"h{i}" for i in range(4)], unit(4, 4), model_id=M, metadata=rows)
    for where in ({"a": text}, f"a == {json.dumps(text)}", {"a": {"in": [text, "nothing"]}}, {"a": {">=": text}}):
        f = parse(where)
        assert filtered.vectors("h", where=where)[0] == [f"h{i}" for i, m in enumerate(rows) if matches(f, m)]
    assert filtered.vectors("h", where={"a": text})[0] == ["h0"] and filtered.collection("h").count == 4


def test_replicas_share_one_milvus_with_no_store_node(tmp_path, milvus_server):
    """Two replicas (each its own data dir: cache, heads, keys) on one Milvus server see one set of collections."""
    x = unit(40, 8)
    with Store(tmp_path / "a", backend=milvus_server) as a, Store(tmp_path / "b", backend=milvus_server) as b:
        a.add("shared", [f"i{j}" for j in range(20)], x[:20], model_id=M, labels=["l"] * 20)
        assert [c.name for c in b.list_collections()] == ["shared"]
        assert b.search("shared", x[3:4], k=1)[0][0].id == "i3"  # a's adds, acknowledged, are b's to read
        b.add("shared", [f"i{j}" for j in range(20, 40)], x[20:], model_id=M)
        assert a.search("shared", x[30:31], k=1)[0][0].id == "i30" and a.collection("shared").count == 40
        with pytest.raises(ModelMismatchError):
            b.add("shared", ["z"], x[:1], model_id="other@1")  # the binding a created holds for b too
        b.set_labels("shared", {"i1": "changed"})
        assert a.get("shared", ["i1"])[0].label == "changed"
        a.delete_collection("shared")
        with pytest.raises(NotFoundError):
            b.search("shared", x[:1], k=1)
        assert b.search(None, x[:1], k=1) == [[]]


def test_heads_follow_the_store_across_replicas(tmp_path, milvus_server, embedder, digit_images):
    """Two servers (`--role all`, each its own data dir) on one Milvus: a head trained on one is listed, used,
    replaced and deleted through the other; a damaged head in Milvus is DATA_LOSS on either (persist's checks)."""
    import base64

    from pymilvus import MilvusClient

    from conftest import running_server

    from classifier import HeadFormatError, HeadRegistry
    from embedder.client import EmbedderClient
    from embedder.client.errors import ServiceError

    images, labels = digit_images
    ids = [f"d{i}" for i in range(len(images))]
    with running_server(embedder, store=milvus_server, data_dir=tmp_path / "a") as a, \
            running_server(embedder, store=milvus_server, data_dir=tmp_path / "b") as b, \
            EmbedderClient(a.address, timeout=120) as on_a, EmbedderClient(b.address, timeout=120) as on_b:
        on_a.add("digits", images, ids, labels=labels)
        trained = on_a.train("digits", "logreg", head_id="digits")
        assert [h["head_id"] for h in on_b.list_heads()] == ["digits"]
        assert on_b.predict("digits", images[:3])[0].labels == on_a.predict("digits", images[:3])[0].labels
        assert [p.label for p in on_b.predict("digits", ids=ids[::10], collection="digits")] == labels[::10]
        assert on_b.stats()["heads"] == 1

        on_b.train("digits", "logreg", head_id="digits", labels=["0", "1"])  # replaced through b, cached on a
        assert trained["classes"] != ["0", "1"]
        assert {p.label for p in on_a.predict("digits", images)} == {"0", "1"}
        assert sorted(on_a.list_heads()[0]["classes"]) == ["0", "1"]

        milvus = MilvusClient(uri=milvus_server)
        try:
            row = milvus.query("embedder_heads", filter='file == "head.safetensors" and chunk == 0',
                               output_fields=["*"], limit=1)[0]
            data = bytearray(base64.b64decode(row["data"]))
            data[-1] ^= 1  # one bit of the arrays
            milvus.upsert("embedder_heads", [{**row, "data": base64.b64encode(bytes(data)).decode()}])
        finally:
            milvus.close()
        with Store(tmp_path / "c", backend=milvus_server) as store, \
                pytest.raises(HeadFormatError, match="saved head 'digits': head.safetensors does not match"):
            HeadRegistry(store.shared_files("heads")).get("digits")  # a third replica, which loads it now

        on_a.delete_head("digits")  # loaded on both: b must notice without a restart
        for client in (on_a, on_b):
            assert client.list_heads() == []
            with pytest.raises(ServiceError) as e:
                client.predict("digits", images[:1])
            assert e.value.code.name == "NOT_FOUND"
    assert not list((tmp_path / "a" / "heads").glob("*")) and not list((tmp_path / "b" / "heads").glob("*"))



def test_replicas_read_one_keys_file_and_are_warned_about_their_own(tmp_path, milvus_server, embedder, capsys,
                                                                      caplog):
    """--keys-file: one file (a mounted Secret) for every replica, so a key added or revoked reaches all; a replica
    on a Milvus server reading its data dir's own keys file says so."""
    import grpc
    from conftest import running_server

    from embedder._proto import embedder_pb2 as pb
    from embedder._proto import embedder_pb2_grpc as pb_grpc
    from embedder.cli import main as cli_main
    from embedder.core.service import open_data_dir

    shared = tmp_path / "secret" / "keys.json"
    shared.parent.mkdir()

    def code(server, key: str) -> grpc.StatusCode:
        with grpc.insecure_channel(server.address) as channel:
            try:
                pb_grpc.EmbedderStub(channel).ListModels(pb.ListModelsRequest(), timeout=30,
                                                         metadata=[("authorization", f"Bearer {key}")])
            except grpc.RpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    assert cli_main(["keys", "add", "bot", "--role", "read", "--keys-file", str(shared)]) == 0
    key = capsys.readouterr().out.split()[-1]
    assert cli_main(["keys", "add", "other", "--keys-file", str(shared)]) == 0  # keys stay on after the revoke
    with running_server(embedder, store=milvus_server, data_dir=tmp_path / "a", keys_file=str(shared)) as a, \
            running_server(embedder, store=milvus_server, data_dir=tmp_path / "b", keys_file=str(shared)) as b:
        assert [code(a, key), code(b, key), code(b, "emb_made_up")] == [grpc.StatusCode.OK, grpc.StatusCode.OK,
                                                                        grpc.StatusCode.UNAUTHENTICATED]
        assert cli_main(["keys", "revoke", key.split("_")[1], "--keys-file", str(shared)]) == 0
        assert [code(a, key), code(b, key)] == [grpc.StatusCode.UNAUTHENTICATED] * 2  # both, from the next call
    assert not (tmp_path / "a" / "keys.json").exists() and "this replica's own file" not in caplog.text

    own = tmp_path / "c"
    assert cli_main(["keys", "add", "local", "--data-dir", str(own)]) == 0
    store, _, _ = open_data_dir(Config(data_dir=own, store=milvus_server))
    store.close()
    assert "keys.json, this replica's own file" in caplog.text and "--keys-file" in caplog.text


def test_heads_saved_in_the_data_dir_before_move_into_milvus_once(tmp_path, caplog):
    """A data dir from before heads followed the store: its heads are copied into Milvus on open (an id Milvus
    holds keeps Milvus's head) and the folder is renamed, so a head deleted later does not come back."""
    from classifier import HeadRegistry, make_head, save_head

    from embedder.core.service import open_data_dir

    x = unit(20, 8)
    for head_id, labels in (("old", ["a", "b"]), ("taken", ["c", "d"])):
        save_head(make_head("logreg").fit(x, labels * 10, model_id=M), tmp_path / "data" / "heads", head_id=head_id)
    config = Config(data_dir=tmp_path / "data", store=f"milvus://{tmp_path}/m.db")
    with Store(tmp_path / "other", backend=config.store) as store:  # Milvus already holds a head "taken"
        HeadRegistry(store.shared_files("heads")).train(x, ["e", "f"] * 10, model_id=M, head_id="taken")
    store, heads, _ = open_data_dir(config)
    try:
        assert {h.head_id: h.classes for h in heads.list()} == {"old": ["a", "b"], "taken": ["e", "f"]}
        assert not (tmp_path / "data" / "heads").exists() and "taken: not copied" in caplog.text
        heads.delete("old")
    finally:
        store.close()
    store, heads, _ = open_data_dir(config)
    try:
        assert [h.head_id for h in heads.list()] == ["taken"]
    finally:
        store.close()



def test_a_backbone_version_made_on_one_replica_embeds_on_another(tmp_path, milvus_server, embedder, digit_images,
                                                                   cache_dir, restore_registry):
    """AdaBN on replica a publishes the version to Milvus; replica b (its own process: the backbone registry is
    per process), started before the version existed, fetches it when a call names it and embeds as a does."""
    from conftest import running_server

    from embedder.client import EmbedderClient

    images = digit_images[0][:12]
    ids = [f"d{i}" for i in range(len(images))]
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "EMBEDDER_DATA_DIR": str(tmp_path / "b")}
    proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--host", "127.0.0.1",
                             "--store", milvus_server], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        with running_server(embedder, store=milvus_server, data_dir=tmp_path / "a") as a, \
                EmbedderClient(a.address, timeout=300) as on_a, \
                EmbedderClient(line.split()[-1], timeout=300, retries=20) as on_b:
            on_a.add("digits", images, ids)
            job = on_a.wait_job(on_a.finetune("digits", "shared", method="adabn")["job_id"], timeout=600)
            name = job["result"]["name"]
            assert job["state"] == "finished" and not (tmp_path / "b" / "backbones" / name).exists()
            on_a.add("on-a", images, ids, model=name)
            on_b.add("on-b", images, ids, model=name)  # b fetches the version from Milvus on first use
            assert (tmp_path / "b" / "backbones" / name / "weights.safetensors").is_file()
            mine, theirs = on_a.get("on-a", ids), on_b.get("on-b", ids)
            np.testing.assert_allclose(np.stack([s.vector for s in theirs]), np.stack([s.vector for s in mine]),
                                       atol=1e-5)
            assert on_b.stats()["collections"][-1].model_id == job["result"]["model_id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
