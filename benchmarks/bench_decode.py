"""JPEG bytes -> the backbone's 224x224 crop without torch: speed, exactness and memory of each decode path.

The reference is torchvision's own recipe on a PIL image: ``Image.open(...).convert("RGB")``, ``Resize(256)``
(bilinear, antialiased: Pillow's resize), ``CenterCrop(224)``. Every path below is compared to it pixel by pixel
and, where its crops differ at all, by the cosine of MobileNetV2's embeddings. Timings are single-thread CPU
time per image (``time.process_time``, torch held to one thread), the variants interleaved image by image
round by round (each round runs every variant over the same photos, the order rotated) so a noisy shared machine slows them all alike; each round's ratio to today's torchvision
path is reported with min/median over the rounds.

Paths (``--part decode``):
  ref_torchvision_transforms  the reference itself (PIL decode + torchvision.transforms on the PIL image)
  a_torchvision               today's default: Preprocessor(jpeg_decoder="torchvision") (decode_jpeg + torch resize)
  b_pillow                    today's Preprocessor(jpeg_decoder="pillow") (PIL decode + boxed two-pass resize)
  c_pil_full                  PIL decode + one full-image Image.resize + crop (the reference without torchvision)
  c_pil_full_gap{1.5,2,3}     the same with Image.resize(reducing_gap=g)
  c_pil_draft                 Image.draft() (DCT-domain downscale) + resize: known inexact, for scale
  d_simplejpeg                header probe + simplejpeg.decode_jpeg (libjpeg-turbo, exact IDCT/upsampling)
                              + Image.fromarray + the Preprocessor's exact boxed resize
  d_simplejpeg_fullresize     simplejpeg + one full-image Image.resize + crop, as the reference resizes
  d_simplejpeg_rgbx           the same decoded to RGBX and wrapped by Image.frombuffer (no copy)
  d_simplejpeg_noprobe        the same with simplejpeg's own header read instead of the PIL probe
  d_turbojpeg                 the same through PyTurboJPEG (Debian's libturbojpeg0)
  decode-only and probe-only rows, to see where the time goes
  pillow-simd (if ``--pillow-simd DIR`` holds it, e.g. ``pip install --target DIR pillow-simd``): the Pillow path
  in a child process with pillow-simd first on the path, paired with a child on stock Pillow each round.

``--embedder-rev REV`` times the embedder package as committed at REV (extracted with ``git archive``), so edits
in progress in the working tree do not move the baseline.

``--part imports``: RSS of a fresh interpreter after importing what each path needs (and after 20 decodes).
``--part serve``: ``embedder serve`` on a fresh data dir with a cached ONNX export (one start exports it first):
RSS once health is SERVING and after N embeds through the client, plus every import site of torch/torchvision
seen during serve (module chain from the entry point).

    python benchmarks/bench_decode.py                  # all parts -> benchmarks/results/decode.json
    python benchmarks/bench_decode.py --part decode --rounds 3 --out decode_quick
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import real_jpegs, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MAX_PIXELS = 64_000_000
SNAPSHOT: str | None = None  # a folder holding the embedder package at --embedder-rev


# --- decode paths -------------------------------------------------------------------------------------------


def _target(w: int, h: int, size: int = 256) -> tuple[int, int]:
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def _center(img: Image.Image, crop: int = 224) -> Image.Image:
    w, h = img.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def _none(_: object) -> None:
    return None


def build_variants() -> dict[str, Callable[[bytes], np.ndarray | None]]:
    import torch
    from torchvision import transforms as T

    from embedder.backbones import IMAGENET_224
    from embedder.preprocess import Preprocessor

    torch.set_num_threads(1)  # single-thread core time: the decode workers run torch on one thread too
    tv = Preprocessor(IMAGENET_224, max_pixels=MAX_PIXELS, jpeg_decoder="torchvision")
    pil = Preprocessor(IMAGENET_224, max_pixels=MAX_PIXELS, jpeg_decoder="pillow")
    probe = tv.jpeg.accepts  # the header/EXIF probe today's JPEG path runs first
    ref_tf = T.Compose([T.Resize(256), T.CenterCrop(224)])
    BIL = Image.Resampling.BILINEAR

    def ref(data: bytes) -> np.ndarray:
        return np.asarray(ref_tf(Image.open(io.BytesIO(data)).convert("RGB")))

    def pil_full(gap: float | None) -> Callable[[bytes], np.ndarray]:
        def run(data: bytes) -> np.ndarray:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            return np.asarray(_center(img.resize(_target(*img.size), BIL, reducing_gap=gap)))
        return run

    def pil_draft(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", _target(*img.size))
        img = img.convert("RGB")
        return np.asarray(_center(img.resize(_target(*img.size), BIL)))

    variants: dict[str, Callable[[bytes], np.ndarray | None]] = {
        "ref_torchvision_transforms": ref,
        "a_torchvision": tv,
        "b_pillow": pil,
        "c_pil_full": pil_full(None),
        "c_pil_full_gap2": pil_full(2.0),
        "c_pil_full_gap3": pil_full(3.0),
        "c_pil_full_gap1.5": pil_full(1.5),
        "c_pil_draft": pil_draft,
    }

    def exact_resize(arr: np.ndarray) -> np.ndarray:
        return np.asarray(pil.resize_crop(Image.fromarray(arr)), dtype=np.uint8)

    try:
        import simplejpeg

        def sj(data: bytes) -> np.ndarray | None:
            if not probe(data):
                return None
            return exact_resize(simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False))

        def sj_noprobe(data: bytes) -> np.ndarray:
            simplejpeg.decode_jpeg_header(data)  # size and colour space, as a probe would use them
            return exact_resize(simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False))

        def sj_rgbx(data: bytes) -> np.ndarray | None:
            # decode straight into Pillow's own 4-byte layout and wrap it without a copy
            if not probe(data):
                return None
            arr = simplejpeg.decode_jpeg(data, "RGBX", fastdct=False, fastupsample=False)
            img = Image.frombuffer("RGBX", (arr.shape[1], arr.shape[0]), arr, "raw", "RGBX", 0, 1)
            return np.ascontiguousarray(np.asarray(pil.resize_crop(img))[:, :, :3])

        def sj_full(data: bytes) -> np.ndarray | None:
            if not probe(data):
                return None
            img = Image.fromarray(simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False))
            return np.asarray(_center(img.resize(_target(*img.size), BIL)))

        variants["d_simplejpeg"] = sj
        variants["d_simplejpeg_fullresize"] = sj_full
        variants["d_simplejpeg_rgbx"] = sj_rgbx
        variants["d_simplejpeg_noprobe"] = sj_noprobe
        variants["decode_only_simplejpeg"] = lambda d: _none(simplejpeg.decode_jpeg(d, "RGB", fastdct=False,
                                                                                    fastupsample=False))
    except ImportError:
        pass
    try:
        import turbojpeg

        tj = turbojpeg.TurboJPEG()

        def tjd(data: bytes) -> np.ndarray | None:
            if not probe(data):
                return None
            return exact_resize(tj.decode(data, pixel_format=turbojpeg.TJPF_RGB, flags=0))

        variants["d_turbojpeg"] = tjd
        variants["decode_only_turbojpeg"] = lambda d: _none(tj.decode(d, pixel_format=turbojpeg.TJPF_RGB, flags=0))
    except (ImportError, RuntimeError, OSError):
        pass

    from torchvision.io import ImageReadMode, decode_jpeg

    def pil_decode(data: bytes) -> None:
        Image.open(io.BytesIO(data)).load()

    variants["decode_only_pil"] = pil_decode
    variants["decode_only_torchvision"] = lambda d: _none(decode_jpeg(
        torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB))
    variants["probe_only"] = lambda d: _none(probe(d))
    return variants


# --- exactness ----------------------------------------------------------------------------------------------


def exactness(variants: dict[str, Callable], jpegs: list[bytes],
              extra: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Each variant's crops vs the reference's, plus ``extra`` crops made elsewhere (for the first photos)."""
    import torch

    from embedder.backbones import FrozenBackbone, load_backbone
    from embedder.catalog import get_backbone

    ref_all = np.stack([variants["ref_torchvision_transforms"](j) for j in jpegs])
    spec = get_backbone("mobilenet_v2")
    model = FrozenBackbone(load_backbone(spec), spec.preprocessing).eval()
    torch.set_num_threads(2)

    def embed(crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = np.concatenate([model(torch.from_numpy(crops[i:i + 32])).numpy() for i in range(0, len(crops), 32)])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    ref_emb = embed(ref_all)
    out: dict[str, dict[str, Any]] = {}
    todo = [(k, fn) for k, fn in variants.items()
            if not k.startswith(("decode_only", "probe_only")) and k != "ref_torchvision_transforms"]
    todo += list((extra or {}).items())
    for name, fn in todo:
        crops = list(fn) if isinstance(fn, np.ndarray) else [fn(j) for j in jpegs]
        if any(c is None for c in crops):
            out[name] = {"note": "declined some inputs"}
            continue
        crops_a = np.stack(crops)
        n = len(crops_a)
        ref, ref_emb_n = ref_all[:n], ref_emb[:n]
        diff = np.abs(crops_a.astype(np.int16) - ref.astype(np.int16))
        row: dict[str, Any] = {
            "images": n,
            "max_abs_pixel_diff": int(diff.max()),
            "mean_abs_pixel_diff": round(float(diff.mean()), 5),
            "pixels_differing_frac": round(float((diff > 0).mean()), 6),
            "images_with_any_diff": int((diff.reshape(n, -1).max(1) > 0).sum()),
        }
        if diff.max() == 0:
            row["min_cosine"] = row["mean_cosine"] = 1.0
        else:
            cos = (embed(crops_a) * ref_emb_n).sum(1)
            row["min_cosine"] = round(float(cos.min()), 7)
            row["mean_cosine"] = round(float(cos.mean()), 7)
        out[name] = row
        print(f"  exactness {name:28s} {row}", flush=True)
    return out


# --- timing -------------------------------------------------------------------------------------------------

_SIMD_CHILD = r"""
import io, json, sys, time
sys.path.insert(0, {repo!r})
import numpy as np
from PIL import Image
import PIL
import torch
torch.set_num_threads(1)
from embedder.backbones import IMAGENET_224
from embedder.preprocess import Preprocessor
pp = Preprocessor(IMAGENET_224, max_pixels=64_000_000, jpeg_decoder="pillow")
sys.path.insert(0, {bench!r})
from images import real_jpegs
jpegs = real_jpegs({n}, seed=0)
for j in jpegs: pp(j)
t = []
for j in jpegs:
    t0 = time.process_time_ns(); pp(j); t.append(time.process_time_ns() - t0)
crops = np.stack([pp(j) for j in jpegs])
np.save({crops_out!r}, crops)
print(json.dumps({{"pillow": PIL.__version__, "ms": sum(t) / len(t) / 1e6}}))
"""


def _child_pillow(simd_dir: str | None, n: int, crops_out: str) -> dict[str, Any]:
    env = dict(os.environ)
    if simd_dir:
        env["PYTHONPATH"] = simd_dir + os.pathsep + env.get("PYTHONPATH", "")
    code = _SIMD_CHILD.format(repo=SNAPSHOT or str(REPO), bench=str(Path(__file__).resolve().parent), n=n, crops_out=crops_out)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def timing(variants: dict[str, Callable], jpegs: list[bytes], rounds: int,
           simd_dir: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    import torch

    torch.set_num_threads(1)  # after the model's forward in exactness(): an idle OpenMP team would bill its spin here
    names = list(variants)
    for j in jpegs[:8]:  # warm-up: lazy imports, first-call allocations
        for fn in variants.values():
            fn(j)
    per_round: dict[str, list[float]] = {k: [] for k in names}
    simd_rounds: list[dict[str, float]] = []
    tmp = tempfile.mkdtemp(prefix="bench_decode_")
    for r in range(rounds):
        tot = dict.fromkeys(names, 0)
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:  # variant by variant within a round (image-by-image interleaving measured the
            for j in jpegs:  # neighbours' allocator state: up to 2x artefacts), the order rotated every round
                t0 = time.process_time_ns()
                variants[k](j)
                tot[k] += time.process_time_ns() - t0
        for k in names:
            per_round[k].append(tot[k] / len(jpegs) / 1e6)
        if simd_dir:
            pair = {}
            for label, path in (("stock", None), ("simd", simd_dir))[:: 1 if r % 2 == 0 else -1]:
                pair[label] = _child_pillow(path, len(jpegs), os.path.join(tmp, f"{label}.npy"))
            simd_rounds.append({"stock_ms": pair["stock"]["ms"], "simd_ms": pair["simd"]["ms"],
                                "pillow_stock": pair["stock"]["pillow"], "pillow_simd": pair["simd"]["pillow"]})
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k}={per_round[k][-1]:.2f}" for k in names), flush=True)
    base = per_round["a_torchvision"]
    table = {}
    for k in names:
        ratios = [x / b for x, b in zip(per_round[k], base)]
        table[k] = {"core_ms_min": round(min(per_round[k]), 3), "core_ms_median": round(statistics.median(per_round[k]), 3),
                    "ratio_vs_a_torchvision_min": round(min(ratios), 3),
                    "ratio_vs_a_torchvision_median": round(statistics.median(ratios), 3),
                    "rounds_ms": [round(x, 3) for x in per_round[k]]}
    simd = None
    if simd_rounds:
        stock = np.load(os.path.join(tmp, "stock.npy"))
        simd_c = np.load(os.path.join(tmp, "simd.npy"))
        ratios = [s["simd_ms"] / s["stock_ms"] for s in simd_rounds]
        simd = {"rounds": simd_rounds, "ratio_simd_vs_stock_median": round(statistics.median(ratios), 3),
                "ratio_simd_vs_stock_min": round(min(ratios), 3),
                "simd_ms_median": round(statistics.median(s["simd_ms"] for s in simd_rounds), 3),
                "stock_ms_median": round(statistics.median(s["stock_ms"] for s in simd_rounds), 3),
                "max_abs_pixel_diff_simd_vs_stock_pillow_path": int(np.abs(stock.astype(np.int16) - simd_c).max()),
                "pixels_differing_frac": round(float((stock != simd_c).mean()), 6),
                "crops": simd_c}
    return table, simd


# --- memory: imports ----------------------------------------------------------------------------------------

IMPORT_SETS = {
    "python_numpy_pil": "import numpy, PIL.Image, PIL.ImageOps",
    "pil_path": "import numpy, PIL.Image, PIL.ImageOps\n"
                "def dec(d):\n import io; return PIL.Image.open(io.BytesIO(d)).convert('RGB').resize((256, 256))",
    "simplejpeg": "import numpy, PIL.Image, PIL.ImageOps, simplejpeg\n"
                  "def dec(d): return PIL.Image.fromarray(simplejpeg.decode_jpeg(d, 'RGB')).resize((256, 256))",
    "turbojpeg": "import numpy, PIL.Image, PIL.ImageOps, turbojpeg\ntj = turbojpeg.TurboJPEG()\n"
                 "def dec(d): return PIL.Image.fromarray(tj.decode(d, pixel_format=turbojpeg.TJPF_RGB)).resize((256, 256))",
    "torch_torchvision": "import numpy, PIL.Image, PIL.ImageOps, torch\n"
                         "from torchvision.io import decode_jpeg, ImageReadMode\n"
                         "from torchvision.transforms.v2 import functional as tvf\ntorch.set_num_threads(1)\n"
                         "def dec(d): return tvf.resize(decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), "
                         "mode=ImageReadMode.RGB), [256], antialias=True)",
    "torch_only": "import numpy, PIL.Image, torch",
}


def _rss_kb(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def import_rss(repeats: int = 3) -> dict[str, Any]:
    sample = os.path.join(tempfile.mkdtemp(prefix="bench_decode_"), "jpegs.npy")
    np.save(sample, np.array(real_jpegs(20, seed=0), dtype=object), allow_pickle=True)
    res: dict[str, Any] = {}
    for name, code in IMPORT_SETS.items():
        runs = []
        for _ in range(repeats):
            script = (f"import time; t0 = time.perf_counter()\n{code}\nt1 = time.perf_counter()\n"
                      "def rss():\n return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
                      "a = rss()\nimport numpy as _np\n"
                      f"js = _np.load({sample!r}, allow_pickle=True)\n"
                      "b = None\nif 'dec' in globals():\n for j in js: dec(bytes(j))\n b = rss()\n"
                      "import json; print(json.dumps({'import_s': t1 - t0, 'rss_mb_after_import': a / 1024, "
                      "'rss_mb_after_20_decodes': b and b / 1024}))")
            r = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=300)
            if r.returncode:
                runs.append({"error": r.stderr[-500:]})
                break
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        ok = [x for x in runs if "error" not in x]
        if not ok:
            res[name] = runs[0]
            continue
        res[name] = {"rss_mb_after_import_median": round(statistics.median(x["rss_mb_after_import"] for x in ok), 1),
                     "import_s_median": round(statistics.median(x["import_s"] for x in ok), 3)}
        if ok[0]["rss_mb_after_20_decodes"]:
            res[name]["rss_mb_after_20_decodes_median"] = round(
                statistics.median(x["rss_mb_after_20_decodes"] for x in ok), 1)
        print(f"  imports {name:20s} {res[name]}", flush=True)
    return res


# --- memory: embedder serve ---------------------------------------------------------------------------------

# Runs `embedder serve` with every import statement of torch/torchvision recorded: who imported it (the module
# chain from the entry point, and the function when the import is inside one). Written to $TORCH_IMPORT_LOG.
_SERVE_WRAPPER = r"""
import builtins, json, os, sys
_log = open(os.environ["TORCH_IMPORT_LOG"], "a")
_seen = set()
_orig = builtins.__import__
def _hook(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and (name == "torch" or name.startswith(("torch.", "torchvision"))) and globals is not None:
        importer = globals.get("__name__", "?")
        key = (importer, name)
        if key not in _seen and not importer.startswith(("torch", "torchvision")):
            _seen.add(key)
            f, chain, func = sys._getframe(1), [], None
            while f is not None:
                mod = f.f_globals.get("__name__", "?")
                if f.f_code.co_name == "<module>":
                    chain.append(mod)
                elif func is None:
                    func = f"{mod}.{f.f_code.co_name}"
                f = f.f_back
            _log.write(json.dumps({"importer": importer, "name": name, "first_load": "torch" not in sys.modules,
                                   "in_function": func if not chain or chain[0] != importer else None,
                                   "chain": chain[::-1], "line": sys._getframe(1).f_lineno}) + "\n")
            _log.flush()
    return _orig(name, globals, locals, fromlist, level)
builtins.__import__ = _hook
import embedder
_log.write(json.dumps({"embedder_file": embedder.__file__}) + "\n"); _log.flush()
from embedder.cli import main
sys.exit(main(sys.argv[1:]))
"""


_LAZY_TORCH = (
    "class _LazyTorch:  # what-if prototype: torch imported on first attribute use\n"
    "    def __getattr__(self, name):\n"
    "        import torch as _t\n"
    "        return getattr(_t, name)\n"
    "torch = _LazyTorch()\n")


def patch_lazy_torch(root: str) -> list[str]:
    """What-if (``--what-if-lazy``): the snapshot's pipeline.py and jpeg.py with their torch imports made lazy.

    A prototype of the edits this benchmark recommends, applied to a throw-away copy only: ``import torch`` at
    module level becomes a proxy that imports torch on first use, pipeline.py takes FrozenBackbone from the
    module on use, tests a tensor only when torch is loaded, and the decode threads' OpenMP setting is skipped
    while torch is not loaded. Returns what it changed; raises if a pattern is no longer there.
    """
    changed = []
    for rel, subs in {
        "embedder/pipeline.py": [
            ("\nimport torch\n", "\n" + _LAZY_TORCH),
            ("from .backbones import BackboneSpec, FrozenBackbone, find_backbone, load_backbone",
             "from . import backbones as _bb\nfrom .backbones import BackboneSpec, find_backbone, load_backbone"),
            ("lambda: FrozenBackbone(", "lambda: _bb.FrozenBackbone("),
            ("isinstance(images, torch.Tensor)",
             "(\"torch\" in __import__(\"sys\").modules and isinstance(images, torch.Tensor))"),
        ],
        "embedder/jpeg.py": [
            ("\nimport torch\n", "\n" + _LAZY_TORCH),
            ('    """Decode-pool initializer', '    if "torch" not in __import__("sys").modules:\n        return\n'
                                            '    """Decode-pool initializer'),
        ],
    }.items():
        path = Path(root) / rel
        text = path.read_text()
        for old, new in subs:
            if old not in text:
                raise RuntimeError(f"--what-if-lazy: {rel} no longer has {old!r}")
            text = text.replace(old, new, 1)
            changed.append(f"{rel}: {old.strip()[:60]}")
        path.write_text(text)
    return changed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(data_dir: Path, cache_dir: Path, log_path: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = dict(os.environ, TORCH_IMPORT_LOG=str(log_path))
    env["PYTHONPATH"] = (SNAPSHOT or str(REPO)) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [PY, "-c", _SERVE_WRAPPER, "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--cache-dir", str(cache_dir), *extra]
    # cwd: not the repo, whose working tree would shadow the snapshot (`python -c` puts the cwd first on sys.path)
    proc = subprocess.Popen(cmd, env=env, cwd=str(log_path.parent), stdout=subprocess.DEVNULL,
                            stderr=open(log_path.with_suffix(".stderr"), "w"))
    return proc, port


def _wait_serving(port: int, proc: subprocess.Popen, timeout: float = 300) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"embedder serve exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - t0
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError("embedder serve did not become SERVING")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_rss(embeds: int, extra: list[str]) -> dict[str, Any]:
    from embedder.client import EmbedderClient

    tmp = Path(tempfile.mkdtemp(prefix="bench_decode_serve_"))
    cache = tmp / "cache"
    res: dict[str, Any] = {"args": extra, "embedder_source": SNAPSHOT or str(REPO)}
    # 1st start: exports the ONNX file into the fresh cache dir (torch needed for that).
    proc, port = _start_serve(tmp / "data0", cache, tmp / "imports_export.jsonl", extra)
    try:
        res["export_start_s"] = round(_wait_serving(port, proc), 2)
        res["export_start_rss_mb"] = round(_rss_kb(proc.pid)["VmRSS"] / 1024, 1)
    finally:
        _stop(proc)
    # 2nd start: the cached export, as a restarted server runs.
    log = tmp / "imports_cached.jsonl"
    proc, port = _start_serve(tmp / "data1", cache, log, extra)
    try:
        res["cached_start_s"] = round(_wait_serving(port, proc), 2)
        time.sleep(1.0)
        res["idle_rss_mb_after_warmup"] = round(_rss_kb(proc.pid)["VmRSS"] / 1024, 1)
        if embeds:
            jpegs = real_jpegs(256, seed=1)
            client = EmbedderClient(f"127.0.0.1:{port}")
            t0 = time.monotonic()
            done = 0
            while done < embeds:
                start = done % len(jpegs)  # distinct photos (seed 1: none of them cached before), 32 a call
                batch = jpegs[start:start + min(32, embeds - done)]
                client.embed(batch)
                done += len(batch)
            res["embeds"] = done
            res["embed_s"] = round(time.monotonic() - t0, 2)
            time.sleep(1.0)
            mem = _rss_kb(proc.pid)
            res["idle_rss_mb_after_embeds"] = round(mem["VmRSS"] / 1024, 1)
            res["peak_rss_mb"] = round(mem["VmHWM"] / 1024, 1)
            client.close()
    finally:
        _stop(proc)
    sites = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    res["embedder_imported_from"] = next((x["embedder_file"] for x in sites if "embedder_file" in x), None)
    sites = [x for x in sites if "importer" in x]
    res["torch_loaded_cached_serve"] = any(x["first_load"] for x in sites)
    # the project's own import statements (torch's and torchvision's inner imports of each other left out)
    res["torch_import_sites_cached_serve"] = [x for x in sites
                                              if x["importer"].startswith(("embedder", "classifier", "__main__"))]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "decode", "imports", "serve"), default="all")
    ap.add_argument("--n-time", type=int, default=64, help="photos timed per round")
    ap.add_argument("--n-exact", type=int, default=256, help="photos compared with the reference")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pillow-simd", default=os.environ.get("PILLOW_SIMD_DIR"),
                    help="a folder with pillow-simd installed (pip install --target DIR pillow-simd)")
    ap.add_argument("--serve-embeds", type=int, default=512)
    ap.add_argument("--serve-args", default="", help="extra `embedder serve` arguments, e.g. '--jpeg-decoder pillow'")
    ap.add_argument("--out", default="decode")
    ap.add_argument("--embedder-rev", help="import the embedder package as committed at this git revision")
    ap.add_argument("--what-if-lazy", action="store_true",
                    help="serve part: patch the snapshot's pipeline.py/jpeg.py to import torch lazily (a prototype)")
    ap.add_argument("--serve-key", default="serve", help="where the serve part's result goes in the JSON")
    args = ap.parse_args()
    if args.what_if_lazy and not args.embedder_rev:
        ap.error("--what-if-lazy patches a snapshot: give --embedder-rev too")
    global SNAPSHOT
    payload_patch: list[str] = []
    if args.embedder_rev:
        SNAPSHOT = tempfile.mkdtemp(prefix="bench_decode_src_")
        subprocess.run(f"git -C {REPO} archive {args.embedder_rev} embedder classifier | tar -x -C {SNAPSHOT}",
                       shell=True, check=True)
        sys.path.insert(0, SNAPSHOT)
        if args.what_if_lazy:
            payload_patch = patch_lazy_torch(SNAPSHOT)
        args.embedder_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.embedder_rev],
                                           capture_output=True, text=True, check=True).stdout.strip()

    payload: dict[str, Any] = {"settings": vars(args)}
    out_path = Path(__file__).resolve().parent / "results" / f"{args.out}.json"
    if out_path.exists():  # keep the parts not rerun
        prev = json.loads(out_path.read_text())
        payload.update({k: v for k, v in prev.items() if k not in ("machine", "settings")})
    if args.part in ("all", "decode"):
        variants = build_variants()
        print("exactness ...", flush=True)
        payload["exactness"] = exactness(variants, real_jpegs(args.n_exact, seed=0))
        print("timing ...", flush=True)
        table, simd = timing(variants, real_jpegs(args.n_time, seed=0), args.rounds, args.pillow_simd)
        import embedder.preprocess
        payload["embedder_source"] = str(Path(embedder.preprocess.__file__).parent)
        payload["timing_single_thread"] = table
        if simd is not None:  # its crops vs the reference, over the photos it timed
            ref_only = {"ref_torchvision_transforms": variants["ref_torchvision_transforms"]}
            payload["exactness"].update(exactness(ref_only, real_jpegs(args.n_time, seed=0),
                                                  extra={"pillow_simd_b_pillow": simd.pop("crops")}))
            payload["exactness"]["pillow_simd_b_pillow"]["note"] = "pillow-simd in a child process, first photos only"
        payload["pillow_simd"] = simd
        try:
            from importlib import metadata
            payload["versions"] = {d: metadata.version(d) for d in ("simplejpeg", "PyTurboJPEG") if _has(d)}
        except Exception:
            pass
    if args.part in ("all", "imports"):
        print("import RSS ...", flush=True)
        payload["import_rss"] = import_rss()
    if args.part in ("all", "serve"):
        print("serve RSS ...", flush=True)
        res = payload[args.serve_key] = serve_rss(args.serve_embeds, args.serve_args.split())
        res["embedder_rev"] = args.embedder_rev
        if args.what_if_lazy:
            res["what_if_lazy_patch"] = payload_patch
        print(json.dumps({k: v for k, v in res.items() if k != "torch_import_sites_cached_serve"}))
        for s in res["torch_import_sites_cached_serve"]:
            print("  torch import:", s)
    print(write_json(args.out, payload))


def _has(dist: str) -> bool:
    from importlib import metadata
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
