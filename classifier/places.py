"""Where saved heads are kept: a :class:`HeadPlace` stores each head's files (``head.json``, ``head.safetensors``)
as bytes under its id, with a version tag; :mod:`classifier.persist` turns heads into those bytes and back, and
checks them (one integrity path, wherever the bytes were kept).

:class:`HeadFolder` keeps them in a local directory, ``<root>/<head_id>/`` (a server's ``<data_dir>/heads``).
Other places implement the same protocol, e.g. :class:`embedder.store.milvus_files.MilvusFiles`, which keeps
them in Milvus so every replica on one Milvus sees the same heads.

The version tag changes whenever a head is written again, so a registry that keeps loaded heads in memory asks
for it (cheap: one ``stat`` here, one primary-key query in Milvus) and reloads a head replaced elsewhere.
"""
from __future__ import annotations

import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from embedder.durable import fsync_dir, write_synced

META_FILE = "head.json"


class HeadPlace(Protocol):
    """Files of saved heads by head id (ids are checked by the caller: safe as folder and key names)."""

    def write(self, head_id: str, files: Mapping[str, bytes], *, overwrite: bool) -> str:
        """Store ``files`` as head ``head_id`` all-or-nothing (readers see the old head or the new one); returns
        the new version tag. FileExistsError when it exists and not ``overwrite``."""

    def read(self, head_id: str, names: Sequence[str]) -> tuple[dict[str, bytes], str] | None:
        """The files ``names`` of one version of head ``head_id`` (a missing file is left out) and that
        version's tag; None when there is no such head."""

    def version(self, head_id: str) -> str | None:
        """The version tag of head ``head_id``, None when there is none."""

    def ids(self) -> list[str]:
        """The ids of the saved heads, sorted."""

    def remove(self, head_id: str) -> bool:
        """Delete head ``head_id``; False when there was none."""

    def where(self, head_id: str) -> str:
        """Where head ``head_id`` is kept, for the log (never for remote callers: it may name server paths)."""

    def path(self, head_id: str) -> Path | None:
        """The head's folder on this machine, None when it is not kept in one."""

    def recover(self) -> list[str]:
        """Clean up what interrupted writes left; one line per action."""


class HeadFolder:
    """Heads as folders ``<root>/<head_id>/``, each written to a hidden temp folder, fsynced and renamed into
    place; a replaced head is renamed aside first (readers through this object wait for both renames, so a head
    being replaced never looks missing) and a crash in between is undone by :meth:`recover`. Thread-safe."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._renames = threading.Lock()  # held across a replace's two renames, and by every reader

    def __repr__(self) -> str:
        return f"HeadFolder({str(self.root)!r})"

    def write(self, head_id: str, files: Mapping[str, bytes], *, overwrite: bool) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / head_id
        if final.exists() and not overwrite:
            raise FileExistsError(f"a head with id {head_id!r} already exists in {self.root}; "
                                  "pass overwrite=True or delete it first")
        tmp = self.root / f".tmp-{head_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                write_synced(tmp / name, data)
            fsync_dir(tmp)
            with self._renames:
                if final.exists():
                    old = self.root / f".old-{head_id}-{secrets.token_hex(4)}"
                    final.rename(old)
                    tmp.rename(final)
                    shutil.rmtree(old)
                else:
                    tmp.rename(final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.version(head_id) or ""

    def read(self, head_id: str, names: Sequence[str]) -> tuple[dict[str, bytes], str] | None:
        try:  # through one folder handle: every file from the version whose tag is returned
            with self._renames:
                fd = os.open(self.root / head_id, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            files = {}
            for name in names:
                try:
                    with os.fdopen(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as f:
                        files[name] = f.read()
                except FileNotFoundError:
                    pass
            if META_FILE not in files:
                return None
            return files, _tag(os.fstat(fd))
        finally:
            os.close(fd)

    def version(self, head_id: str) -> str | None:
        try:
            with self._renames:
                if not (self.root / head_id / META_FILE).is_file():
                    return None
                return _tag((self.root / head_id).stat())
        except FileNotFoundError:
            return None

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        with self._renames:  # hidden: temp, replaced and deleted folders of writes in progress or interrupted
            return sorted(e.name for e in self.root.iterdir() if not e.name.startswith(".") and e.is_dir())

    def remove(self, head_id: str) -> bool:
        path = self.root / head_id
        if not (path / META_FILE).is_file():
            return False
        doomed = self.root / f".del-{head_id}-{secrets.token_hex(4)}"  # renamed first: never seen half-deleted
        with self._renames:
            path.rename(doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed)
        return True

    def where(self, head_id: str) -> str:
        return str(self.root / head_id)

    def path(self, head_id: str) -> Path | None:
        return self.root / head_id

    def recover(self) -> list[str]:
        """A crash can leave ``.tmp-*`` (a head being written: never published, removed), ``.del-*`` (a head being
        deleted: removed) and ``.old-<id>-*`` (a head being replaced: removed if the new ``<id>`` landed, else put
        back, since the replacing save never returned). Call it only while no other process writes to ``root``."""
        if not self.root.is_dir():
            return []
        actions = []
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if name.startswith(".old-"):
                final = self.root / name[len(".old-"):].rsplit("-", 1)[0]
                if (final / META_FILE).is_file():
                    shutil.rmtree(entry)
                    actions.append(f"removed {name} (replaced by {final.name})")
                else:
                    entry.rename(final)
                    actions.append(f"restored {final.name} from {name} (its replacement was interrupted)")
            elif name.startswith((".tmp-", ".del-")) and entry.is_dir():
                shutil.rmtree(entry)
                actions.append(f"removed {name} (an interrupted {'save' if name.startswith('.tmp-') else 'delete'})")
        if actions:
            fsync_dir(self.root)
        return actions


def copy_heads(source: HeadPlace, target: HeadPlace, names: Sequence[str]) -> list[str]:
    """Copy every head of ``source`` that ``target`` lacks (files ``names``); one line per head, copied or not
    (an id ``target`` already holds keeps ``target``'s head)."""
    done = []
    for head_id in source.ids():
        found = source.read(head_id, names)
        if found is None:
            continue
        if target.version(head_id) is not None:
            done.append(f"{head_id}: not copied, {target.where(head_id)} already holds a head of that id")
            continue
        target.write(head_id, found[0], overwrite=False)
        done.append(f"{head_id}: copied to {target.where(head_id)}")
    return done


def _tag(st: os.stat_result) -> str:
    """A folder's version: a replaced head is a new folder (a new inode, made at another time)."""
    return f"{st.st_ino}-{st.st_mtime_ns}"
