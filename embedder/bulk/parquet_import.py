"""``import_parquet``: a bulk job's shards into a local store (collection items, or the cache), no backbone pass."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelMismatchError
from ..inputs import folder_label
from .shards import _read_shard_meta, _shard_files

if TYPE_CHECKING:
    import pyarrow as pa

    from ..store import Store


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
