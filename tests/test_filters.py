"""Metadata filters: the parser, the SQLite compilation held to the reference meaning (filters.matches) by a
property test, hostile text, and filtered search on real FAISS + SQLite (k hits whenever k items match)."""
from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from embedder import filters
from embedder.errors import InvalidArgumentError
from embedder.filters import And, Compare, Exists, In, Not, Or
from embedder.store import Store
from embedder.store.sqlite import connect
from embedder.store.validation import metadata_json
from embedder.store.where import where_sql

M = "test-model@1"
HOSTILE = ["'); DROP TABLE items; --", '"; DROP TABLE items; --', "$", "$.a", "a' OR '1'='1", "\\", "\\u0000",
           "x\x00y", "\x00", "é✓😀", "\u202e", "%", "_", "*", "NULL", ""]


# --- parser ---

@pytest.mark.parametrize("text, tree", [
    ('camera == "a"', Compare(("camera",), "==", "a")),
    ("year >= 2020 and year < 2023.5", And((Compare(("year",), ">=", 2020), Compare(("year",), "<", 2023.5)))),
    ("tag in ['cat', \"dog\", 3, true]", In(("tag",), ("cat", "dog", 3, True))),
    ("not exists(reviewed) or exif.iso != 800", Or((Not(Exists(("reviewed",))), Compare(("exif", "iso"), "!=", 800)))),
    ("(a == 1 or b == 2) and c-d == false", And((Or((Compare(("a",), "==", 1), Compare(("b",), "==", 2))),
                                                 Compare(("c-d",), "==", False)))),
    ('{"camera": "a", "year": {">=": 2020, "<": 2023}, "tag": {"in": ["x"]}, "seen": {"exists": false}}',
     And((Compare(("camera",), "==", "a"), Compare(("year",), ">=", 2020), Compare(("year",), "<", 2023),
          In(("tag",), ("x",)), Not(Exists(("seen",)))))),
    ('{"$or": [{"a": 1}, {"$not": {"b": true}}]}', Or((Compare(("a",), "==", 1), Not(Compare(("b",), "==", True))))),
])
def test_parse_text_and_json_forms(text, tree):
    assert filters.parse(text) == tree
    assert filters.parse(filters.describe(tree)) == tree  # describe writes what parse reads back


def test_parse_empty_is_no_filter():
    assert filters.parse(None) is None and filters.parse("  ") is None and filters.parse({}) is None


@pytest.mark.parametrize("text, part", [
    ("camera = 'a'", "'='"),
    ("year >=", "expected a value"),
    ("a == 1 and", "expected a field name"),
    ("(a == 1", "expected ')'"),
    ("a in []", "expected a value"),
    ("a == [1]", "expected a value"),
    ("a ~ 1", "'~'"),
    ("a == 'x' ; DROP TABLE items", "';'"),
    ("a.'b' == 1", "unexpected '.' at character 2"),
    ("a == 1e999", "not a finite number"),
    ("a < 9223372036854775808", "64-bit integer range"),
    ('{"a": {">": -9223372036854775809}}', "64-bit integer range"),
    ('{"a": {"like": "x%"}}', "unknown operator 'like'"),
    ('{"a": [1, 2]}', "a value must be"),
    ('{"a b": 1}', "is not a field name"),
    ('{"a": {"exists": 1}}', "exists takes true or false"),
    ("{not json", "does not parse"),
    ("not " * 20 + "a == 1", "nesting deeper"),
])
def test_parse_refuses_and_names_the_part(text, part):
    with pytest.raises(InvalidArgumentError, match="where") as e:
        filters.parse(text)
    assert part in str(e.value)


def test_parse_refuses_non_text():
    with pytest.raises(InvalidArgumentError, match="text or a JSON object"):
        filters.parse(42)  # type: ignore[arg-type]


# --- the SQL agrees with filters.matches ---

NAMES = ["a", "b", "x-y", "_z"]
FIELDS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=2).map(tuple)
SCALARS = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, 3),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.5, -0.0, 1.0, 2.5]),
                    st.text(max_size=4), st.sampled_from(["", "a", "b", "a\x00", "a\x00b", "\\u0000", "é", "😀"]),
                    st.booleans())
JSON = st.recursive(st.one_of(SCALARS, st.none()),
                    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(NAMES), inner,
                                                                                max_size=3), max_leaves=6)
METADATA = st.dictionaries(st.sampled_from(NAMES), JSON, max_size=4)
FILTER_VALUES = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, 3),
                          st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.5, -0.0, 1.0, 2.5]),
                          st.text(max_size=4), st.sampled_from(["", "a", "b", "a\x00b", "é"]), st.booleans())
LEAVES = st.one_of(
    st.builds(Compare, FIELDS, st.sampled_from(filters.COMPARISONS), FILTER_VALUES),
    st.builds(In, FIELDS, st.lists(FILTER_VALUES, min_size=1, max_size=4).map(tuple)),
    st.builds(Exists, FIELDS))
TREES = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, min_size=2, max_size=3).map(lambda p: And(tuple(p))),
    st.lists(inner, min_size=2, max_size=3).map(lambda p: Or(tuple(p))),
    st.builds(Not, inner)), max_leaves=6)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """The store's own connection (with the functions it registers), and a table of just metadata."""
    conn = connect(tmp_path_factory.mktemp("where") / "store.sqlite3")
    conn.execute("CREATE TABLE t (fid INTEGER PRIMARY KEY, metadata TEXT NOT NULL)")
    yield conn
    conn.close()


def selected(db: sqlite3.Connection, f, rows: list[dict]) -> list[int]:
    db.execute("DELETE FROM t")
    db.executemany("INSERT INTO t VALUES (?, ?)", [(i, metadata_json(m, str(i))) for i, m in enumerate(rows)])
    sql, params = where_sql(f)
    return [fid for (fid,) in db.execute(f"SELECT fid FROM t WHERE {sql} ORDER BY fid", params)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(TREES, st.lists(METADATA, max_size=8))
@example(Compare(("a",), ">", "a"), [{"a": "a\x00b"}, {"a": "a"}])  # json_extract cuts strings at NUL
@example(Not(Compare(("a",), "==", 1)), [{}, {"a": True}, {"a": 1.0}, {"a": "1"}])
@example(Compare(("a",), "==", True), [{"a": 1}, {"a": True}, {"a": None}])
@example(Compare(("a", "b"), "<", 3), [{"a": {"b": 2}}, {"a": [{"b": 2}]}, {"a": "b"}])
def test_sql_agrees_with_matches(db, f, rows):
    assert selected(db, f, rows) == [i for i, m in enumerate(rows) if filters.matches(f, m)]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_values_match_literally(db, text):
    rows = [{"a": text}, {"a": text + "!"}, {"a": "other"}, {"b": text}]
    for f in (Compare(("a",), "==", text), filters.parse({"a": text}), filters.parse(f"a == {json.dumps(text)}"),
              In(("a",), (text, "nothing")), Compare(("a",), ">=", text)):
        assert selected(db, f, rows) == [i for i, m in enumerate(rows) if filters.matches(f, m)]
    assert selected(db, Compare(("a",), "==", text), rows) == [0]
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 4  # nothing was dropped or changed


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(name):
    for where in ({name: 1}, f"{name} == 1", f"exists({name})"):
        if name in ("NULL", "_"):  # plain names
            assert filters.parse(where) is not None
            continue
        with pytest.raises(InvalidArgumentError, match="where"):
            filters.parse(where)


# --- the store: filtered search on real FAISS + SQLite ---

def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def meta(i: int) -> dict:
    """Synthetic metadata: g is i % 100 (1% per value), some items lack year, camera nests."""
    m = {"g": i % 100, "camera": {"make": "abc"[i % 3]}, "tag": f"t{i % 10}", "ok": i % 2 == 0}
    if i % 4:
        m["year"] = 2000 + i % 30
    return m


N, D = 2000, 32
X = unit(N, D, seed=1)
IDS = [f"item{i}" for i in range(N)]
METAS = [meta(i) for i in range(N)]
LABELS = ["cat" if i % 3 == 0 else "dog" for i in range(N)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with Store(tmp_path_factory.mktemp("filtered")) as s:
        s.create_collection("flat", model_id=M, dim=D, index="flat")
        s.create_collection("hnsw", model_id=M, dim=D, index="hnsw")
        for name in ("flat", "hnsw"):
            s.add(name, IDS, X, model_id=M, metadata=METAS, labels=LABELS)
        s.delete("hnsw", IDS[:50])  # tombstones in the graph must stay out of filtered answers too
        yield s


def exact(q: np.ndarray, keep: list[int], k: int) -> list[str]:
    scores = X[keep] @ q
    return [IDS[keep[j]] for j in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("name", ["flat", "hnsw"])
@pytest.mark.parametrize("where", ["g == 7", {"g": {"in": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}}, "ok == true",
                                   "camera.make == 'b' and not exists(year)", "g >= 40"])
def test_k_hits_whenever_k_match(store, name, where):
    f = filters.parse(where)
    first = 50 if name == "hnsw" else 0
    keep = [i for i in range(first, N) if filters.matches(f, METAS[i])]
    q = unit(3, D, seed=2)
    for row, hits in zip(q, store.search(name, q, k=10, where=where)):
        assert len(hits) == min(10, len(keep)) and all(filters.matches(f, h.metadata) for h in hits)
        if len(keep) < 0.5 * (N - first) or name == "flat":  # exact: flat, and HNSW over a small selection
            assert [h.id for h in hits] == exact(row, keep, 10)


@pytest.mark.parametrize("name", ["flat", "hnsw"])
def test_fewer_matches_than_k_come_back_all(store, name):
    hits = store.search(name, unit(1, D, seed=3), k=50, where="g == 77 and year < 2010")[0]
    keep = [i for i in range(50 if name == "hnsw" else 0, N) if i % 100 == 77 and METAS[i].get("year", 9999) < 2010]
    assert sorted(h.id for h in hits) == sorted(IDS[i] for i in keep) and keep


def test_label_and_where_combine(store):
    q = unit(1, D, seed=4)
    hits = store.search("flat", q, k=10, label="cat", where={"tag": "t3"})[0]
    keep = [i for i in range(N) if LABELS[i] == "cat" and METAS[i]["tag"] == "t3"]
    assert [h.id for h in hits] == exact(q[0], keep, 10)
    assert store.search("flat", q, k=10, label="cat", where="camera.make == 'b'")[0] == []  # cats are make 'a'
    assert len(store.search("flat", q, k=10, label="dog", where="camera.make == 'b'")[0]) == 10


def test_search_by_id_and_across_collections(store):
    hits = store.search_by_id("flat", "item7", k=5, where="g == 7")
    assert len(hits) == 5 and all(h.metadata["g"] == 7 and h.id != "item7" for h in hits)
    q = unit(1, D, seed=5)
    both = store.search(None, q, k=40, where="g == 42")[0]
    assert {h.collection for h in both} == {"flat", "hnsw"} and len(both) == 20 + 19  # hnsw lost item42
    assert all(h.metadata["g"] == 42 for h in both)


def test_training_and_candidate_selection(store):
    ids, x, labels = store.labelled("flat", labels=["dog"], where="year >= 2025")
    want = [IDS[i] for i in range(N) if LABELS[i] == "dog" and METAS[i].get("year", 0) >= 2025]
    assert ids == want and labels == ["dog"] * len(want) and np.allclose(x, X[[IDS.index(i) for i in ids]])
    ids, x = store.vectors("flat", where="not exists(year)")
    assert ids == [IDS[i] for i in range(0, N, 4)] and x.shape == (N // 4, D)
    with pytest.raises(InvalidArgumentError, match="by ids or by where"):
        store.labelled("flat", ids=["item0"], where="g == 0")


def test_pre_selection_reads_only_the_metadata_index(tmp_path):
    """The rows hold vectors in overflow pages; the filter must be answered from items_metadata (schema version 5,
    added to a version 4 store on open)."""
    with Store(tmp_path) as s:
        s.add("c", ["a"], unit(1, D), model_id=M, metadata=[{"g": 1}])
    with sqlite3.connect(tmp_path / "store.sqlite3") as db:
        db.execute("DROP INDEX items_metadata")
        db.execute("PRAGMA user_version = 4")
    with Store(tmp_path) as s:
        assert [h.id for h in s.search("c", unit(1, D), where="g == 1")[0]] == ["a"]
    sql, params = where_sql(filters.parse("g == 1 and exists(h)"))
    with sqlite3.connect(tmp_path / "store.sqlite3") as db:
        plan = db.execute(f"EXPLAIN QUERY PLAN SELECT fid FROM items WHERE cid = ? AND {sql}",
                          [1, *params]).fetchall()
    assert "COVERING INDEX items_metadata" in plan[0][3]


def test_a_repeated_filter_sees_every_write(tmp_path):
    """Selections are reused while the collection is unchanged; adds, replacements, deletes and labels show at once."""
    q = unit(1, D, seed=6)

    def found(**kw) -> set[str]:
        return {h.id for h in s.search("c", q, k=50, **kw)[0]}

    with Store(tmp_path) as s:
        s.add("c", ["a", "b"], unit(2, D), model_id=M, metadata=[{"g": 1}, {"g": 2}])
        assert found(where="g == 1") == {"a"}
        s.add("c", ["c"], unit(1, D, seed=7), model_id=M, metadata=[{"g": 1}])
        assert found(where="g == 1") == {"a", "c"}
        s.add("c", ["a"], unit(1, D), model_id=M, metadata=[{"g": 2}])  # replaced: no longer passes
        assert found(where="g == 1") == {"c"} and found(where="g == 1.0") == {"c"}
        s.delete("c", ["c"])
        assert found(where="g == 1") == set() and found(where="g == 2") == {"a", "b"}
        s.set_labels("c", {"b": "x"})
        assert found(where="g == 2", label="x") == {"b"}
        s.set_labels("c", {"b": None, "a": "x"})
        assert found(where="g == 2", label="x") == {"a"}


@pytest.mark.parametrize("where", ["g ==", "g == 'x') OR 1=1 --", {"g": {"$regex": "."}}, 7])
def test_bad_filter_is_invalid_argument(store, where):
    with pytest.raises(InvalidArgumentError, match="where"):
        store.search("flat", unit(1, D), k=3, where=where)


@pytest.mark.parametrize("where", [
    {"$or": [{"a": i} for i in range(2000)]},  # SQLite: "Expression tree is too large" (a 500) before the cap
    {f"k{i}": i for i in range(20_000)},
    {"$or": [{"a": {"in": list(range(1000))}} for _ in range(40)]},  # Milvus: minutes of CPU before the cap
])
def test_wide_filters_are_refused_before_any_engine_sees_them(store, where):
    with pytest.raises(InvalidArgumentError, match="at most 256 and 1024"):
        store.search("flat", unit(1, D), k=3, where=where)
    within = {"$or": [{"a": {"in": list(range(4))}} for _ in range(256)]}  # the caps themselves pass
    assert len(store.search("flat", unit(1, D), k=3, where=within)[0]) <= 3


def test_hostile_filter_values_in_the_store(store, tmp_path):
    with Store(tmp_path) as s:
        s.add("c", [f"h{i}" for i in range(len(HOSTILE))], unit(len(HOSTILE), D), model_id=M,
              metadata=[{"note": t} for t in HOSTILE])
        for i, text in enumerate(HOSTILE):
            hits = s.search("c", unit(1, D), k=len(HOSTILE), where={"note": text})[0]
            assert [h.id for h in hits] == [f"h{i}"]
        assert s.collection("c").count == len(HOSTILE)


# --- every door: a real server on loopback with the real model ---

PHOTO_IDS = [f"p{i}" for i in range(12)]  # the six photos twice: the second copies come from the cache
PHOTO_META = [{"camera": "ab"[i % 2], "year": 2018 + i, **({"exif": {"iso": 400 * i}} if i in (3, 5, 9) else {})}
              for i in range(12)]
PHOTO_LABELS = [("cat" if i % 2 == 0 else "dog") if i < 10 else None for i in range(12)]


def passing(where) -> set[str]:
    f = filters.parse(where)
    return {i for i, m in zip(PHOTO_IDS, PHOTO_META) if filters.matches(f, m)}


@pytest.fixture(scope="module")
def doors(embedder, photos):
    """A gRPC server and the HTTP door over its service, with six photos stored under PHOTO_META."""
    from conftest import http_door, running_server

    from embedder.client import EmbedderClient

    with running_server(embedder) as server:
        with http_door(server) as http:
            with EmbedderClient(server.address, timeout=120) as client:
                client.add("photos", photos + photos, PHOTO_IDS, labels=PHOTO_LABELS, metadata=PHOTO_META)
                query = client.get("photos", ["p0"])[0].vector
            yield server, http, query


def test_grpc_client_round_trip(doors):
    import grpc

    from embedder.client import EmbedderClient, ServiceError

    server, _, query = doors
    with EmbedderClient(server.address, timeout=120) as client:
        for where in ("camera == 'a' and year >= 2020", {"camera": "b", "exif.iso": {"<": 3000}},
                      '{"$or": [{"year": 2018}, {"exif": {"exists": true}}]}'):
            hits = client.search(vector=query, collection="photos", k=12, where=where)
            assert {h.id for h in hits} == passing(where)
        assert {h.id for h in client.search(vector=query, k=12, where="year < 2020")} == {"p0", "p1"}  # all colls.
        hits = client.search(collection="photos", item_id="p0", k=12, where="camera == 'a'", label="cat")
        assert {h.id for h in hits} == {"p2", "p4", "p6", "p8"}
        assert client.train("photos", where="year <= 2025", head_id="filtered")["samples"] == 8
        assert client.suggest("photos", where="year >= 2029")["candidates"] == 1
        assert client.label_issues("photos", where="year <= 2025", folds=3)["checked"] == 8
        with pytest.raises(ServiceError) as e:
            client.search(vector=query, collection="photos", where="year >> 2020")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'>'" in str(e.value)
        with pytest.raises(ServiceError) as e:
            client.train("photos", where="year == 1999")
        assert "whose metadata passes year == 1999" in str(e.value)
        with pytest.raises(ServiceError) as e:
            client.suggest("photos", ids=["p11"], where="year >= 2029")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in str(e.value)


def test_async_client_round_trip(doors):
    import asyncio

    from embedder.client.aio import AsyncEmbedderClient

    server, _, query = doors

    async def main() -> list:
        async with AsyncEmbedderClient(server.address, timeout=120) as client:
            return await client.search(vector=query, collection="photos", k=6, where={"year": {"in": [2019, 2021, 2000]}})

    assert {h.id for h in asyncio.run(main())} == {"p1", "p3"}


def test_http_round_trip(doors):
    import requests

    _, http, query = doors
    vector = [float(v) for v in query]
    for where in ("camera == 'b' and not exists(exif)", {"year": {">": 2019, "<=": 2022}}):
        r = requests.post(f"{http.url}/v1/search", json={"collection": "photos", "vector": vector, "k": 12,
                                                      "where": where}, timeout=120)
        assert r.status_code == 200, r.text
        assert {h["id"] for h in r.json()["hits"]} == passing(where)
    r = requests.post(f"{http.url}/v1/collections/photos/suggest", json={"where": {"camera": "a"}}, timeout=120)
    assert r.status_code == 200 and r.json()["candidates"] == 1, r.text  # p10
    r = requests.post(f"{http.url}/v1/search", json={"collection": "photos", "vector": vector,
                                                  "where": {"year": {"~": 1}}}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_argument"
    assert "unknown operator '~'" in r.json()["error"]["message"]


def test_cli_round_trip(doors, capsys, monkeypatch):
    from embedder.cli import main

    server, _, _ = doors
    for key in [k for k in os.environ if k.startswith("EMBEDDER_")]:
        monkeypatch.delenv(key)
    where = 'camera == "a" or exif.iso >= 1000'
    code = main(["search", "--id", "p1", "--collection", "photos", "-k", "12", "--where", where, "--json",
                 "--server", server.address])
    assert code == 0
    assert {h["id"] for h in json.loads(capsys.readouterr().out)} == passing(where) - {"p1"}
    code = main(["suggest", "--collection", "photos", "--where", '{"year": {">=": 2029}}', "--json",
                 "--server", server.address])
    assert code == 0 and json.loads(capsys.readouterr().out)["candidates"] == 1
    code = main(["search", "--id", "p1", "--collection", "photos", "--where", "camera == ", "--server",
                 server.address])
    assert code == 2 and "where: camera ==: expected a value" in capsys.readouterr().err


def test_cli_add_stores_metadata_and_searches_every_collection(doors, photos, tmp_path, capsys, monkeypatch):
    """`add --metadata` gives every file added the object (so the CLI can --where on what it stored); `search`
    without --collection searches every collection, naming each hit's."""
    from embedder.cli import main

    server, _, query = doors
    for key in [k for k in os.environ if k.startswith("EMBEDDER_")]:
        monkeypatch.delenv(key)
    folder = tmp_path / "shots"
    folder.mkdir()
    for i, photo in enumerate(photos[:2]):
        (folder / f"s{i}.jpg").write_bytes(photo)
    assert main(["add", str(folder), "--collection", "cli-meta", "--metadata", '{"camera": "z", "year": 1990}',
                 "--server", server.address, "-q"]) == 0
    capsys.readouterr()
    image = folder / "s0.jpg"
    assert main(["search", str(image), "--where", 'camera == "z"', "--json", "--server", server.address]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert {(h["collection"], h["id"]) for h in hits} == {("cli-meta", "s0.jpg"), ("cli-meta", "s1.jpg")}
    assert hits[0]["metadata"] == {"camera": "z", "year": 1990}
    assert main(["search", str(image), "-k", "3", "--server", server.address]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "collection/id" in table[0] and len(table) == 4
    assert main(["add", str(folder), "--collection", "cli-meta", "--metadata", "[1]", "--server",
                 server.address]) == 2
    assert "--metadata must be a JSON object" in capsys.readouterr().err
