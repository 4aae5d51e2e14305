"""Compressed FAISS indexes (fp16 and sq8 codes, flat and HNSW, optional re-ranking) on real FAISS and SQLite.

Each kind goes through the Store: add, delete, search (plain, label- and metadata-filtered), restart from its snapshot,
rebuild from SQLite. Recall is checked against brute-force numpy cosine over clustered vectors; the floors
sit below what the kinds reach here (sq8 codes ~0.97-1.0, HNSW defaults ~0.99) so they fail only on a break.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from embedder.errors import InvalidArgumentError
from embedder.index import TRAIN_SIZE, IndexSpec, VectorIndex
from embedder.store import Store

M = "test-model@1"
DIM = 48
N = TRAIN_SIZE + 1500  # past the sq8 training size, so the codes are trained
RECALL_FLOOR = 0.9
COMPRESSED = ["flat:codes=fp16", "flat:codes=sq8", "hnsw:codes=fp16", "hnsw:codes=sq8", "hnsw:codes=sq8,rerank=30"]


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 40 shared centres, so neighbours are close (as image embeddings are)."""
    centres = np.random.default_rng(123).standard_normal((40, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(got: list[list[str]], want: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, want)]))


def exact(x: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> list[list[str]]:
    return [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in q @ x.T]


def hit_ids(hits) -> list[list[str]]:
    return [[h.id for h in row] for row in hits]


# --- the spec ---

@pytest.mark.parametrize("text, canonical", [
    ("flat:codes=sq8", "flat:codes=sq8"),
    ("FLAT:codes=FP16,rerank=20", "flat:codes=fp16,rerank=20"),
    ("hnsw:codes=sq8", "hnsw:m=32,ef_construction=40,ef_search=64,codes=sq8"),
    ("hnsw:rerank=50, codes=sq8, m=16", "hnsw:m=16,ef_construction=40,ef_search=64,codes=sq8,rerank=50"),
    ("hnsw", "hnsw:m=32,ef_construction=40,ef_search=64"),  # collections made before codes keep their string
    ("flat:codes=float32", "flat"),
])
def test_spec_strings_round_trip(text, canonical):
    spec = IndexSpec.parse(text)
    assert str(spec) == canonical and IndexSpec.parse(canonical) == spec


@pytest.mark.parametrize("index, message", [
    ("flat:codes=pq8", r"codes must be one of float32, fp16, sq8"),
    ("hnsw:codes=", "bad index option 'codes='"),
    ("hnsw:rerank=20", "scores them exactly already; add codes=sq8"),
    ("flat:rerank=5", "scores them exactly already"),
    ("hnsw:codes=sq8,rerank=1001", r"rerank must be an int in \[0, 1000\]"),
    ("hnsw:codes=sq8,rerank=-1", "bad index option 'rerank=-1'"),
    ("flat:codes=sq8,m=16", "'flat' takes only codes and rerank"),
    ("ivf:codes=sq8", "'flat'.*'hnsw'"),
    ("flat:codes=fp16,codes=sq8", "'codes' is given twice"),  # the last one silently won
])
def test_bad_specs_are_refused_naming_the_fix(tmp_path, index, message):
    with Store(tmp_path) as store:
        with pytest.raises(InvalidArgumentError, match=message):
            store.create_collection("c", model_id=M, dim=DIM, index=index)
        assert store.list_collections() == []


# --- each kind through the store ---

def _fill(store: Store, index: str) -> tuple[np.ndarray, list[str], list[str]]:
    """N clustered vectors added in batches, every 9th deleted; returns (vectors, ids, labels) of the live ones."""
    x = clustered(N)
    ids = [f"i{i}" for i in range(N)]
    labels = [f"l{i % 10}" for i in range(N)]  # l3: 10% of items; HNSW answers that filter exactly
    store.create_collection("c", model_id=M, dim=DIM, index=index)
    for s in range(0, N, 1000):
        store.add("c", ids[s:s + 1000], x[s:s + 1000], model_id=M, labels=labels[s:s + 1000],
                  metadata=[{"n": i} for i in range(s, min(s + 1000, N))])
    store.delete("c", ids[::9])
    keep = [i for i in range(N) if i % 9]
    return x[keep], [ids[i] for i in keep], [labels[i] for i in keep]


def _check_recall(store: Store, x: np.ndarray, ids: list[str], labels: list[str]) -> None:
    q = clustered(40, seed=7)
    assert recall(hit_ids(store.search("c", q, k=10)), exact(x, ids, q, 10)) >= RECALL_FLOOR
    for label in ("l3", "l0"):
        hits = store.search("c", q, k=10, label=label)
        assert all(len(row) == 10 and {h.label for h in row} == {label} for row in hits)
        mine = [i for i, lab in enumerate(labels) if lab == label]
        assert recall(hit_ids(hits), exact(x[mine], [ids[i] for i in mine], q, 10)) >= RECALL_FLOOR
    number = np.array([int(i[1:]) for i in ids])
    for where, mine in (("n < 600", number < 600), ("n >= 1000", number >= 1000)):  # ~10% and ~80% of items
        hits = store.search("c", q, k=10, where=where)
        allowed = {i for i, m in zip(ids, mine) if m}
        assert all(len(row) == 10 and {h.id for h in row} <= allowed for row in hits)
        assert recall(hit_ids(hits), exact(x[mine], [i for i, m in zip(ids, mine) if m], q, 10)) >= RECALL_FLOOR


@pytest.mark.parametrize("index", COMPRESSED)
def test_each_kind_adds_deletes_searches_restarts_and_rebuilds(tmp_path, index, caplog):
    with Store(tmp_path) as store:
        x, ids, labels = _fill(store, index)
        assert store.collection("c").count == len(ids) and store.collection("c").index == str(IndexSpec.parse(index))
        assert not {h.id for row in store.search("c", clustered(N)[:50:9], k=10) for h in row} & {"i0", "i9", "i45"}
        _check_recall(store, x, ids, labels)
        q = clustered(20, seed=3)
        before = store.search("c", q, k=10)
    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(tmp_path) as store:
        assert store.search("c", q, k=10) == before  # the snapshot holds the trained codes as they were
        store.delete("c", ids[:5])
        assert not {h.id for row in store.search("c", x[:5], k=10) for h in row} & set(ids[:5])
    assert not caplog.records
    next((tmp_path / "snapshots").glob("*.faiss")).unlink()
    with Store(tmp_path) as store:  # rebuilt from SQLite: trained again on the first vectors
        _check_recall(store, x[5:], ids[5:], labels[5:])


def test_sq8_is_exact_until_trained_then_keeps_earlier_vectors(tmp_path):
    x = clustered(TRAIN_SIZE + 100)
    ids = [f"i{i}" for i in range(len(x))]
    with Store(tmp_path) as store:
        store.create_collection("c", model_id=M, dim=DIM, index="hnsw:codes=sq8")
        store.add("c", ids[:100], x[:100], model_id=M)
    with Store(tmp_path) as store:  # the untrained index's snapshot loads as it was
        hits = store.search("c", x[100:103], k=10)
        assert hit_ids(hits) == exact(x[:100], ids[:100], x[100:103], 10)
        np.testing.assert_allclose([h.score for h in hits[0]], np.sort(x[:100] @ x[100])[::-1][:10], rtol=1e-5)
        store.add("c", ids[100:], x[100:], model_id=M)  # reaches TRAIN_SIZE: trains, moves everything into codes
        top = store.search("c", x[:100], k=1)
        assert [row[0].id for row in top] == ids[:100]  # vectors staged before training are still found
        assert any(abs(row[0].score - 1.0) > 1e-6 for row in top)  # ... and scored from 8-bit codes now


# --- re-ranking ---

@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_rerank_returns_exact_scores_in_exact_order(tmp_path, kind):
    x = clustered(N)
    ids = [f"i{i}" for i in range(N)]
    q = clustered(15, seed=5)
    with Store(tmp_path) as store:
        for name, index in (("plain", f"{kind}:codes=sq8"), ("rerank", f"{kind}:codes=sq8,rerank=40")):
            store.create_collection(name, model_id=M, dim=DIM, index=index)
            store.add(name, ids, x, model_id=M)
        for name in ("plain", "rerank"):
            for row, qv in zip(store.search(name, q, k=10), q):
                got = np.array([h.score for h in row])
                true = np.array([float(x[int(h.id[1:])] @ qv) for h in row])
                if name == "rerank":
                    np.testing.assert_allclose(got, true, rtol=1e-5, atol=1e-6)
                    assert (np.diff(got) <= 0).all()
                else:  # the codes' approximate scores: what rerank replaces
                    assert np.abs(got - true).max() > 1e-5
        reranked = hit_ids(store.search("rerank", q, k=10))
        assert recall(reranked, exact(x, ids, q, 10)) >= recall(hit_ids(store.search("plain", q, k=10)),
                                                               exact(x, ids, q, 10))
        assert recall(reranked, exact(x, ids, q, 10)) >= 0.97
        store.set_labels("rerank", {i: "few" for i in ids[::20]})  # a filter: re-ranked among its items only
        for row, qv in zip(store.search("rerank", q, k=10, label="few"), q):
            assert {h.label for h in row} == {"few"}
            np.testing.assert_allclose([h.score for h in row], [x[int(h.id[1:])] @ qv for h in row], rtol=1e-5)


def test_rerank_needs_the_vectors():
    index = VectorIndex(DIM, IndexSpec.parse("flat:codes=fp16,rerank=20"))
    index.add(np.arange(50), clustered(50))
    with pytest.raises(ValueError, match="pass vectors="):
        index.search(clustered(1), 5)


def test_compacting_an_sq8_graph_keeps_its_trained_ranges():
    x = clustered(N)
    index = VectorIndex(DIM, IndexSpec.parse("hnsw:codes=sq8"))
    index.add(np.arange(N), x)
    live = np.arange(N // 3, N)
    before, found = index.search(x[live], 1)
    index.remove(np.arange(N // 3))  # a third dead: past COMPACT_FRACTION, the graph is rebuilt
    assert (len(index), index.tombstones) == (len(live), 0)
    after, found_after = index.search(x[live], 1)
    assert (found[:, 0] == live).mean() > 0.99 and (found_after[:, 0] == live).mean() > 0.99
    same = (found[:, 0] == live) & (found_after[:, 0] == live)
    np.testing.assert_array_equal(after[same], before[same])  # re-encoded with the same ranges: same codes
