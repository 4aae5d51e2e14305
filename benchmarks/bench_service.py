"""Service throughput: the in-process pipeline vs the gRPC service over loopback, on the same real JPEGs.

Usage::

    python benchmarks/bench_service.py                 # 256 photos (1024 on CUDA), 3 rounds, device auto
    python benchmarks/bench_service.py --quick         # smoke test: 64 photos, 1 round
    python benchmarks/bench_service.py --device cpu --n 512 --repeats 5

Cases, all on the default backbone with default settings (batcher: max_batch 64, max_delay 5 ms):

1. in-process: ``Embedder.embed(jpegs)`` on the whole list: the pipeline's best case, no network;
2. service, unary: C concurrent callers (threads, C = 1, 8, 64), each sending one image per ``Embed``
   call through :class:`embedder.client.EmbedderClient`: the case dynamic batching exists for (the target
   is measured on these); and 8 callers sending 8 images per call, which pays the per-call cost once per 8;
3. service, stream: one caller streaming the whole list with ``EmbedderClient.embed_iter``.

The service's content cache is turned off (``cache_max_items=0``) so that every call runs the model; a cache
lookup still happens per item, as in production (``bench_search.py`` measures hits).

The server runs in this process on an ephemeral loopback port; every case gets one untimed warm-up pass, and
the timed rounds interleave the cases so a burst of load on a shared machine skews all of them alike. Reported
per case: img/s (median over rounds), its ratio to in-process, per-call latency p50/p99 (unary), the mean
batch size the batcher formed, and process CPU ms per image (client and server together: the service's CPU
overhead, which other processes' load distorts less than img/s does). Target: on CPU, service >= 0.85x in-process at concurrency >= 8. Results go to
``benchmarks/results/bench_service_cpu.json`` (or ``bench_service_<gpu name>.json``; ``_quick`` for --quick).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `images` lives beside this script

from images import gpu_name, real_jpegs, slug, write_json  # noqa: E402

from embedder import Config, Embedder  # noqa: E402
from embedder.client import EmbedderClient  # noqa: E402
from embedder.server import EmbedderServer, freeze_heap  # noqa: E402

log = logging.getLogger("bench_service")

CONCURRENCY = (1, 8, 64)
TARGET_RATIO = 0.85  # service / in-process img/s at concurrency >= 8, on CPU
MULTI = 8  # images per call in the extra unary case: what a caller batching its own images sends


def unary_callers(client: EmbedderClient, concurrency: int,
                  per_call: int = 1) -> Callable[[Sequence[bytes]], dict[str, Any]]:
    """``concurrency`` threads share the images, ``per_call`` images per ``Embed`` call; returns vectors and
    per-call latencies."""

    def run(jpegs: Sequence[bytes]) -> dict[str, Any]:
        starts = range(0, len(jpegs), per_call)
        latencies = [0.0] * len(starts)
        vectors: list[np.ndarray | None] = [None] * len(starts)

        def caller(k: int) -> None:
            for c in range(k, len(starts), concurrency):
                start = time.perf_counter()
                vectors[c] = client.embed(jpegs[starts[c]:starts[c] + per_call])
                latencies[c] = time.perf_counter() - start

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(caller, range(concurrency)))
        return {"vectors": np.concatenate(vectors), "latencies": latencies}

    return run


def streamed(client: EmbedderClient) -> Callable[[Sequence[bytes]], dict[str, Any]]:
    def run(jpegs: Sequence[bytes]) -> dict[str, Any]:
        return {"vectors": np.stack([r.vector for r in client.embed_iter(jpegs)]), "latencies": []}

    return run


def measure(cases: dict[str, Callable], jpegs: Sequence[bytes], repeats: int,
            server: EmbedderServer) -> dict[str, dict[str, Any]]:
    """One warm-up round, then ``repeats`` rounds each running every case once (interleaved)."""
    rates: dict[str, list[float]] = {k: [] for k in cases}
    latencies: dict[str, list[float]] = {k: [] for k in cases}
    batches: dict[str, list[float]] = {k: [0.0, 0.0] for k in cases}  # items, batches
    cpu: dict[str, list[float]] = {k: [] for k in cases}  # process CPU seconds per image
    outputs: dict[str, np.ndarray] = {}
    for round_ in range(repeats + 1):
        for key, fn in cases.items():
            before = server.service.default.batcher.stats()
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn(jpegs)
            elapsed, cpu_used = time.perf_counter() - start, time.process_time() - cpu_start
            after = server.service.default.batcher.stats()
            outputs[key] = out["vectors"]
            if round_:
                rates[key].append(len(jpegs) / elapsed)
                cpu[key].append(cpu_used / len(jpegs))
                latencies[key] += out["latencies"]
                batches[key][0] += after["embedded"] - before["embedded"]
                batches[key][1] += after["batches"] - before["batches"]
        log.info("%s done", f"round {round_}/{repeats}" if round_ else "warm-up")
    res = {}
    for key in cases:
        lat = np.array(latencies[key]) * 1000
        items, nb = batches[key]
        res[key] = {
            "img_s": round(statistics.median(rates[key]), 1), "runs": [round(r, 1) for r in rates[key]],
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "mean_batch": round(items / nb, 2) if nb else None,
            "cpu_ms_per_img": round(1000 * statistics.median(cpu[key]), 2),
        }
    res["_outputs"] = outputs  # type: ignore[assignment]
    return res


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="number of JPEGs (default 256; 1024 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 JPEGs, 1 round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedder").setLevel(logging.WARNING)

    # The content cache is off (cache_max_items=0): every round must run the model, or the rounds after the
    # warm-up would time cache hits (bench_search measures those). A scratch data dir, removed at the end.
    scratch = tempfile.mkdtemp(prefix="bench-service-")
    config = Config.from_env(device=args.device, port=0, cache_max_items=0, data_dir=scratch)
    embedder = Embedder(config=config)
    on_cuda = embedder.device.startswith("cuda")
    n = args.n or (64 if args.quick else (1024 if on_cuda else 256))
    repeats = 1 if args.quick else args.repeats
    jpegs = real_jpegs(n, seed=0)
    log.info("%d JPEGs, %s on %s via %s", n, embedder.model_id, embedder.device, embedder.runtime.name)

    server = EmbedderServer(config, embedder=embedder)
    server.start()
    server.load()
    freeze_heap()  # as `embedder serve` does
    clients = [EmbedderClient(f"127.0.0.1:{server.port}", timeout=300) for _ in range(2)]
    try:
        cases: dict[str, Callable] = {"in-process": lambda j: {"vectors": embedder.embed(j), "latencies": []}}
        for c in CONCURRENCY:
            cases[f"unary c={c}"] = unary_callers(clients[0], c)
        cases[f"unary c=8, {MULTI} per call"] = unary_callers(clients[0], 8, MULTI)
        cases["stream c=1"] = streamed(clients[1])
        res = measure(cases, jpegs, repeats, server)
    finally:
        for client in clients:
            client.close()
        server.stop(grace=5)
        embedder.close()
        shutil.rmtree(scratch, ignore_errors=True)

    outputs = res.pop("_outputs")
    base = res["in-process"]["img_s"]
    max_diff = max(float(np.abs(outputs[k] - outputs["in-process"]).max()) for k in outputs)
    for key, row in res.items():
        row["x_in_process"] = round(row["img_s"] / base, 3)
    targets = []
    if not on_cuda:
        for c in CONCURRENCY:
            if c >= 8:
                ratio = res[f"unary c={c}"]["x_in_process"]
                targets.append({"name": f"service unary c={c} / in-process img/s", "value": ratio,
                                "threshold": TARGET_RATIO, "passed": ratio >= TARGET_RATIO})

    print(f"\n{embedder.model_id} on {embedder.device} via {embedder.runtime.name}, {n} real JPEGs, "
          f"{repeats} round(s), batcher max_batch={config.max_batch} max_delay={config.max_delay_ms} ms")
    header = ("case", "img/s", "x in-proc", "p50 ms", "p99 ms", "mean batch", "cpu ms/img")
    rows = [(k, f"{r['img_s']:.1f}", f"{r['x_in_process']:.2f}", _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
             _fmt(r["mean_batch"]), _fmt(r["cpu_ms_per_img"])) for k, r in res.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print(f"  vectors: max |service - in-process| = {max_diff:.2e}; cpu ms/img is this whole process "
          "(client + server), so it shows the service's CPU overhead even on a busy machine")
    for t in targets:
        print(f"  target {t['name']} >= {t['threshold']}: {t['value']:.2f} {'PASS' if t['passed'] else 'FAIL'}")

    name = "bench_service_" + ("cpu" if not on_cuda else slug(gpu_name() or "cuda")) + ("_quick" if args.quick else "")
    payload = {"model_id": embedder.model_id, "device": embedder.device, "runtime": embedder.runtime.name,
               "n_images": n, "repeats": repeats, "max_batch": config.max_batch, "max_delay_ms": config.max_delay_ms,
               "cases": res, "max_abs_diff_vs_in_process": max_diff, "targets": targets}
    print(f"\nwrote {write_json(name, payload)}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


if __name__ == "__main__":
    main()
