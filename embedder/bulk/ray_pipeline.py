"""The Ray Data pipeline of a bulk job: read units, decode tasks (CPU), an embedding actor pool, and the
driver loop that writes each shard as soon as all its rows are back.

Ray is imported inside the functions that need it, and the pipeline (torch) only where the model runs or
inputs are decoded, so importing this module stays light.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..backbones import BackboneSpec
from ..catalog import find_backbone
from ..config import Config, resolve_jpeg_decoder
from ..errors import Category, EmbedderError, ImageDecodeError
from ..inputs import content_hash
from .listing import Inputs
from .shards import FORMAT, SHARD_NAME, _write_shard

if TYPE_CHECKING:
    from ..preprocess import Preprocessor

log = logging.getLogger(__name__)


class ScaleNotInstalledError(EmbedderError):
    """Ray Data (the ``scale`` extra) is not installed."""

    category = Category.FAILED_PRECONDITION


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ScaleNotInstalledError(
            f"bulk-embed needs Ray Data ({e}); install it with: pip install 'embedder[scale]'") from None
    return ray


# ----------------------------------------------------------------------------------------------- read units

def _units(inputs: Inputs, shards: list[tuple[int, int, int]], batch_size: int) -> list[dict[str, Any]]:
    """Read units of the shards to compute: ``(index, start, stop)`` -> JSON-able dicts for the decode tasks.

    A unit never crosses a shard, a Parquet file or a row group (so each reads its bytes once): files go in
    ``batch_size`` runs, Parquet rows by row group (a task yields them in ``batch_size`` batches).
    """
    units: list[dict[str, Any]] = []
    if inputs.kind == "files":
        for k, start, stop in shards:
            for s in range(start, stop, batch_size):
                e = min(s + batch_size, stop)
                units.append({"shard": k, "pos": s - start, "paths": inputs.paths[s:e]})
        return units
    import pyarrow.parquet as pq

    cuts: set[int] = set()  # global positions where a read unit must end: files and their row groups
    for f, first in zip(inputs.files, inputs.file_offsets):
        md = pq.ParquetFile(f).metadata
        at = first
        for g in range(md.num_row_groups):
            at += md.row_group(g).num_rows
            cuts.add(at)
    ordered = np.array(sorted(cuts), dtype=np.int64)
    for k, start, stop in shards:
        inside = ordered[np.searchsorted(ordered, start, side="right"):np.searchsorted(ordered, stop, side="left")]
        edges = [start, *inside.tolist(), stop]
        for s, e in zip(edges, edges[1:]):
            f = int(np.searchsorted(inputs.file_offsets, s, side="right")) - 1
            first = inputs.file_offsets[f]
            units.append({"shard": k, "pos": s - start, "file": inputs.files[f], "start": s - first,
                          "stop": e - first, "column": inputs.bytes_column})
    return units


# ---------------------------------------------------------------------------------- decode (Ray CPU tasks)

def _preprocessor(config: Config) -> Preprocessor:
    """The backbone's own :class:`Preprocessor`, as the Embedder builds it: bulk and service inputs fail (and
    succeed) the same way."""
    from ..preprocess import Preprocessor  # torch: imported in the decode tasks, not where the job is planned

    spec = find_backbone(config.model, config.data_dir)
    return Preprocessor(spec.preprocessing, max_pixels=config.max_pixels,
                        jpeg_decoder=resolve_jpeg_decoder(config.jpeg_decoder, "cpu"))  # decoded on CPU


def _load(unit: dict[str, Any]) -> list[tuple[bytes | None, str | None]]:
    """``(encoded bytes, None)`` or ``(None, error)`` per input of a unit."""
    if "paths" in unit:
        out: list[tuple[bytes | None, str | None]] = []
        for p in unit["paths"]:
            try:
                out.append((Path(p).read_bytes(), None))
            except OSError as e:
                out.append((None, f"could not read file: {e}"))  # as embedder.preprocess.decode says it
        return out
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit["file"])
    md = pf.metadata
    groups, first, at = [], None, 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if at < unit["stop"] and at + n > unit["start"]:
            groups.append(g)
            first = at if first is None else first
        at += n
    column = unit["column"]
    col = pf.read_row_groups(groups, columns=[column]).column(column).slice(unit["start"] - first,
                                                                           unit["stop"] - unit["start"])
    out = []
    for v in col.to_pylist():
        if isinstance(v, dict):  # Hugging Face datasets' Image: {"bytes": ..., "path": ...}
            v = v.get("bytes")
        out.append((bytes(v), None) if v is not None else (None, f"no image bytes (null in column {column!r})"))
    return out


def _decode_units(batch: dict[str, np.ndarray], *, config: Config, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data CPU task: read each unit's inputs, hash them and preprocess them to uint8 crops.

    Yields ``batch_size`` batches of ``shard``, ``pos``, ``sha256``, ``image`` (zeros for a failure) and
    ``error`` ("" when the input is fine).
    """

    preprocessor = _preprocessor(config)
    crop = preprocessor.pp.crop
    for text in batch["unit"]:
        unit = json.loads(str(text))
        loaded = _load(unit)
        for s in range(0, len(loaded), batch_size):
            part = loaded[s:s + batch_size]
            images = np.zeros((len(part), crop, crop, 3), dtype=np.uint8)
            shas, errors = [], []
            for j, (data, error) in enumerate(part):
                sha = ""
                if error is None:
                    try:
                        images[j] = preprocessor.prepare(data)
                        sha = content_hash(data)
                    except ImageDecodeError as e:
                        error = str(e)  # the manifest's message
                shas.append(sha)
                errors.append(error or "")
            yield {"shard": np.full(len(part), unit["shard"], dtype=np.int64),
                   "pos": np.arange(unit["pos"] + s, unit["pos"] + s + len(part), dtype=np.int64),
                   "sha256": np.array(shas, dtype=object), "image": images, "error": np.array(errors, dtype=object)}


# ------------------------------------------------------------------------------------ embed (Ray actor pool)

class _EmbedActor:
    """One :class:`Embedder` per actor; :meth:`Embedder.embed_arrays` on the decoded crops."""

    def __init__(self, config: Config, model_id: str) -> None:
        from ..pipeline import Embedder  # torch: imported in the actors, not where the job is planned

        self.embedder = Embedder(config=config)
        if self.embedder.model_id != model_id:
            raise EmbedderError(f"this worker's {config.model} is {self.embedder.model_id}, the driver's is "
                                f"{model_id}: install the same embedder and weights on every node")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        vectors = np.zeros((len(errors), self.embedder.dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.embedder.embed_arrays(np.ascontiguousarray(batch["image"][ok]))
        return {"shard": batch["shard"], "pos": batch["pos"], "sha256": batch["sha256"], "error": errors,
                "vector": vectors}


# ---------------------------------------------------------------------------------------------------- driver

def _resources_plan(resources: dict[str, float], actors: int | None, config: Config) -> dict[str, Any]:
    """Actors, their CPUs/GPUs and device, leaving one CPU for the decode tasks (else they could starve).

    CPU fractions are only Ray's scheduling budget; the threads an actor runs are ``runtime_threads``.
    """
    cpus = float(resources.get("CPU", 1.0))
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus >= 1 and config.device != "cpu"
    if config.device.startswith("cuda") and not use_gpu:
        raise ValueError(f"--device {config.device} but the Ray cluster has no GPUs ({resources})")
    n = actors or (gpus if use_gpu else max(1, int(cpus // 4)))
    actor_cpus = min(1.0, max(0.1, (cpus - 1) / n)) if cpus > 1 else 0.1
    device = (config.device if config.device.startswith("cuda") else "cuda") if use_gpu else "cpu"
    # CPU actors run the model on their share of the cores (measured: on 2 cores, 1 actor with 2 threads beside
    # the decode tasks beats 1 thread, and beats 2 actors); the OS shares the cores with the decode tasks.
    threads = 0 if use_gpu else max(1, int(cpus // n))
    return {"actors": n, "actor_cpus": round(actor_cpus, 3), "num_gpus": 1 if use_gpu else 0, "device": device,
            "decode_cpus": 1.0, "runtime_threads": config.runtime_threads or threads}


def _dataset(ray: Any, units: list[dict[str, Any]], config: Config, actor_config: Config, plan: dict[str, Any],
             model_id: str, batch_size: int) -> Any:
    """units -> decode (CPU tasks) -> embed (actor pool): rows of shard, pos, sha256, error, vector."""
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=min(len(units), 2000))
    # The decode tasks' memory request also keeps Ray Data from fusing them into the actors (it fuses a task map
    # into the next actor map when their resource requests are equal): decoding runs beside the model, not in
    # series with it in the same process.
    ds = ds.map_batches(_decode_units, batch_size=1, batch_format="numpy", num_cpus=plan["decode_cpus"],
                        memory=plan["decode_memory"], fn_kwargs={"config": config, "batch_size": batch_size})
    # a fixed pool of plan["actors"]: `concurrency=` until Ray 2.50, `compute=` after (each warns on the other)
    version = tuple(int(x) for x in ray.__version__.split(".")[:2])
    pool = ({"compute": ray.data.ActorPoolStrategy(size=plan["actors"])} if version >= (2, 51)
            else {"concurrency": plan["actors"]})
    return ds.map_batches(_EmbedActor, batch_size=batch_size, batch_format="numpy", **pool,
                          fn_constructor_kwargs={"config": actor_config, "model_id": model_id},
                          num_cpus=plan["actor_cpus"], num_gpus=plan["num_gpus"] or None)


def _run_ray(inputs: Inputs, todo: list[tuple[int, int, int]], out: Path, spec: BackboneSpec, config: Config,
             fingerprint: dict[str, Any], digests: dict[int, str], shard_meta: dict[int, dict[str, Any]], *,
             ray_address: str | None, actors: int | None, batch_size: int, progress: bool,
             local_cpus: int | None) -> dict[str, Any]:
    """Run the pending shards through Ray Data; each shard is written as soon as all its rows are back."""
    import dataclasses

    from tqdm.auto import tqdm

    ray = _ray()
    ours = False
    if not ray.is_initialized():
        try:
            if ray_address:
                ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
            else:
                ray.init(address="local", num_cpus=local_cpus or os.cpu_count() or 1, include_dashboard=False,
                         ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray instance"
            raise EmbedderError(f"could not start or reach {where}: {e}") from None
        ours = True
    # Ray Data logs every execution at INFO and warns that its progress bars are off (ours is the one bar):
    # quiet unless this package logs at INFO (`embedder -v`).
    quiet = {} if log.isEnabledFor(logging.INFO) else {"ray.data": logging.WARNING,
                                                       "ray.data._internal.progress": logging.ERROR}
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        plan = _resources_plan(ray.cluster_resources(), actors, config)
        plan["decode_memory"] = (512 + 2 * batch_size) * 2**20  # a worker with torch imported, plus a batch
        actor_config = dataclasses.replace(config, device=plan["device"], decode_workers=1,
                                           runtime_threads=plan["runtime_threads"])
        ctx = ray.data.DataContext.get_current()
        bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours is the one bar, over images
        try:
            ds = _dataset(ray, _units(inputs, todo, batch_size), config, actor_config, plan, spec.model_id,
                          batch_size)
        finally:
            ctx.enable_progress_bars = bars
        shards = {k: (s, e) for k, s, e in todo}
        partial: dict[int, dict[str, Any]] = {}
        total = sum(e - s for _, s, e in todo)
        kind = "GPU" if plan["num_gpus"] else "CPU"
        desc = f"bulk-embed ({spec.name}, {plan['actors']} {kind} actor{'s' if plan['actors'] > 1 else ''})"
        # When the first rows and half of them came back: start-up (planning, actors importing torch and loading
        # the model) and the steady rate of the second half, reported in the manifest's settings.
        started, timing, returned = time.perf_counter(), {}, 0
        with tqdm(total=total, disable=not progress, unit="img", desc=desc) as bar:
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    returned += len(batch["shard"])
                    timing.setdefault("first_result_s", round(time.perf_counter() - started, 3))
                    if 2 * returned >= total and "half_result_s" not in timing:
                        timing.update(half_result_s=round(time.perf_counter() - started, 3), half_result_rows=returned)
                    for k in np.unique(batch["shard"]).tolist():
                        s, e = shards[k]
                        acc = partial.get(k)
                        if acc is None:
                            acc = partial[k] = {"sha": np.full(e - s, "", object), "err": np.full(e - s, "", object),
                                                "vec": np.zeros((e - s, spec.dim), np.float32), "left": e - s}
                        rows = np.flatnonzero(batch["shard"] == k)
                        pos = batch["pos"][rows]
                        acc["sha"][pos], acc["err"][pos] = batch["sha256"][rows], batch["error"][rows]
                        acc["vec"][pos] = batch["vector"][rows]
                        acc["left"] -= len(rows)
                        if acc["left"] == 0:
                            meta = {"format": FORMAT, "shard": k, "inputs": e - s, "digest": digests[k],
                                    "fingerprint": fingerprint, "model_id": spec.model_id}
                            shard_meta[k] = _write_shard(out / SHARD_NAME.format(k), inputs, s, e,
                                                         [str(x) for x in acc["sha"]], acc["vec"],
                                                         [str(x) for x in acc["err"]], meta)
                            del partial[k]
                    bar.update(len(batch["shard"]))
            except ray.exceptions.RayError as e:
                raise EmbedderError(f"the Ray job failed ({type(e).__name__}: {e}); the {len(shard_meta)} complete "
                                    "shards are kept: rerun to resume") from e
        if partial:
            raise EmbedderError(f"Ray Data returned incomplete shards {sorted(partial)[:5]}; rerun to resume")
        return {**plan, **timing, "ray_seconds": round(time.perf_counter() - started, 3)}
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if ours:
            ray.shutdown()
