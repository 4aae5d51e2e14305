"""Stored data proves itself: row checksums, snapshots that belong to their database, per-collection locks.

Real SQLite files with real bits flipped in them, real FAISS snapshots, a real kill -9 (issue 19, items 4, 5, 7).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from embedder.errors import Category, DataLossError
from embedder.index import VectorIndex
from embedder.inputs import content_hash
from embedder.store import Store
from embedder.store.sqlite import SCHEMA_VERSION
from test_store import M, _as_version_2, sha, unit

DIM = 64


def flip_bit(path: Path, needle: bytes, *, byte: int, bit: int) -> None:
    """Flip one bit of the only copy of ``needle`` in the file at ``path``, as bit rot would."""
    assert not Path(f"{path}-wal").exists(), "rows may still be in the WAL: close every connection first"
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the row is not stored exactly once in the file"
    data[at + byte] ^= 1 << bit
    path.write_bytes(data)


def flip_exponent(data_dir: Path, vector: np.ndarray) -> None:
    """Flip the top exponent bit of component 5 of a stored vector: 0.1 becomes ~3e37."""
    flip_bit(data_dir / "store.sqlite3", vector.astype("<f4").tobytes(), byte=5 * 4 + 3, bit=6)


def errors_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def stored(tmp_path) -> tuple[Path, np.ndarray, list[str]]:
    """A closed data dir with 50 labelled items in collection "c" and a current snapshot."""
    x, ids = unit(50, DIM), [f"i{i}" for i in range(50)]
    with Store(tmp_path / "data") as store:
        store.add("c", ids, x, model_id=M, labels=[f"l{i % 2}" for i in range(50)])
    return tmp_path / "data", x, ids


# --- item 5: a flipped bit in a stored vector row ---

def test_a_flipped_bit_in_a_stored_vector_is_never_served(stored, caplog):
    data_dir, x, ids = stored
    flip_exponent(data_dir, x[7])
    with caplog.at_level(logging.ERROR, logger="embedder.store"), Store(data_dir) as store:
        reads = {"get": lambda: store.get("c", ["i6", "i7"]),
                 "search near it": lambda: store.search("c", x[7:8], k=3),  # the snapshot still holds the good one
                 "search by its id": lambda: store.search_by_id("c", "i7", k=3),
                 "labelled": lambda: store.labelled("c"),
                 "vectors": lambda: store.vectors("c"),
                 "set_labels": lambda: store.set_labels("c", {"i7": "relabelled"})}
        for name, read in reads.items():
            with pytest.raises(DataLossError, match=r"item 'i7' of collection 'c' is damaged") as caught:
                read()
            assert caught.value.category is Category.DATA_LOSS, name
            assert str(data_dir) not in str(caught.value) and "sqlite3" not in str(caught.value), name
        logged = errors_of(caplog)
        assert logged and all("'c'" in m and "'i7'" in m and str(data_dir / "store.sqlite3") in m for m in logged)
        np.testing.assert_array_equal(store.get("c", ["i6"])[0].vector, x[6])  # its neighbours are fine
        assert store.search("c", x[8:9], k=1)[0][0].id == "i8"

        store.add("c", ["i7"], x[7:8], model_id=M, labels=["l1"])  # adding it again repairs it
        np.testing.assert_array_equal(store.get("c", ["i7"])[0].vector, x[7])
        assert store.search("c", x[7:8], k=1)[0][0].id == "i7"


def test_a_rebuild_leaves_a_damaged_row_out_of_the_index(stored, caplog):
    data_dir, x, ids = stored
    flip_exponent(data_dir, x[7])
    for path in (data_dir / "snapshots").iterdir():
        path.unlink()  # the index must be rebuilt from SQLite
    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(data_dir) as store:
        assert any("'i7'" in m and "left out of the rebuilt index" in m for m in errors_of(caplog))
        hits = store.search("c", x, k=3)
        assert all(h.id != "i7" for row in hits for h in row)  # never served, never a 3e37 component
        assert [row[0].id for j, row in enumerate(hits) if j != 7] == [i for i in ids if i != "i7"]
        assert all(row[0].score == pytest.approx(1.0, abs=1e-5) for j, row in enumerate(hits) if j != 7)


def test_a_damaged_cache_row_is_a_miss_and_is_replaced(tmp_path, caplog):
    x = unit(2, DIM)
    with Store(tmp_path) as store:
        store.put(M, [sha(0), sha(1)], x)
    flip_exponent(tmp_path, x[0])
    with caplog.at_level(logging.ERROR, logger="embedder.store"), Store(tmp_path) as store:
        first, second = store.lookup(M, [sha(0), sha(1)])
        assert first is None  # a miss: the caller embeds it again
        np.testing.assert_array_equal(second, x[1])
        assert any(sha(0) in m for m in errors_of(caplog))
        store.put(M, [sha(0)], x[:1])  # the recomputed vector replaces the damaged row
        np.testing.assert_array_equal(store.lookup(M, [sha(0)])[0], x[0])
        assert store.stats().cache_items == 2


def test_a_version_2_data_dir_gets_checksums_on_upgrade(stored, caplog):
    data_dir, x, ids = stored
    with Store(data_dir) as store:
        store.put(M, [sha(0)], unit(1, DIM, seed=5))
    with closing(sqlite3.connect(data_dir / "store.sqlite3")) as db, db:
        _as_version_2(db)
    snapshot = next((data_dir / "snapshots").iterdir())
    index, marker = VectorIndex.load(snapshot)
    del marker["tag"]  # snapshots of version 2 carry no tag
    index.save(snapshot, marker=marker)

    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(data_dir) as store:
        np.testing.assert_array_equal(store.get("c", ["i3"])[0].vector, x[3])
        assert store.search("c", x[3:4], k=1)[0][0].id == "i3"
        np.testing.assert_array_equal(store.lookup(M, [sha(0)])[0], unit(1, DIM, seed=5)[0])
    assert not caplog.records  # its untagged snapshot is used as it was
    with closing(sqlite3.connect(data_dir / "store.sqlite3")) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    flip_exponent(data_dir, x[3])
    with Store(data_dir) as store, pytest.raises(DataLossError, match="'i3'"):
        store.get("c", ["i3"])


# --- item 4: a snapshot newer than the database, or of another one ---

CHILD = r"""
import sys
import numpy as np
from embedder.store import Store
from test_store import M, unit

store = Store(sys.argv[1])  # never closed: the parent kills us
new = unit(50, %d, seed=3)
for i in range(50):
    store.add("c", [f"n{i}"], new[i:i + 1], model_id=M)
    print(i, flush=True)
sys.stdin.read()
""" % DIM


def _restore_older_database(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Issue 19's operator: copy store.sqlite3 aside, add more, then put the older copy back (snapshots kept)."""
    old, lost = unit(50, DIM, seed=1), unit(50, DIM, seed=2)
    with Store(data_dir) as store:
        store.add("c", [f"o{i}" for i in range(50)], old, model_id=M)
    older = (data_dir / "store.sqlite3").read_bytes()  # a clean close leaves no WAL
    with Store(data_dir) as store:
        store.add("c", [f"lost{i}" for i in range(50)], lost, model_id=M)  # ids 51..100; snapshot written
    (data_dir / "store.sqlite3").write_bytes(older)
    return old, lost


def test_restore_then_adds_then_kill_9_never_serves_wrong_items(tmp_path, caplog):
    data_dir = tmp_path / "data"
    old, lost = _restore_older_database(data_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        acked = [int(proc.stdout.readline() or -1) for _ in range(50)]  # the 50 new items reuse the lost ids
        assert acked == list(range(50)), proc.stderr.read()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(data_dir) as store:
        new = unit(50, DIM, seed=3)
        found = store.search("c", new, k=1)
        assert [row[0].id for row in found] == [f"n{i}" for i in range(50)]  # found by their own vectors
        assert all(row[0].score == pytest.approx(1.0, abs=1e-5) for row in found)
        ghosts = store.search("c", lost, k=1)  # vectors no longer in the database match nothing exactly
        assert all(row[0].score < 0.9 for row in ghosts)
        assert [row[0].id for row in store.search("c", old, k=1)] == [f"o{i}" for i in range(50)]
    assert any("does not belong to database" in m for m in errors_of(caplog))
    assert not any("stale" in r.getMessage() for r in caplog.records)


def test_a_snapshot_newer_than_its_database_is_rebuilt_with_an_error(tmp_path, caplog):
    data_dir = tmp_path / "data"
    old, lost = _restore_older_database(data_dir)
    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(data_dir) as store:
        assert [row[0].id for row in store.search("c", old, k=1)] == [f"o{i}" for i in range(50)]
        assert store.collection("c").count == 50
        assert all(row[0].score < 0.9 for row in store.search("c", lost, k=1))
    assert any("newer than the database (generation 2, database at 1)" in m for m in errors_of(caplog))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embedder.store"):
        Store(data_dir).close()  # the rebuilt index was snapshotted: the next start is clean
    assert not caplog.records


def test_a_snapshot_of_another_data_dir_is_rebuilt_with_an_error(tmp_path, caplog):
    xa, xb = unit(100, DIM, seed=1), unit(100, DIM, seed=2)
    for name, x in (("a", xa), ("b", xb)):  # same collection id, same generation, other vectors
        with Store(tmp_path / name) as store:
            store.add("c", [f"{name}{i}" for i in range(100)], x, model_id=M)
    shutil.copy(tmp_path / "b" / "snapshots" / "c1.faiss", tmp_path / "a" / "snapshots" / "c1.faiss")
    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(tmp_path / "a") as store:
        found = store.search("c", xa, k=1)
        assert [row[0].id for row in found] == [f"a{i}" for i in range(100)]
        assert all(row[0].score == pytest.approx(1.0, abs=1e-5) for row in found)
    assert any("not one this database wrote" in m for m in errors_of(caplog))


def test_a_crash_between_tag_and_snapshot_is_only_stale(tmp_path, caplog, monkeypatch):
    """The tag is committed before the file is written: the file left by a crash there is still accepted."""
    x = unit(100, DIM)
    store = Store(tmp_path)
    store.add("c", [f"i{i}" for i in range(50)], x[:50], model_id=M)
    store.save()
    store.add("c", [f"i{i}" for i in range(50, 100)], x[50:], model_id=M)

    def crash(*args: object, **kwargs: object) -> int:
        raise OSError("disk gone (as if killed)")

    monkeypatch.setattr(VectorIndex, "save", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.close()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(tmp_path) as store:
        assert [row[0].id for row in store.search("c", x, k=1)] == [f"i{i}" for i in range(100)]
    assert not errors_of(caplog)
    assert any("stale" in r.getMessage() for r in caplog.records)


# --- item 7: a write to one collection never stalls another's searches; bounded index settings ---

def test_a_slow_write_to_one_collection_never_stalls_another(tmp_path):
    x = unit(200, DIM)
    with Store(tmp_path) as store:
        store.create_collection("slow", model_id=M, dim=DIM, index="hnsw")
        store.add("slow", ["s0"], x[:1], model_id=M)
        store.add("other", [f"o{i}" for i in range(100)], x[100:], model_id=M, labels=["l"] * 100)
        inside, release = threading.Event(), threading.Event()
        slow = store._backend._collections["slow"].index
        real_add = slow.add

        def held_add(ids: np.ndarray, vectors: np.ndarray) -> None:  # an HNSW insert that takes its time
            inside.set()
            release.wait(60)
            real_add(ids, vectors)

        slow.add = held_add
        writer = threading.Thread(target=store.add, args=("slow", ["s1"], x[1:2]), kwargs={"model_id": M})
        writer.start()
        try:
            assert inside.wait(10)
            done: list[object] = []
            reader = threading.Thread(target=lambda: done.extend([
                store.search("other", x[100:110], k=3), store.get("other", ["o1"]), store.labelled("other"),
                store.add("other", ["o-new"], x[2:3], model_id=M), store.list_collections()]))
            reader.start()
            reader.join(timeout=10)
            assert len(done) == 5, "a write to collection 'slow' stalled calls on collection 'other'"
            assert [row[0].id for row in done[0]] == [f"o{i}" for i in range(10)]
        finally:
            release.set()
            writer.join(timeout=30)
        assert store.search("slow", x[1:2], k=1)[0][0].id == "s1"


def test_settings_over_the_caps_are_refused_but_old_collections_keep_theirs(tmp_path, caplog):
    x = unit(20, DIM)
    with Store(tmp_path) as store:
        store.create_collection("old", model_id=M, dim=DIM, index="hnsw:m=16")
        store.add("old", [f"i{i}" for i in range(20)], x, model_id=M)
    with closing(sqlite3.connect(tmp_path / "store.sqlite3")) as db, db:  # created before the caps existed
        db.execute("UPDATE collections SET index_spec = 'hnsw:m=128,ef_construction=40,ef_search=64'")
    with Store(tmp_path) as store:
        assert store.collection("old").index == "hnsw:m=128,ef_construction=40,ef_search=64"
        assert store.search("old", x[:1], k=1)[0][0].id == "i0"
        with pytest.raises(ValueError, match=r"m=128 is over its cap of 64 \(embedder.index.HNSW_CAPS"):
            store.create_collection("new", model_id=M, dim=DIM, index="hnsw:m=128")
        assert [c.name for c in store.list_collections()] == ["old"]


def test_a_damaged_kept_image_is_never_served(tmp_path):
    image = b"\x89PNG a kept image, " + bytes(range(256)) * 4
    with Store(tmp_path) as store:
        store.add("c", ["a", "b"], unit(2, DIM), model_id=M, sha256s=[content_hash(image), None], images=[image, None])
    flip_bit(tmp_path / "store.sqlite3", image[:200], byte=100, bit=0)
    with Store(tmp_path) as store:
        with pytest.raises(DataLossError, match="item 'a' of collection 'c' is damaged"):
            store.images("c", ["a", "b"])
        assert store.images("c", ["b"]) == [None]
