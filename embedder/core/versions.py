"""Fine-tuned backbone versions shared through a Milvus store, so every replica can embed with them.

A version (``<data_dir>/backbones/<name>/``: ``backbone.json`` + ``weights.safetensors``, see
:func:`embedder.finetune.save_version`) made by FineTune or AdaBN on one replica is published to Milvus (collection
``embedder_backbones``, :class:`~embedder.store.milvus_files.MilvusFiles`). Another replica fetches the versions it
lacks into its own data dir when it opens, and again when a call names a model it does not know, then registers
them as it registers its own; their weights are checked against the sha256 in ``backbone.json`` when loaded, as
every backbone's are.
"""
from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path
from typing import Any

from ..backbones import DERIVED_META, DERIVED_WEIGHTS, load_derived
from ..durable import fsync_dir, write_synced

log = logging.getLogger(__name__)

FILES = (DERIVED_META, DERIVED_WEIGHTS)


def publish(place: Any, folder: Path) -> None:
    """Put the version in ``folder`` where every replica finds it; refused when one of that name is there (a
    version's name stands for its weights)."""
    try:
        place.write(folder.name, {name: (folder / name).read_bytes() for name in FILES}, overwrite=False)
    except FileExistsError:  # another replica's job of the same name finished first
        from ..finetune import FineTuneError

        raise FineTuneError(f"a backbone named {folder.name!r} was published by another replica meanwhile; run the "
                            "job again with another suffix") from None
    log.info("published backbone version %s to %s", folder.name, place)


def sync(place: Any, root: Path) -> list[str]:
    """Publish the versions under ``root`` that ``place`` lacks, fetch those ``root`` lacks, register them; the
    names fetched."""
    shared = set(place.ids())
    local = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.is_dir() else set()
    for name in sorted(local - shared):  # made here before versions were shared
        if all((root / name / file).is_file() for file in FILES):
            publish(place, root / name)
    fetched = []
    for name in sorted(shared - local):
        found = place.read(name, FILES)
        if found is not None and set(found[0]) == set(FILES):
            _write(root, name, found[0])
            fetched.append(name)
    if fetched:
        load_derived(root)
        log.info("fetched backbone versions %s from %s", ", ".join(fetched), place)
    return fetched


def _write(root: Path, name: str, files: dict[str, bytes]) -> None:
    """The version's folder, written aside and renamed in: it appears whole or not at all."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".fetch-{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for file, data in files.items():
            write_synced(tmp / file, data)
        fsync_dir(tmp)
        tmp.rename(root / name)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
