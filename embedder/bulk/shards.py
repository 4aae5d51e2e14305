"""The output folder's format: Parquet shards with their own metadata, and the manifest; written atomically.

Shards record what they were computed from (the digest of their inputs' ids and the model fingerprint), so a
rerun can tell a complete shard from one to recompute.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backbones import BackboneSpec
from ..durable import fsync_file, replace_durably, temp_path, write_atomic
from .listing import Inputs

log = logging.getLogger(__name__)

FORMAT = "embedder.bulk/1"
META_KEY = b"embedder.bulk"  # Parquet key-value metadata of every shard
MANIFEST = "manifest.json"
SHARD_NAME = "part-{:05d}.parquet"


def _shard_digest(inputs: Inputs, start: int, stop: int) -> str:
    h = hashlib.sha256()
    for i in range(start, stop):
        h.update(inputs.ids[i].encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _read_shard_meta(path: Path) -> dict[str, Any] | None:
    """A shard's own metadata, or None when the file is missing or unreadable (then it is recomputed)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[META_KEY])
    except (OSError, KeyError, ValueError) as e:
        if path.exists():
            log.warning("shard %s is unreadable (%s); recomputing it", path, e)
        return None
    except Exception as e:  # pyarrow raises its own ArrowInvalid (a ValueError) and others for a torn file
        log.warning("shard %s is unreadable (%r); recomputing it", path, e)
        return None


def _write_shard(path: Path, inputs: Inputs, start: int, stop: int, sha256s: list[str], vectors: np.ndarray,
                 errors: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    """Write one shard atomically (temp file, fsync, rename): its embedded rows, its failures in metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok = [j for j, e in enumerate(errors) if not e]
    dim = vectors.shape[1]
    columns = {"id": pa.array([inputs.ids[start + j] for j in ok], pa.string()),
               "path": pa.array([inputs.paths[start + j] for j in ok] if inputs.paths else [None] * len(ok),
                                pa.string())}
    if inputs.labels is not None:
        columns["label"] = pa.array([inputs.labels[start + j] for j in ok], pa.string())
    columns["sha256"] = pa.array([sha256s[j] for j in ok], pa.string())
    columns["model_id"] = pa.array([meta["model_id"]] * len(ok), pa.string())
    flat = pa.array(np.ascontiguousarray(vectors[ok], dtype=np.float32).reshape(-1), pa.float32())
    columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    meta = {**meta, "embedded": len(ok), "failed": len(errors) - len(ok),
            "failures": [{"id": inputs.ids[start + j], "error": e} for j, e in enumerate(errors) if e]}
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp)
        fsync_file(tmp)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return meta


def _check_out_dir(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse an output folder that holds shards of another model or vector settings (no silent mix)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the shards")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            raise ValueError(f"{manifest} is not valid JSON; remove it (or use another --out)") from None
        if old.get("fingerprint") not in (None, fingerprint):
            raise ValueError(f"{out} holds shards of {old['fingerprint']}, not {fingerprint}; use another --out "
                             "(or delete that folder) rather than mixing vectors of different models or settings")
    out.mkdir(parents=True, exist_ok=True)


def _remove_stale(out: Path, shards: int) -> None:
    """Shard files numbered beyond this run's shards (the inputs shrank) and temp files of killed runs."""
    for f in out.glob("part-*.parquet"):
        try:
            k = int(f.name[5:10])
        except ValueError:
            continue
        if k >= shards:
            log.warning("removing %s: the inputs now make %d shards", f, shards)
            f.unlink()
    for f in out.glob(".part-*.tmp"):
        f.unlink(missing_ok=True)


def _write_manifest(out: Path, spec: BackboneSpec, fingerprint: dict[str, Any], inputs: Inputs,
                    bounds: list[tuple[int, int, int]], shard_meta: dict[int, dict[str, Any]],
                    settings: dict[str, Any], skipped: int, started: float, *, complete: bool) -> dict[str, Any]:
    done = [shard_meta[k] for k, _, _ in bounds if k in shard_meta]
    manifest = {
        "format": FORMAT, "complete": complete and len(done) == len(bounds),
        "model": spec.name, "model_id": spec.model_id, "dim": spec.dim, "fingerprint": fingerprint,
        "counts": {"inputs": len(inputs), "embedded": sum(m["embedded"] for m in done),
                   "failed": sum(m["failed"] for m in done), "shards": len(bounds), "complete_shards": len(done),
                   "skipped_shards": skipped, "written_shards": len(done) - skipped},
        "shards": [{"file": SHARD_NAME.format(m["shard"]), "inputs": m["inputs"], "embedded": m["embedded"],
                    "failed": m["failed"]} for m in done],
        "failures": [f for m in done for f in m["failures"]],
        "settings": settings,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return manifest


def _shard_files(directory: Path, *, allow_partial: bool) -> list[Path]:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}; point --from-parquet at a bulk-embed --out folder")
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("complete") and not allow_partial:
        c = manifest.get("counts", {})
        raise ValueError(f"the bulk-embed run in {directory} did not finish ({c.get('complete_shards', '?')} of "
                         f"{c.get('shards', '?')} shards); rerun it to resume, then import")
    return [directory / s["file"] for s in manifest["shards"]]
