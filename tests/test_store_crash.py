"""kill -9 in the middle of a stream of adds: every acknowledged add survives, exactly, and nothing is torn.

Twice: the store library in a child process, and the whole service (``embedder serve``) under a client.

A child process adds one item at a time and prints each id once ``add`` has returned (flushed), with a
snapshot every 40 adds so a kill can also land inside a snapshot write. The parent SIGKILLs it mid-stream,
twice (the second child starts on the crashed data dir), then reopens the store and checks it.
"""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from conftest import acked_until_killed

from embedder.store import Store

DIM = 256
CHILD = r"""
import sys
import numpy as np
from embedder.store import Store

data_dir, start = sys.argv[1], int(sys.argv[2])
store = Store(data_dir)  # never closed: the parent kills us
for i in range(start, start + 1_000_000):
    vector = np.random.default_rng(i).standard_normal((1, %d)).astype(np.float32)
    store.add("c", [f"id{i}"], vector, model_id="m", labels=[f"l{i %% 3}"], metadata=[{"i": i}])
    print(i, flush=True)
    if i %% 40 == 39:
        store.save()
""" % DIM


def expected(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def add_until_killed(data_dir: Path, start: int, kill_after: int) -> list[int]:
    """Run the child from item ``start``; SIGKILL it once ``kill_after`` adds are acknowledged."""
    return acked_until_killed([CHILD, str(data_dir), str(start)], kill_after)


def test_acknowledged_adds_survive_kill_9(tmp_path, caplog):
    data_dir = tmp_path / "data"
    first = add_until_killed(data_dir, 0, kill_after=150)
    second = add_until_killed(data_dir, first[-1] + 1, kill_after=97)
    acked = first + second
    assert acked == list(range(len(acked)))

    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(data_dir) as store:
        # at most one add per run was committed but not yet printed
        count = store.collection("c").count
        assert len(acked) <= count <= len(acked) + 2
        ids = [f"id{i}" for i in range(acked[-1] + 3)]
        items = store.get("c", ids)
        for i, item in enumerate(items):
            if i in set(acked):
                assert item is not None, f"acknowledged id{i} is missing"
            if item is not None:  # present means complete: exact vector, label and metadata
                np.testing.assert_array_equal(item.vector, expected(i))
                assert (item.label, item.metadata) == (f"l{i % 3}", {"i": i})
        assert sum(item is not None for item in items) == count
        sample = acked[::10]
        hits = store.search("c", np.stack([expected(i) for i in sample]), k=1)
        assert [row[0].id for row in hits] == [f"id{i}" for i in sample]
    assert all(p.suffix == ".faiss" for p in (data_dir / "snapshots").iterdir())  # no temp file left behind
    with sqlite3.connect(data_dir / "store.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_kill_9_of_the_server_mid_adds_loses_nothing_acknowledged(tmp_path, cache_dir, embedder, photo_arrays):
    """The real service in its own process; a client adds one image per call; SIGKILL lands mid-stream."""
    from conftest import jpeg_bytes

    from embedder.client import EmbedderClient, ServiceError

    base = photo_arrays["astronaut"]
    images = [jpeg_bytes(base[i:i + 96, 2 * i:2 * i + 96]) for i in range(200)]  # 200 distinct real crops
    data_dir = tmp_path / "data"
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "EMBEDDER_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    acked: list[int] = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        address = line.split()[-1]
        stop = threading.Event()

        def add_forever() -> None:
            with EmbedderClient(address, timeout=30, retries=20) as client:  # retries while the model loads
                for i, image in enumerate(images):
                    try:
                        client.add("crash", [image], [f"id{i}"], labels=[f"l{i % 3}"], metadata=[{"i": i}])
                    except ServiceError:
                        return  # the server is gone
                    acked.append(i)
                    if stop.is_set():
                        return

        adder = threading.Thread(target=add_forever, daemon=True)
        adder.start()
        deadline = time.monotonic() + 180
        while len(acked) < 40 and adder.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acked) >= 40, "the server did not acknowledge 40 adds"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # while the adder is mid-call
        proc.wait()
        stop.set()
    adder.join(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    with Store(data_dir) as store:
        count = store.collection("crash").count
        assert len(acked) <= count <= len(acked) + 1  # at most the call in flight was committed, unanswered
        items = store.get("crash", [f"id{i}" for i in range(len(images))])
        present = [i for i, item in enumerate(items) if item is not None]
        assert set(acked) <= set(present)
        expected_vectors = embedder.embed([images[i] for i in present])
        for i, want in zip(present, expected_vectors):  # present means complete and correct
            item = items[i]
            np.testing.assert_allclose(item.vector, want, atol=1e-5)
            assert (item.label, item.metadata) == (f"l{i % 3}", {"i": i})
    with sqlite3.connect(data_dir / "store.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
