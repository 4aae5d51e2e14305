"""Saving and loading heads without pickle: arrays in safetensors, everything else in JSON.

A saved head is two files under its id::

    head.safetensors   the arrays prediction needs (Head.to_arrays()), read by a parser that never runs code
    head.json          kind, classes, backbone model id, dim, params, metrics, created, versions, the arrays' sha256,
                       and ``manifest_sha256``: one checksum over all of the rest of head.json

:func:`encode_head` makes their bytes and :func:`decode_info` / :func:`decode_head` check and read them, wherever
they were kept (a :class:`~classifier.places.HeadPlace`: a local folder ``<root>/<head_id>/``, or Milvus for a
service whose replicas share one). ``save_head`` / ``load_head`` / ``list_heads`` / ``delete_head`` are the
folder form: both files go to a hidden temporary directory next to the target, are fsynced, and the directory
is renamed into place, so a reader sees a whole head or none. Loading checks the format
version, the manifest checksum (an edited class list or kind cannot load), the arrays' checksum, their
names and shapes against the JSON, and (when given) the backbone model id, and refuses anything that does
not fit together with :class:`HeadFormatError`, whose message names the head, never a server path (the
path is logged). Heads of format 1 (before the manifest checksum) still load, with a warning.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from embedder.errors import Category, ModelMismatchError

from .adapt import DomainAdapter
from .heads import HEADS, Head, HeadError
from .places import META_FILE, HeadFolder

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: head.json carries manifest_sha256
_READABLE_VERSIONS = (1, FORMAT_VERSION)
ARRAYS_FILE = "head.safetensors"
ADAPTER_PREFIX = "adapter."  # arrays of a head's DomainAdapter, beside the head's own
MAX_META_BYTES = 16 * 1024 * 1024  # a head.json larger than this is not one of ours
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class HeadFormatError(HeadError):
    """A saved head that is corrupt, edited, of an unknown format, or not a head at all."""

    category = Category.DATA_LOSS


class HeadNotFoundError(HeadError, FileNotFoundError):
    """No saved head at that path or id."""

    category = Category.NOT_FOUND


@dataclass(frozen=True)
class HeadInfo:
    """What ``head.json`` says about a saved head (everything but the arrays)."""

    head_id: str
    kind: str
    model_id: str
    dim: int
    classes: list[Any]
    class_counts: list[int]
    params: dict[str, Any]
    metrics: dict[str, Any] | None
    created: str
    library_version: str
    format_version: int
    path: Path | None  # its folder on this machine; None when kept elsewhere (Milvus)
    source: dict[str, Any] | None = None  # what it was trained on, e.g. {"collection": ..., "samples": ...}
    adaptation: dict[str, Any] | None = None  # how it was adapted to a target domain (DomainAdapter.describe())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``path`` as a string or None)."""
        return {"head_id": self.head_id, "kind": self.kind, "model_id": self.model_id, "dim": self.dim,
                "classes": self.classes, "class_counts": self.class_counts, "params": self.params,
                "metrics": self.metrics, "created": self.created, "library_version": self.library_version,
                "format_version": self.format_version,
                "path": None if self.path is None else str(self.path), "source": self.source,
                "adaptation": self.adaptation}


def check_head_id(head_id: str) -> str:
    """``head_id`` if it is a safe directory name (letters, digits, ``.``, ``_``, ``-``; up to 128), else raise."""
    if not isinstance(head_id, str) or not _ID_RE.fullmatch(head_id):
        raise HeadError(f"invalid head id {head_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return head_id


def new_head_id(kind: str) -> str:
    """A fresh id such as ``logreg-20260101T120000-3f9a1c``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{kind}-{stamp}-{secrets.token_hex(3)}"


def encode_head(head: Head, *, head_id: str | None = None, metrics: Mapping[str, Any] | None = None,
                source: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """A fitted head as the bytes of its two files, ``{META_FILE: ..., ARRAYS_FILE: ...}``, for any
    :class:`~classifier.places.HeadPlace`; ``head_id`` None: a fresh one (:func:`new_head_id`).

    The head must have been fitted with ``model_id=``: a saved head is only ever used with features of
    the backbone it was trained on. ``metrics`` (e.g. ``Evaluation.to_dict()``) and ``source`` (what the
    head was trained on) must be JSON-serialisable.
    """
    if not hasattr(head, "classes_"):
        raise HeadError("cannot save an unfitted head; call fit(X, y, model_id=...) first")
    if not head.model_id_:
        raise HeadError("this head does not know which backbone its features came from; fit it with "
                        "fit(X, y, model_id=embedder.model_id) so it can never be used with another model's vectors")
    head_id = check_head_id(new_head_id(head.kind) if head_id is None else head_id)
    arrays = head.to_arrays()
    adapter = head.adapter_
    if adapter is not None:
        arrays.update({f"{ADAPTER_PREFIX}{k}": v for k, v in adapter.to_arrays().items()})
    blob = save_safetensors(arrays)
    meta = {
        "format_version": FORMAT_VERSION,
        "head_id": head_id,
        "kind": head.kind,
        "model_id": head.model_id_,
        "dim": int(head.n_features_in_),
        "classes": [v.item() if isinstance(v, np.generic) else v for v in head.classes_],
        "class_counts": [int(c) for c in head.class_counts_],
        "params": head.saved_params(),
        "metrics": dict(metrics) if metrics is not None else None,
        "source": dict(source) if source is not None else None,
        "adaptation": adapter.describe() if adapter is not None else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "library_version": _library_version(),
        "arrays": {"file": ARRAYS_FILE, "sha256": hashlib.sha256(blob).hexdigest(),
                   "names": sorted(arrays)},
    }
    try:
        meta["manifest_sha256"] = manifest_sha256(meta)
        meta_text = json.dumps(meta, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise HeadError(f"metrics and params must be JSON-serialisable (finite numbers, strings, lists, dicts): {e}") \
            from None
    return {META_FILE: meta_text.encode(), ARRAYS_FILE: blob}


def decode_info(meta_bytes: bytes, head_id: str, *, where: str, path: Path | None = None) -> HeadInfo:
    """The checked :class:`HeadInfo` of head ``head_id`` from its ``head.json`` bytes (the arrays are not read);
    ``where`` names the place for the log, ``path`` becomes ``HeadInfo.path``."""
    return _info_from_meta(_parse_meta(meta_bytes, head_id, where), head_id, where, path)


def decode_head(files: Mapping[str, bytes], head_id: str, *, where: str,
                expected_model_id: str | None = None) -> Head:
    """The head ``head_id`` from its files' bytes (:func:`encode_head`'s output, however kept); no code from them
    is ever executed. Every check of a saved head is here: format version, manifest checksum, arrays checksum,
    their names and shapes against the JSON, and (with ``expected_model_id``) the backbone, which refuses a head
    of another model with a :class:`ModelMismatchError` naming both ids."""
    meta = _parse_meta(files[META_FILE], head_id, where)
    info = _info_from_meta(meta, head_id, where, None)
    if info.format_version == 1:  # here, not on every listing: a registry loads a head once
        log.warning("saved head at %s predates manifest checksums (format 1): edits to its %s go unnoticed; "
                    "train it again to protect it", where, META_FILE)
    if expected_model_id is not None and info.model_id != expected_model_id:
        raise ModelMismatchError(
            f"head {info.head_id!r} was trained on features of model {info.model_id!r}, but model "
            f"{expected_model_id!r} was expected; use a head trained for {expected_model_id!r} or train one",
            expected_model_id=info.model_id, other_model_id=expected_model_id)
    blob = files.get(ARRAYS_FILE)
    if blob is None:
        raise _corrupt(head_id, where, f"{ARRAYS_FILE} is missing; the head is incomplete, save or train it again")
    if hashlib.sha256(blob).hexdigest() != meta["arrays"]["sha256"]:
        raise _corrupt(head_id, where, f"{ARRAYS_FILE} does not match the checksum in {META_FILE}: the head is "
                                       "corrupt or was modified; save or train it again")
    try:
        arrays = load_safetensors(blob)  # a plain header + raw buffers parser: never unpickles
    except (SafetensorError, ValueError) as e:
        raise _corrupt(head_id, where, f"{ARRAYS_FILE} is not a valid safetensors file ({e}); save or train the "
                                       "head again") from None
    if sorted(arrays) != meta["arrays"]["names"]:
        raise _corrupt(head_id, where, f"{ARRAYS_FILE} holds arrays {sorted(arrays)}, {META_FILE} lists "
                                       f"{meta['arrays']['names']}")
    adapter_arrays = {k[len(ADAPTER_PREFIX):]: v for k, v in arrays.items() if k.startswith(ADAPTER_PREFIX)}
    arrays = {k: v for k, v in arrays.items() if not k.startswith(ADAPTER_PREFIX)}
    try:
        head = HEADS[info.kind].from_arrays(arrays, classes=info.classes, params=info.params, model_id=info.model_id)
        if info.adaptation is not None:
            head.adapter_ = DomainAdapter.from_arrays(adapter_arrays, method=info.adaptation.get("method"),
                                                      params=info.adaptation.get("params", {}))
        elif adapter_arrays:
            raise HeadError("it holds adapter arrays but head.json records no adaptation")
    except HeadError as e:
        raise _corrupt(head_id, where, f"its files do not fit together: {e}") from None
    if head.n_features_in_ != info.dim or head.class_counts_.tolist() != info.class_counts:
        raise _corrupt(head_id, where, f"{META_FILE} says dim {info.dim} and class counts {info.class_counts}, the "
                                       f"arrays say {head.n_features_in_} and {head.class_counts_.tolist()}")
    return head


# --- heads as folders (a library user's directory, a server's <data_dir>/heads): see classifier.places ---


def save_head(head: Head, root: str | os.PathLike, *, head_id: str | None = None,
              metrics: Mapping[str, Any] | None = None, source: Mapping[str, Any] | None = None,
              overwrite: bool = False) -> Path:
    """Write a fitted head to ``root/<head_id>/`` atomically (see :func:`encode_head`); returns that directory.

    With ``overwrite``, an existing head of that id is replaced (readers see the old or the new one; a
    crash in between leaves the new one in place and the old one in a hidden ``.old-*`` directory).
    """
    files = encode_head(head, head_id=head_id, metrics=metrics, source=source)
    head_id = json.loads(files[META_FILE])["head_id"]
    folder = HeadFolder(root)
    folder.write(head_id, files, overwrite=overwrite)
    log.info("saved %s head %s (%d classes, model %s) to %s", head.kind, head_id, len(head.classes_),
             head.model_id_, folder.where(head_id))
    return Path(root) / head_id


def read_head_info(path: str | os.PathLike) -> HeadInfo:
    """Read and validate ``head.json`` of the head directory ``path`` (the arrays are not read)."""
    path = Path(path)
    files = _read_folder(path, [META_FILE])
    return decode_info(files[META_FILE], path.name, where=str(path), path=path)


def load_head(path: str | os.PathLike, *, expected_model_id: str | None = None) -> Head:
    """Load the head saved in directory ``path`` (see :func:`decode_head`)."""
    path = Path(path)
    return decode_head(_read_folder(path, [META_FILE, ARRAYS_FILE]), path.name, where=str(path),
                       expected_model_id=expected_model_id)


def list_heads(root: str | os.PathLike) -> list[HeadInfo]:
    """Every valid saved head under ``root``, sorted by id; unreadable ones are logged and skipped."""
    infos = []
    for head_id in HeadFolder(root).ids():
        try:
            infos.append(read_head_info(Path(root) / head_id))
        except HeadError as e:
            log.warning("skipping %s: %s", Path(root) / head_id, e)
    return infos


def delete_head(root: str | os.PathLike, head_id: str) -> None:
    """Delete the saved head ``head_id`` under ``root``; :class:`HeadNotFoundError` if there is none."""
    if not HeadFolder(root).remove(check_head_id(head_id)):
        raise HeadNotFoundError(f"no head with id {head_id!r}")


def recover_interrupted(root: str | os.PathLike) -> list[str]:
    """Clean up what writes interrupted by a crash left under ``root`` (:meth:`HeadFolder.recover`); returns one
    line per action. Call it only while no other process writes to ``root``."""
    return HeadFolder(root).recover()


def _read_folder(path: Path, names: list[str]) -> dict[str, bytes]:
    found = HeadFolder(path.parent).read(path.name, names)
    if found is None:
        raise HeadNotFoundError(f"no saved head {path.name!r} ({META_FILE} is missing)")
    return found[0]


# --- internals -----------------------------------------------------------------------------------


def _library_version() -> str:
    try:
        return metadata.version("embedder")
    except metadata.PackageNotFoundError:
        return "unknown"


def manifest_sha256(meta: Mapping[str, Any]) -> str:
    """The checksum of a head.json's content: sha256 of its canonical JSON without ``manifest_sha256`` itself."""
    rest = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=False)
                          .encode("utf-8")).hexdigest()


def _manifest_or_none(meta: Mapping[str, Any]) -> str | None:
    try:
        return manifest_sha256(meta)
    except ValueError:  # NaN or infinity, which no saved head.json holds
        return None


def _corrupt(head_id: str, where: str, problem: str) -> HeadFormatError:
    """The error for a saved head that is not whole: callers may be remote, so where it is kept goes to the log
    only."""
    log.error("saved head at %s: %s", where, problem)
    return HeadFormatError(f"saved head {head_id!r}: {problem}")


def _parse_meta(text: bytes, head_id: str, where: str) -> dict[str, Any]:
    if len(text) > MAX_META_BYTES:
        raise _corrupt(head_id, where, f"{META_FILE} is larger than {MAX_META_BYTES} bytes; it is not a head file")
    try:
        meta = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _corrupt(head_id, where, f"{META_FILE} is not valid JSON ({e}); the head is corrupt, save it "
                                       "again") from None
    if not isinstance(meta, dict):
        raise _corrupt(head_id, where, f"{META_FILE} must hold a JSON object")
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise _corrupt(head_id, where, f"{META_FILE} has format_version {version!r}; this library reads versions "
                                       f"{', '.join(map(str, _READABLE_VERSIONS))}. Upgrade the library or train "
                                       "the head again")
    if version != 1 and meta.get("manifest_sha256") != _manifest_or_none(meta):
        raise _corrupt(head_id, where, f"{META_FILE} does not match its manifest_sha256: it was edited or is "
                                       "corrupt (its class list, kind or parameters cannot be trusted); train the "
                                       "head again")
    return meta


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "head_id": str, "kind": str, "model_id": str, "dim": int, "classes": list, "class_counts": list,
    "params": dict, "metrics": (dict, type(None)), "created": str, "library_version": str, "arrays": dict,
}


def _info_from_meta(meta: dict[str, Any], head_id: str, where: str, path: Path | None) -> HeadInfo:
    def bad(problem: str) -> HeadFormatError:
        return _corrupt(head_id, where, f"{META_FILE}: {problem}")

    for name, types in _FIELDS.items():
        if not isinstance(meta.get(name), types) or isinstance(meta.get(name), bool):
            raise bad(f"field {name!r} is missing or has the wrong type")
    if meta["kind"] not in HEADS:
        raise bad(f"unknown head kind {meta['kind']!r} (known: {', '.join(HEADS)})")
    classes = meta["classes"]
    if (len(classes) < 2 or len(set(map(repr, classes))) != len(classes)
            or not (all(isinstance(c, str) for c in classes)
                    or all(isinstance(c, int) and not isinstance(c, bool) for c in classes))):
        raise bad("classes must be two or more distinct strings or integers")
    counts = meta["class_counts"]
    if len(counts) != len(classes) or not all(isinstance(c, int) and c >= 1 for c in counts):
        raise bad("class_counts must hold one positive integer per class")
    arrays = meta["arrays"]
    if (arrays.get("file") != ARRAYS_FILE or not isinstance(arrays.get("sha256"), str)
            or not isinstance(arrays.get("names"), list)):
        raise bad(f"the 'arrays' entry must name {ARRAYS_FILE}, its sha256 and array names")
    for name in ("source", "adaptation"):
        if not isinstance(meta.get(name), (dict, type(None))):
            raise bad(f"field {name!r} must be an object or null")
    if meta["head_id"] != head_id:
        raise bad(f"head_id {meta['head_id']!r} does not match its directory {head_id!r}")
    return HeadInfo(head_id=meta["head_id"], kind=meta["kind"], model_id=meta["model_id"], dim=meta["dim"],
                    classes=classes, class_counts=counts, params=meta["params"], metrics=meta["metrics"],
                    created=meta["created"], library_version=meta["library_version"],
                    format_version=meta["format_version"], path=path, source=meta.get("source"),
                    adaptation=meta.get("adaptation"))
