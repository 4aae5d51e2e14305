"""Runtimes that execute a :class:`FrozenBackbone`: torch (CUDA, and the fallback), ONNX Runtime, OpenVINO.

All three run the same module: the ONNX runtimes load it exported once into the cache directory,
keyed by the backbone's model id and the exporter settings, and verified by sha256 on every load; the cache is
kept under a size (:mod:`embedder.onnx_cache`).
Each runtime maps uint8 ``(N, H, W, 3)`` arrays to float32 ``(N, dim)`` features.

torch is imported only where it is used: the torch runtime, an export, and ``device="auto"`` on a machine
that has a GPU driver (to ask torch whether CUDA works). The ONNX runtimes on a cached export need none of it.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from .backbones import BackboneSpec, sha256_file
from .durable import fsync_file, replace_durably, temp_path, write_atomic
from .errors import ExportError
from .onnx_cache import evict, export_path, mark_used

if TYPE_CHECKING:
    import torch

    from .backbones import FrozenBackbone

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_VERSION = 1  # bump when the export recipe changes; old files are then rebuilt
# Preference for "auto" on CPU, fastest first, as measured by benchmarks/bench_embed.py: OpenVINO fp32 ran
# ~400 img/s model-only and ~215 img/s from JPEG bytes here, ONNX Runtime ~350-395 and ~180-207.
CPU_PREFERENCE = ("openvino", "onnxruntime")
RUNTIMES = ("torch", "onnxruntime", "openvino")
# OpenVINO runs batches up to this size on a model compiled for their exact shape (see OpenVinoRuntime).
STATIC_MAX_BATCH = 8
INSTALL = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino"}


class Runtime(Protocol):
    name: str
    device: str

    def run(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` -> float32 ``(N, dim)``."""


def installed(name: str) -> bool:
    """Whether ``name`` can be imported: found, not imported (torch alone takes seconds to import)."""
    return importlib.util.find_spec(name) is not None


def _cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing torch where no GPU driver is loaded (it is False there)."""
    if "torch" not in sys.modules and sys.platform.startswith("linux") and not any(
            os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvmap", "/dev/kfd", "/dev/dxg")):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if device.startswith("cuda") and not _cuda_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def resolve_runtime(runtime: str, device: str) -> str:
    """Pick the runtime: 'auto' means torch on CUDA and the fastest installed ONNX runtime on CPU."""
    if runtime not in ("auto", *RUNTIMES):
        raise ValueError(f"runtime must be one of auto, {', '.join(RUNTIMES)}; got {runtime!r}")
    if device != "cpu":
        if runtime not in ("auto", "torch"):
            raise ValueError(f"runtime {runtime!r} runs on CPU only; use runtime='torch' with device={device!r}")
        return "torch"
    if runtime == "auto":
        return next((r for r in CPU_PREFERENCE if installed(r)), "torch")
    if not installed(runtime):
        log.warning("runtime %r is not installed (%s); falling back to torch", runtime, INSTALL[runtime])
        return "torch"
    return runtime


class TorchRuntime:
    """Eager (optionally compiled) torch; channels_last; fp16 autocast on CUDA."""

    name = "torch"

    def __init__(self, module: FrozenBackbone, device: str, *, threads: int = 0, compile: bool = False) -> None:
        import torch

        self.device = device
        if device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.module = module.to(device).to(memory_format=torch.channels_last).eval()
        self._forward = torch.compile(self.module) if compile else self.module
        self._cuda = device.startswith("cuda")

    def run(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 ``(N, H, W, 3)``: a numpy array, or a tensor already on the device (device-decoded crops)."""
        import torch

        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(images)
        with torch.inference_mode():
            if self._cuda:
                # host arrays go through pinned memory; a tensor already on this GPU does not move
                x = x.pin_memory().to(self.device, non_blocking=True) if not x.is_cuda else x.to(self.device)
                with torch.autocast("cuda", dtype=torch.float16):
                    out = self._forward(x)
            else:
                out = self._forward(x.cpu())
            return out.float().cpu().numpy()


class OnnxRuntime:
    name = "onnxruntime"
    device = "cpu"

    def __init__(self, onnx_path: Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        # Idle workers must not spin: they would steal the cores the decode threads need (measured +5-70%).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: images})[0]


class OpenVinoRuntime:
    """OpenVINO on CPU; a batch of up to :data:`STATIC_MAX_BATCH` items runs on a model compiled for its shape.

    A dynamic-shape model pays for every change of batch size (mixed sizes 4, 3, 4, ... cost ~0.6-0.8 ms more
    per image than a steady 4 here), and a server's batches vary with its load. Each static model is compiled on
    first use (~0.2 s); larger batches share the dynamic one. The model is read from its file once: the ONNX
    cache may delete the file meanwhile (:func:`embedder.onnx_cache.evict`).
    """

    name = "openvino"
    device = "cpu"

    def __init__(self, onnx_path: Path, *, threads: int = 0, precision: str = "fp32") -> None:
        import openvino as ov

        self._core = ov.Core()
        self._model = self._core.read_model(str(onnx_path))
        self._config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = self._core.compile_model(self._model, "CPU", self._config)  # dynamic batch
        self._static: dict[int, object] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # an infer request is not thread-safe; one per thread and shape

    def run(self, images: np.ndarray) -> np.ndarray:
        reqs = getattr(self._local, "reqs", None)
        if reqs is None:
            reqs = self._local.reqs = {}
        n = len(images)
        key = n if 1 <= n <= STATIC_MAX_BATCH else 0
        req = reqs.get(key)
        if req is None:
            req = reqs[key] = (self._static_model(n, images.shape[1:]) if key else self.compiled).create_infer_request()
        return np.array(req.infer({0: images})[0], dtype=np.float32, copy=True)

    def _static_model(self, n: int, shape: tuple[int, ...]) -> object:
        with self._lock:  # compile each shape once, whichever thread asks first
            if n not in self._static:
                model = self._model.clone()
                model.reshape({0: [n, *shape]})
                self._static[n] = self._core.compile_model(model, "CPU", self._config)
            return self._static[n]


def create_runtime(
    name: str, spec: BackboneSpec, build: Callable[[], FrozenBackbone], device: str, *,
    cache_dir: Path, cache_bytes: int, threads: int = 0, precision: str = "fp32", compile: bool = False,
) -> Runtime:
    """``build`` makes the torch module; the ONNX runtimes call it only to export, so a process whose export is
    cached never builds the network or imports torchvision (~1.6 s of every start on this CPU)."""
    if precision != "fp32" and name != "openvino":
        raise ValueError(f"precision={precision!r} is only offered on the openvino runtime; use fp32")
    if name == "torch":
        return TorchRuntime(build(), device, threads=threads, compile=compile)
    path = export_onnx(spec, build, cache_dir, cache_bytes)
    if name == "onnxruntime":
        return OnnxRuntime(path, threads=threads)
    return OpenVinoRuntime(path, threads=threads, precision=precision)


def export_onnx(spec: BackboneSpec, build: Callable[[], FrozenBackbone], cache_dir: Path, cache_bytes: int) -> Path:
    """Export the module ``build()`` makes to ONNX once per model id; reuse the cached file while its sha256
    matches (then ``build`` is not called: the file was exported from verified weights and is verified itself).

    The sidecar JSON records the file's sha256, the opset and the export recipe version; a missing,
    corrupt or stale file is rebuilt (with a log line). The write is atomic: temp file, then rename. After an
    export the least recently used others are deleted until the cache holds at most ``cache_bytes``.
    """
    path = export_path(cache_dir, spec.model_id, f".opset{OPSET}.v{EXPORT_VERSION}.onnx")
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") == sha256_file(path) and meta.get("model_id") == spec.model_id:
                mark_used(meta_path)
                return path
            log.warning("cached ONNX export %s does not match its recorded hash; rebuilding it", path)
        except (OSError, ValueError) as e:
            log.warning("cached ONNX export metadata %s is unreadable (%s); rebuilding it", meta_path, e)
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.exporter is not None:  # a model card's ONNX file: wrapped, never through torch
        tmp = temp_path(path)
        try:
            spec.exporter(spec.weights.verified_path(), tmp)
            fsync_file(tmp)
            replace_durably(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        write_atomic(meta_path, json.dumps({"model_id": spec.model_id, "sha256": sha256_file(path), "opset": OPSET,
                                            "export_version": EXPORT_VERSION, "wrapped": True}, indent=2).encode())
        evict(path.parent, cache_bytes, keep=path)
        return path
    import torch  # only to export: a cached file is used without it

    crop = spec.preprocessing.crop
    dummy = torch.zeros(2, crop, crop, 3, dtype=torch.uint8)
    log.info("exporting %s to ONNX (opset %d) at %s", spec.model_id, OPSET, path)
    tmp = temp_path(path)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            model = build().cpu().eval()
            if spec.torchscript:
                # The legacy exporter cannot trace into a loaded TorchScript submodule; it exports a traced wrapper.
                model = torch.jit.trace(model, (dummy,))
            torch.onnx.export(
                model, (dummy,), tmp, dynamo=False, opset_version=OPSET,
                input_names=["images"], output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            )
        fsync_file(tmp)
        replace_durably(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"exporting {spec.model_id} to ONNX failed: {e}; use runtime='torch' meanwhile") from e
    meta = {"model_id": spec.model_id, "sha256": sha256_file(path), "opset": OPSET,
            "export_version": EXPORT_VERSION, "torch": torch.__version__}
    write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    evict(path.parent, cache_bytes, keep=path)
    return path
