"""Bulk embedding on Ray Data: a folder tree, a list of paths or a Parquet dataset -> Parquet shards + a manifest.

    embedder bulk-embed photos/ --out vectors/                           # starts a local Ray on this machine
    embedder bulk-embed paths.txt --out vectors/ --ray-address ray://head:10001
    embedder bulk-embed images.parquet --out vectors/ --bytes-column image --id-column id
    embedder add --from-parquet vectors/ --collection pets --data-dir embedder-data   # no backbone pass

The same code as the service, no second pipeline: CPU tasks read each input and decode + preprocess it with
the backbone's own :class:`embedder.preprocess.Preprocessor` and its :meth:`~embedder.preprocess.Preprocessor.prepare`
(same errors, same pixels), and an actor pool runs :meth:`Embedder.embed_arrays` (one
:class:`~embedder.Embedder` per actor; one GPU per actor when the cluster has GPUs, CPU actors otherwise).

**Output** (``--out DIR``): ``part-00000.parquet``, ... with one row per embedded input: ``id``, ``path``
(file inputs; null for Parquet inputs), ``sha256`` of the encoded bytes, ``model_id``, ``vector``
(``fixed_size_list<float32>[dim]``) and ``label`` when ``--label-column`` was given; and ``manifest.json``:
model id, dim, counts, the shard list, every input that failed with its error, the settings and the time.

**Shards** are deterministic: inputs in a fixed order (a folder: sorted paths; a list: its order; Parquet:
files sorted by name, rows in order) cut into ``shard_size`` runs. Each shard is written atomically (temp
file, fsync, rename) by the driver once all its rows are back, and carries its own metadata (Parquet
key-value ``embedder.bulk``: its inputs' count and digest, the model fingerprint, its failures). A rerun
skips every shard whose file is complete for the same inputs and model, so an interrupted job resumes
where it stopped; a shard whose inputs changed is recomputed. Resumption keys on ids (paths), not on file
contents: a file edited in place under the same name is not re-embedded.

**Clusters**: with ``--ray-address`` the job is submitted to that cluster. Every node needs this package and
the backbone's weights installed (the same versions), and file inputs must be paths every node can read
(a shared filesystem); Parquet inputs likewise. Without it, a private local Ray instance is started
(``address="local"``: never another user's cluster on the same machine) and shut down at the end.

Ray is imported inside the functions that need it: ``import embedder`` never pulls it in, and without it
installed ``bulk-embed`` says ``pip install 'embedder[scale]'``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .backbones import BackboneSpec, find_backbone
from .config import Config
from .durable import fsync_file, replace_durably, temp_path, write_atomic
from .errors import Category, EmbedderError, ImageDecodeError, ModelMismatchError
from .inputs import IMAGE_SUFFIXES, content_hash, folder_label, image_files
from .pipeline import Embedder
from .preprocess import Preprocessor

if TYPE_CHECKING:
    import pyarrow as pa

    from .store import Store

log = logging.getLogger(__name__)

FORMAT = "embedder.bulk/1"
META_KEY = b"embedder.bulk"  # Parquet key-value metadata of every shard
MANIFEST = "manifest.json"
SHARD_NAME = "part-{:05d}.parquet"
DEFAULT_BATCH_SIZE = 64
DEFAULT_SHARD_SIZE = 1000
# Settings that change the vectors: a shard written under others is recomputed, a manifest refuses a mix.
_VECTOR_SETTINGS = ("normalize", "precision")
# Embedder settings bulk_embed accepts (Config fields that make sense for a batch job).
_SETTINGS = ("device", "runtime", "max_batch", "micro_batch", "runtime_threads", "max_pixels", "precision",
             "normalize", "compile", "cache_dir", "data_dir", "jpeg_decoder")


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


# ---------------------------------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """What :func:`read_inputs` found: one id per input, in shard order, and how to load each.

    ``kind`` "files": ``paths[i]`` is the absolute path of input i. ``kind`` "parquet": input i is row
    ``i - file_offsets[f]`` of ``files[f]`` (its column ``bytes_column``).
    """

    kind: str  # "files" | "parquet"
    src: str
    ids: list[str]
    paths: list[str] | None = None
    labels: list[str | None] | None = None  # Parquet --label-column
    files: list[str] = field(default_factory=list)
    file_offsets: list[int] = field(default_factory=list)  # global index of each file's first row (+ the total)
    bytes_column: str | None = None

    def __len__(self) -> int:
        return len(self.ids)


def read_inputs(src: str | os.PathLike, *, bytes_column: str = "image", id_column: str | None = "id",
                label_column: str | None = None) -> Inputs:
    """The inputs ``src`` names, in a deterministic order.

    - a folder: its image files (``preprocess.image_files``), recursively, sorted; ids are paths relative to it
      (as ``embedder add`` names them), so a rerun on the same tree finds the same shards;
    - a ``.parquet`` file, or a folder of ``*.parquet`` files (and no images; sorted, recursively): one input per
      row, the encoded image in ``bytes_column`` (binary, or a struct with a binary ``bytes`` field as Hugging
      Face ``datasets`` writes images), its id in ``id_column`` (``None``/``""``: ``FILE#ROW``), optionally a
      label in ``label_column``;
    - any other file: a list of image paths, one per line, in that order (blank lines and ``#`` comments
      skipped); relative paths are relative to the list's folder; ids are the lines as written.

    Ids must be unique (a ValueError names the first repeat). Nothing is decoded here.
    """
    root = Path(src).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {root}")
    if root.is_dir():
        images = image_files(root)
        if images:
            ids = [f.relative_to(root).as_posix() for f in images]
            return Inputs("files", str(root), ids, paths=[str(f.absolute()) for f in images])
        tables = sorted(f for f in root.rglob("*.parquet") if f.is_file() and not f.name.startswith("."))
        if not tables:
            raise FileNotFoundError(f"no image files (or .parquet files) found under {root}")
        return _read_parquet_inputs(root, tables, bytes_column, id_column, label_column)
    if root.suffix.lower() == ".parquet":
        return _read_parquet_inputs(root.parent, [root], bytes_column, id_column, label_column)
    if root.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"{root} is one image; pass a folder, a text file listing image paths, or Parquet "
                         "(or use `embedder embed` for a few files)")
    ids, paths = [], []
    try:
        lines = root.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{root} is not a UTF-8 text file of image paths (one per line), a folder, "
                         "or a .parquet file") from None
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        ids.append(entry)
        paths.append(str((p if p.is_absolute() else root.parent / p).absolute()))
    if not ids:
        raise FileNotFoundError(f"{root} lists no image paths")
    _check_unique(ids, f"{root} lists")
    return Inputs("files", str(root), ids, paths=paths)


def _check_unique(ids: Sequence[str], where: str) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"{where} {dup!r} more than once; every input needs a unique id")


def _binary_column_type(t: "pa.DataType") -> str | None:
    """"binary" or "struct" when the column holds encoded images, else None."""
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        if idx >= 0 and (pa.types.is_binary(t.field(idx).type) or pa.types.is_large_binary(t.field(idx).type)):
            return "struct"
    return None


def _read_parquet_inputs(root: Path, tables: list[Path], bytes_column: str, id_column: str | None,
                         label_column: str | None) -> Inputs:
    import pyarrow.parquet as pq

    ids: list[str] = []
    labels: list[str | None] | None = [] if label_column else None
    offsets = [0]
    for f in tables:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        names = schema.names
        if bytes_column not in names or _binary_column_type(schema.field(bytes_column).type) is None:
            got = f"is {schema.field(bytes_column).type}" if bytes_column in names else "is missing"
            raise ValueError(f"{f}: column {bytes_column!r} {got}; it must hold the encoded image bytes (binary, or "
                             f"a struct with a binary 'bytes' field). Columns: {', '.join(names)}; pick one with "
                             "--bytes-column")
        wanted = [c for c in (id_column, label_column) if c]
        for c in wanted:
            if c not in names:
                what = "--id-column ('' for FILE#ROW ids)" if c == id_column else "--label-column"
                raise ValueError(f"{f}: no column {c!r} (columns: {', '.join(names)}); pick one with {what}")
        n = pf.metadata.num_rows
        table = pf.read(columns=wanted) if wanted else None
        name = f.relative_to(root).as_posix()
        if id_column:
            file_ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()]
            if None in file_ids:
                raise ValueError(f"{f}: column {id_column!r} has a null in row {file_ids.index(None)}; "
                                 "every row needs an id")
            ids += file_ids
        else:
            ids += [f"{name}#{r}" for r in range(n)]
        if label_column:
            labels += [None if v is None else str(v) for v in table.column(label_column).to_pylist()]
        offsets.append(offsets[-1] + n)
    if not ids:
        raise FileNotFoundError(f"{', '.join(map(str, tables))} holds no rows")
    _check_unique(ids, f"{root}: column {id_column!r} holds" if id_column else str(root))
    return Inputs("parquet", str(root), ids, labels=labels, files=[str(f.absolute()) for f in tables],
                  file_offsets=offsets, bytes_column=bytes_column)


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
    spec = find_backbone(config.model, config.data_dir)
    return Preprocessor(spec.preprocessing, max_pixels=config.max_pixels, jpeg_decoder=config.jpeg_decoder)


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


# ---------------------------------------------------------------------------------------------------- shards

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


# ---------------------------------------------------------------------------------------------------- import

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


def _labels_for(table: "pa.Table", labels_from: str | None, label: str | None) -> list[str | None] | None:
    if label is not None:
        return [label] * table.num_rows
    if labels_from is None:
        return None
    if labels_from == "folder":  # as `embedder add --label-from-folder`: the file's parent folder
        paths = table.column("path").to_pylist()
        ids = table.column("id").to_pylist()
        return [folder_label(Path(p) if p else PurePosixPath(i)) for p, i in zip(paths, ids)]
    if labels_from not in table.column_names:
        raise ValueError(f"labels_from={labels_from!r}: the shards have no such column (columns: "
                         f"{', '.join(table.column_names)}); use 'folder' or a column name")
    return [None if v is None else str(v) for v in table.column(labels_from).to_pylist()]


def _vectors(table: "pa.Table") -> np.ndarray:
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def import_parquet(directory: str | os.PathLike, store: "Store", collection: str | None, *,
                   labels_from: str | None = None, label: str | None = None, index: str | None = None,
                   allow_partial: bool = False, progress: bool = False) -> dict[str, Any]:
    """Put the vectors of a :func:`bulk_embed` output folder into ``store``, without any backbone pass.

    Each shard's rows go to ``collection`` (created on first use; ``index`` for a new one) under their ids with
    their sha256s, so embedding the same image bytes later (``embed_cached``, the service's Add/Embed/Search)
    is a cache hit. ``collection=None`` fills only the cache (``Store.put``). Labels: ``label`` for every item,
    or ``labels_from="folder"`` (the file's parent folder, as ``embedder add --label-from-folder``) or the name
    of a shard column (``label`` when bulk-embed had ``--label-column``).

    Every shard is checked before anything is written: one model id across them, and the collection's own when
    it exists (:class:`ModelMismatchError` otherwise). Re-importing replaces the same ids (idempotent).
    Returns ``{"added", "replaced", "cached", "items", "shards", "model_id", "collection"}``.
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    directory = Path(directory).expanduser()
    files = _shard_files(directory, allow_partial=allow_partial)
    metas = []
    for f in files:
        meta = _read_shard_meta(f)
        if meta is None:
            raise FileNotFoundError(f"shard {f} is missing or unreadable; rerun bulk-embed on {directory} to "
                                    "recompute it")
        metas.append(meta)
        if labels_from not in (None, "folder") and label is None:
            names = pq.read_schema(f).names
            if labels_from not in names:  # before anything is written, like the model check below
                hint = (" (bulk-embed writes it only when run with --label-column)" if labels_from == "label"
                        else "")
                raise ValueError(f"the shards in {directory} have no {labels_from!r} column{hint}; columns: "
                                 f"{', '.join(names)}. Import them without shard labels, or with the folder "
                                 "names (--label-from-folder) or one label (--label)")
    models = sorted({m["model_id"] for m in metas})
    if len(models) > 1:
        raise ModelMismatchError(f"{directory} mixes shards of models {', '.join(models)}; import one model's "
                                 "shards per collection")
    if not models:
        return {"added": 0, "replaced": 0, "cached": 0, "items": 0, "shards": 0, "model_id": None,
                "collection": collection}
    model_id, dim = models[0], metas[0]["fingerprint"]["dim"]
    if collection is not None:
        existing = {c.name: c for c in store.list_collections()}.get(collection)
        if existing is not None and existing.model_id != model_id:
            raise ModelMismatchError(
                f"collection {collection!r} holds vectors of model {existing.model_id}, but the shards in "
                f"{directory} are of {model_id}; vectors of different models are not comparable. Import into "
                "another collection, or bulk-embed again with the collection's model")
        if existing is None and index is not None:
            store.create_collection(collection, model_id=model_id, dim=dim, index=index)
    added = replaced = cached = items = 0
    for f in tqdm(files, disable=not progress, unit="shard", desc=f"importing {directory}"):
        table = pq.read_table(f)
        if not table.num_rows:
            continue
        vectors = _vectors(table)
        shas = table.column("sha256").to_pylist()
        if collection is None:
            store.put(model_id, shas, vectors)
            cached += len(shas)
        else:
            r = store.add(collection, table.column("id").to_pylist(), vectors, model_id=model_id, sha256s=shas,
                          labels=_labels_for(table, labels_from, label))
            added, replaced = added + r.added, replaced + r.replaced
        items += table.num_rows
    return {"added": added, "replaced": replaced, "cached": cached, "items": items, "shards": len(files),
            "model_id": model_id, "collection": collection}
