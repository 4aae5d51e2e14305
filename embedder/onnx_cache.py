"""The ONNX export cache, ``<cache_dir>/onnx``: each export's file name, and the bound on the folder's size.

Each model the ONNX runtimes run is exported there once (9-28 MB for a recipe), and any caller may name a new
recipe, so the folder is kept under ``Config.onnx_cache_bytes``: after an export, the least recently used
exports are deleted until it fits. "Used" is when an export was last written or loaded: the time of its sidecar JSON,
touched on every load (the ``.onnx`` itself stays untouched). A runtime holds its model in memory once loaded
(see :class:`embedder.runtimes.OpenVinoRuntime`), so deleting the file of a model in use costs only a re-export
the next time it is loaded.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# A readable start of the model id, then a hash of all of it: a short name (the 255-byte file name limit, and the
# temp name beside it) whatever the id's length, and distinct ids never share a file.
_PREFIX_CHARS = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def export_path(cache_dir: str | os.PathLike, model_id: str, suffix: str) -> Path:
    """Where ``model_id``'s export lives: ``<cache_dir>/onnx/<start of the id>-<sha256[:16] of the id><suffix>``."""
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    return Path(cache_dir) / "onnx" / f"{_UNSAFE.sub('_', model_id[:_PREFIX_CHARS])}-{digest}{suffix}"


def mark_used(meta_path: Path) -> None:
    """Record that the export beside ``meta_path`` (its sidecar) was just loaded: it is evicted last."""
    try:
        os.utime(meta_path)
    except OSError as e:  # a read-only cache still serves; it is only evicted out of order
        log.warning("cannot mark the ONNX export %s as used (%s)", meta_path, e)


def evict(folder: Path, max_bytes: int, keep: Path) -> list[Path]:
    """Delete the least recently used exports in ``folder`` (each ``.onnx`` with its sidecar ``.json``) until the
    folder holds at most ``max_bytes``, never ``keep`` (the export just made); the ``.onnx`` files deleted."""
    exports = []
    for onnx in folder.glob("*.onnx"):
        data, meta = _stat(onnx), _stat(onnx.with_suffix(".json"))
        if data is not None:  # else another process evicted it meanwhile
            exports.append(((meta or data).st_mtime, data.st_size + (meta.st_size if meta else 0), onnx))
    total = sum(size for _, size, _ in exports)
    evicted = []
    for _, size, onnx in sorted(exports, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if onnx == keep:
            continue
        onnx.unlink(missing_ok=True)
        onnx.with_suffix(".json").unlink(missing_ok=True)
        total -= size
        evicted.append(onnx)
    if evicted:
        log.info("ONNX cache over onnx_cache_bytes=%d: deleted %d least recently used exports (%s)", max_bytes,
                 len(evicted), ", ".join(p.name for p in evicted))
    return evicted


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None
