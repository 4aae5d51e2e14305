"""``embedder backup`` while the store is being written by another process, and ``embedder restore``.

The data dir is held by a child process adding one item at a time with snapshots in between (the lock and
the writes a server makes), while heads are saved again and again by renaming folders, as
``classifier.persist`` does. Real SQLite, real FAISS, real files; the child is killed with SIGKILL.
"""
from __future__ import annotations

import json
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

from embedder.cli import main
from embedder.store import Store

DIM = 32
WRITER = r"""
import sys
import numpy as np
from embedder.store import Store

store = Store(sys.argv[1])  # never closed: the parent kills us
for i in range(1_000_000):
    store.add("c", [f"id{i}"], np.random.default_rng(i).standard_normal((1, %d)).astype(np.float32), model_id="m")
    print(i, flush=True)
    if i %% 20 == 19:
        store.save()
""" % DIM


def expected(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def save_head(heads: Path, version: int) -> None:
    """A head folder written aside and renamed over the old one (the pattern of classifier.persist)."""
    tmp = heads / f".tmp-h1-{version}"
    tmp.mkdir(parents=True)
    (tmp / "head.json").write_text(json.dumps({"version": version}))
    (tmp / "head.safetensors").write_bytes(version.to_bytes(8, "little") * 1000)
    final = heads / "h1"
    if final.exists():
        old = heads / f".old-h1-{version}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


class Writer:
    """The child process adding items; ``acked`` are the adds it has acknowledged."""

    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data_dir)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.acked: list[int] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.acked.append(int(line))

    def wait_for(self, n: int) -> None:
        self._reader.join(timeout=0)
        for _ in range(1200):
            if len(self.acked) >= n:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the writer exited: {self.proc.stderr.read()}")
            threading.Event().wait(0.1)
        raise AssertionError("the writer is too slow")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def check_restored(data_dir: Path, caplog) -> int:
    """The store in ``data_dir`` opens cleanly and holds items id0..id{n-1} exactly; returns n."""
    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(data_dir) as store:
        n = store.collection("c").count
        items = store.get("c", [f"id{i}" for i in range(n + 5)])
        assert all(item is not None for item in items[:n]) and not any(items[n:])  # adds land in order
        for i, item in enumerate(items[:n]):
            np.testing.assert_array_equal(item.vector, expected(i))
        hits = store.search("c", np.stack([expected(i) for i in range(0, n, 7)]), k=1)
        assert [row[0].id for row in hits] == [f"id{i}" for i in range(0, n, 7)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with closing(sqlite3.connect(data_dir / "store.sqlite3")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return n


def test_backup_while_writing_then_restore(tmp_path, caplog, capsys):
    live, backup, restored = tmp_path / "live", tmp_path / "backup", tmp_path / "restored"
    save_head(live / "heads", 0)
    writer = Writer(live)
    stop = threading.Event()

    def resave_heads() -> None:
        version = 1
        while not stop.wait(0.01):  # far more often than anyone trains heads
            save_head(live / "heads", version)
            version += 1

    saver = threading.Thread(target=resave_heads)
    try:
        writer.wait_for(60)
        saver.start()
        assert main(["backup", str(backup), "--data-dir", str(live)]) == 0
        during = len(writer.acked)
        writer.wait_for(during + 10)  # the writer was never stopped
        stop.set()
        saver.join()
        assert "backed up" in capsys.readouterr().out

        assert main(["restore", str(backup), "--data-dir", str(live), "--force"]) == 2  # the writer holds it
        assert "in use by a running server" in capsys.readouterr().err
    finally:
        stop.set()
        writer.kill()

    assert sorted(p.name for p in backup.iterdir()) == ["backup.json", "heads", "snapshots", "store.json",
                                                        "store.sqlite3"]
    assert main(["restore", str(backup), "--data-dir", str(restored)]) == 0
    n = check_restored(restored, caplog)
    assert 60 <= n <= during + 1  # as of one commit during the backup
    head = json.loads((restored / "heads" / "h1" / "head.json").read_text())["version"]  # one version's files
    assert (restored / "heads" / "h1" / "head.safetensors").read_bytes() == head.to_bytes(8, "little") * 1000

    # Over the killed writer's data dir, WAL and all: the backup replaces it exactly.
    assert main(["restore", str(backup), "--data-dir", str(live)]) == 2
    assert "already holds a store" in capsys.readouterr().err and (live / "store.sqlite3-wal").exists()
    assert main(["restore", str(backup), "--data-dir", str(live), "--force"]) == 0
    assert check_restored(live, caplog) == n
    assert not list(live.glob(".restore-*"))


def test_a_damaged_or_unfinished_backup_is_refused_before_anything_changes(tmp_path, capsys):
    data = tmp_path / "data"
    with Store(data) as store:
        store.add("c", ["a", "b"], np.eye(2, DIM, dtype=np.float32), model_id="m")
    assert main(["backup", str(tmp_path / "b"), "--data-dir", str(data)]) == 0
    assert main(["backup", str(tmp_path / "b"), "--data-dir", str(data)]) == 2  # never into an existing backup
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["backup", str(data / "inside"), "--data-dir", str(data)]) == 2
    assert "inside the data dir" in capsys.readouterr().err

    target = tmp_path / "target"
    snapshot = next((tmp_path / "b" / "snapshots").iterdir())
    damaged = bytearray(snapshot.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    snapshot.write_bytes(damaged)
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(target)]) == 4
    assert "is damaged: snapshots/c1.faiss" in capsys.readouterr().err
    assert not (target / "store.sqlite3").exists()

    (tmp_path / "b" / "backup.json").unlink()
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(target)]) == 2
    assert "not a finished backup" in capsys.readouterr().err


def test_backup_refuses_a_folder_without_a_store(tmp_path, capsys):
    assert main(["backup", str(tmp_path / "b"), "--data-dir", str(tmp_path / "nothing")]) == 2
    assert "holds no store" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_backup_and_restore_take_a_relative_path_that_climbs_above_the_root(tmp_path, monkeypatch, capsys):
    """'../../..' from a folder two levels down climbs past '/' (the OS stops there; SQLite refused the path)."""
    data = tmp_path / "data"
    with Store(data) as store:
        store.add("c", ["a"], np.ones((1, 4), np.float32), model_id="m")
    monkeypatch.chdir(data)
    climbing = "/".join([".."] * (len(data.parts) + 2)) + str(tmp_path / "b")
    assert main(["backup", climbing, "--data-dir", "."]) == 0
    assert main(["restore", climbing, "--data-dir", str(tmp_path / "again")]) == 0
    with Store(tmp_path / "again") as store:
        assert [s.id for s in store.get("c", ["a"]) if s] == ["a"]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("EMBEDDER_DATA_DIR", raising=False)


def test_a_restore_keeps_the_keys_in_place_so_a_revoked_key_stays_revoked(tmp_path, capsys):
    from embedder.keys import KeyStore

    data = tmp_path / "data"
    with Store(data) as store:
        store.add("c", ["a"], np.eye(1, DIM, dtype=np.float32), model_id="m")
    keys = KeyStore(data)
    old, _ = keys.add("old", "admin", None)
    assert main(["backup", str(tmp_path / "b"), "--data-dir", str(data)]) == 0
    assert not (tmp_path / "b" / "keys.json").exists()  # credentials are not part of a backup
    keys.revoke(old.key_id)
    keys.add("new", "read", None)
    before = (data / "keys.json").read_bytes()
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(data), "--force"]) == 0
    assert (data / "keys.json").read_bytes() == before and oct((data / "keys.json").stat().st_mode & 0o777) == "0o600"



def test_a_restore_never_installs_keys_from_a_backup_and_warns_when_a_keyed_server_would_be_open(tmp_path, caplog):
    """A backup.json listing keys.json (as backups did before keys were left out, or as an edited one may) had
    restore replace the live keys with the backup's: revoked keys came back, and planted ones let their holder
    in. Now restore skips it with a warning; and restoring a keyed server's backup where there are no keys warns
    that a server started there would answer every call without a key."""
    import hashlib

    from embedder.keys import KeyStore

    data = tmp_path / "data"
    with Store(data) as store:
        store.add("c", ["a"], np.eye(1, DIM, dtype=np.float32), model_id="m")
    KeyStore(data).add("live", "admin", None)
    assert main(["backup", str(tmp_path / "clean"), "--data-dir", str(data)]) == 0
    assert json.loads((tmp_path / "clean" / "backup.json").read_text())["api_keys"] is True
    planted = shutil.copytree(tmp_path / "clean", tmp_path / "planted")
    planted_key = KeyStore(tmp_path / "elsewhere").add("planted", "admin", None)[1]
    shutil.copy(tmp_path / "elsewhere" / "keys.json", planted / "keys.json")
    manifest = json.loads((planted / "backup.json").read_text())
    raw = (planted / "keys.json").read_bytes()
    manifest["files"]["keys.json"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (planted / "backup.json").write_text(json.dumps(manifest))
    before = (data / "keys.json").read_bytes()

    with caplog.at_level(logging.WARNING, logger="embedder.store.backup"):
        assert main(["restore", str(planted), "--data-dir", str(data), "--force"]) == 0
    assert (data / "keys.json").read_bytes() == before and KeyStore(data).authenticate(planted_key) is None
    assert "not restoring keys.json" in caplog.text and "without a key" not in caplog.text
    with Store(data) as store:
        assert [s.id for s in store.get("c", ["a"]) if s] == ["a"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embedder.store.backup"):
        assert main(["restore", str(tmp_path / "clean"), "--data-dir", str(tmp_path / "fresh")]) == 0
    assert not (tmp_path / "fresh" / "keys.json").exists()
    assert "required API keys" in caplog.text and "answers every call without a key" in caplog.text


def _head_in(store: Store, seed: int):
    """A head trained on random vectors and saved where the store keeps heads (Milvus); returns it."""
    from classifier import HeadRegistry

    x = np.random.default_rng(seed).standard_normal((40, DIM)).astype(np.float32)
    HeadRegistry(store.shared_files("heads")).train(x, ["a", "b"] * 20, model_id="m", head_id="h")
    return x


@pytest.mark.parametrize("inside", [False, True], ids=["beside", "inside-the-data-dir"])
def test_a_milvus_lite_store_is_backed_up_with_its_server_stopped_and_restored_elsewhere(tmp_path, capsys, inside):
    from classifier import HeadRegistry

    data = tmp_path / "data"
    data.mkdir()
    lite = f"milvus://{data if inside else tmp_path}/lite.db"
    x = np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float32)
    store = Store(data, backend=lite)
    try:
        store.add("c", [f"id{i}" for i in range(30)], x, model_id="m", labels=["a", "b"] * 15)
        probe = _head_in(store, 1)
        assert main(["backup", str(tmp_path / "b"), "--data-dir", str(data)]) == 2  # serving: refused, nothing made
        err = capsys.readouterr().err
        assert "is open in a running server" in err and "Stop the server, run this again" in err
        assert not (tmp_path / "b").exists()
        expected = HeadRegistry(store.shared_files("heads")).get("h").predict_proba(probe)
    finally:
        store.close()
    assert main(["backup", str(tmp_path / "b"), "--data-dir", str(data)]) == 0
    assert "milvus-lite store" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"milvus-lite", "store.json", "store.sqlite3"}
    assert not (tmp_path / "b" / "lite.db").exists()  # once, as the milvus-lite part

    moved = f"milvus://{tmp_path}/moved.db"
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "r")]) == 2  # where would it go?
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "r"), "--store", moved]) == 0
    with Store(tmp_path / "r", backend=moved) as restored:
        assert restored.collection("c").labels == {"a": 15, "b": 15}
        np.testing.assert_array_equal(restored.get("c", ["id7"])[0].vector, x[7])
        np.testing.assert_array_equal(HeadRegistry(restored.shared_files("heads")).get("h").predict_proba(probe),
                                      expected)
        restored.delete_collection("c")
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "r"), "--store", moved]) == 2
    assert "already holds a store" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "r"), "--store", moved, "--force"]) == 0
    with Store(tmp_path / "r", backend=moved) as restored:
        assert restored.collection("c").count == 30
    with Store(data, backend=lite) as store:
        store.delete_collection("c")
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(data), "--force"]) == 0  # in place, as it was
    with Store(data, backend=lite) as store:
        assert store.collection("c").count == 30 and [c.name for c in store.list_collections()] == ["c"]


def test_with_a_milvus_server_the_heads_are_backed_up_and_the_collections_left_to_milvus_backup(
        tmp_path, capsys, milvus_server):
    from classifier import HeadRegistry

    data = tmp_path / "data"
    with Store(data, backend=milvus_server) as store:  # open: a Milvus server's replica is backed up while it serves
        store.add("c", ["a"], np.eye(1, DIM, dtype=np.float32), model_id="m")
        probe = _head_in(store, 2)
        expected = HeadRegistry(store.shared_files("heads")).get("h").predict_proba(probe)
        assert main(["backup", str(tmp_path / "b"), "--data-dir", str(data)]) == 0
        out = capsys.readouterr().out
        assert "1 head(s) from Milvus" in out and "milvus-backup" in out
        assert sorted(p.name for p in (tmp_path / "b" / "milvus-heads" / "h").iterdir()) == ["head.json",
                                                                                            "head.safetensors"]
        HeadRegistry(store.shared_files("heads")).delete("h")
    assert main(["restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "r")]) == 0  # into the same server
    assert "1 head(s) written back into Milvus" in capsys.readouterr().out
    with Store(tmp_path / "r", backend=milvus_server) as store:
        np.testing.assert_array_equal(HeadRegistry(store.shared_files("heads")).get("h").predict_proba(probe), expected)
