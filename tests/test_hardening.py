"""Load, faults and security: many callers at once, kill -9 while training, SIGTERM under writes, tokens.

Real servers throughout: in-process on a loopback port for concurrency and security, ``embedder serve``
subprocesses for the crash and shutdown tests.
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

import grpc
import numpy as np
import pytest
from conftest import jpeg_bytes, running_server

from classifier import HeadRegistry, list_heads
from embedder._proto import embedder_pb2 as pb
from embedder.client import EmbedderClient, ServiceError
from embedder.server import SERVICE_NAME
from embedder.store import Store

OK = grpc.StatusCode.OK.value[0]


def crops(photo: np.ndarray, n: int, size: int = 80) -> list[bytes]:
    """``n`` distinct real images: ``size`` x ``size`` crops of one photo at different offsets."""
    h, w = photo.shape[:2]
    return [jpeg_bytes(photo[(7 * i) % (h - size):][:size, (13 * i) % (w - size):][:, :size]) for i in range(n)]


def start_server(data_dir: Path, cache_dir: Path) -> tuple[subprocess.Popen, str]:
    """``embedder serve --port 0`` in its own process; returns it and its address."""
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "EMBEDDER_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, line.split()[-1]


# ------------------------------------------------------------------------------------------ security


def test_every_rpc_of_the_service_requires_the_token(embedder):
    """Walks the service descriptor, so an RPC added later is covered without touching this test."""
    methods = pb.DESCRIPTOR.services_by_name["Embedder"].methods
    assert len(methods) >= 13
    with running_server(embedder, token="s3cret") as s, grpc.insecure_channel(s.address) as ch:
        for m in methods:
            request_cls = getattr(pb, m.input_type.name)
            response_cls = getattr(pb, m.output_type.name)
            path = f"/{SERVICE_NAME}/{m.name}"
            if m.client_streaming:
                call = ch.stream_stream(path, request_serializer=request_cls.SerializeToString,
                                        response_deserializer=response_cls.FromString)

                def invoke(md, call=call, request_cls=request_cls):
                    return list(call(iter([request_cls()]), metadata=md, timeout=30))
            else:
                call = ch.unary_unary(path, request_serializer=request_cls.SerializeToString,
                                      response_deserializer=response_cls.FromString)

                def invoke(md, call=call, request_cls=request_cls):
                    return call(request_cls(), metadata=md, timeout=30)
            for md in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as e:
                    invoke(md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, m.name
            try:  # with the token the call gets past authentication (an empty request may still be invalid)
                invoke((("authorization", "Bearer s3cret"),))
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.UNAUTHENTICATED, m.name


def test_no_rpc_touches_paths_outside_the_data_dir(embedder, photos, tmp_path):
    data_dir = tmp_path / "data"
    with running_server(embedder, data_dir=data_dir) as s, EmbedderClient(s.address) as client:
        before = set(tmp_path.rglob("*"))
        for name in ("../escape", "/etc/passwd", "a/../../b"):  # collection names are only SQLite keys
            client.add(name, [photos[0], photos[1]], ["x", "y"], labels=["a", "b"])
            assert client.search(photos[0], collection=name, k=1)[0].id == "x"
        for head_id in ("../escape", "/tmp/x", "a/b", ".hidden"):
            with pytest.raises(ServiceError) as e:
                client.train("../escape", head_id=head_id)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "head id" in str(e.value)
        after = set(tmp_path.rglob("*"))
    assert all(data_dir in p.parents for p in after - before)


# ------------------------------------------------------------------------------------------ concurrency


def test_64_callers_mixing_every_kind_of_call(embedder, photo_arrays):
    """64 loopback callers at once: Embed, Add, Get, Search, Train and Predict, no unexpected error, and
    every acknowledged add is visible to searches right after its acknowledgement and at the end."""
    callers, rounds = 64, 3
    images = crops(photo_arrays["astronaut"], callers * rounds)
    seed = crops(photo_arrays["coffee"], 8)
    with running_server(embedder) as s:
        with EmbedderClient(s.address, timeout=120) as client:
            client.add("mix", seed, [f"seed{i}" for i in range(8)], labels=["cup", "mug"] * 4)
            head = client.train("mix", head_id="mix-head")["head_id"]
        errors: list[str] = []
        acked: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(callers)

        def caller(c: int) -> None:
            try:
                with EmbedderClient(s.address, timeout=120, retries=0) as client:
                    start.wait()
                    for r in range(rounds):
                        i = c * rounds + r
                        item_id = f"c{c}-r{r}"
                        vector = client.embed([images[i]])[0]
                        client.add("mix", [images[i]], [item_id], labels=["cup" if i % 2 else "mug"])
                        with lock:
                            acked.append(item_id)
                        stored = client.get("mix", [item_id])[0]
                        assert stored is not None and np.array_equal(stored.vector, vector)
                        hit = client.search(vector=vector, collection="mix", k=1)[0]
                        assert hit.id == item_id and hit.score > 0.999, (item_id, hit)
                        prediction = client.predict(head, [images[i]])[0]
                        assert prediction.error is None and prediction.label in ("cup", "mug")
                        if c % 16 == 0 and r == 1:
                            assert client.train("mix")["samples"] >= 8
            except Exception as e:  # any exception fails the test, with what went wrong
                with lock:
                    errors.append(f"caller {c}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[:5]
        assert len(acked) == callers * rounds
        with EmbedderClient(s.address) as client:
            stored = client.get("mix", acked, vectors=False)
            assert all(item is not None for item in stored)
            assert client.stats()["collections"][0].count == 8 + callers * rounds


# ------------------------------------------------------------------------------------------ crash and shutdown


def test_kill_9_while_training_leaves_every_saved_head_and_no_half_written_one(embedder, cache_dir, tmp_path):
    data_dir = tmp_path / "data"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6000, embedder.dim)).astype(np.float32)
    y = np.arange(6000) % 3
    x[:, :3] += 2 * np.eye(3, dtype=np.float32)[y]  # learnable, and slow enough to kill mid-training
    with Store(data_dir) as store:
        store.add("big", [f"v{i}" for i in range(6000)], x, model_id=embedder.model_id,
                  labels=[f"class{c}" for c in y])
    for attempt, delay in enumerate((0.2, 0.6, 1.2)):
        proc, address = start_server(data_dir, cache_dir)
        try:
            with EmbedderClient(address, timeout=120, retries=30) as client:
                saved = client.train("big", head_id=f"saved-{attempt}", labels=["class0", "class1"])["head_id"]
                doomed = threading.Thread(target=lambda: _train_quietly(address, f"doomed-{attempt}"), daemon=True)
                doomed.start()
                time.sleep(delay)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        heads = {h.head_id for h in list_heads(data_dir / "heads")}
        assert {f"saved-{i}" for i in range(attempt + 1)} <= heads and saved in heads
    registry = HeadRegistry(data_dir / "heads")  # what a restarted server does first
    assert not [p for p in (data_dir / "heads").iterdir() if p.name.startswith(".")]  # nothing half-written left
    for info in registry.list():  # every head there loads and predicts, including a doomed one that made it
        assert registry.predict(info.head_id, x[:5], model_id=embedder.model_id).labels
    with sqlite3.connect(data_dir / "store.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _train_quietly(address: str, head_id: str) -> None:
    try:
        with EmbedderClient(address, timeout=120, retries=0) as client:
            client.train("big", "linear_svm", head_id=head_id)
    except ServiceError:
        pass  # killed mid-call: expected


def test_sigterm_drains_in_flight_adds_and_a_restart_loses_nothing(cache_dir, photo_arrays, tmp_path, caplog):
    data_dir = tmp_path / "data"
    images = crops(photo_arrays["chelsea"], 300)
    proc, address = start_server(data_dir, cache_dir)
    acked: list[int] = []
    failures: list[grpc.StatusCode] = []

    def add_forever() -> None:
        with EmbedderClient(address, timeout=60, retries=30) as client:
            for i, image in enumerate(images):
                try:
                    client.add("drain", [image], [f"id{i}"], labels=[f"l{i % 2}"])
                except ServiceError as e:
                    failures.append(e.code)
                    return
                acked.append(i)

    adder = threading.Thread(target=add_forever, daemon=True)
    try:
        adder.start()
        deadline = time.monotonic() + 180
        while len(acked) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # a clean exit after draining
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    adder.join(timeout=60)
    assert len(acked) >= 30 and failures and failures[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    with caplog.at_level(logging.WARNING, logger="embedder.store"), Store(data_dir) as store:
        items = store.get("drain", [f"id{i}" for i in acked])
        assert all(item is not None for item in items)
        assert store.collection("drain").count in (len(acked), len(acked) + 1)
    assert not caplog.records  # the snapshot written at shutdown is current: no rebuild, no catch-up
