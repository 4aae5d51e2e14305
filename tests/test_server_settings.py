"""Settings `embedder serve` cannot use are the operator's to fix: named, exit 2, before anything says listening."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from test_client import self_signed


def serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBEDDER_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "embedder.cli", "serve", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_a_busy_port_exits_2_naming_the_flag(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        grpc_busy = serve(tmp_path, "--port", port)
        http_busy = serve(tmp_path, "--port", "0", "--http-port", port)
        metrics_busy = serve(tmp_path, "--port", "0", "--metrics-port", port)
    assert metrics_busy.returncode == 2 and "--metrics-port" in metrics_busy.stderr, metrics_busy.stderr
    assert grpc_busy.returncode == 2 and "is the port in use" in grpc_busy.stderr and "--port" in grpc_busy.stderr
    assert http_busy.returncode == 2 and "--http-port" in http_busy.stderr
    assert "0 picks a free one" not in http_busy.stderr  # 0 turns the HTTP door off
    assert "listening on" not in grpc_busy.stdout


def test_a_model_name_that_cannot_load_is_named_before_anything_says_listening(tmp_path):
    for model, says in (("mobilenet_v2@stages=9", "stages=9"), ("mobilenet_v3", "unknown model 'mobilenet_v3'")):
        done = serve(tmp_path, "--port", "0", "--model", model)
        assert done.returncode == 2 and says in done.stderr, done.stderr
        assert "listening on" not in done.stdout  # it was printed, then the load failed


def test_a_certificate_and_key_that_do_not_pair_are_named_not_blamed_on_the_port(tmp_path):
    cert, key = self_signed(tmp_path)
    swapped = serve(tmp_path, "--port", "0", "--tls-cert", str(key), "--tls-key", str(cert))
    assert swapped.returncode == 2, swapped.stderr
    assert "do not load as a pair" in swapped.stderr and "port in use" not in swapped.stderr
