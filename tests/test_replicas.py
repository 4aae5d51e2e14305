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
    value = server.metrics.registry.get_sample_value("embedder_requests_total", {"method": "Embed", "code": "OK"})
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


def test_kill_9_of_a_replica_mid_load_loses_nothing(embedder, photo_arrays, cache_dir, tmp_path):
    images = crops(photo_arrays["astronaut"], 120)
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--role", "embed"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    try:
        addresses = [p.stdout.readline().split()[-1] for p in procs]
        with running_server(embedder, role="embed") as local, \
                running_server(None, role="store", embed_target=",".join([*addresses, local.address])) as store:
            acked: list[int] = []
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
                                errors.append(f"{i}: {e}")
                            continue
                        with lock:
                            acked.append(i)
                            kill = len(acked) >= 20 and not killed.is_set()
                            if kill:
                                killed.set()
                        if kill:
                            os.kill(procs[0].pid, signal.SIGKILL)  # mid-load: other calls are in flight

            threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert procs[0].wait(timeout=30) == -signal.SIGKILL
            assert not errors, errors[:3]  # every call succeeded, on the replicas left
            with EmbedderClient(store.address) as client:
                stored = client.get("survivor", [f"i{i}" for i in range(len(images))])
        assert sorted(acked) == list(range(len(images)))
        np.testing.assert_allclose(np.stack([s.vector for s in stored]), embedder.embed(images), atol=1e-5)
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
