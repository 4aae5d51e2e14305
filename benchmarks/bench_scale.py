"""Scale-out overhead: the single-process pipeline vs Ray Data bulk embedding vs 1 and 3 embedding replicas.

Usage::

    python benchmarks/bench_scale.py                  # 2,048 real JPEGs, 3 interleaved rounds
    python benchmarks/bench_scale.py --quick          # smoke test: 256 JPEGs, 1 round
    python benchmarks/bench_scale.py --n 4096 --repeats 5

All cases embed the same real JPEGs (``images.real_jpegs``), written once to a folder, with the default backbone
and settings, from the files on disk to float32 vectors:

1. **single process**: read the files, ``Embedder.embed`` (the pipeline the service runs), model already loaded;
2. **Ray Data, 1 / 2 actors**: ``embedder.bulk.bulk_embed(folder, fresh out dir, actors=k)`` on a local Ray
   started once before the rounds (its start-up is reported apart); each job pays what a user's job pays:
   planning, starting its actors (each imports torch and loads the model), decode tasks, shards written with
   fsync. Reported as the whole job, its start-up (until the first result), and the rate over the second half
   of the images (what a long job converges to; decoding that ran ahead during start-up is spent by then);
3. **replicas, 1 / 3**: ``embedder serve --role embed`` processes on loopback behind one gRPC channel with
   ``round_robin`` and health checking (``embedder.remote.pool_client``, the store node's own), four callers
   sending 16 images per ``Embed`` call.

On this 2-core machine every case shares the same two cores, so the honest figure is overhead (a ratio to the
single process), not speed-up. Target: Ray Data local >= 0.8x the single-process pipeline. Also measured, for
the README's per-GPU-node projection: decode + preprocess core-ms per image on one thread, and the mean JPEG size
(network bytes per image). Vectors of every case are checked against the single process (min cosine).
Results: ``benchmarks/results/bench_scale.json`` (``_quick`` for --quick, ``_nN`` for another --n).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `images` lives beside this script

from images import real_jpegs, write_json  # noqa: E402

from embedder import Config, Embedder  # noqa: E402
from embedder.bulk import bulk_embed  # noqa: E402
from embedder.remote import pool_client  # noqa: E402

log = logging.getLogger("bench_scale")

TARGET_RAY = 0.8  # Ray Data local / single-process img/s
CALLERS, PER_CALL = 4, 16  # replica cases: concurrent callers, images per Embed call


def read_folder(folder: Path, names: Sequence[str]) -> list[bytes]:
    return [(folder / n).read_bytes() for n in names]


def start_replicas(n: int, stack: ExitStack) -> list[str]:
    """``n`` ``embedder serve --role embed`` processes on free loopback ports; their addresses once SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    procs = []
    for _ in range(n):
        p = subprocess.Popen([sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--role", "embed"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stack.callback(_stop, p)
        procs.append(p)
    addresses = [p.stdout.readline().split()[-1] for p in procs]
    for address in addresses:
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 300
            while stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {address} did not become SERVING in 300 s")
                time.sleep(0.2)
    return addresses


def _stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def replica_case(addresses: Sequence[str], folder: Path, names: Sequence[str]) -> Callable[[], np.ndarray]:
    client = pool_client(Config.from_env(environ={}, role="store", embed_target=",".join(addresses)))
    dim = client.list_models()[0]["dim"]  # connected to every replica before the clock starts

    def run() -> np.ndarray:
        data = read_folder(folder, names)
        chunks = [list(range(s, min(s + PER_CALL, len(data)))) for s in range(0, len(data), PER_CALL)]
        out = np.zeros((len(data), dim), np.float32)

        def call(chunk: list[int]) -> None:
            out[chunk] = client.embed([data[i] for i in chunk])

        with ThreadPoolExecutor(CALLERS) as pool:
            list(pool.map(call, chunks))
        return out

    run.client = client  # type: ignore[attr-defined]
    return run


def ray_case(folder: Path, names: Sequence[str], actors: int, scratch: Path) -> Callable[[], np.ndarray]:
    import pyarrow.parquet as pq

    def run() -> np.ndarray:
        out = Path(tempfile.mkdtemp(dir=scratch))
        try:
            manifest = bulk_embed(folder, out, actors=actors, progress=False)
            if manifest["counts"]["failed"]:
                raise RuntimeError(f"bulk-embed failed on {manifest['failures'][:3]}")
            run.last = manifest["settings"]  # type: ignore[attr-defined]
            rows = {}
            for f in sorted(out.glob("part-*.parquet")):
                t = pq.read_table(f, columns=["id", "vector"])
                vecs = np.stack(t.column("vector").to_numpy(zero_copy_only=False))
                rows.update(zip(t.column("id").to_pylist(), vecs))
            return np.stack([rows[n] for n in names]).astype(np.float32)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return run


def decode_core_ms(embedder: Embedder, jpegs: Sequence[bytes]) -> float:
    """Decode + resize + crop of one image on one thread (what a GPU node's CPUs must keep up with)."""
    start = time.thread_time()
    for data in jpegs:
        embedder.prepare(data)
    return 1000 * (time.thread_time() - start) / len(jpegs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="number of JPEGs (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--quick", action="store_true", help="smoke test: 256 JPEGs, 1 round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedder").setLevel(logging.WARNING)
    n = args.n or (256 if args.quick else 2048)
    repeats = 1 if args.quick else args.repeats

    import ray

    jpegs = real_jpegs(n, seed=0)
    scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    folder = scratch / "images"
    folder.mkdir()
    names = [f"{i:05d}.jpg" for i in range(n)]
    for name, data in zip(names, jpegs):
        (folder / name).write_bytes(data)
    embedder = Embedder(config=Config.from_env(device="cpu"))
    log.info("%d JPEGs (mean %.1f KB), %s via %s", n, np.mean([len(j) for j in jpegs]) / 1024, embedder.model_id,
             embedder.runtime.name)

    with ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, True)
        started = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        stack.callback(ray.shutdown)
        ray_init_s = time.perf_counter() - started
        addresses = start_replicas(3, stack)
        cases: dict[str, Callable[[], np.ndarray]] = {
            "single process": lambda: embedder.embed(read_folder(folder, names)),
            "ray data, 1 actor": ray_case(folder, names, 1, scratch),
            "ray data, 2 actors": ray_case(folder, names, 2, scratch),
            "replicas, 1": replica_case(addresses[:1], folder, names),
            "replicas, 3": replica_case(addresses, folder, names),
        }
        for case in cases.values():
            if hasattr(case, "client"):
                stack.callback(case.client.close)
        rates: dict[str, list[float]] = {k: [] for k in cases}
        startup: dict[str, list[float]] = {k: [] for k in cases if k.startswith("ray")}
        steady: dict[str, list[float]] = {k: [] for k in startup}
        outputs: dict[str, np.ndarray] = {}
        for round_ in range(repeats + 1):  # round 0 warms up (exports, imports, first connections)
            for key, fn in cases.items():
                start = time.perf_counter()
                outputs[key] = fn()
                elapsed = time.perf_counter() - start
                if round_:
                    rates[key].append(n / elapsed)
                    if key in startup:  # start-up: planning, actors importing and loading the model
                        run = fn.last  # type: ignore[attr-defined]
                        startup[key].append(run["first_result_s"])
                        steady[key].append((n - run["half_result_rows"]) / (run["ray_seconds"] - run["half_result_s"]))
                log.info("%s %s: %.1f img/s", f"round {round_}" if round_ else "warm-up", key, n / elapsed)
        core_ms = decode_core_ms(embedder, jpegs[:256])
    embedder.close()

    base = statistics.median(rates["single process"])
    base_vec = outputs["single process"]
    res: dict[str, dict[str, Any]] = {}
    for key in cases:
        v = outputs[key]
        cos = np.sum(v * base_vec, axis=1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(base_vec, axis=1))
        med = statistics.median(rates[key])
        res[key] = {"img_s": round(med, 1), "runs": [round(r, 1) for r in rates[key]],
                    "x_single_process": round(med / base, 3),
                    # per round, against that round's single-process run: less exposed to load drifting over time
                    "x_per_round": [round(r / b, 3) for r, b in zip(rates[key], rates["single process"])],
                    "min_cosine_vs_single": round(float(cos.min()), 6)}
        if key in startup:
            res[key].update({"startup_s": round(statistics.median(startup[key]), 2),
                             "steady_img_s": round(statistics.median(steady[key]), 1),
                             "steady_x_single_process": round(statistics.median(steady[key]) / base, 3),
                             "steady_runs": [round(r, 1) for r in steady[key]]})
    targets = []
    for k in startup:
        for what, field in (("whole job", "x_single_process"), ("second half", "steady_x_single_process")):
            targets.append({"target": f"{k}, {what} >= {TARGET_RAY}x single process", "value": res[k][field],
                            "passed": res[k][field] >= TARGET_RAY})
    targets.append({"target": "every case's vectors equal the single process (min cosine >= 0.9999)",
                    "value": min(r["min_cosine_vs_single"] for r in res.values()),
                    "passed": min(r["min_cosine_vs_single"] for r in res.values()) >= 0.9999})

    print(f"\n{embedder.model_id} via {embedder.runtime.name}, {n} real JPEGs, {repeats} round(s), "
          f"{os.cpu_count()} CPUs; local Ray start-up {ray_init_s:.1f} s (not in the Ray rows)")
    print(f"  {'case':<20} {'img/s':>8} {'x single':>9}  {'start-up s':>10} {'2nd half img/s':>14} {'x single':>9}")
    for key, r in res.items():
        extra = (f"{r['startup_s']:>10.2f} {r['steady_img_s']:>14.1f} {r['steady_x_single_process']:>9.2f}"
                 if key in startup else "")
        print(f"  {key:<20} {r['img_s']:>8.1f} {r['x_single_process']:>9.2f}  {extra}")
    print(f"  decode + preprocess: {core_ms:.2f} core-ms per image; mean JPEG {np.mean([len(j) for j in jpegs]) / 1024:.1f} KB")
    for t in targets:
        print(f"  target {t['target']}: {t['value']} {'PASS' if t['passed'] else 'FAIL'}")
    payload = {"model_id": embedder.model_id, "runtime": embedder.runtime.name, "n_images": n, "repeats": repeats,
               "ray": ray.__version__, "ray_local_init_s": round(ray_init_s, 2),
               "replica_callers": CALLERS, "replica_images_per_call": PER_CALL,
               "mean_jpeg_kb": round(float(np.mean([len(j) for j in jpegs])) / 1024, 1),
               "decode_core_ms_per_img": round(core_ms, 2), "cases": res, "targets": targets}
    name = "bench_scale" + ("_quick" if args.quick else f"_n{n}" if args.n else "")
    print(f"\nwrote {write_json(name, payload)}")


if __name__ == "__main__":
    main()
