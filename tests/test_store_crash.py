"""kill -9 in the middle of a stream of adds: every acknowledged add survives, exactly, and nothing is torn.

A child process adds one item at a time and prints each id once ``add`` has returned (flushed), with a
snapshot every 40 adds so a kill can also land inside a snapshot write. The parent SIGKILLs it mid-stream,
twice (the second child starts on the crashed data dir), then reopens the store and checks it.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

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
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir), str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    acked: list[int] = []
    try:
        while len(acked) < kill_after:
            line = lines.get(timeout=120)
            if line is None:
                raise AssertionError(f"the child exited early:\n{proc.stderr.read()}")
            acked.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=10)
    while (line := lines.get_nowait()) is not None:  # acknowledged before the kill landed
        acked.append(int(line))
    assert proc.returncode == -signal.SIGKILL
    return acked


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
