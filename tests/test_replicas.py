"""Scale-out on loopback: stateless embedding replicas behind gRPC round-robin, and a store node using them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import ExitStack

import grpc
import numpy as np
import pytest
from conftest import jpeg_bytes, running_server

from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.client import EmbedderClient
from embedder.remote import pool_target


def crops(photo: np.ndarray, n: int, size: int = 72) -> list[bytes]:
    h, w = photo.shape[:2]
    return [jpeg_bytes(photo[(5 * i) % (h - size):][:size, (11 * i) % (w - size):][:, :size]) for i in range(n)]


def calls_served(server) -> float:
    value = server.metrics.registry.get_sample_value("embedder_requests_total", {"door": "grpc", "method": "Embed", "code": "OK"})
    return value or 0.0


def test_a_store_node_embeds_through_replicas_round_robin(embedder, photo_arrays):
    images = crops(photo_arrays["coffee"], 40)
    with ExitStack() as stack:
        replicas = [stack.enter_context(running_server(embedder, role="embed")) for _ in range(3)]
        target = ",".join(r.address for r in replicas)
        store = stack.enter_context(running_server(None, role="store", embed_target=target))
        with EmbedderClient(store.address, timeout=120) as client:
            for start in range(0, 40, 4):  # one call per few images, so round-robin spreads them
                client.add("pooled", images[start:start + 4], [f"i{start + j}" for j in range(4)])
            stored = client.get("pooled", [f"i{i}" for i in range(40)])
            hits = client.search(images[7], collection="pooled", k=1)
            info = client.list_models()[0]
        np.testing.assert_allclose(np.stack([s.vector for s in stored]), embedder.embed(images), atol=1e-6)
        assert hits[0].id == "i7" and info["model_id"] == embedder.model_id and info["runtime"].startswith("remote")
        assert all(calls_served(r) >= 1 for r in replicas)  # every replica took a share
        with grpc.insecure_channel(replicas[0].address) as ch:  # a replica is stateless: embedding only
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.EmbedderStub(ch).Stats(pb.StatsRequest(), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--role embed" in e.value.details()


def same_ranking(hits, expected) -> None:
    """Equal scores, and equal ids wherever the scores are not tied (a tie may list its items either way)."""
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], atol=1e-5)
    for i, (h, e) in enumerate(zip(hits, expected)):
        tied = any(abs(e.score - x.score) < 1e-5 for j, x in enumerate(expected) if j != i)
        assert h.id == e.id or tied, (i, h, e)


def test_kill_9_of_a_replica_mid_load_loses_nothing(embedder, photo_arrays, cache_dir, tmp_path):
    """Three replicas (two processes), a store node, four Add callers and two Embed callers; one replica is
    killed with SIGKILL mid-load. Every call succeeds on the replicas left, every vector equals the
    single-process one, and search on the store node ranks exactly as a single-node server does."""
    images = crops(photo_arrays["astronaut"], 120)
    probes = crops(photo_arrays["rocket"], 24)  # Embed-only traffic: cache misses sent to the pool
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--role", "embed"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    try:
        addresses = [p.stdout.readline().split()[-1] for p in procs]
        with running_server(embedder, role="embed") as local, \
                running_server(None, role="store", embed_target=",".join([*addresses, local.address])) as store:
            acked: list[int] = []
            embedded: dict[int, np.ndarray] = {}
            errors: list[str] = []
            lock = threading.Lock()
            killed = threading.Event()

            def add(worker: int) -> None:
                with EmbedderClient(store.address, timeout=120) as client:
                    for i in range(worker, len(images), 4):
                        try:
                            client.add("survivor", [images[i]], [f"i{i}"])
                        except Exception as e:  # noqa: BLE001 - any failure is reported below
                            with lock:
                                errors.append(f"add {i}: {e}")
                            continue
                        with lock:
                            acked.append(i)
                            kill = len(acked) >= 20 and not killed.is_set()
                            if kill:
                                killed.set()
                        if kill:
                            os.kill(procs[0].pid, signal.SIGKILL)  # mid-load: other calls are in flight

            def embed(worker: int) -> None:
                with EmbedderClient(store.address, timeout=120) as client:
                    for i in range(worker, len(probes), 2):
                        try:
                            vector = client.embed([probes[i]])[0]
                        except Exception as e:  # noqa: BLE001
                            with lock:
                                errors.append(f"embed {i}: {e}")
                            continue
                        with lock:
                            embedded[i] = vector

            threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
            threads += [threading.Thread(target=embed, args=(w,)) for w in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert procs[0].wait(timeout=30) == -signal.SIGKILL
            assert not errors, errors[:3]  # every call succeeded, on the replicas left
            with EmbedderClient(store.address) as client:
                stored = client.get("survivor", [f"i{i}" for i in range(len(images))])
                pooled = [client.search(images[q], collection="survivor", k=10) for q in (0, 33, 77, 119)]
        assert sorted(acked) == list(range(len(images)))
        np.testing.assert_allclose(np.stack([s.vector for s in stored]), embedder.embed(images), atol=1e-5)
        assert sorted(embedded) == list(range(len(probes)))
        np.testing.assert_allclose(np.stack([embedded[i] for i in range(len(probes))]), embedder.embed(probes),
                                   atol=1e-5)
        with running_server(embedder) as single, EmbedderClient(single.address, timeout=120) as client:
            client.add("survivor", images, [f"i{i}" for i in range(len(images))])
            for q, hits in zip((0, 33, 77, 119), pooled):
                expected = client.search(images[q], collection="survivor", k=10)
                assert hits[0].id == f"i{q}"
                same_ranking(hits, expected)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_pool_targets_name_every_replica():
    assert pool_target("127.0.0.1:5001") == "127.0.0.1:5001"
    assert pool_target("127.0.0.1:5001, 127.0.0.1:5002") == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert pool_target("[::1]:5001,[::1]:5002") == "ipv6:[::1]:5001,[::1]:5002"
    with pytest.raises(ValueError, match="dns:///"):
        pool_target("embed-a:5001,embed-b:5001")


def test_embedder_serve_role_store_runs_from_the_cli(embedder, photo_arrays, tmp_path):
    """`embedder serve --role store` (no local model) comes up SERVING, embeds through its pool, stops on SIGTERM."""
    image = crops(photo_arrays["chelsea"], 1)[0]
    with running_server(embedder, role="embed") as replica:
        proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--role", "store",
                                 "--embed-target", replica.address, "--data-dir", str(tmp_path / "store")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            address = proc.stdout.readline().split()[-1]
            with EmbedderClient(address, timeout=60) as client:
                vector = client.embed([image])[0]
            np.testing.assert_allclose(vector, embedder.embed([image])[0], atol=1e-5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
        finally:
            proc.kill()
