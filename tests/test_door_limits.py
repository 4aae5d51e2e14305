"""Bounded concurrency at both doors: capped calls, idle streams ended, probes answering whatever else is open,
unauthenticated messages refused unread.

Real servers on loopback: in-process for the caps, an ``embedder serve`` process where its memory is measured.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from typing import Iterator

import grpc
import pytest
from conftest import http_door, running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.server import REFLECTION_STREAMS

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def _silent(stop: threading.Event) -> Iterator:
    """A request stream that sends nothing until ``stop``."""
    stop.wait()
    yield from ()


def _channel(address: str) -> grpc.Channel:
    """A channel on its own connection (grpc shares one per target unless told not to)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _check(channel: grpc.Channel, timeout: float = 1.0) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def _ended(calls: list) -> list[grpc.StatusCode]:
    """The codes of the calls that have ended (refused ones end at once, held ones stay open)."""
    return [c.code() for c in calls if c.done()]


def test_idle_streams_cannot_starve_health_or_other_callers(embedder, photos):
    """The attack from issue 19: 128 reflection streams that never send (no token needed) and 200 idle
    authenticated EmbedStreams. Health still answers within 1 s, and an Embed is served or refused at once."""
    stop = threading.Event()
    with running_server(embedder, token=TOKEN) as s, ExitStack() as stack:
        cap = s.config.max_concurrent_rpcs
        attacker, probe = stack.enter_context(_channel(s.address)), stack.enter_context(_channel(s.address))
        stack.callback(stop.set)
        reflect = attacker.stream_stream(REFLECTION)
        streams = pb_grpc.EmbedderStub(attacker).EmbedStream
        refl = [reflect(_silent(stop)) for _ in range(128)]
        embeds = [streams(_silent(stop), metadata=AUTH) for _ in range(200)]
        for c in refl + embeds:
            stack.callback(c.cancel)
        time.sleep(2.0)  # every stream is open (or refused) by now
        refused_refl, refused_embed = _ended(refl), _ended(embeds)
        assert refused_refl == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (128 - REFLECTION_STREAMS)
        assert refused_embed == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (200 - cap)
        for _ in range(5):
            start = time.monotonic()
            assert _check(probe) == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - start < 1.0
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.EmbedderStub(probe).Embed(pb.EmbedRequest(items=[pb.Item(id="a", image=photos[0])]),
                                              metadata=AUTH, timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs" in e.value.details()
        assert time.monotonic() - start < 1.0
        stop.set()  # the attack ends: its streams close and give their slots back
        for c in refl + embeds:
            c.cancel()
        deadline = time.monotonic() + 10
        while True:
            try:
                out = pb_grpc.EmbedderStub(probe).Embed(pb.EmbedRequest(items=[pb.Item(id="a", image=photos[0])]),
                                                        metadata=AUTH, timeout=5)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.2)
        assert out.results[0].status.code == 0


def test_the_cap_refuses_beyond_it_and_every_call_gives_its_slot_back(embedder, photos):
    request = pb.EmbedRequest(items=[pb.Item(id="a", image=photos[0])])
    with running_server(embedder, token=TOKEN, max_concurrent_rpcs=2) as s, _channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        for _ in range(10):  # answered, failed and unauthenticated calls alike give their slot back
            assert stub.Embed(request, metadata=AUTH, timeout=30).results[0].status.code == 0
            with pytest.raises(grpc.RpcError):
                stub.Search(pb.SearchRequest(collection="none", item_id="x"), metadata=AUTH, timeout=30)
            with pytest.raises(grpc.RpcError) as e:
                stub.Embed(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stop = threading.Event()
        held = [stub.EmbedStream(_silent(stop), metadata=AUTH) for _ in range(2)]
        try:
            time.sleep(1.0)
            with pytest.raises(grpc.RpcError) as e:
                stub.Embed(request, metadata=AUTH, timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2 concurrent" in e.value.details() and "--max-concurrent-rpcs" in e.value.details()
            assert _check(ch) == health_pb2.HealthCheckResponse.SERVING
        finally:
            stop.set()
        assert [r.results for r in held[0]] == [] and held[0].code() == grpc.StatusCode.OK
        time.sleep(0.5)
        assert stub.Embed(request, metadata=AUTH, timeout=30).results[0].status.code == 0


def test_idle_streams_are_ended_with_a_status_naming_the_flag(embedder, photos):
    request = pb.EmbedRequest(items=[pb.Item(id="a", image=photos[0])])
    with running_server(embedder, stream_idle_seconds=1.0) as s, _channel(s.address) as ch:
        stop = threading.Event()

        def one_then_silence() -> Iterator[pb.EmbedRequest]:
            yield request
            stop.wait()

        def steady() -> Iterator[pb.EmbedRequest]:
            for _ in range(6):  # 3 s in all, never 1 s silent
                yield request
                time.sleep(0.5)

        try:
            start = time.monotonic()
            idle = pb_grpc.EmbedderStub(ch).EmbedStream(one_then_silence(), timeout=20)
            first = next(idle)
            assert first.results[0].status.code == 0
            with pytest.raises(grpc.RpcError) as e:
                next(idle)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-idle-seconds" in e.value.details()
            assert 1.0 <= time.monotonic() - start < 5.0

            reflect = ch.stream_stream(REFLECTION)(_silent(stop), timeout=20)
            with pytest.raises(grpc.RpcError) as e:
                next(reflect)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-idle-seconds" in e.value.details()

            busy = list(pb_grpc.EmbedderStub(ch).EmbedStream(steady(), timeout=30))
            assert len(busy) == 6 and all(r.results[0].status.code == 0 for r in busy)
        finally:
            stop.set()


def _vm(pid: int, field: str) -> int:
    """``VmHWM`` (peak) or ``VmRSS`` of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_unauthenticated_large_messages_are_refused_unread(cache_dir, tmp_path):
    """The token is checked before the message is received: 8 unauthenticated 60 MB Embeds at once leave the
    server's peak memory where it was (received in full, they would add ~480 MB)."""
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "EMBEDDER_DATA_DIR": str(tmp_path / "data"),
           "EMBEDDER_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        with _channel(line.split()[-1]) as ch:
            deadline = time.monotonic() + 60
            while _check(ch, timeout=5) != health_pb2.HealthCheckResponse.SERVING:  # the model's memory first
                assert time.monotonic() < deadline
                time.sleep(0.2)
            peak_before = _vm(proc.pid, "VmHWM")
            big = pb.EmbedRequest(items=[pb.Item(id="big", image=b"\xff" * (60 * 2**20))])
            codes: list[grpc.StatusCode] = []

            def send() -> None:
                try:
                    pb_grpc.EmbedderStub(ch).Embed(big, timeout=30)
                except grpc.RpcError as e:
                    codes.append(e.code())

            threads = [threading.Thread(target=send) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 8
            assert _vm(proc.pid, "VmHWM") - peak_before < 100 * 2**20
    finally:
        proc.terminate()
        proc.wait(30)


def test_http_door_caps_concurrent_requests_and_ends_idle_uploads(embedder):
    with running_server(embedder, max_concurrent_rpcs=2, stream_idle_seconds=1.0) as s:
        with http_door(s) as http:
            head = ("POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    "Content-Length: 1000\r\n\r\n{").encode()
            slow = [socket.create_connection(("127.0.0.1", http.port), timeout=10) for _ in range(2)]
            for sock in slow:
                sock.sendall(head)  # then nothing: a slow upload holding a slot
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", http.port), timeout=10) as third:
                third.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                answer = third.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 429") and "--max-concurrent-rpcs" in answer, answer[:300]
            with socket.create_connection(("127.0.0.1", http.port), timeout=10) as probe:
                probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                assert probe.recv(65536).startswith(b"HTTP/1.1 200")
            for sock in slow:  # ended after 1 s without a byte
                answer = sock.recv(65536).decode()
                assert answer.startswith("HTTP/1.1 408") and "--stream-idle-seconds" in answer, answer[:300]
                sock.close()
            with socket.create_connection(("127.0.0.1", http.port), timeout=10) as again:
                again.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                assert again.recv(65536).startswith(b"HTTP/1.1 200")
