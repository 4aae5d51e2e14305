"""The gRPC service against a real server on an ephemeral loopback port, through raw generated stubs.

The in-process servers share the session's loaded model (the ``embedder`` fixture); one test runs
``python -m embedder.cli serve --port 0`` as a subprocess to check SIGTERM handling end to end.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from conftest import running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.server import SERVICE_NAME, EmbedderServer

OK, INVALID = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# A call arriving while the server shuts down: UNAVAILABLE from our handler, or CANCELLED from gRPC core.
REFUSED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
MAX_MESSAGE = 2 * 1024 * 1024  # small limits, so the limit tests send little data
MAX_ITEMS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def channel_to(server: EmbedderServer):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


def vector(result: pb.Result) -> np.ndarray:
    assert result.status.code == OK, result.status.message
    v = np.frombuffer(result.vector, dtype="<f4")
    assert v.shape == (result.dim,)
    return v


def request(images=(), tensors=(), ids=None) -> pb.EmbedRequest:
    items = [pb.Item(image=b) for b in images] + [pb.Item(tensor=t) for t in tensors]
    for i, it in enumerate(items):
        it.id = ids[i] if ids else f"item-{i}"
    return pb.EmbedRequest(items=items)


def health_status(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def server(embedder, metrics_port):
    with running_server(embedder, max_message_bytes=MAX_MESSAGE, max_items=MAX_ITEMS,
                        metrics_port=metrics_port) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with channel_to(server) as channel:
        yield pb_grpc.EmbedderStub(channel)


@pytest.fixture(scope="module")
def expected(embedder, photos):
    return embedder.embed(photos)


class GatedModel:
    """The real model behind a gate the test controls, to hold a batch inside the model."""

    def __init__(self, real) -> None:
        self.real, self.config = real, real.config
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.items_run = 0
        self.lethal = False

    def info(self):
        return self.real.info()

    def probe(self, item):
        return self.real.probe(item)

    def submit(self, item, probe=None):
        return self.real.submit(item, probe)

    def warm_up(self):
        self.real.warm_up()

    def embed_arrays(self, images):
        if self.lethal:
            raise SystemExit("simulated worker crash")  # a BaseException: kills the worker thread
        self.entered.set()
        assert self.gate.wait(30)
        self.items_run += len(images)
        return self.real.embed_arrays(images)

    def close_gate(self) -> None:
        self.gate.clear()
        self.entered.clear()


# ------------------------------------------------------------------------------------------ results


def test_vectors_over_grpc_equal_the_in_process_pipeline(stub, photos, expected, embedder):
    response = stub.Embed(request(photos), timeout=60)
    assert [r.id for r in response.results] == [f"item-{i}" for i in range(len(photos))]
    assert response.model_id == embedder.model_id and response.dim == embedder.dim
    got = np.stack([vector(r) for r in response.results])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert all(r.model_id == embedder.model_id and not r.cached for r in response.results)


def test_32_concurrent_callers_get_their_own_correct_results(stub, photos, expected):
    n = len(photos)

    def call(k: int):
        order = [(k + j) % n for j in range(3)]  # each caller a different mix of photos
        response = stub.Embed(request([photos[i] for i in order], ids=[f"{k}-{i}" for i in order]), timeout=120)
        return order, response

    with ThreadPoolExecutor(32) as pool:
        for k, (order, response) in enumerate(pool.map(call, range(32))):
            assert [r.id for r in response.results] == [f"{k}-{i}" for i in order]
            np.testing.assert_allclose(np.stack([vector(r) for r in response.results]), expected[order], atol=1e-6)


def test_corrupt_items_fail_alone(stub, photos, expected):
    items = [photos[0], b"", b"GIF89a nonsense", photos[1], photos[2][: len(photos[2]) // 3]]
    response = stub.Embed(request(items), timeout=60)
    codes = [r.status.code for r in response.results]
    assert codes == [OK, INVALID, INVALID, OK, INVALID]
    assert "empty" in response.results[1].status.message
    assert all(r.vector == b"" for r in response.results if r.status.code != OK)
    np.testing.assert_allclose(vector(response.results[0]), expected[0], atol=1e-6)
    np.testing.assert_allclose(vector(response.results[3]), expected[1], atol=1e-6)


def test_raw_tensor_items(stub, photo_arrays, embedder):
    arr = photo_arrays["chelsea"]
    h, w, c = arr.shape
    u8 = pb.Tensor(shape=[h, w, c], dtype=pb.DTYPE_UINT8, data=arr.tobytes())
    f32 = pb.Tensor(shape=[h, w, c], dtype=pb.DTYPE_FLOAT32, data=(arr.astype("<f4") / 255).tobytes())
    short = pb.Tensor(shape=[h, w, c], dtype=pb.DTYPE_UINT8, data=arr.tobytes()[:-1])
    no_dtype = pb.Tensor(shape=[h, w, c], data=arr.tobytes())
    response = stub.Embed(request(tensors=[u8, short, no_dtype]), timeout=60)
    floats = stub.Embed(request(tensors=[f32]), timeout=60)  # separately: both would exceed the 2 MiB limit
    ref = embedder.embed([arr])[0]
    np.testing.assert_allclose(vector(response.results[0]), ref, atol=1e-6)
    np.testing.assert_allclose(vector(floats.results[0]), ref, atol=1e-6)
    assert [r.status.code for r in response.results[1:]] == [INVALID, INVALID]
    assert "needs" in response.results[1].status.message and "DTYPE_UINT8" in response.results[2].status.message


def test_empty_item_is_a_per_item_error(stub, photos):
    response = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="nothing"), pb.Item(id="ok", image=photos[0])]),
                          timeout=60)
    assert [r.status.code for r in response.results] == [INVALID, OK]
    assert "neither" in response.results[0].status.message


def png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG header declaring side x side pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_hostile_items_fail_alone_and_the_server_keeps_serving(stub, photos, expected):
    nan = np.full((4, 4, 3), np.nan, "<f4")
    hostile = [
        pb.Item(image=png_bomb()),  # decompression bomb: refused from its header
        pb.Item(tensor=pb.Tensor(shape=[2**40, 2**40, 3], dtype=pb.DTYPE_UINT8, data=b"\0" * 12)),
        pb.Item(tensor=pb.Tensor(shape=[-1, 4, 3], dtype=pb.DTYPE_UINT8, data=b"\0" * 12)),
        pb.Item(tensor=pb.Tensor(shape=[1, 1, 1, 1, 3], dtype=pb.DTYPE_UINT8, data=b"\0" * 3)),
        pb.Item(tensor=pb.Tensor(shape=[2, 2, 3], dtype=99, data=b"\0" * 12)),  # an enum value from the future
        pb.Item(tensor=pb.Tensor(shape=[4, 4, 3], dtype=pb.DTYPE_FLOAT32, data=nan.tobytes())),
        pb.Item(tensor=pb.Tensor(shape=[4, 4, 2], dtype=pb.DTYPE_UINT8, data=b"\0" * 32)),
        pb.Item(image=photos[0]),
    ]
    response = stub.Embed(pb.EmbedRequest(items=hostile), timeout=60)
    assert [r.status.code for r in response.results] == [INVALID] * 7 + [OK]
    assert "pixels" in response.results[0].status.message
    np.testing.assert_allclose(vector(response.results[7]), expected[0], atol=1e-6)
    np.testing.assert_allclose(vector(stub.Embed(request(photos[1:2]), timeout=60).results[0]), expected[1],
                               atol=1e-6)


def test_list_models_and_limits(stub, embedder):
    response = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    (m,) = response.models
    assert (m.name, m.model_id, m.dim, m.input_size) == ("mobilenet_v2", embedder.model_id, embedder.dim, 224)
    assert (response.limits.max_message_bytes, response.limits.max_items) == (MAX_MESSAGE, MAX_ITEMS)


def test_unknown_model_is_not_found(stub, photos, embedder):
    stub.Embed(pb.EmbedRequest(items=[pb.Item(image=photos[0])], model=embedder.model_id), timeout=60)
    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(pb.EmbedRequest(items=[pb.Item(image=photos[0])], model="resnet152"), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "mobilenet_v2" in e.value.details()


# ------------------------------------------------------------------------------------------ streaming


def test_stream_returns_results_in_request_order_with_ids(stub, photos, expected):
    n = len(photos)
    requests = [request([photos[(k + j) % n] for j in range(3)] + ([b"junk"] if k == 2 else []),
                        ids=[f"r{k}-{j}" for j in range(4)]) for k in range(6)]
    responses = list(stub.EmbedStream(iter(requests), timeout=120))
    assert len(responses) == len(requests)
    for k, (req, resp) in enumerate(zip(requests, responses)):
        assert [r.id for r in resp.results] == [it.id for it in req.items]
        got = np.stack([vector(r) for r in resp.results[:3]])
        np.testing.assert_allclose(got, expected[[(k + j) % n for j in range(3)]], atol=1e-6)
    assert responses[2].results[3].status.code == INVALID


def test_stream_with_an_oversized_request_ends_after_the_answered_ones(stub, photos):
    requests = [request(photos[:2]), request([photos[0]] * (MAX_ITEMS + 1))]
    call = stub.EmbedStream(iter(requests), timeout=60)
    first = next(call)
    assert len(first.results) == 2
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------------------ limits


def test_oversized_message_is_resource_exhausted(stub):
    big = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # 3 MiB > 2 MiB limit
    t = pb.Tensor(shape=list(big.shape), dtype=pb.DTYPE_UINT8, data=big.tobytes())
    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(request(tensors=[t]), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_too_many_items_names_the_limit_and_how_to_raise_it(stub, photos):
    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(request([photos[0]] * (MAX_ITEMS + 1)), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{MAX_ITEMS}" in e.value.details()
    assert "--max-items" in e.value.details() and "EMBEDDER_MAX_ITEMS" in e.value.details()


def test_image_over_max_pixels_is_a_per_item_error(cache_dir, photos):
    from embedder import Embedder

    arr = np.zeros((300, 300, 3), np.uint8)
    t = pb.Tensor(shape=[300, 300, 3], dtype=pb.DTYPE_UINT8, data=arr.tobytes())
    small = np.zeros((200, 200, 3), np.uint8)
    ok = pb.Tensor(shape=[200, 200, 3], dtype=pb.DTYPE_UINT8, data=small.tobytes())
    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir, max_pixels=300 * 300 - 1,
                  decode_workers=1) as limited, running_server(limited) as s, channel_to(s) as ch:
        response = pb_grpc.EmbedderStub(ch).Embed(request([photos[0]], tensors=[t, ok]), timeout=60)
    assert [r.status.code for r in response.results] == [INVALID, INVALID, OK]  # the photo is 451x300
    assert "--max-pixels" in response.results[1].status.message


def test_deadline_exceeded_and_the_expired_work_is_dropped(embedder, photos):
    gated = GatedModel(embedder)
    with running_server(gated) as s, channel_to(s) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        gated.close_gate()
        before = gated.items_run
        blocker = stub.Embed.future(request([photos[0]]), timeout=60)
        assert gated.entered.wait(30)  # the model is busy with the blocker
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(request(photos[1:4]), timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gated.gate.set()
        assert len(blocker.result().results) == 1
        assert len(stub.Embed(request([photos[4]]), timeout=60).results) == 1
        assert gated.items_run - before == 2  # the expired call's 3 items never reached the model
        assert s.service.default.batcher.stats()["dropped"] == 3


def test_queue_full_is_resource_exhausted(embedder, photos):
    gated = GatedModel(embedder)
    with running_server(gated, max_queue=2, max_items=2) as s, channel_to(s) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        gated.close_gate()
        first = stub.Embed.future(request(photos[:2]), timeout=60)
        assert gated.entered.wait(30)  # both items admitted: the queue is full
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(request([photos[2]]), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queue" in e.value.details()
        gated.gate.set()
        assert [r.status.code for r in first.result().results] == [OK, OK]
        assert stub.Embed(request([photos[2]]), timeout=60).results[0].status.code == OK


# ------------------------------------------------------------------------------------------ security


def test_token_required_for_every_embedder_rpc(embedder, photos):
    with running_server(embedder, token="s3cret") as s, channel_to(s) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        calls = {
            "Embed": lambda md: stub.Embed(request([photos[0]]), metadata=md, timeout=30),
            "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30),
            "EmbedStream": lambda md: list(stub.EmbedStream(iter([request([photos[0]])]), metadata=md, timeout=30)),
        }
        for name, call in calls.items():
            for md in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),),
                       (("authorization", "Basic s3cret"),)):
                with pytest.raises(grpc.RpcError) as e:
                    call(md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, md)
            call((("authorization", "Bearer s3cret"),))  # succeeds
            call((("authorization", "bearer s3cret"),))  # the scheme is case-insensitive
        assert health_status(ch) == SERVING  # health stays open for probes
        assert s.metrics.registry.get_sample_value(
            "embedder_requests_total", {"door": "grpc", "method": "Embed", "code": "UNAUTHENTICATED"}) == 4


# ------------------------------------------------------------------------------------------ health, life cycle


def test_health_not_serving_until_warm_then_serving(embedder, photos):
    with running_server(embedder, load=False) as s, channel_to(s) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        assert health_status(ch) == NOT_SERVING
        assert health_status(ch, SERVICE_NAME) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(request([photos[0]]), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in e.value.details()
        s.load()
        assert health_status(ch) == SERVING and health_status(ch, SERVICE_NAME) == SERVING
        assert stub.Embed(request([photos[0]]), timeout=30).results[0].status.code == OK
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                     timeout=30)
        assert next(watch).status == SERVING
        threading.Thread(target=s.stop, kwargs={"grace": 1.0}, daemon=True).start()
        assert next(watch).status == NOT_SERVING  # on shutdown, before the port closes


def test_worker_death_turns_health_not_serving(embedder, photos):
    gated = GatedModel(embedder)
    with running_server(gated) as s, channel_to(s) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        assert health_status(ch) == SERVING
        gated.lethal = True
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(request([photos[0]]), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health_status(ch) == NOT_SERVING and health_status(ch, SERVICE_NAME) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(request([photos[0]]), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # no hang, no crash: a clear refusal


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with channel_to(server) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        assert db.FindFileContainingSymbol(SERVICE_NAME).name == "embedder/v1/embedder.proto"


def test_metrics_endpoint_exposes_the_counters(stub, photos, metrics_port):
    stub.Embed(request(photos[:3] + [b"junk"]), timeout=60)
    stub.Embed(request(photos[:3]), timeout=60)  # cached by the call before, if not earlier
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("embedder_requests_total", (("code", "OK"), ("door", "grpc"), ("method", "Embed")))] >= 1
    assert samples[("embedder_images_total", (("outcome", "ok"),))] >= 3
    assert samples[("embedder_images_total", (("outcome", "error"),))] >= 1
    assert samples[("embedder_batch_size_count", ())] >= 1
    assert samples[("embedder_request_seconds_count", (("door", "grpc"), ("method", "Embed")))] >= 1
    assert samples[("embedder_queue_depth", ())] == 0
    assert samples[("embedder_cache_hits_total", ())] >= 3
    assert samples[("embedder_serving", ())] == 1
    info = stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0]
    labels = (("device", info.device), ("model_id", info.model_id), ("precision", info.precision),
              ("runtime", info.runtime))
    assert samples[("embedder_model_info", labels)] == 1


def test_sigterm_lets_the_in_flight_call_finish_and_exits_0(embedder, cache_dir, photos, expected, tmp_path):
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--device", "cpu",
                             "--grace-seconds", "60"], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            cwd=tmp_path)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        line = lines.get(timeout=180)
        assert line.startswith("listening on 127.0.0.1:"), line
        with grpc.insecure_channel(line.split()[-1]) as ch:
            deadline = time.monotonic() + 180
            while True:  # the model loads after the port is bound
                try:
                    if health_status(ch) == SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "server never became SERVING"
                time.sleep(0.2)
            stub = pb_grpc.EmbedderStub(ch)
            outgoing: queue.Queue = queue.Queue()
            responses = stub.EmbedStream(iter(outgoing.get, None), timeout=120)
            outgoing.put(request(photos[:2]))
            first = next(responses)  # the call is certainly in flight now
            proc.send_signal(signal.SIGTERM)
            while True:  # wait until shutdown has begun
                try:
                    if health_status(ch) == NOT_SERVING:
                        break
                except grpc.RpcError as e:  # the port no longer takes new calls
                    assert e.code() in REFUSED
                    break
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as refused:  # new calls are refused...
                stub.Embed(request([photos[0]]), timeout=30)
            assert refused.value.code() in REFUSED
            outgoing.put(request(photos[2:4]))  # ...while the in-flight stream is still served
            second = next(responses)
            outgoing.put(None)
            assert list(responses) == []
        got = np.stack([vector(r) for r in [*first.results, *second.results]])
        np.testing.assert_allclose(got, expected[:4], atol=1e-6)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        print(log.read()[-3000:])  # shown by pytest only when the test fails


def test_serve_settings_come_from_flags_then_env_then_defaults(monkeypatch):
    from embedder.cli import _serve_config, build_parser

    monkeypatch.setenv("EMBEDDER_MAX_ITEMS", "4")
    monkeypatch.setenv("EMBEDDER_MAX_QUEUE", "100")
    monkeypatch.setenv("EMBEDDER_TOKEN", "from-env")
    args = build_parser().parse_args(["serve", "--port", "0", "--max-items", "8", "--max-batch", "16",
                                      "--metrics-port", "9100"])
    config = _serve_config(args)
    assert (config.port, config.max_items, config.max_batch, config.metrics_port) == (0, 8, 16, 9100)  # flags
    assert (config.max_queue, config.token) == (100, "from-env")  # env
    assert (config.host, config.max_message_bytes) == ("127.0.0.1", 64 * 1024 * 1024)  # defaults


def test_a_server_holds_at_most_max_models(embedder, photos):
    with running_server(embedder, max_models=1) as s, channel_to(s) as ch:
        with pytest.raises(grpc.RpcError) as e:  # a registered backbone, but no room: nothing is loaded
            pb_grpc.EmbedderStub(ch).Embed(pb.EmbedRequest(items=[pb.Item(image=photos[0])],
                                                           model="efficientnet_lite0"), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-models" in e.value.details()
        assert [m.name for m in s.service.models.models] == ["mobilenet_v2"]


FREEZE_PROBE = """
import gc, os, signal, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from embedder.config import Config
from embedder.server import serve

def probe(address):
    def run():
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        end = time.monotonic() + 60  # serve() freezes the heap right after SERVING
        while gc.get_freeze_count() == 0 and time.monotonic() < end:
            time.sleep(0.05)
        print("frozen", gc.get_freeze_count(), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=run, daemon=True).start()

sys.exit(serve(Config.from_env(port=0, device="cpu", data_dir=sys.argv[1]), on_listening=probe))
"""


def test_serve_exempts_the_loaded_heap_from_garbage_collection(cache_dir, tmp_path):
    """Full collections would walk torch's and the model's ~10^5 objects under load (a pause for every caller)."""
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", FREEZE_PROBE, str(tmp_path / "data")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frozen = int(proc.stdout.split("frozen")[-1].split()[0])
    assert frozen > 100_000, proc.stdout


def test_a_second_server_on_a_held_data_dir_fails_before_saying_listening(embedder, cache_dir, tmp_path):
    """Scripts wait for the "listening on" line: it must not appear for a server that is about to exit."""
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir)}
    with running_server(embedder, data_dir=tmp_path / "data"):
        proc = subprocess.run([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--device", "cpu",
                               "--data-dir", str(tmp_path / "data")], env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "listening" not in proc.stdout
    assert "open in another process" in proc.stderr
