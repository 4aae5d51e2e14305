"""Soak test: the real service under minutes of mixed load; requests, errors by code, p99 over time, memory.

Usage::

    python benchmarks/soak.py                      # 10 minutes or 100,000 requests, whichever comes first
    python benchmarks/soak.py --quick              # smoke test: 1 minute or 5,000 requests
    python benchmarks/soak.py --minutes 30 --requests 300000 --clients 32 --device cpu

What runs: ``python -m embedder.cli serve --port 0`` in its own process on a fresh data dir (a temporary one
unless ``--data-dir``), exactly as an operator would start it; ``EMBEDDER_*`` variables pass through (e.g.
``EMBEDDER_CACHE_DIR``). Its resident memory is read from ``/proc/<pid>/status`` (VmRSS) every few seconds,
with its thread and open-file counts (leaks of those show up there first).

Setup (not counted): 200 real JPEGs (:func:`images.real_jpegs`) are embedded once (the reference vectors),
three collections (two flat, one HNSW) get 100 *stable* ids (never deleted) and 100 *volatile* ids each,
labelled by source photo, and two heads (logreg, linear SVM) are trained. Then ``--clients`` threads, each
with its own :class:`embedder.client.EmbedderClient` (``retries=0``, so no failure is hidden by a retry),
draw operations by weight (:data:`MIX`) until the time or request budget is spent:

- Embed of 1-4 pool photos (vectors checked against the reference: cosine >= 0.999, else WRONG_RESULT),
  Embed of a *fresh* variant (a pool photo cropped and re-encoded at a random quality: a cache miss, a
  model pass, and LRU eviction: the server runs with ``EMBEDDER_CACHE_MAX_ITEMS=--cache-max-items``, 100),
  EmbedStream of pool photos and ``content_sha256`` references (NOT_FOUND for a hash that is no longer
  cached is expected: replacing a collection item drops its vector);
- Add (upsert 1-4 items, labels and metadata; 3% fresh photos), Delete (volatile ids only), Get, SetLabels
  (stable ids; 10% clear), Search by image / stored id / raw vector (random collection or all, k 1-50,
  30% with a label filter), Stats, ListModels, ListHeads, Predict (photos or stored ids), Train (1 in 500
  calls, replacing one of the two heads while Predict uses it). Labels stay true (id ``s<j>`` always holds
  a photo of source ``j % 11``), so the heads learn a real task and a Train costs the same throughout;
- deliberately bad calls whose errors are *expected*: junk bytes (per item INVALID_ARGUMENT, the rest of
  the call succeeds), an unknown head or collection (NOT_FOUND), k above the limit (INVALID_ARGUMENT). A
  bad call answered with any other code, or OK, is an unexpected error.

Any other failure (an RPC error, a per-item error on a good item, a wrong vector) is *unexpected*.
Warm-up is the first 10% of the request budget or of the time budget, whichever ends first; memory growth
is ``(RSS at end - RSS after warm-up) / RSS after warm-up``, each the median of 3 consecutive samples
(after the warm-up ends; the last ones under load). Targets: growth < 5% and zero unexpected errors.
The server is then stopped with SIGTERM; its exit code (0 expected) and the shutdown time are recorded,
and its log is scanned for warnings and errors. Latency is the client's wall time per call. The machine's load
average before and after the load phase goes in the results: on a shared machine compare runs at like load.
Results go to ``benchmarks/results/soak.json`` (``soak_quick.json`` for --quick).

``--attack`` adds an attacker next to the normal mix, within the server's caps (:func:`attacker`): idle
EmbedStreams and reflection streams that never send (reopened when the server ends them), streams trickling
one photo every few seconds (slow uploads), and a hog sending the largest fresh batches back to back; and a
prober calling health Check every 0.5 s with a 1 s deadline. The attacker's own outcomes are reported apart;
targets add "health never misses". Compare its p99 with a run without ``--attack`` (target: within 2x).
Results go to ``soak_attack.json`` (``soak_attack_quick.json``).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `images` lives beside this script

from images import real_jpegs, write_json  # noqa: E402

from embedder._proto import embedder_pb2 as pb  # noqa: E402
from embedder._proto import embedder_pb2_grpc as pb_grpc  # noqa: E402
from embedder.client import Cached, EmbedderClient, RemoteBatchError, ServiceError  # noqa: E402

log = logging.getLogger("soak")

REPO = Path(__file__).resolve().parent.parent
POOL = 200  # distinct real photos the clients send; most calls become cache hits after warm-up
STABLE, VOLATILE = 100, 100  # ids per collection: stable ones are never deleted, volatile ones are
COLLECTIONS = {"soak-flat-a": "flat", "soak-flat-b": "flat", "soak-hnsw": "hnsw"}
HEADS = {"soak-logreg": "logreg", "soak-svm": "linear_svm"}
N_SOURCES = 11  # real_jpegs cycles through 11 source photos: image i shows source i % 11 (its label)
MAX_K = 10_000  # the server's limit on k (embedder.store.MAX_K)
FRESH_ADD = 0.03  # share of Add items that are fresh variants
TARGET_GROWTH = 0.05  # RSS growth after warm-up
COSINE_MIN = 0.999  # a pool photo's vector vs its reference
JUNK = b"\xff\xd8\xff\xe0 this is not a JPEG " * 8


@dataclass
class Outcome:
    """One call's result: ``kind`` ok | expected | unexpected; ``code`` a gRPC code name or WRONG_RESULT etc."""

    kind: str = "ok"
    code: str = "OK"
    detail: str = ""
    extra: dict[str, Any] | None = None  # kept per call in the JSON (Train: the server's timings)


OK = Outcome()


def unexpected(code: str, detail: str) -> Outcome:
    return Outcome("unexpected", code, detail[:300])


def expect(code: str, wanted: Sequence[str], detail: str = "") -> Outcome:
    """The outcome of a deliberately bad call that answered ``code``."""
    if code in wanted:
        return Outcome("expected", code)
    return unexpected(code, f"expected {'/'.join(wanted)}, got {code}: {detail}")


# ---------------------------------------------------------------------------------------------- workload

@dataclass
class Workload:
    """Shared, read-only after setup: the photos, their hashes, labels and reference vectors."""

    jpegs: list[bytes]
    sha256s: list[str]
    labels: list[str]
    dim: int = 0
    refs: np.ndarray | None = None  # (POOL, dim), from setup

    @classmethod
    def build(cls, n: int) -> Workload:
        jpegs = real_jpegs(n, seed=0)
        return cls(jpegs, [hashlib.sha256(j).hexdigest() for j in jpegs], [f"src{i % N_SOURCES}" for i in range(n)])

    def fresh(self, rng: random.Random, i: int | None = None) -> bytes:
        """Pool photo ``i`` (default random) cropped by a few pixels and re-encoded at a random quality:
        bytes the server never saw."""
        img = Image.open(io.BytesIO(self.jpegs[rng.randrange(len(self.jpegs)) if i is None else i]))
        img.draft("RGB", (img.width // 2, img.height // 2))  # decode at half size: cheaper, still a real photo
        img = img.convert("RGB")
        dx, dy = rng.randint(1, 8), rng.randint(1, 8)
        img = img.crop((dx, dy, img.width - rng.randint(0, 8), img.height - rng.randint(0, 8)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(60, 95))
        return buf.getvalue()


def _check_vectors(w: Workload, picks: Sequence[int], vectors: np.ndarray, errors: Sequence[str | None]) -> Outcome:
    for i, err in zip(picks, errors):
        if err is not None:
            return unexpected("ITEM_ERROR", f"pool photo {i}: {err}")
    cos = (vectors * w.refs[list(picks)]).sum(1) / np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    if cos.min() < COSINE_MIN:
        return unexpected("WRONG_RESULT", f"vector of pool photo {picks[int(cos.argmin())]} has cosine "
                                          f"{cos.min():.4f} to its reference")
    return OK


def photo_for(item_id: str, rng: random.Random | None = None, salt: int = 0) -> int:
    """A pool photo for id ``s<j>`` / ``v<j>``: always one of source ``j % 11``, so its label stays true and the
    heads keep learning a real task (random labels would make training slower and slower as noise piles up)."""
    j = int(item_id[1:])
    per_source = POOL // N_SOURCES
    k = rng.randrange(per_source) if rng is not None else (j * 7 + salt * 13) % per_source
    return j % N_SOURCES + N_SOURCES * k


def label_of(item_id: str) -> str:
    return f"src{int(item_id[1:]) % N_SOURCES}"


def _ids(rng: random.Random, n: int, *, stable_only: bool = False) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        i = f"s{rng.randrange(STABLE)}" if stable_only or rng.random() < 0.5 else f"v{rng.randrange(VOLATILE)}"
        if i not in out:
            out.append(i)
    return out


def op_embed(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    picks = rng.sample(range(len(w.jpegs)), rng.choice((1, 1, 1, 2, 4)))
    r = c.embed([w.jpegs[i] for i in picks], errors="return")
    return _check_vectors(w, picks, r.vectors, r.errors)


def op_embed_fresh(c: EmbedderClient, w: Workload, rng: random.Random, image: bytes) -> Outcome:
    r = c.embed([image], errors="return")
    if r.errors[0] is not None:
        return unexpected("ITEM_ERROR", f"fresh photo: {r.errors[0]}")
    norm = float(np.linalg.norm(r.vectors[0]))
    return OK if abs(norm - 1) < 1e-3 else unexpected("WRONG_RESULT", f"fresh photo: vector norm {norm:.4f}")


def op_embed_stream(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    picks = rng.sample(range(len(w.jpegs)), rng.randint(4, 12))
    by_hash = {i for i in picks if rng.random() < 0.5}
    items = [Cached(w.sha256s[i]) if i in by_hash else w.jpegs[i] for i in picks]
    results = list(c.embed_iter(items))
    if len(results) != len(picks):
        return unexpected("WRONG_RESULT", f"{len(results)} results for {len(picks)} items")
    expected_miss = False
    for i, r in zip(picks, results):
        if r.ok:
            cos = float(r.vector @ w.refs[i] / max(np.linalg.norm(r.vector), 1e-12))
            if cos < COSINE_MIN:
                return unexpected("WRONG_RESULT", f"stream: pool photo {i} has cosine {cos:.4f} to its reference")
        elif i in by_hash and r.code == grpc.StatusCode.NOT_FOUND:
            expected_miss = True  # no longer cached: its collection item was replaced or deleted
        else:
            return unexpected(r.code.name, f"stream item {i}{' (by hash)' if i in by_hash else ''}: {r.error}")
    return Outcome("expected", "NOT_FOUND") if expected_miss else OK


def op_add(c: EmbedderClient, w: Workload, rng: random.Random, fresh: Callable[[int], bytes]) -> Outcome:
    collection = rng.choice(list(COLLECTIONS))
    ids = _ids(rng, rng.choice((1, 1, 2, 4)))
    picks = [photo_for(i, rng) for i in ids]
    images = [fresh(i) if rng.random() < FRESH_ADD else w.jpegs[i] for i in picks]
    s = c.add(collection, images, ids, labels=[w.labels[i] for i in picks],
              metadata=[{"pool": i, "t": round(time.time(), 3)} for i in picks],
              index=COLLECTIONS[collection], errors="return")
    if s.failed:
        return unexpected("ITEM_ERROR", f"add to {collection}: {s.failed}")
    if s.added + s.replaced != len(ids):
        return unexpected("WRONG_RESULT", f"add of {len(ids)} items: added {s.added}, replaced {s.replaced}")
    return OK


def op_delete(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    ids = [f"v{i}" for i in rng.sample(range(VOLATILE), rng.randint(1, 3))]
    r = c.delete(rng.choice(list(COLLECTIONS)), ids)
    return OK if r.deleted + len(r.missing) == len(ids) else unexpected("WRONG_RESULT", f"delete: {r}")


def op_get(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    ids = _ids(rng, rng.randint(1, 10))
    items = c.get(rng.choice(list(COLLECTIONS)), ids, vectors=rng.random() < 0.5)
    missing_stable = [i for i, s in zip(ids, items) if s is None and i.startswith("s")]
    return unexpected("WRONG_RESULT", f"get: stable ids missing {missing_stable}") if missing_stable else OK


def op_set_labels(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    ids = _ids(rng, rng.randint(1, 5), stable_only=True)
    changes = {i: None if rng.random() < 0.1 else label_of(i) for i in ids}
    updated = c.set_labels(rng.choice(list(COLLECTIONS)), changes)
    return OK if updated == len(ids) else unexpected("WRONG_RESULT", f"set_labels: {updated} of {len(ids)}")


def _search_args(rng: random.Random) -> dict[str, Any]:
    label = f"src{rng.randrange(N_SOURCES)}" if rng.random() < 0.3 else None
    return {"k": rng.choice((1, 5, 10, 10, 50)), "label": label}


def op_search_image(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    collection = rng.choice([*COLLECTIONS, None])
    c.search(w.jpegs[rng.randrange(len(w.jpegs))], collection=collection, **_search_args(rng))
    return OK


def op_search_id(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    c.search(collection=rng.choice(list(COLLECTIONS)), item_id=f"s{rng.randrange(STABLE)}", **_search_args(rng))
    return OK


def op_search_vector(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    v = np.random.default_rng(rng.getrandbits(32)).standard_normal(w.dim).astype(np.float32)
    c.search(vector=v, collection=rng.choice([*COLLECTIONS, None]), **_search_args(rng))
    return OK


def op_predict(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    head = rng.choice(list(HEADS))
    if rng.random() < 0.5:
        preds = c.predict(head, [w.jpegs[i] for i in rng.sample(range(len(w.jpegs)), rng.randint(1, 4))], top_k=3)
    else:
        preds = c.predict(head, ids=_ids(rng, rng.randint(1, 5), stable_only=True),
                          collection=rng.choice(list(COLLECTIONS)), top_k=3)
    bad = [p for p in preds if p.error is not None or not p.labels]
    return unexpected("ITEM_ERROR", f"predict {head}: {bad[0].error}") if bad else OK


def _train(head_id: str) -> Callable[[EmbedderClient, Workload, random.Random], Outcome]:
    def op_train(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
        collection = rng.choice(list(COLLECTIONS))
        r = c.train(collection, HEADS[head_id], head_id=head_id, seed=rng.randrange(1000))
        if r["head_id"] != head_id:
            return unexpected("WRONG_RESULT", f"train: head id {r['head_id']}")
        return Outcome(extra={"collection": collection, "samples": r["samples"],
                              "accuracy": (r["metrics"] or {}).get("accuracy"),
                              "server_train_s": round(r["train_seconds"], 3),
                              "server_total_s": round(r["total_seconds"], 3)})
    return op_train


def op_stats(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    s = c.stats()
    names = {col.name for col in s["collections"]}
    return OK if set(COLLECTIONS) <= names else unexpected("WRONG_RESULT", f"stats: collections {sorted(names)}")


def op_list(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    if rng.random() < 0.5:
        return OK if c.list_models() else unexpected("WRONG_RESULT", "list_models: none")
    heads = {h["head_id"] for h in c.list_heads()}
    return OK if set(HEADS) <= heads else unexpected("WRONG_RESULT", f"list_heads: {sorted(heads)}")


def _code_of(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except ServiceError as e:
        return e.code.name, str(e)
    return "OK", ""


def bad_junk(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    """Junk bytes beside a good photo: the junk fails alone (per-item INVALID_ARGUMENT), the photo is served."""
    i = rng.randrange(len(w.jpegs))
    if rng.random() < 0.5:
        results = list(c.embed_iter([w.jpegs[i], JUNK]))
        if not results[0].ok:
            return unexpected(results[0].code.name, f"good photo beside junk: {results[0].error}")
        return expect(results[1].code.name, ("INVALID_ARGUMENT",), results[1].error or "junk accepted")
    collection = rng.choice(list(COLLECTIONS))
    s = c.add(collection, [w.jpegs[i], JUNK], [f"v{rng.randrange(VOLATILE)}", "junk"],
              labels=[w.labels[i], "junk"], errors="return")
    if 0 in s.failed:
        return unexpected("ITEM_ERROR", f"good photo beside junk in add: {s.failed[0]}")
    # the client reports per-item failures as messages; the server sends INVALID_ARGUMENT for undecodable bytes
    return Outcome("expected", "INVALID_ARGUMENT") if 1 in s.failed else unexpected("OK", "junk item was added")


def bad_unknown_head(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    return _expect_call(lambda: c.predict("no-such-head", [w.jpegs[rng.randrange(len(w.jpegs))]]), ("NOT_FOUND",))


def bad_unknown_collection(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    if rng.random() < 0.5:
        return _expect_call(lambda: c.search(collection="no-such-collection", item_id="s0"), ("NOT_FOUND",))
    return _expect_call(lambda: c.train("no-such-collection", "logreg", head_id="never"), ("NOT_FOUND",))


def bad_k(c: EmbedderClient, w: Workload, rng: random.Random) -> Outcome:
    return _expect_call(lambda: c.search(collection=rng.choice(list(COLLECTIONS)), item_id="s0", k=MAX_K + 1),
                        ("INVALID_ARGUMENT",))


def _expect_call(call: Callable[[], Any], wanted: Sequence[str]) -> Outcome:
    code, message = _code_of(call)
    return expect(code, wanted, message or "the call succeeded")


@dataclass(frozen=True)
class Op:
    name: str  # what the table shows: "RPC" or "RPC/variant"
    weight: int  # per 1000 calls
    fn: Callable[..., Outcome]
    fresh: bool = False  # takes a freshly made image (made before the clock starts)


MIX: tuple[Op, ...] = (
    Op("Embed", 250, op_embed),
    Op("Embed/fresh", 20, op_embed_fresh, fresh=True),
    Op("EmbedStream", 30, op_embed_stream),
    Op("Add", 120, op_add),
    Op("Delete", 15, op_delete),
    Op("Get", 70, op_get),
    Op("SetLabels", 40, op_set_labels),
    Op("Search/image", 80, op_search_image),
    Op("Search/id", 80, op_search_id),
    Op("Search/vector", 60, op_search_vector),
    Op("Predict", 60, op_predict),
    Op("Train/logreg", 1, _train("soak-logreg")),
    Op("Train/svm", 1, _train("soak-svm")),
    Op("Stats", 20, op_stats),
    Op("List", 13, op_list),
    Op("bad/junk", 16, bad_junk),
    Op("bad/unknown-head", 8, bad_unknown_head),
    Op("bad/unknown-collection", 8, bad_unknown_collection),
    Op("bad/k", 8, bad_k),
)


# ---------------------------------------------------------------------------------------------- the server

@dataclass
class Sample:
    t: float  # seconds since the load started (negative: setup)
    served: int  # calls finished so far
    rss_mb: float
    threads: int
    fds: int


def proc_status(pid: int) -> tuple[float, int, int]:
    """``(VmRSS in MB, threads, open fds)`` of a live process, from /proc."""
    rss_kb, threads = 0, 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss_kb / 1024, threads, len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m embedder.cli serve`` in a subprocess: start, wait for SERVING, sample memory, SIGTERM."""

    def __init__(self, data_dir: Path, log_path: Path, *, device: str | None, cache_max_items: int,
                 metrics_port: int) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "EMBEDDER_CACHE_MAX_ITEMS": str(cache_max_items)}
        cmd = [sys.executable, "-m", "embedder.cli", "serve", "--port", "0", "--data-dir", str(data_dir),
               "--metrics-port", str(metrics_port)]
        if device:
            cmd += ["--device", device]
        self.metrics_port = metrics_port
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=REPO)
        self.address = ""

    def wait_serving(self, timeout: float = 300) -> float:
        """Read ``listening on HOST:PORT``, then poll health until SERVING; returns the seconds it took."""
        start = time.monotonic()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the server printed nothing in {timeout:.0f} s; see {self.log_path}") from None
        if not line.startswith("listening on "):
            raise RuntimeError(f"unexpected first line from the server: {line!r}; see {self.log_path}")
        self.address = line.split()[-1]
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - start
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None or time.monotonic() - start > timeout:
                    raise RuntimeError(f"the server never became SERVING (exit code {self.proc.poll()}); "
                                       f"see {self.log_path}")
                time.sleep(0.2)

    def status(self) -> tuple[float, int, int]:
        return proc_status(self.proc.pid)

    def scrape(self) -> dict[str, dict[str, int]]:
        """The server's own count of RPCs by method and code (Prometheus ``embedder_requests_total``)."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
        except OSError as e:
            log.warning("could not read %s: %s", url, e)
            return {}
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "embedder_requests_total" and s.labels["door"] == "grpc":
                    out[s.labels["method"]][s.labels["code"]] = int(s.value)
        return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}

    def stop(self, timeout: float = 120) -> tuple[int | None, float]:
        """SIGTERM, wait; returns (exit code, seconds). Killed (code None) if it outlives ``timeout``."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("the server did not exit %.0f s after SIGTERM; killing it", timeout)
            self.proc.kill()
            self.proc.wait()
            code = None
        self._log.close()
        return code, time.monotonic() - start

    def log_problems(self, limit: int = 20) -> dict[str, Any]:
        """Counts of WARNING / ERROR / CRITICAL / Traceback lines in the server's log, and the first few."""
        counts: Counter = Counter()
        first: list[str] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            level = next((lv for lv in ("CRITICAL", "ERROR", "WARNING", "Traceback") if line.startswith(lv)), None)
            if level:
                counts[level] += 1
                if len(first) < limit:
                    first.append(line[:300])
        return {"counts": dict(counts), "first": first}


# ---------------------------------------------------------------------------------------------- the run

def setup(address: str, w: Workload) -> dict[str, Any]:
    """Reference vectors, three seeded collections, two trained heads. Returns what it took."""
    start = time.monotonic()
    with EmbedderClient(address, timeout=300) as c:
        info = c.list_models()[0]
        w.dim = int(info["dim"])
        w.refs = np.concatenate([c.embed(w.jpegs[i:i + 32]) for i in range(0, len(w.jpegs), 32)])
        for n, (name, index) in enumerate(COLLECTIONS.items()):
            ids = [f"s{j}" for j in range(STABLE)] + [f"v{j}" for j in range(VOLATILE)]
            picks = [photo_for(i, salt=n) for i in ids]
            c.add(name, [w.jpegs[i] for i in picks], ids, labels=[w.labels[i] for i in picks],
                  metadata=[{"pool": i} for i in picks], index=index)
        for head_id, kind in HEADS.items():
            c.train(list(COLLECTIONS)[0], kind, head_id=head_id)
    return {**info, "setup_seconds": round(time.monotonic() - start, 2)}


@dataclass
class Run:
    """Shared state of the load phase; each worker appends to its own list of records."""

    max_requests: int
    deadline: float  # monotonic
    t0: float  # monotonic, when the load started
    lock: threading.Lock = field(default_factory=threading.Lock)
    claimed: int = 0
    done: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def claim(self) -> bool:
        with self.lock:
            if self.stop.is_set() or self.claimed >= self.max_requests or time.monotonic() >= self.deadline:
                self.stop.set()
                return False
            self.claimed += 1
            return True

    def finished(self) -> None:
        with self.lock:
            self.done += 1


Record = tuple[float, str, float, str, str]  # (end time since the load started, op, seconds, kind, code)


def worker(k: int, address: str, w: Workload, run: Run, seed: int, records: list[Record],
           samples_of_errors: list[dict[str, Any]], extras: list[dict[str, Any]]) -> None:
    """Claim calls until the budget is spent; record each one's end time, op, latency and outcome."""
    rng = random.Random(seed * 1000 + k)
    ops = list(MIX)
    weights = [op.weight for op in ops]
    with EmbedderClient(address, timeout=60, retries=0) as client:
        while run.claim():
            op = rng.choices(ops, weights)[0]
            args: tuple = ()
            if op.fresh:
                args = (w.fresh(rng),)
            elif op.fn is op_add:
                args = (lambda i: w.fresh(rng, i),)
            start = time.perf_counter()
            try:
                outcome = op.fn(client, w, rng, *args)
            except ServiceError as e:
                outcome = unexpected(e.code.name, str(e))
            except RemoteBatchError as e:
                outcome = unexpected("ITEM_ERROR", str(e))
            except Exception as e:  # noqa: BLE001 - a soak test reports every failure and goes on
                outcome = unexpected(type(e).__name__, repr(e))
            seconds = time.perf_counter() - start
            t = time.monotonic() - run.t0
            records.append((t, op.name, seconds, outcome.kind, outcome.code))
            run.finished()
            if outcome.extra is not None:
                extras.append({"t": round(t, 2), "op": op.name, "client_s": round(seconds, 3), **outcome.extra})
            if outcome.kind == "unexpected":
                log.warning("unexpected %s in %s: %s", outcome.code, op.name, outcome.detail)
                if len(samples_of_errors) < 50:
                    samples_of_errors.append({"t": round(time.monotonic() - run.t0, 2), "op": op.name,
                                              "code": outcome.code, "detail": outcome.detail})


ATTACK_IDLE_STREAMS = 24  # EmbedStreams that never send
ATTACK_REFLECTION_STREAMS = 8  # more than the server keeps open: the rest are refused
ATTACK_TRICKLES = 4  # streams sending one photo every TRICKLE_EVERY seconds
TRICKLE_EVERY = 5.0
HOG_ITEMS = 64  # fresh photos per hog call: cache misses, the model's full work


def attacker(address: str, w: Workload, run: Run, seed: int, seen: Counter) -> list[threading.Thread]:
    """Start the attack threads (see ``--attack``); they stop with ``run``. ``seen`` counts their outcomes."""
    lock = threading.Lock()

    def note(kind: str, code: str) -> None:
        with lock:
            seen[f"{kind} {code}"] += 1

    def silent() -> Any:
        run.stop.wait()
        yield from ()

    def trickle() -> Any:
        rng = random.Random(seed)
        while not run.stop.wait(TRICKLE_EVERY):
            yield pb.EmbedRequest(items=[pb.Item(id="t", image=w.jpegs[rng.randrange(len(w.jpegs))])])

    def hold(kind: str, open_call: Callable[[], Any]) -> None:
        """Keep one stream open, reopening it when the server ends it."""
        while not run.stop.is_set():
            try:
                for _ in open_call():
                    pass
                note(kind, "OK")
            except grpc.RpcError as e:
                note(kind, e.code().name)
            run.stop.wait(1.0)  # a refused stream retries after a pause, not in a hot loop

    def hog() -> None:
        rng = random.Random(seed)
        with EmbedderClient(address, timeout=120, retries=0) as c:
            while not run.stop.is_set():
                try:
                    c.embed([w.fresh(rng) for _ in range(HOG_ITEMS)])
                    note("hog", "OK")
                except ServiceError as e:
                    note("hog", e.code.name)

    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    stub = pb_grpc.EmbedderStub(channel)
    reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    jobs: list[tuple[str, Callable[[], Any]]] = (
        [("idle stream", lambda: stub.EmbedStream(silent()))] * ATTACK_IDLE_STREAMS
        + [("reflection stream", lambda: reflect(silent()))] * ATTACK_REFLECTION_STREAMS
        + [("trickle stream", lambda: stub.EmbedStream(trickle()))] * ATTACK_TRICKLES)
    threads = [threading.Thread(target=hold, args=job, name="soak-attack", daemon=True) for job in jobs]
    threads.append(threading.Thread(target=hog, name="soak-hog", daemon=True))
    for t in threads:
        t.start()
    return threads


def prober(address: str, run: Run, misses: list[dict[str, Any]], checks: list[float]) -> None:
    """Health Check every 0.5 s with a 1 s deadline; a miss is anything but SERVING in time."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not run.stop.wait(0.5):
            start = time.monotonic()
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                what = None if status == health_pb2.HealthCheckResponse.SERVING else f"status {status}"
            except grpc.RpcError as e:
                what = e.code().name
            checks.append(time.monotonic() - start)
            if what is not None:
                misses.append({"t": round(start - run.t0, 1), "what": what})


def sampler(server: Server, run: Run, samples: list[Sample], every: float, warm: dict[str, Any],
            warm_requests: int, warm_seconds: float) -> None:
    """Sample the server's RSS every ``every`` s; note when warm-up ends; log progress every ~10 s."""
    last_log = time.monotonic()
    next_sample = time.monotonic() + every  # the caller took the first sample
    while not run.stop.is_set():
        now = time.monotonic()
        if "t" not in warm and (run.done >= warm_requests or now - run.t0 >= warm_seconds):
            warm.update(t=now - run.t0, served=run.done)
            next_sample = now  # sample right at the end of warm-up
        if now >= next_sample:
            rss, threads, fds = server.status()
            samples.append(Sample(now - run.t0, run.done, rss, threads, fds))
            next_sample += every
            if now - last_log >= 10:
                last_log = now
                log.info("%6.0f s: %d calls (%.0f/s), server RSS %.1f MB, %d threads, %d fds", now - run.t0,
                         run.done, run.done / max(now - run.t0, 1e-9), rss, threads, fds)
        run.stop.wait(0.1)


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 2) if len(values) else None


def summarize(records: list[Record], window: float) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Per op (calls, rate, latency, errors), per time window (p50/p99/max), and errors by code."""
    by_op: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_op[r[1]].append(r)
    duration = max((r[0] for r in records), default=0.0)
    ops: dict[str, Any] = {}
    for op in [o.name for o in MIX]:
        rs = by_op.get(op, [])
        lat = [r[2] for r in rs]
        ops[op] = {"calls": len(rs), "per_s": round(len(rs) / duration, 2) if duration else 0.0,
                   "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                   "max_ms": round(max(lat) * 1000, 2) if lat else None,
                   "expected_errors": dict(Counter(r[4] for r in rs if r[3] == "expected")),
                   "unexpected_errors": dict(Counter(r[4] for r in rs if r[3] == "unexpected"))}
    edges = [float(x) for x in np.arange(0.0, duration, window)] + [duration]
    if len(edges) > 2 and edges[-1] - edges[-2] < window / 2:
        del edges[-2]  # a short tail joins the window before it rather than showing a p99 of a handful of calls
    windows = []
    for start, end in zip(edges, edges[1:]):
        rs = [r for r in records if start <= r[0] < end or (end == duration and r[0] == end)]
        lat = [r[2] for r in rs]
        windows.append({"start_s": round(float(start), 1), "end_s": round(float(end), 1), "calls": len(rs),
                        "per_s": round(len(rs) / max(end - start, 1e-9), 1), "p50_ms": percentile(lat, 50),
                        "p99_ms": percentile(lat, 99), "max_ms": round(max(lat) * 1000, 2) if lat else None,
                        "unexpected_errors": sum(r[3] == "unexpected" for r in rs)})
    errors = {"expected": dict(Counter(r[4] for r in records if r[3] == "expected").most_common()),
              "unexpected": dict(Counter(r[4] for r in records if r[3] == "unexpected").most_common())}
    return ops, windows, errors


def memory_report(samples: list[Sample], warm: dict[str, Any], setup_rss: float, ready_rss: float) -> dict[str, Any]:
    """RSS at start, after warm-up and at the end (medians of 3 samples), max, growth, and the trend after warm-up."""
    under_load = [s for s in samples if s.t >= 0]
    after = [s for s in under_load if s.t >= warm.get("t", 0.0)]
    warm_rss = float(np.median([s.rss_mb for s in after[:3]])) if after else None
    end_rss = float(np.median([s.rss_mb for s in under_load[-3:]])) if under_load else None
    growth = (end_rss - warm_rss) / warm_rss if warm_rss and end_rss else None
    slope = None
    if len(after) >= 10 and after[-1].served > after[0].served:  # fewer samples: too noisy to mean anything
        served = np.array([s.served for s in after], float)
        slope = float(np.polyfit(served, [s.rss_mb for s in after], 1)[0]) * 10_000  # MB per 10k calls
    return {"ready_mb": round(ready_rss, 1), "start_mb": round(setup_rss, 1),
            "after_warmup_mb": round(warm_rss, 1) if warm_rss else None,
            "end_mb": round(end_rss, 1) if end_rss else None,
            "max_mb": round(max(s.rss_mb for s in samples), 1) if samples else None,
            "growth": round(growth, 4) if growth is not None else None,
            "trend_mb_per_10k_calls": round(slope, 2) if slope is not None else None,
            "warmup_end_s": round(warm.get("t", 0.0), 1), "warmup_calls": warm.get("served", 0),
            "threads_start": under_load[0].threads if under_load else None,
            "threads_end": under_load[-1].threads if under_load else None,
            "fds_start": under_load[0].fds if under_load else None,
            "fds_end": under_load[-1].fds if under_load else None}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="time budget (default 10; --quick: 1)")
    parser.add_argument("--requests", type=int, default=None, help="call budget (default 100000; --quick: 5000)")
    parser.add_argument("--clients", type=int, default=16, help="client threads, each with its own channel")
    parser.add_argument("--device", default=None, help="server --device (default: the server's auto)")
    parser.add_argument("--cache-max-items", type=int, default=100,
                        help="server cache size (EMBEDDER_CACHE_MAX_ITEMS), small so fresh photos force evictions")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of either budget that is warm-up")
    parser.add_argument("--window", type=float, default=None, help="seconds per p99 window (default 30; --quick: 10)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--data-dir", type=Path, default=None, help="server data dir, kept (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 minute or 5000 calls")
    parser.add_argument("--attack", action="store_true",
                        help="add an attacker (idle, slow and hog calls within the caps) and a health prober")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    minutes = args.minutes or (1.0 if args.quick else 10.0)
    max_requests = args.requests or (5000 if args.quick else 100_000)
    window = args.window or (10.0 if args.quick else 30.0)

    w = Workload.build(POOL)
    tmp = None
    if args.data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    data_dir = args.data_dir or tmp / "data"
    log_path = (tmp or data_dir.parent) / "soak-server.log"
    run: Run | None = None
    server = Server(data_dir, log_path, device=args.device, cache_max_items=args.cache_max_items,
                    metrics_port=free_port())
    try:
        startup = server.wait_serving()
        ready_rss = server.status()[0]
        log.info("server %s SERVING after %.1f s (RSS %.1f MB); setting up", server.address, startup, ready_rss)
        info = setup(server.address, w)
        setup_rss = server.status()[0]
        log.info("setup took %.1f s (RSS %.1f MB); %d clients for %.1f min or %d calls", info["setup_seconds"],
                 setup_rss, args.clients, minutes, max_requests)

        load_before = os.getloadavg()  # a shared machine: the same load is the only fair comparison
        t0 = time.monotonic()
        run = Run(max_requests, t0 + 60 * minutes, t0)
        per_worker: list[list[Record]] = [[] for _ in range(args.clients)]
        error_samples: list[dict[str, Any]] = []
        extras: list[dict[str, Any]] = []
        samples: list[Sample] = [Sample(0.0, 0, *server.status())]
        warm: dict[str, Any] = {}
        mon = threading.Thread(target=sampler, args=(server, run, samples, args.sample_every, warm,
                                                     int(args.warmup * max_requests), args.warmup * 60 * minutes))
        mon.start()
        threads = [threading.Thread(target=worker, args=(k, server.address, w, run, args.seed, per_worker[k],
                                                         error_samples, extras), name=f"soak-{k}")
                   for k in range(args.clients)]
        attack_seen: Counter = Counter()
        misses: list[dict[str, Any]] = []
        checks: list[float] = []
        side = [threading.Thread(target=prober, args=(server.address, run, misses, checks), name="soak-probe")]
        if args.attack:
            side += attacker(server.address, w, run, args.seed, attack_seen)
        for t in threads + side[:1]:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        load_after = os.getloadavg()
        run.stop.set()
        for t in side:
            t.join(130)  # the attacker's calls end with the run (a hog call within its deadline)
        run.stop.set()
        mon.join()
        samples.append(Sample(elapsed, run.done, *server.status()))  # the last one under load
        time.sleep(2)
        idle_rss = server.status()[0]
        server_counts = server.scrape()
        with EmbedderClient(server.address, timeout=30) as client:
            stats = client.stats()
    finally:
        if run is not None:
            run.stop.set()  # on an interrupt: the workers stop at their next call
        exit_code, shutdown_s = server.stop()
        problems = server.log_problems()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    records = sorted((r for rs in per_worker for r in rs), key=lambda r: r[0])
    ops, windows, errors = summarize(records, window)
    memory = {**memory_report(samples, warm, setup_rss, ready_rss), "idle_after_load_mb": round(idle_rss, 1)}
    for win in windows:  # RSS at each window's end (the last sample within it)
        within = [s for s in samples if s.t <= win["end_s"] + 1e-6]
        win["rss_mb"] = round(within[-1].rss_mb, 1) if within else None
    n_unexpected = sum(errors["unexpected"].values())
    growth = memory["growth"]
    targets = [
        {"name": "RSS growth after warm-up", "value": growth, "threshold": TARGET_GROWTH,
         "passed": growth is not None and growth < TARGET_GROWTH},
        {"name": "unexpected errors", "value": n_unexpected, "threshold": 0, "passed": n_unexpected == 0},
        {"name": "server exit code after SIGTERM", "value": exit_code, "threshold": 0, "passed": exit_code == 0},
        {"name": "health checks missed", "value": len(misses), "threshold": 0, "passed": not misses},
    ]

    print(f"\nsoak: {info['model_id']} on {info['device']} via {info['runtime']}; {args.clients} clients, "
          f"{len(records)} calls in {elapsed:.1f} s ({len(records) / elapsed:.1f}/s); budget {minutes:g} min or "
          f"{max_requests} calls; server cache {args.cache_max_items} items; load average (1, 5, 15 min) "
          f"{_loads(load_before)} before, {_loads(load_after)} after")
    _table(("call", "calls", "/s", "p50 ms", "p99 ms", "max ms", "expected err", "unexpected err"),
           [(name, str(r["calls"]), f"{r['per_s']:.1f}", _fmt(r["p50_ms"]), _fmt(r["p99_ms"]), _fmt(r["max_ms"]),
             _codes(r["expected_errors"]), _codes(r["unexpected_errors"])) for name, r in ops.items()]
           + [("all", str(len(records)), f"{len(records) / elapsed:.1f}",
               _fmt(percentile([r[2] for r in records], 50)), _fmt(percentile([r[2] for r in records], 99)),
               _fmt(round(max(r[2] for r in records) * 1000, 2) if records else None),
               _codes(errors["expected"]), _codes(errors["unexpected"]))])
    print(f"\n  over time ({window:g} s windows, all calls):")
    _table(("window s", "calls", "/s", "p50 ms", "p99 ms", "max ms", "unexpected", "RSS MB"),
           [(f"{x['start_s']:.0f}-{x['end_s']:.0f}", str(x["calls"]), f"{x['per_s']:.1f}", _fmt(x["p50_ms"]),
             _fmt(x["p99_ms"]), _fmt(x["max_ms"]), str(x["unexpected_errors"]), _fmt(x["rss_mb"]))
            for x in windows])
    m = memory
    print(f"\n  server RSS: ready {m['ready_mb']} MB, load start {m['start_mb']} MB, after warm-up "
          f"{m['after_warmup_mb']} MB ({m['warmup_calls']} calls, {m['warmup_end_s']} s), end {m['end_mb']} MB, "
          f"max {m['max_mb']} MB, idle after load {m['idle_after_load_mb']} MB; trend "
          f"{_fmt(m['trend_mb_per_10k_calls'])} MB per 10k calls; threads {m['threads_start']} -> "
          f"{m['threads_end']}, fds {m['fds_start']} -> {m['fds_end']}")
    print(f"  shutdown: SIGTERM -> exit code {exit_code} in {shutdown_s:.2f} s; server log: "
          f"{problems['counts'] or 'no warnings or errors'}")
    trains = sorted(extras, key=lambda d: d["t"])
    if trains:
        total, client = [d["server_total_s"] for d in trains], [d["client_s"] for d in trains]
        acc = [d["accuracy"] for d in trains if d["accuracy"] is not None]
        print(f"  Train: {len(trains)} calls on {int(np.median([d['samples'] for d in trains]))} labelled vectors "
              f"(median); server time p50 {np.median(total):.2f} s, max {max(total):.2f} s; client p50 "
              f"{np.median(client):.2f} s, max {max(client):.2f} s (the rest waits: one training at a time); "
              f"hold-out accuracy median {np.median(acc) if acc else float('nan'):.3f}")
    refused = {f"{method} {code}": n for method, codes in server_counts.items() for code, n in codes.items()
               if code != "OK"}
    print(f"  server-side non-OK RPCs (its metrics, setup included): {_codes(refused)}")
    print(f"  store at end: {stats['items']} items, cache {stats['cache_items']} / {stats['cache_max_items']}, "
          f"{stats['heads']} heads, {stats['disk_bytes'] / 1e6:.1f} MB on disk")
    for t in targets:
        shown = f"{t['value']:+.2%}" if t["name"].startswith("RSS") and t["value"] is not None else t["value"]
        bound = f"< {t['threshold']:.0%}" if t["name"].startswith("RSS") else f"== {t['threshold']}"
        print(f"  target {t['name']} {bound}: {shown} {'PASS' if t['passed'] else 'FAIL'}")
    for e in error_samples[:5]:
        print(f"  unexpected: t={e['t']} s {e['op']} {e['code']}: {e['detail']}")
    health = {"checks": len(checks), "missed": misses, "p99_ms": percentile(checks, 99),
              "max_ms": _ms(max(checks, default=None))}
    print(f"  health Check every 0.5 s: {health['checks']} checks, {len(misses)} missed, p99 {health['p99_ms']} ms, "
          f"max {health['max_ms']} ms")
    if args.attack:
        print(f"  attacker outcomes: {_codes(dict(sorted(attack_seen.items())))}")

    payload = {"model_id": info["model_id"], "device": info["device"], "runtime": info["runtime"],
               "clients": args.clients, "budget": {"minutes": minutes, "requests": max_requests},
               "cache_max_items": args.cache_max_items, "pool": POOL, "startup_seconds": round(startup, 2),
               "setup_seconds": info["setup_seconds"], "duration_s": round(elapsed, 2), "calls": len(records),
               "calls_per_s": round(len(records) / elapsed, 2), "mix": {o.name: o.weight for o in MIX},
               "all": {"p50_ms": percentile([r[2] for r in records], 50),
                       "p99_ms": percentile([r[2] for r in records], 99)},
               "load_average": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in load_after]},
               "ops": ops, "trains": trains, "errors": errors, "unexpected_samples": error_samples, "windows": windows,
               "window_s": window, "memory": memory,
               "rss_samples": [[round(s.t, 1), s.served, round(s.rss_mb, 1), s.threads, s.fds] for s in samples],
               "rss_samples_columns": ["t_s", "calls", "rss_mb", "threads", "fds"],
               "server_requests": server_counts, "store_at_end": {k: v for k, v in stats.items() if k != "collections"},
               "shutdown": {"exit_code": exit_code, "seconds": round(shutdown_s, 2)}, "server_log": problems,
               "health": health, "targets": targets}
    if args.attack:
        payload["attack"] = {"idle_streams": ATTACK_IDLE_STREAMS, "reflection_streams": ATTACK_REFLECTION_STREAMS,
                             "trickle_streams": ATTACK_TRICKLES, "trickle_every_s": TRICKLE_EVERY,
                             "hog_items": HOG_ITEMS, "outcomes": dict(sorted(attack_seen.items()))}
    name = ("soak_attack" if args.attack else "soak") + ("_quick" if args.quick else "")
    print(f"\nwrote {write_json(name, payload)}")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _loads(loads: Sequence[float]) -> str:
    return " ".join(f"{x:.2f}" for x in loads)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


if __name__ == "__main__":
    main()
