"""Consistent copies of a data dir while a server serves it (``embedder backup``), and putting one back
(``embedder restore``) into a data dir no process holds.

A backup is a folder: the data dir's files as they were, plus ``backup.json``, which lists every file with
its size and sha256 and is written last, so a folder without it is an unfinished backup. The copy goes to
a hidden temp folder beside ``dest`` that is renamed into place at the end.

What a running server may change during the copy, and how each is read consistently:

- SQLite databases (``*.sqlite3``) through SQLite's online backup API: one read transaction, so the copy
  is the database as of one commit, while the server goes on writing (WAL readers never block writers);
- snapshots (``snapshots/``) are copied last but one, just before ``store.sqlite3``: a snapshot's tag is
  committed before its file is written, so the copied database knows every copied snapshot and the
  restored store uses it or catches up from it. A snapshot saved again between the two copies (whose tag
  the copy may not know) is checked for and both are copied again;
- every other file (``heads/``, ``backbones/``, ``jobs/``, ...) file by file; a folder that is replaced
  by renaming (a head saved again) is read through one directory handle, so its files are from the same
  version, and copied again if it goes away while being read.

With the collections in Milvus (the data dir's ``store.json`` says so), :mod:`.milvus_backup` adds what is ours
there: a milvus-lite ``.db`` folder whole (refused while a server holds it: milvus-lite cannot be copied
consistently alongside its process), or, from a Milvus server, the heads (its collections are for milvus-backup;
the summary's notes say so).

Not copied: ``keys.json`` (this deployment's credentials: a restore keeps the keys in place, so revoked keys
stay revoked; ``backup.json`` records only whether the server had keys), ``store.lock``, SQLite's ``-wal`` /
``-shm`` / ``-journal`` files (inside the online copy), hidden temp files and folders of writes in progress, and
recomputable caches (:data:`RECOMPUTABLE`).

A restore checks every file of the backup against ``backup.json`` before it touches the data dir, takes
the data dir's lock (so it refuses while a server holds it, and no server starts meanwhile), stages the
files inside the data dir, then renames them into place, snapshots first and ``store.sqlite3`` last.
Everything the backup does not hold goes, except what a backup never holds. What a backup never holds is never
installed either, whatever ``backup.json`` lists: a ``keys.json`` there (backups before keys were left out held
one) is skipped with a warning, as are lock files. Restoring the backup of a server that had keys where the keys
file holds none warns that a server started there would answer every call without a key.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import stat
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..config import parse_store_uri
from ..durable import fsync_dir, fsync_file, temp_path, write_atomic
from ..errors import DataLossError, InvalidArgumentError, StoreLockedError
from ..index import SnapshotError, VectorIndex
from ..keys import KEYS_FILE, KeyStore
from .milvus_backup import (HEADS_FOLDER, LITE_FOLDER, MilvusPart, export_heads, holding_lite,
                            import_heads, lite_folder, record_store, recorded_store, swap_lite)

log = logging.getLogger(__name__)

MANIFEST = "backup.json"
FORMAT = 1
DATABASE = "store.sqlite3"
RECOMPUTABLE = ("activations.sqlite3",)  # fine-tuning's activation cache: large, and recomputed when missing
# keys.json holds this deployment's credentials: a restore must not bring revoked keys back (nor drop new ones)
_NEVER = ("store.lock", MANIFEST, KEYS_FILE, "keys.lock", "LOCK")  # LOCK: milvus-lite's
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
_COPY_CHUNK = 1 << 20
_ATTEMPTS = 5  # copies of a folder that keeps being replaced under us


@dataclass(frozen=True)
class BackupSummary:
    """What a backup or restore copied."""

    path: Path
    files: int
    bytes: int
    seconds: float
    notes: tuple[str, ...] = ()  # what the caller should know: where the rest of the data is, what was done there


def backup(data_dir: str | os.PathLike, dest: str | os.PathLike, *, store_token: str = "",
           keys_path: str | os.PathLike | None = None) -> BackupSummary:
    """Copy ``data_dir`` to the new folder ``dest`` consistently, while a server may be serving it (with a
    milvus-lite store: only while none is); ``store_token``: a Milvus server's, to read the heads kept there;
    ``keys_path``: the server's keys file (default its ``keys.json``), whether it holds keys is recorded."""
    started = time.perf_counter()
    # absolute and normalised: SQLite refuses a relative path that climbs above / ("../../../tmp/b" from /tmp/x)
    data_dir, dest = Path(data_dir).resolve(), Path(dest).resolve()
    if not (data_dir / DATABASE).is_file():
        raise InvalidArgumentError(f"{data_dir} holds no store ({DATABASE} is missing); give the data dir a server "
                                   "runs with (--data-dir, or EMBEDDER_DATA_DIR)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidArgumentError(f"{dest} exists and is not an empty folder; back up into a new folder")
    if data_dir.resolve() in dest.resolve().parents:
        raise InvalidArgumentError(f"{dest} is inside the data dir {data_dir}; back up to a folder outside it")
    store = recorded_store(data_dir)
    lite = lite_folder(store)
    keyed = KeyStore(data_dir, path=keys_path).in_use()  # a damaged file counts as keys
    with holding_lite(lite, "copied") if lite is not None else nullcontext():
        return _backup(data_dir, dest, store, store_token, lite, keyed, started)


def _backup(data_dir: Path, dest: Path, store: str, store_token: str, lite: Path | None, keyed: bool,
            started: float) -> BackupSummary:
    staging = temp_path(dest)
    staging.mkdir(parents=True)
    try:
        files: dict[str, dict[str, int | str]] = {}
        milvus = MilvusPart()
        if lite is not None:  # its lock is ours: no server writes it meanwhile
            milvus.files = {f"{LITE_FOLDER}/{name}": f for name, f in
                            _copy_unit(lite.parent, Path(lite.name), staging / LITE_FOLDER).items()}
            milvus.notes.append(f"the milvus-lite store {lite} (collections, kept images, heads) is in {LITE_FOLDER}/")
        elif parse_store_uri(store)[0] == "milvus":
            milvus = export_heads(store, store_token, staging)
        files.update(milvus.files)
        for entry in sorted(_entries(data_dir)):
            if lite is not None and entry.resolve() == lite.resolve():
                continue  # the milvus-lite folder inside the data dir: copied above
            if entry.name == "snapshots" or entry.name == DATABASE:
                continue  # copied together, last
            if entry.suffix == ".sqlite3":
                files[entry.name] = _backup_database(entry, staging / entry.name)
            elif entry.is_dir():
                files.update(_copy_folder(data_dir, Path(entry.name), staging))
            else:
                files.update(_copy_unit(data_dir, Path(entry.name), staging))
        files.update(_copy_store(data_dir, staging))
        _sync(staging, files)
        write_atomic(staging / MANIFEST, json.dumps(
            {"format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "source": str(data_dir.resolve()), "api_keys": keyed, "files": files}, indent=1, sort_keys=True).encode())
        fsync_dir(staging)
        os.rename(staging, dest)  # onto nothing or an empty folder
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = BackupSummary(dest, len(files), sum(int(f["size"]) for f in files.values()),
                            time.perf_counter() - started, tuple(milvus.notes))
    log.info("backed up %s to %s: %d files, %.1f MB in %.2f s", data_dir, dest, summary.files, summary.bytes / 1e6,
             summary.seconds)
    return summary


def restore(src: str | os.PathLike, data_dir: str | os.PathLike, *, force: bool = False, store: str = "",
            store_token: str = "", keys_path: str | os.PathLike | None = None) -> BackupSummary:
    """Put the backup ``src`` into ``data_dir``, which no process may hold; ``force`` to replace a store there.

    A milvus-lite store in the backup goes back to ``store`` (default: where it was), whose lock is taken the same
    way; heads a Milvus server held go back into the server at ``store`` (default: the same), with
    ``store_token``. ``keys_path``: the keys file a server on ``data_dir`` reads (default its ``keys.json``),
    never written here."""
    started = time.perf_counter()
    src, data_dir = Path(src).resolve(), Path(data_dir).resolve()
    manifest = verify(src)
    files = manifest["files"]
    never = sorted(n for n in files if _skipped(Path(n).parts[0]))
    if never:  # a backup never holds these; an older one held keys.json, which must not replace the live keys
        log.warning("not restoring %s from backup %s: a restore never installs what a backup leaves out (API keys, "
                    "lock and temp files), so the data dir's own keys stay as they are", ", ".join(never)[:300], src)
        files = {n: f for n, f in files.items() if n not in never}
    store = store or recorded_store(src)
    lite_names = sorted(n for n in files if Path(n).parts[0] == LITE_FOLDER)
    head_names = sorted(n for n in files if Path(n).parts[0] == HEADS_FOLDER)
    lite = lite_folder(store)
    if lite_names and lite is None:
        raise InvalidArgumentError(f"backup {src} holds a milvus-lite store; say where it goes with --store "
                                   "milvus:///absolute/path.db")
    if head_names and parse_store_uri(store)[0] != "milvus":
        raise InvalidArgumentError(f"backup {src} holds heads of a Milvus server; say which server they go back into "
                                   "with --store http(s)://host:port (and EMBEDDER_STORE_TOKEN)")
    own = {n: f for n, f in files.items() if n not in lite_names and n not in head_names}
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(data_dir / "store.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until done: no server starts meanwhile
        except BlockingIOError:
            raise StoreLockedError(f"{data_dir} is in use by a running server (or another process); stop it, then "
                                   "restore") from None
        with holding_lite(lite, "replaced") if lite_names and lite is not None else nullcontext():
            held = (data_dir / DATABASE).exists() or (bool(lite_names) and lite is not None and any(
                e.name != "LOCK" for e in lite.iterdir()))
            if held and not force:
                raise InvalidArgumentError(f"{data_dir} (or the milvus-lite store) already holds a store; restoring "
                                           "replaces everything in it. Pass --force to do so (back it up first with "
                                           "`embedder backup` if it may be needed), or restore into a new data dir")
            for leftover in data_dir.glob(".restore-*"):  # of a restore that was interrupted
                _remove(leftover)
            staging = _stage(src, own, data_dir / f".restore-{secrets.token_hex(4)}")
            lite_staging = None
            if lite_names and lite is not None:
                lite_staging = _stage(src, {n: files[n] for n in lite_names},
                                      lite.parent / f".{lite.name}.restore-{secrets.token_hex(4)}",
                                      strip=2)  # milvus-lite/<name>.db/...
            _swap_in(staging, data_dir, sorted({Path(name).parts[0] for name in own}), keep=lite)
            if lite_staging is not None and lite is not None:
                swap_lite(lite_staging, lite)
            if store != recorded_store(data_dir):
                record_store(data_dir, store)
    finally:
        os.close(lock)
    notes = ()
    if lite_names:
        notes = (f"the milvus-lite store is back in {lite}",)
    elif head_names:
        notes = tuple(import_heads(src, head_names, store, store_token).notes)
    keys = KeyStore(data_dir, path=keys_path)
    if (manifest.get("api_keys") or KEYS_FILE in never) and not keys.in_use():
        log.warning("backup %s is of a server that required API keys, but %s holds none: a server started on %s "
                    "answers every call without a key until you add one (`embedder keys add NAME --role ROLE`) or "
                    "start it with --token, or with --keys-file naming a file with keys", src, keys.path, data_dir)
    summary = BackupSummary(data_dir, len(files), sum(int(f["size"]) for f in files.values()),
                            time.perf_counter() - started, notes)
    log.info("restored %s into %s: %d files, %.1f MB in %.2f s", src, data_dir, summary.files, summary.bytes / 1e6,
             summary.seconds)
    return summary


def _stage(src: Path, files: dict[str, dict[str, int | str]], staging: Path, strip: int = 0) -> Path:
    """Copy ``files`` of the backup ``src`` into the new folder ``staging`` (their first ``strip`` parts left
    off), each checked again against the manifest, and fsync them."""
    staging.mkdir()
    placed = {}
    try:
        for name, expected in files.items():
            relative = Path(*Path(name).parts[strip:]).as_posix()
            if _copy_file(src / name, staging / relative) != expected:  # the backup changed since it was verified
                raise DataLossError(f"backup {src} changed while it was restored ({name}); restore again")
            placed[relative] = expected
        _sync(staging, placed)
    except BaseException:
        _remove(staging)
        raise
    return staging


def verify(src: Path) -> dict[str, Any]:
    """The manifest (``backup.json``) of the backup ``src``, each of its files checked against its size and
    sha256 there."""
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"{src} is not a finished backup ({MANIFEST} is missing); give a folder written "
                                   "by `embedder backup`") from None
    except ValueError as e:
        raise DataLossError(f"{src / MANIFEST} is damaged ({e}); use another backup") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise DataLossError(f"{src / MANIFEST} is not a backup manifest of format {FORMAT}; use a backup written "
                            "by this embedder version")
    files = manifest["files"]
    if DATABASE not in files:
        raise DataLossError(f"backup {src} holds no {DATABASE}; use another backup")
    for name, expected in files.items():
        path = src / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataLossError(f"{src / MANIFEST} names {name!r}, outside the backup; use another backup")
        try:
            size, digest = path.stat().st_size, _sha256(path)
        except FileNotFoundError:
            raise DataLossError(f"backup {src} is incomplete: {name} is missing; use another backup") from None
        if (size, digest) != (expected.get("size"), expected.get("sha256")):
            raise DataLossError(f"backup {src} is damaged: {name} does not match its size and sha256 in {MANIFEST}; "
                                "use another backup")
    return manifest


def _entries(data_dir: Path) -> Iterator[Path]:
    """The top-level files and folders of ``data_dir`` that a backup holds."""
    for entry in data_dir.iterdir():
        if _skipped(entry.name) or entry.name in RECOMPUTABLE:
            continue
        mode = entry.lstat().st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            yield entry
        else:
            log.warning("not backing up %s: not a regular file or folder", entry)


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in _NEVER or name.endswith(_SQLITE_SIDE_FILES)


def _copy_store(data_dir: Path, staging: Path) -> dict[str, dict[str, int | str]]:
    """The snapshots, then store.sqlite3, as a pair the restored store can use.

    A snapshot saved between the two copies carries a tag the copied database does not know (the store would
    rebuild that index from SQLite, with an ERROR): then both are copied again, and after
    :data:`_ATTEMPTS` tries such snapshots are left out (the restored store rebuilds them with a WARNING).
    """
    for attempt in range(_ATTEMPTS):
        _remove(staging / "snapshots")
        files: dict[str, dict[str, int | str]] = {}
        if (data_dir / "snapshots").is_dir():
            files.update(_copy_folder(data_dir, Path("snapshots"), staging))
        files[DATABASE] = _backup_database(data_dir / DATABASE, staging / DATABASE)
        with closing(sqlite3.connect(staging / DATABASE)) as db:
            if db.execute("PRAGMA user_version").fetchone()[0] < 3:
                return files  # not yet upgraded: neither its database nor its snapshots carry tags
            known = {f"snapshots/c{cid}.faiss": tags for cid, *tags in db.execute(
                "SELECT cid, snapshot_tag, previous_tag FROM collections")}
        unknown = [name for name in files if name in known and _snapshot_tag(staging / name) not in known[name]]
        if not unknown:
            return files
        log.info("snapshots %s were saved while the database was copied (try %d); copying both again",
                 unknown, attempt + 1)
    for name in unknown:
        log.warning("leaving %s out of the backup: it keeps being saved again while the database is copied; the "
                    "restored store rebuilds that index from SQLite", name)
        (staging / name).unlink()
        del files[name]
    return files


def _snapshot_tag(path: Path) -> str | None:
    try:
        return VectorIndex.read_marker(path).get("tag")
    except SnapshotError:
        return None


def _backup_database(path: Path, target: Path) -> dict[str, int | str]:
    """One SQLite database through the online backup API, checked with ``PRAGMA integrity_check``."""
    source = sqlite3.connect(path, timeout=60)  # waits out a writer's lock
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)  # all pages in one step: the database as of one commit
            problem = copy.execute("PRAGMA integrity_check").fetchone()[0]
            if problem != "ok":
                raise DataLossError(f"the copy of {path} fails SQLite's integrity check ({problem}); the database "
                                    "itself may be damaged: check it with `sqlite3 FILE 'PRAGMA integrity_check'`")
        finally:
            copy.close()
    finally:
        source.close()
    return {"size": target.stat().st_size, "sha256": _sha256(target)}


def _copy_folder(data_dir: Path, relative: Path, staging: Path) -> dict[str, dict[str, int | str]]:
    """Copy each entry of the folder ``data_dir/relative`` as a unit (a head, a backbone version, a job)."""
    copied: dict[str, dict[str, int | str]] = {}
    done: set[str] = set()
    for _ in range(2):  # listed again after: a folder replaced by two renames is briefly absent from a listing
        for name in sorted(set(os.listdir(data_dir / relative)) - done):
            if not _skipped(name):
                copied.update(_copy_unit(data_dir, relative / name, staging))
                done.add(name)
    return copied


def _copy_unit(data_dir: Path, relative: Path, staging: Path) -> dict[str, dict[str, int | str]]:
    """Copy the file or folder ``data_dir/relative`` (all of a folder's files from one version of it)."""
    for attempt in range(_ATTEMPTS):
        copied: dict[str, dict[str, int | str]] = {}
        try:
            source = data_dir / relative
            if not source.is_dir():
                copied[relative.as_posix()] = _copy_file(source, staging / relative)
                return copied
            fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _copy_tree(fd, relative, staging, copied)
                # Renamed away meanwhile, its files may have been deleted before we listed them: not one version.
                if os.stat(source).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError(source)
            finally:
                os.close(fd)
            return copied
        except FileNotFoundError:  # replaced or deleted while we read it: read the version there now
            _remove(staging / relative)
            time.sleep(0.01 * (attempt + 1))  # a replacement is two renames: let it finish
    if not (data_dir / relative).exists():
        return {}  # deleted meanwhile
    raise DataLossError(f"{data_dir / relative} kept changing while it was copied ({_ATTEMPTS} tries); back up "
                        "again when it is quieter")


def _copy_tree(fd: int, relative: Path, staging: Path, copied: dict[str, dict[str, int | str]]) -> None:
    """Copy the folder open as ``fd`` (files read relative to it, so from that folder even if it is renamed)."""
    (staging / relative).mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(fd)):
        if _skipped(name):
            continue
        mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                _copy_tree(child, relative / name, staging, copied)
            finally:
                os.close(child)
        elif stat.S_ISREG(mode):
            source = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(source, "rb") as f:
                copied[(relative / name).as_posix()] = _write_from(f, staging / relative / name)


def _copy_file(source: Path, target: Path) -> dict[str, int | str]:
    with open(source, "rb") as f:
        return _write_from(f, target)


def _write_from(f, target: Path) -> dict[str, int | str]:
    """Write the rest of the open file ``f`` to ``target``; its size and sha256. Not fsynced: :func:`_sync`
    does that once at the end, so each folder is read in the shortest time."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _sync(root: Path, names: Iterable[str]) -> None:
    """fsync the files ``names`` under ``root`` and their folders."""
    folders = {root}
    for name in names:
        fsync_file(root / name)
        folders.update((root / name).parents)
    for folder in folders:
        if folder == root or root in folder.parents:
            fsync_dir(folder)


def _swap_in(staging: Path, data_dir: Path, names: list[str], keep: Path | None = None) -> None:
    """Rename the staged entries into ``data_dir``; what the backup does not hold goes, except ``keep`` (a
    milvus-lite folder inside the data dir: restored on its own)."""
    old = data_dir / f".restore-old-{secrets.token_hex(4)}"
    old.mkdir()
    present = [e for e in data_dir.iterdir() if not _skipped(e.name) and e.name not in RECOMPUTABLE
               and (keep is None or e.resolve() != keep.resolve())]
    for entry in present:
        if entry.name not in names:
            entry.rename(old / entry.name)
    # Snapshots before the database: if this is interrupted in between, the old database does not know the new
    # snapshots, and the store rebuilds their indexes from SQLite (an ERROR in the log), never uses them.
    for name in sorted(names, key=lambda n: (n != "snapshots", n == DATABASE, n)):
        target = data_dir / name
        if name.endswith(".sqlite3"):
            for suffix in _SQLITE_SIDE_FILES:  # the old database's WAL must never be replayed into the new one
                Path(f"{target}{suffix}").unlink(missing_ok=True)
        if target.exists():
            target.rename(old / name)
        (staging / name).rename(target)
    fsync_dir(data_dir)
    _remove(old)
    _remove(staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
