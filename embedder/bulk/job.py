"""``bulk_embed``: plan a bulk job's shards, skip the complete ones, run the rest on Ray, keep the manifest."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..backbones import BackboneSpec
from ..catalog import find_backbone
from ..config import Config
from .listing import read_inputs
from .ray_pipeline import _ray, _run_ray
from .shards import SHARD_NAME, _check_out_dir, _read_shard_meta, _remove_stale, _shard_digest, _write_manifest

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
DEFAULT_SHARD_SIZE = 1000
# Settings that change the vectors: a shard written under others is recomputed, a manifest refuses a mix.
_VECTOR_SETTINGS = ("normalize", "precision")
# Embedder settings bulk_embed accepts (Config fields that make sense for a batch job).
_SETTINGS = ("device", "runtime", "max_batch", "micro_batch", "runtime_threads", "max_pixels", "precision",
             "normalize", "compile", "cache_dir", "onnx_cache_bytes", "data_dir", "jpeg_decoder")


def _fingerprint(spec: BackboneSpec, config: Config) -> dict[str, Any]:
    return {"model_id": spec.model_id, "dim": spec.dim, **{k: getattr(config, k) for k in _VECTOR_SETTINGS}}


def bulk_embed(src: str | os.PathLike, out: str | os.PathLike, *, model: str | None = "mobilenet_v2",
               ray_address: str | None = None, actors: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True, bytes_column: str = "image",
               id_column: str | None = "id", label_column: str | None = None, local_cpus: int | None = None,
               **embedder_settings: Any) -> dict[str, Any]:
    """Embed everything under ``src`` on Ray Data into Parquet shards in ``out``; returns the manifest.

    ``src``: see :func:`read_inputs`. ``ray_address``: a cluster to submit to (``ray://host:10001``, ``auto``,
    ...); None starts a private local Ray with ``local_cpus`` (default: all cores) and shuts it down after. When
    Ray is already initialised in this process, that instance is used as it is. ``actors``: embedding actors
    (default: one per GPU, else one per 4 CPUs, at least 1). ``embedder_settings``: :class:`Config` fields
    (device, runtime, micro_batch, runtime_threads, max_pixels, precision, normalize, cache_dir, ...), also
    read from ``EMBEDDER_*`` env vars in this process and shipped to the workers.

    Resumable: shards already complete for the same inputs and model are skipped. Inputs that cannot be read
    or decoded are in ``manifest["failures"]`` with their error, never dropped silently.
    """
    started = time.perf_counter()
    unknown = set(embedder_settings) - set(_SETTINGS)
    if unknown:
        raise TypeError(f"bulk_embed() got unknown settings {sorted(unknown)}; Embedder settings: {list(_SETTINGS)}")
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
        raise ValueError(f"actors must be a positive int or None, got {actors!r}")
    config = Config.from_env(model=model, **embedder_settings)
    spec = find_backbone(config.model, config.data_dir)
    fingerprint = _fingerprint(spec, config)
    out = Path(out).expanduser()
    inputs = read_inputs(src, bytes_column=bytes_column, id_column=id_column, label_column=label_column)
    if inputs.kind == "parquet" and any(Path(f).is_relative_to(out.absolute()) for f in inputs.files):
        raise ValueError(f"--out {out} is inside the Parquet input {src}: its shards would be read as input; "
                         "put the output elsewhere")
    _check_out_dir(out, fingerprint)

    n = len(inputs)
    bounds = [(k, s, min(s + shard_size, n)) for k, s in enumerate(range(0, n, shard_size))]
    shard_meta: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, int, int]] = []
    digests = {}
    for k, s, e in bounds:
        digests[k] = _shard_digest(inputs, s, e)
        meta = _read_shard_meta(out / SHARD_NAME.format(k))
        if (meta is not None and meta.get("shard") == k and meta.get("inputs") == e - s
                and meta.get("digest") == digests[k] and meta.get("fingerprint") == fingerprint):
            shard_meta[k] = meta
        else:
            todo.append((k, s, e))
    settings = {"src": str(src), "input_kind": inputs.kind, "batch_size": batch_size, "shard_size": shard_size,
                "ray_address": ray_address, "bytes_column": bytes_column if inputs.kind == "parquet" else None,
                "id_column": id_column if inputs.kind == "parquet" else None, "label_column": label_column,
                "model": spec.name, "runtime": config.runtime, "micro_batch": config.micro_batch,
                "runtime_threads": config.runtime_threads, "max_pixels": config.max_pixels,
                **{k: getattr(config, k) for k in _VECTOR_SETTINGS}}
    skipped = len(shard_meta)
    if todo:
        _ray()  # installed? (before writing anything)
    _write_manifest(out, spec, fingerprint, inputs, bounds, shard_meta, settings, skipped, started, complete=False)
    if todo:
        log.info("bulk-embed: %d inputs, %d shards, %d to compute (%d already complete)",
                 n, len(bounds), len(todo), skipped)
        try:
            plan = _run_ray(inputs, todo, out, spec, config, fingerprint, digests, shard_meta,
                            ray_address=ray_address, actors=actors, batch_size=batch_size, progress=progress,
                            local_cpus=local_cpus)
        except BaseException:  # interrupted or failed: the manifest lists the shards finished so far
            _write_manifest(out, spec, fingerprint, inputs, bounds, shard_meta, settings, skipped, started,
                            complete=False)
            raise
        settings.update(plan)
    _remove_stale(out, len(bounds))
    return _write_manifest(out, spec, fingerprint, inputs, bounds, shard_meta, settings, skipped, started,
                           complete=True)
