"""CPU runtimes: torch, ONNX Runtime and OpenVINO agree in fp32; the ONNX export is cached and verified."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from embedder import Config, Embedder
from embedder.backbones import IMAGENET_224, BackboneSpec, WeightsFile, register_backbone, sha256_file
from embedder.errors import ExportError
from embedder.onnx_cache import export_path
from embedder.runtimes import CPU_PREFERENCE, RUNTIMES, STATIC_MAX_BATCH, installed, resolve_device, resolve_runtime

from conftest import cosine

RUNTIME_FIXTURES = {"torch": "torch_embedder", "onnxruntime": "ort_embedder", "openvino": "openvino_embedder"}


def onnx_files(cache: Path) -> list[Path]:
    return sorted((cache / "onnx").glob("*.onnx"))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_matches_torchvision_in_fp32(runtime, request, photos, torchvision_features):
    """Each CPU runtime (all three are installed by `make install`) equals plain torchvision (cosine >= 0.9999)."""
    assert installed(runtime)
    emb = request.getfixturevalue(RUNTIME_FIXTURES[runtime])
    assert emb.runtime.name == runtime and emb.info()["precision"] == "fp32"
    got = emb.embed(photos)
    assert got.dtype == np.float32 and got.shape == (len(photos), 1280)
    assert cosine(got, torchvision_features).min() >= 0.9999


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_onnx_runtimes_equal_torch(runtime, request, torch_embedder, photos):
    """The exported graph computes what the torch module computes, to float rounding."""
    emb = request.getfixturevalue(RUNTIME_FIXTURES[runtime])
    images = np.stack([emb.prepare(p) for p in photos])
    ours, ref = emb.runtime.run(images), torch_embedder.runtime.run(images)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4)


def test_onnx_export_is_cached_and_reused(photos, tmp_path, torch_embedder):
    """The first Embedder exports once (atomically, with a sidecar); the next one reuses the file untouched."""
    with Embedder(model="mobilenet_v2", device="cpu", runtime="onnxruntime", cache_dir=tmp_path) as emb:
        first = emb.embed(photos[:2])
    (onnx,) = onnx_files(tmp_path)
    assert onnx.name.startswith("mobilenet_v2_b03531047ffa_pp2-")
    meta = json.loads(onnx.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(onnx) and meta["model_id"] == emb.model_id and meta["opset"] == 17
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted([onnx.name, onnx.with_suffix(".json").name])
    stat = onnx.stat()
    for runtime in ("onnxruntime", "openvino"):
        with Embedder(model="mobilenet_v2", device="cpu", runtime=runtime, cache_dir=tmp_path) as emb:
            again = emb.embed(photos[:2])
        assert (onnx.stat().st_mtime_ns, onnx.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino), runtime
        assert 1 - cosine(again, first).min() < 1e-6
    assert 1 - cosine(first, torch_embedder.embed(photos[:2])).min() < 1e-6


def test_a_cached_export_starts_without_building_the_network(embedder, cache_dir):
    """With the export cached, a new process's Embedder never builds the torch network: no torchvision import
    (~1.6 s of every service, replica or Ray actor start here), and still the same vectors."""
    code = ("import sys, numpy as np; from embedder import Embedder; "
            f"e = Embedder(model='mobilenet_v2', device='cpu', runtime='{embedder.runtime.name}', "
            f"cache_dir={str(cache_dir)!r}); v = e.embed([np.full((64, 64, 3), 128, np.uint8)]); "
            "print('torchvision' in sys.modules, ' '.join(map(repr, v[0, :4].tolist())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"
    expected = embedder.embed([np.full((64, 64, 3), 128, np.uint8)])[0, :4]
    np.testing.assert_allclose([float(x) for x in out[1:]], expected, atol=1e-6)


@pytest.mark.parametrize("damage", ["flipped-bytes", "truncated", "metadata-garbage", "metadata-other-model"])
def test_damaged_cache_is_detected_and_rebuilt(damage, photos, tmp_path, caplog, ort_embedder, cache_dir):
    """A cached export that no longer matches its sidecar is rebuilt with a WARNING; results stay right."""
    (tmp_path / "onnx").mkdir()
    for f in (cache_dir / "onnx").glob(export_path(cache_dir, ort_embedder.model_id, ".*").name):
        shutil.copy2(f, tmp_path / "onnx")  # the session's good export, as a stale cache to damage
    (onnx,) = onnx_files(tmp_path)
    meta_path = onnx.with_suffix(".json")
    good = onnx.read_bytes()
    if damage == "flipped-bytes":  # same size, so only the hash can tell
        data = bytearray(good)
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        onnx.write_bytes(bytes(data))
    elif damage == "truncated":
        onnx.write_bytes(good[:1000])
    elif damage == "metadata-garbage":
        meta_path.write_text("{not json")
    else:
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "model_id": "efficientnet_lite0:x"}))
    with caplog.at_level(logging.WARNING, logger="embedder.runtimes"):
        with Embedder(model="mobilenet_v2", device="cpu", runtime="onnxruntime", cache_dir=tmp_path) as emb:
            got = emb.embed(photos[:3])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "embedder.runtimes"]
    assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()
    assert onnx.read_bytes() == good  # the export is deterministic: rebuilt to the same file
    assert json.loads(meta_path.read_text())["sha256"] == sha256_file(onnx)
    np.testing.assert_allclose(got, ort_embedder.embed(photos[:3]), atol=1e-6)


def test_export_failure_is_an_error_not_a_silent_fallback(tmp_path, restore_registry):
    """A backbone ONNX cannot express raises ExportError (pointing at runtime='torch') and leaves no files."""

    class Spectrum(nn.Module):  # aten::fft_rfft2 has no ONNX opset-17 export
        def forward(self, x):
            return torch.fft.rfft2(x).abs().mean((2, 3))

    def build(path):
        net = nn.Sequential(Spectrum(), nn.Linear(3, 2))
        net.load_state_dict(torch.load(path, weights_only=True))
        return net

    weights = tmp_path / "spectrum.pth"
    torch.save(nn.Sequential(Spectrum(), nn.Linear(3, 2)).state_dict(), weights)
    register_backbone(BackboneSpec(name="spectrum", dim=3, preprocessing=IMAGENET_224, build=build,
                                   weights=WeightsFile(sha256=sha256_file(weights), path=weights)))
    cache = tmp_path / "cache"
    for runtime in ("auto", "onnxruntime", "openvino"):
        with pytest.raises(ExportError, match="spectrum.*ONNX failed.*use runtime='torch'"):
            Embedder(model="spectrum", device="cpu", runtime=runtime, cache_dir=cache)
    assert list((cache / "onnx").iterdir()) == []  # no half-written temp files, nothing cached
    with Embedder(model="spectrum", device="cpu", runtime="torch", cache_dir=cache) as emb:
        assert emb.embed([np.full((32, 32, 3), 128, np.uint8)]).shape == (1, 3)


def test_openvino_compiles_a_model_per_small_batch_size(openvino_embedder, photos):
    """A batch of up to STATIC_MAX_BATCH items runs on a model compiled for its shape (a dynamic-shape model pays
    for every change of batch size); bigger ones run on the dynamic model; all agree; warm_up() compiles the
    sizes the pipeline will send, so the first real call does not pay for it."""
    runtime = openvino_embedder.runtime
    images = np.stack([openvino_embedder.prepare(p) for p in photos])
    big = np.concatenate([images, images, images])[:STATIC_MAX_BATCH + 1]
    dynamic = runtime.run(big)
    assert STATIC_MAX_BATCH + 1 not in runtime._static
    openvino_embedder.warm_up()
    assert set(range(1, openvino_embedder.micro_batch + 1)) <= set(runtime._static)
    for n in (1, 3, STATIC_MAX_BATCH):
        np.testing.assert_allclose(runtime.run(big[:n]), dynamic[:n], rtol=1e-4, atol=1e-4)
        assert n in runtime._static


def test_bf16_on_openvino(openvino_embedder, photos, cache_dir):
    """precision='bf16' runs on OpenVINO (in bf16 where the CPU has it) within cosine 0.99 of fp32."""
    import openvino as ov

    fp32 = openvino_embedder.embed(photos)
    with Embedder(model="mobilenet_v2", device="cpu", runtime="openvino", precision="bf16", cache_dir=cache_dir) as emb:
        assert emb.info()["precision"] == "bf16"
        got = emb.embed(photos)
        hint = str(emb.runtime.compiled.get_property("INFERENCE_PRECISION_HINT"))
    sims = cosine(got, fp32)
    assert got.dtype == np.float32 and sims.min() >= 0.99
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert "bfloat16" in hint or "bf16" in hint
        assert sims.max() < 0.999999  # really computed in reduced precision
    else:
        assert np.array_equal(got, fp32)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_bf16_is_openvino_only(runtime, cache_dir):
    with pytest.raises(ValueError, match="precision='bf16' is only offered on the openvino runtime"):
        Embedder(model="mobilenet_v2", device="cpu", runtime=runtime, precision="bf16", cache_dir=cache_dir)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        Config(precision="fp16")


def test_auto_picks_the_preferred_installed_cpu_runtime(embedder):
    """auto on CPU takes the first installed ONNX runtime of the measured preference order, never torch."""
    assert set(CPU_PREFERENCE) == {"openvino", "onnxruntime"}
    expected = next(r for r in CPU_PREFERENCE if installed(r))
    assert resolve_runtime("auto", "cpu") == expected
    assert embedder.runtime.name == expected
    assert resolve_runtime("auto", "cuda") == "torch" and resolve_runtime("auto", "cuda:1") == "torch"
    for name in RUNTIMES:
        assert resolve_runtime(name, "cpu") == name


def test_runtime_names_are_checked(cache_dir):
    with pytest.raises(ValueError, match="runtime must be one of auto, torch, onnxruntime, openvino; got 'tensorrt'"):
        resolve_runtime("tensorrt", "cpu")
    with pytest.raises(ValueError, match="tensorrt"):
        Embedder(model="mobilenet_v2", device="cpu", runtime="tensorrt", cache_dir=cache_dir)
    assert installed("torch") and not installed("no_such_runtime_module")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_onnx_runtimes_are_cpu_only(runtime):
    with pytest.raises(ValueError, match=f"runtime '{runtime}' runs on CPU only; use runtime='torch'"):
        resolve_runtime(runtime, "cuda")


def test_device_resolution():
    """cpu stays cpu; auto follows CUDA availability; CUDA without CUDA and unknown devices are refused."""
    assert resolve_device("cpu") == "cpu"
    cuda = torch.cuda.is_available()
    assert resolve_device("auto") == ("cuda" if cuda else "cpu")
    if not cuda:
        for device in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="CUDA is not available; use device='cpu'"):
                resolve_device(device)
    for device in ("tpu", "gpu", "CPU"):
        with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            resolve_device(device)
