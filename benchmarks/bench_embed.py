"""Embedding throughput: the tutorial loop vs the model alone vs our pipeline, on the same real JPEGs.

Usage::

    python benchmarks/bench_embed.py                    # 256 photos (2048 on CUDA), 3 repeats, device auto
    python benchmarks/bench_embed.py --quick            # smoke test: 64 photos, 1 repeat
    python benchmarks/bench_embed.py --device cpu --n 512 --repeats 5
    python benchmarks/bench_embed.py --card             # built-in mobilenet_v2 vs the same network as an ONNX card

Every number is img/s, the median of ``--repeats`` timed passes over all photos, after one untimed
warm-up pass. All cases stay loaded and the passes are interleaved (round 1 runs every case once,
then round 2, ...), so a burst of load on a shared machine spreads over all cases rather than
skewing a few. Measured, on the default backbone (mobilenet_v2):

1. naive: the tutorial loop, one image at a time (PIL open, torchvision Resize/CenterCrop/ToTensor/
   Normalize, torch eager ``model(x.unsqueeze(0))``, torch's default threads);
2. model alone: pre-decoded uint8 crops through ``Embedder.embed_arrays`` per runtime, over a scan of
   batch sizes (the best one is the compute limit); plus decode + resize alone (the ``Preprocessor``
   in 1..all threads), to see where the pipeline's time goes;
3. pipeline: ``Embedder.embed(jpeg_bytes)`` per runtime with default settings, and on CPU a scan of
   runtime threads x decode workers x micro-batch for the default runtime;
4. decode alone and the default pipeline with the other JPEG decoder than the device's default (``auto``: Pillow
   on CPU, torchvision on CUDA), to show what the decoder choice is worth.

On CPU all three runtimes (torch, onnxruntime, openvino; openvino bf16 as opt-in) are measured;
on CUDA only the torch runtime. Results, with the pass/fail of the targets, go to
``benchmarks/results/bench_embed_cpu.json`` (or ``bench_embed_<gpu name>.json``).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from itertools import product
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from tqdm.auto import tqdm

from embedder import Embedder
from embedder.backbones import BackboneSpec, load_backbone
from embedder.catalog import get_backbone
from embedder.config import Config, resolve_jpeg_decoder
from embedder.jpeg import one_torch_thread
from embedder.preprocess import Preprocessor
from embedder.runtimes import RUNTIMES, installed, resolve_device, resolve_runtime
from images import gpu_name, real_jpegs, slug, write_json

log = logging.getLogger("bench_embed")

MODEL = "mobilenet_v2"
CPU_BATCHES = (1, 2, 4, 8, 16)
CUDA_BATCHES = (16, 32, 64, 128, 256)
SCAN_MICRO_BATCHES = (2, 4, 8)
SAME_COSINE = {"cpu": 0.9999, "cuda": 0.999}  # CUDA autocasts to fp16; the naive loop runs fp32


@dataclass
class Timing:
    """Median img/s over the timed repeats, each repeat's img/s, and the last pass's output."""

    img_s: float
    runs: list[float]
    output: Any = field(repr=False, default=None)

    def to_json(self) -> dict[str, Any]:
        return {"img_s": round(self.img_s, 1), "runs": [round(r, 1) for r in self.runs]}


@dataclass
class Target:
    name: str
    issue: str
    value: float
    threshold: float
    unit: str = "x"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "issue": self.issue, "value": round(self.value, 3),
                "threshold": self.threshold, "unit": self.unit, "passed": self.value >= self.threshold}


Case = tuple[Callable[[Sequence], Any], Sequence]  # a function and the items it processes in one pass


def measure_all(cases: dict[tuple, Case], repeats: int) -> dict[tuple, Timing]:
    """Warm every case up with one pass, then time ``repeats`` rounds, each running every case once.

    Interleaving the cases spreads a shared machine's bursts of load over all of them, instead of
    skewing the few that happened to run during a burst.
    """
    rates: dict[tuple, list[float]] = {key: [] for key in cases}
    outputs: dict[tuple, Any] = {}
    for round_ in range(repeats + 1):
        desc = "warm-up" if round_ == 0 else f"round {round_}/{repeats}"
        with tqdm(cases.items(), desc=desc, unit="case", leave=False, disable=None) as bar:
            for key, (fn, items) in bar:
                bar.set_postfix_str(" ".join(map(str, key)))
                start = time.perf_counter()
                outputs[key] = fn(items)
                if round_:
                    rates[key].append(len(items) / (time.perf_counter() - start))
        log.info("%s done", desc)
    return {key: Timing(statistics.median(r), r, outputs[key]) for key, r in rates.items()}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def thread_choices(cores: int) -> list[int]:
    return sorted({1, max(1, cores // 2), cores})


# --- the three ways to embed ----------------------------------------------------------------------


def naive_loop(spec: BackboneSpec, device: str) -> Callable[[Sequence[bytes]], np.ndarray]:
    """The tutorial: one image at a time through torchvision transforms and the eager model."""
    pp = spec.preprocessing
    model = load_backbone(spec).to(device)
    transform = T.Compose([
        T.Resize(pp.resize, interpolation=T.InterpolationMode(pp.interpolation)),
        T.CenterCrop(pp.crop), T.ToTensor(), T.Normalize(pp.mean, pp.std),
    ])

    def run(jpegs: Sequence[bytes]) -> np.ndarray:
        outs = []
        with torch.no_grad():
            for data in jpegs:
                img = Image.open(io.BytesIO(data)).convert("RGB")
                outs.append(model(transform(img).unsqueeze(0).to(device)).cpu())
        return torch.cat(outs).numpy()

    return run


def decode_pool(workers: int) -> ThreadPoolExecutor:
    """Threads set up as the Embedder's decode workers are (one torch thread each)."""
    return ThreadPoolExecutor(workers, initializer=one_torch_thread)


def decode_in(pool: ThreadPoolExecutor, pre: Preprocessor, jpegs: Sequence[bytes]) -> np.ndarray:
    """Decode + resize + crop only (the pipeline's CPU side), in the pool's threads."""
    return np.stack(list(pool.map(pre, jpegs)))


def embed_arrays_at(emb: Embedder, batch: int, arrays: np.ndarray) -> np.ndarray:
    """The model alone: ``embed_arrays`` on pre-decoded crops, in micro-batches of ``batch``."""
    emb.micro_batch = batch
    return emb.embed_arrays(arrays)


def label(emb: Embedder) -> str:
    """The runtime's name, plus its precision and thread count where not the defaults."""
    bf16 = "-bf16" if emb.config.precision == "bf16" else ""
    threads = f"-{emb.config.runtime_threads}t" if emb.config.runtime_threads else ""
    return emb.runtime.name + bf16 + threads


def best(scan: dict[int, Timing]) -> tuple[int, Timing]:
    return max(scan.items(), key=lambda kv: kv[1].img_s)


# --- the benchmark ---------------------------------------------------------------------------------


def run_benchmark(device: str, n: int, repeats: int) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    on_cpu = device == "cpu"
    spec = get_backbone(MODEL)
    jpegs = real_jpegs(n)
    default_decoder = resolve_jpeg_decoder("auto", device)
    other_decoder = "torchvision" if default_decoder == "pillow" else "pillow"
    pre = Preprocessor(spec.preprocessing, max_pixels=Config.from_env().max_pixels, jpeg_decoder=default_decoder)
    arrays = np.stack([pre(j) for j in jpegs])
    default_runtime = resolve_runtime("auto", device)
    runtimes = [r for r in RUNTIMES if installed(r)] if on_cpu else ["torch"]
    log.info("%d JPEGs (%.0f KB median), device %s, runtimes %s, default %s, %d repeats",
             n, np.median([len(j) for j in jpegs]) / 1024, device, runtimes, default_runtime, repeats)
    with ExitStack() as stack:
        def embedder(**settings: Any) -> Embedder:
            return stack.enter_context(Embedder(MODEL, device, **settings))

        cases: dict[tuple, Case] = {("naive",): (naive_loop(spec, device), jpegs)}
        for workers in thread_choices(cores):
            cases["decode", workers] = (partial(decode_in, stack.enter_context(decode_pool(workers)), pre),
                                        jpegs)
        for settings in model_variants(on_cpu, runtimes, default_runtime):
            emb = embedder(**settings)
            for batch in CPU_BATCHES if on_cpu else CUDA_BATCHES:
                cases["model", label(emb), batch] = (partial(embed_arrays_at, emb, batch), arrays)
        for runtime in runtimes:
            cases["pipeline", runtime] = (embedder(runtime=runtime).embed, jpegs)
        # The same pipeline with every plain JPEG through the other decoder
        other = Preprocessor(spec.preprocessing, max_pixels=Config.from_env().max_pixels, jpeg_decoder=other_decoder)
        cases["decode-other", cores] = (partial(decode_in, stack.enter_context(decode_pool(cores)), other),
                                        jpegs)
        cases["pipeline-other", default_runtime] = (embedder(jpeg_decoder=other_decoder).embed, jpegs)
        if on_cpu:
            for threads, workers, mb in product(thread_choices(cores), thread_choices(cores), SCAN_MICRO_BATCHES):
                emb = embedder(runtime=default_runtime, runtime_threads=threads, decode_workers=workers,
                               micro_batch=mb)
                cases["scan", threads, workers, mb] = (emb.embed, jpegs)
        log.info("%d cases loaded", len(cases))
        timings = measure_all(cases, repeats)
    return summarize(device, n, repeats, cores, default_runtime, timings)


def run_card_comparison(device: str, n: int, repeats: int) -> dict[str, Any]:
    """``--card``: the built-in backbone against the same network saved by a user as an ONNX file and served
    through a model card, on the default CPU runtime: the model alone and the whole pipeline, interleaved."""
    import tempfile
    from pathlib import Path

    from embedder.cards import ModelCard, register_card

    spec = get_backbone(MODEL)
    runtime = resolve_runtime("auto", device)
    jpegs = real_jpegs(n)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        onnx_file = Path(tmp) / f"{MODEL}.onnx"
        crop = spec.preprocessing.crop
        torch.onnx.export(load_backbone(spec), (torch.zeros(1, 3, crop, crop),), str(onnx_file), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["features"],
                          dynamic_axes={"input": {0: "n"}, "features": {0: "n"}})
        pp = spec.preprocessing
        card = Path(tmp) / "card.json"
        card.write_text(json.dumps({"name": f"{MODEL}-card", "format": "onnx", "path": onnx_file.name,
                                    "input_size": pp.crop, "resize": pp.resize, "mean": pp.mean, "std": pp.std,
                                    "interpolation": pp.interpolation}))
        register_card(ModelCard.read(card))
        built_in = stack.enter_context(Embedder(MODEL, device, runtime=runtime, cache_dir=Path(tmp) / "cache"))
        carded = stack.enter_context(Embedder(f"{MODEL}-card", device, runtime=runtime, model_cards=str(card),
                                              cache_dir=Path(tmp) / "cache"))
        arrays = np.stack([built_in.prepare(j) for j in jpegs])
        cases: dict[tuple, Case] = {}
        for name, emb in (("built-in", built_in), ("card", carded)):
            cases["model", name] = (emb.embed_arrays, arrays)
            cases["pipeline", name] = (emb.embed, jpegs)
        log.info("%s vs %s-card on %s: %d JPEGs, %d repeats", MODEL, MODEL, runtime, n, repeats)
        timings = measure_all(cases, repeats)
    rows = {f"{stage}/{name}": t.to_json() for (stage, name), t in timings.items()}
    return {"settings": {"model": MODEL, "card": "the same network exported to an ONNX file by torch.onnx.export",
                         "device": device, "runtime": runtime, "n_images": n, "repeats": repeats,
                         "cores": os.cpu_count() or 1},
            "img_s": rows,
            "card_vs_built_in": {stage: round(timings[stage, "card"].img_s / timings[stage, "built-in"].img_s, 3)
                                 for stage in ("model", "pipeline")},
            "min_cosine_card_vs_built_in": round(min_cosine(timings["pipeline", "card"].output,
                                                            timings["pipeline", "built-in"].output), 6)}


def model_variants(on_cpu: bool, runtimes: list[str], default_runtime: str) -> list[dict[str, Any]]:
    """Runtimes to time the model alone on; on CPU also the default at one thread, and openvino bf16."""
    variants = [{"runtime": r} for r in runtimes]
    if on_cpu:
        variants.append({"runtime": default_runtime, "runtime_threads": 1})  # the model's cost in core-seconds
        if "openvino" in runtimes:
            variants.append({"runtime": "openvino", "precision": "bf16"})
    return variants


def summarize(device: str, n: int, repeats: int, cores: int, default_runtime: str,
              timings: dict[tuple, Timing]) -> dict[str, Any]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    naive = timings["naive",]
    decode = {key[1]: t for key, t in timings.items() if key[0] == "decode"}
    model: dict[str, dict[int, Timing]] = {}
    for key, t in timings.items():
        if key[0] == "model":
            model.setdefault(key[1], {})[key[2]] = t
    model_json = {name: model_summary(name, model) for name in model}
    pipe_json = {
        key[1]: {**t.to_json(), "min_cosine_vs_naive": round(min_cosine(t.output, naive.output), 6),
                 "vs_naive": round(t.img_s / naive.img_s, 3),
                 "vs_model_alone": round(t.img_s / model_json[key[1]]["img_s"], 3)}
        for key, t in timings.items() if key[0] == "pipeline"
    }
    other = {key[0]: t for key, t in timings.items() if key[0] in ("decode-other", "pipeline-other")}
    scan = [{"runtime_threads": key[1], "decode_workers": key[2], "micro_batch": key[3], **t.to_json()}
            for key, t in timings.items() if key[0] == "scan"]
    default_model = model_json[default_runtime]["img_s"]
    pipe_default = pipe_json[default_runtime]["img_s"]
    cos_min = SAME_COSINE[kind]
    return {
        "settings": {"model": MODEL, "device": device, "n_images": n, "repeats": repeats, "cores": cores,
                     "default_runtime": default_runtime},
        "naive": naive.to_json(),
        "decode_alone": {w: t.to_json() for w, t in decode.items()},
        "model_alone": model_json,
        "pipeline": pipe_json,
        "jpeg_decoder_default": resolve_jpeg_decoder("auto", device),
        "jpeg_decoder_other": {
            "decoder": "torchvision" if resolve_jpeg_decoder("auto", device) == "pillow" else "pillow",
            "decode_alone": {cores: other["decode-other"].to_json()},
            "pipeline": {**other["pipeline-other"].to_json(),
                         "min_cosine_vs_naive": round(min_cosine(other["pipeline-other"].output, naive.output), 6),
                         "vs_model_alone": round(other["pipeline-other"].img_s / default_model, 3)},
        },
        "pipeline_scan": scan,
        "pipeline_scan_best": max(scan, key=lambda r: r["img_s"]) if scan else None,
        **bounds(kind, cores, decode, model_json, default_runtime),
        "embeddings_equal": {"min_cosine_required": cos_min,
                             "passed": all(p["min_cosine_vs_naive"] >= cos_min for p in pipe_json.values())},
        "targets": [t.to_json() for t in make_targets(kind, naive.img_s, model_json["torch"]["img_s"],
                                                      default_model, pipe_default)],
    }


def model_summary(name: str, model: dict[str, dict[int, Timing]]) -> dict[str, Any]:
    """Best batch, speed-up over torch eager, and min cosine to the fp32 reference (bf16: openvino)."""
    batch, top = best(model[name])
    reference = "openvino" if name.startswith("openvino-bf16") else "torch"
    reference_out = best(model[reference])[1].output
    return {"by_batch": {b: t.to_json() for b, t in model[name].items()}, "best_batch": batch,
            "img_s": round(top.img_s, 1), "vs_torch_eager": round(top.img_s / best(model["torch"])[1].img_s, 3),
            "cosine_reference": reference, "min_cosine": round(min_cosine(top.output, reference_out), 6)}


def bounds(kind: str, cores: int, decode: dict[int, Timing], model_json: dict[str, Any],
           default_runtime: str) -> dict[str, Any]:
    """Where the time goes, and the pipeline's best possible img/s given decode and model costs.

    CPU: decode and model share the cores, so the ceiling is cores / (their core-seconds per image),
    the model's cost taken at one thread. CUDA: the GPU runs the model while the cores decode.
    """
    decode_ms = 1000.0 / decode[1].img_s
    if kind == "cuda":
        ceiling = min(decode[cores].img_s, model_json[default_runtime]["img_s"])
        return {"core_ms_per_image": {"decode": round(decode_ms, 2)}, "ceiling_img_s": round(ceiling, 1)}
    model_ms = 1000.0 / model_json[f"{default_runtime}-1t"]["img_s"]
    return {"core_ms_per_image": {"decode": round(decode_ms, 2), "model": round(model_ms, 2)},
            "ceiling_img_s": round(1000.0 * cores / (decode_ms + model_ms), 1)}


def make_targets(kind: str, naive: float, torch_model: float, default_model: float,
                 pipe: float) -> list[Target]:
    if kind == "cuda":
        return [Target("pipeline img/s", "GPU", pipe, 3000.0, "img/s"),
                Target("pipeline / model alone", "GPU", pipe / default_model, 0.6)]
    return [Target("pipeline / naive", "issue 3", pipe / naive, 2.0),
            Target("pipeline / model alone", "issue 3", pipe / default_model, 0.8),
            Target("model alone default runtime / torch eager", "issue 10", default_model / torch_model, 2.5),
            Target("pipeline (default runtime) / naive", "issue 10", pipe / naive, 2.5)]


# --- the report ------------------------------------------------------------------------------------


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def show(value: float, unit: str) -> str:
    return f"{value:.2f}x" if unit == "x" else f"{value:.0f} {unit}"


def report(res: dict[str, Any]) -> None:
    s = res["settings"]
    model, pipe = res["model_alone"], res["pipeline"]
    default = s["default_runtime"]
    print(f"\n{s['model']} on {s['device']} ({s['cores']} cores), {s['n_images']} JPEGs, "
          f"median of {s['repeats']}, default runtime {default}")
    batches = list(next(iter(model.values()))["by_batch"])
    print_table("Model alone on pre-decoded crops, img/s by batch size", ["batch", *model],
                [[b, *(m["by_batch"][b]["img_s"] for m in model.values())] for b in batches]
                + [["best", *(f"{m['img_s']:.1f} @{m['best_batch']}" for m in model.values())],
                   ["x torch", *(f"{m['vs_torch_eager']:.2f}" for m in model.values())],
                   ["min cos", *(f"{m['min_cosine']:.6f}" for m in model.values())],
                   ["vs", *(m["cosine_reference"] for m in model.values())]])
    print_table("Decode + resize alone (Preprocessor), img/s", ["threads", "img/s"],
                [[w, t["img_s"]] for w, t in res["decode_alone"].items()]
                + [[f"{w}, JPEGs via {res['jpeg_decoder_other']['decoder']}", t["img_s"]]
                   for w, t in res["jpeg_decoder_other"]["decode_alone"].items()])
    print("  core-ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in res["core_ms_per_image"].items())
          + (f" ({default}, 1 thread)" if "model" in res["core_ms_per_image"] else ""))
    if res["pipeline_scan"]:
        rows = sorted(res["pipeline_scan"], key=lambda r: -r["img_s"])
        print_table(f"Pipeline scan ({default}), img/s, fastest first",
                    ["runtime_threads", "decode_workers", "micro_batch", "img/s"],
                    [[r["runtime_threads"], r["decode_workers"], r["micro_batch"], r["img_s"]] for r in rows])
    print_table("From JPEG bytes, img/s", ["way", "img/s", "x naive", "x model alone", "min cos vs naive"],
                [["naive tutorial loop", res["naive"]["img_s"], "1.00", "", ""]]
                + [[f"pipeline {name}" + (" (default)" if name == default else ""), p["img_s"],
                    f"{p['vs_naive']:.2f}", f"{p['vs_model_alone']:.2f}", f"{p['min_cosine_vs_naive']:.6f}"]
                   for name, p in pipe.items()]
                + [[f"pipeline {default}, JPEGs via {res['jpeg_decoder_other']['decoder']}",
                    res["jpeg_decoder_other"]["pipeline"]["img_s"],
                    f"{res['jpeg_decoder_other']['pipeline']['img_s'] / res['naive']['img_s']:.2f}",
                    f"{res['jpeg_decoder_other']['pipeline']['vs_model_alone']:.2f}",
                    f"{res['jpeg_decoder_other']['pipeline']['min_cosine_vs_naive']:.6f}"]]
                + [[f"ceiling {default} (from decode and model costs)", res["ceiling_img_s"], "", "", ""]])
    eq = res["embeddings_equal"]
    print(f"\nEmbeddings equal to the naive loop's (min cosine >= {eq['min_cosine_required']}): "
          f"{'PASS' if eq['passed'] else 'FAIL'}")
    print_table("Targets", ["target", "issue", "value", "needs", "result"],
                [[t["name"], t["issue"], show(t["value"], t["unit"]), ">= " + show(t["threshold"], t["unit"]),
                  "PASS" if t["passed"] else "FAIL"] for t in res["targets"]])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="number of JPEGs (default 256; 2048 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per case; the median is reported")
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 JPEGs, 1 repeat")
    parser.add_argument("--card", action="store_true",
                        help="only the built-in model against the same network served from an ONNX model card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("embedder").setLevel(logging.WARNING)
    device = resolve_device(args.device)
    on_cpu = device == "cpu"
    n = 64 if args.quick else args.n or (256 if on_cpu else 2048)
    repeats = 1 if args.quick else args.repeats
    if args.card:
        res = run_card_comparison(device, n, repeats)
        print(json.dumps(res, indent=2))
        name = "bench_embed_card_" + ("cpu" if on_cpu else slug(gpu_name() or device))
        name += "_quick" if args.quick else ""
        print(f"\nwrote {write_json(name, res)}")
        return
    res = run_benchmark(device, n, repeats)
    report(res)
    name = "bench_embed_cpu" if on_cpu else f"bench_embed_{slug(gpu_name() or device)}"
    if args.quick:
        name += "_quick"
    print(f"\nwrote {write_json(name, res)}")


if __name__ == "__main__":
    main()
