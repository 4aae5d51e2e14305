"""API keys per caller: who is calling (:class:`Principal`), the hashed key file, and the one check every door uses.

A key is ``emb_<id>_<secret>``; ``<data_dir>/keys.json`` (mode 0600) keeps its id, name, role, collection
allow-list and the SHA-256 of the whole key, never the key itself (keys are 192 random bits, so a fast hash
is enough: there is nothing to brute-force). Roles are ordered: ``read`` (embed, search, get, stats, list,
predict, jobs' state) < ``write`` (add, delete, labels, train, fine-tune, cancel, forget own cache entries) <
``admin`` (everything, forget in every key's cache). The server's single ``--token`` is an admin key with id
``token``.

:class:`KeyStore` re-reads the file when it changes, so ``embedder keys add|revoke`` on the data dir takes
effect on a running server with its next call. With neither ``--token`` nor any key ever added, nothing is checked
(``Principal`` None: a trusted caller, as the in-process library is). Once a server has seen a key (or was given
``--keys-file``), auth stays on for as long as it runs: every key revoked, the file gone, emptied, unreadable or of
an unknown version, every call without ``--token`` is refused. Neither revoking a leaked key nor losing the file
may open the server.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import InvalidArgumentError, NotFoundError, SettingError, UnauthenticatedError
from .inputs import check_name

log = logging.getLogger(__name__)

ROLES = ("read", "write", "admin")  # in order: each includes the ones before it
KEYS_FILE = "keys.json"
VERSION = 1  # of the file's format
TOKEN_KEY_ID = "token"
_PREFIX = "emb_"
_HOW = ("send `authorization: Bearer <key>` (EmbedderClient(token=...), --token or EMBEDDER_TOKEN); keys come "
        "from `embedder keys add`")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its key id, role and collection allow-list (None: every collection)."""

    key_id: str
    role: str
    collections: frozenset[str] | None = None

    def has(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def may_see(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections

    @property
    def cache_owner(self) -> str:
        """The namespace of this caller's cache entries: its key id; the server token shares the library's ""."""
        return "" if self.key_id == TOKEN_KEY_ID else self.key_id


TOKEN_PRINCIPAL = Principal(TOKEN_KEY_ID, "admin")


@dataclass(frozen=True)
class KeyInfo:
    """One key as ``embedder keys list`` shows it (no secret, no hash)."""

    key_id: str
    name: str
    role: str
    collections: list[str] | None
    created: float
    revoked: float | None = None


class KeyStore:
    """The hashed keys of one data dir; thread-safe, re-read when the file changes."""

    def __init__(self, data_dir: str | Path, *, path: str | Path | None = None, required: bool = False) -> None:
        """The keys of ``data_dir`` (its ``keys.json``), or of the file ``path`` when given (``--keys-file``);
        ``required``: the file must hold keys from the start (it was named explicitly), else once it has held one."""
        self.path = Path(path).expanduser() if path else Path(data_dir).expanduser() / KEYS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, dict[str, Any]] = {}
        self._required = required

    def authenticate(self, key: str) -> Principal | None:
        """The principal of a live key, or None when ``key`` is not one."""
        key_id = _key_id(key)
        record = self._load().get(key_id) if key_id else None
        if record is None or record.get("revoked") is not None:
            return None
        if not hmac.compare_digest(_hash(key), record["sha256"]):
            return None
        allowed = record.get("collections")
        return Principal(key_id, record["role"], None if allowed is None else frozenset(allowed))

    def enforced(self) -> bool:
        """Whether every call needs a live key: one was ever added (revoked ones count). While the file is not
        usable (damaged; gone or empty after it held keys), :class:`UnauthenticatedError` saying what is wrong."""
        return bool(self._load())

    def in_use(self) -> bool:
        """:meth:`enforced`, never raising: a file that is not usable means auth on (failing closed)."""
        try:
            return self.enforced()
        except UnauthenticatedError:
            return True

    def live(self) -> int:
        """How many keys are not revoked."""
        return sum(r.get("revoked") is None for r in self._load().values())

    def add(self, name: str, role: str, collections: Sequence[str] | None = None) -> tuple[KeyInfo, str]:
        """Create a key; returns its info and the key itself, which is shown once and never stored."""
        if role not in ROLES:
            raise InvalidArgumentError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if collections is not None:
            for c in collections:  # a name no collection can have would make a key that can never be used
                check_name(c)
        key_id = secrets.token_hex(6)
        key = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
        record = {"name": name, "role": role, "collections": None if collections is None else sorted(set(collections)),
                  "sha256": _hash(key), "created": time.time(), "revoked": None}
        with self._writing():
            keys = self._read()
            keys[key_id] = record
            self._write(keys)
        log.info("added key %s (%s, role %s)", key_id, name, role)
        return _info(key_id, record), key

    def list(self) -> list[KeyInfo]:
        return sorted((_info(k, r) for k, r in self._load().items()), key=lambda i: i.created)

    def revoke(self, key_id: str) -> KeyInfo:
        """Mark a key revoked (kept in the file, so ``list`` shows when); refused from its next call on."""
        with self._writing():
            keys = self._read()
            if key_id not in keys:
                raise NotFoundError(f"no key {key_id!r} in {self.path}; `embedder keys list` shows the ids")
            keys[key_id]["revoked"] = keys[key_id].get("revoked") or time.time()
            self._write(keys)
        log.info("revoked key %s", key_id)
        return _info(key_id, keys[key_id])

    def _load(self) -> dict[str, dict[str, Any]]:
        """The keys, re-read only when the file's mtime or size changed (one stat per call).

        Once the file has held a key (or was required), a file that is gone or holds none raises
        :class:`UnauthenticatedError`: losing the file must not open the server."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._required:
                raise _refused("is missing", self.path) from None
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._keys, self._stamp = self._read(), stamp
            if self._keys:
                self._required = True
            elif self._required:
                raise _refused("holds no keys", self.path)
            return self._keys

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            content = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise self._damaged(type(e).__name__, e) from e
        if not isinstance(content, dict):
            raise self._damaged(f"a JSON {type(content).__name__}, not an object")
        if content.get("version") != VERSION:  # a newer format may mean something this code would misread
            raise self._damaged(f"version {str(content.get('version'))[:20]}; this server reads version {VERSION}")
        try:
            return _checked(content["keys"])
        except (ValueError, KeyError, TypeError) as e:
            raise self._damaged(type(e).__name__, e) from e

    def _damaged(self, why: str, cause: BaseException | None = None) -> UnauthenticatedError:
        """Fail closed, also once the damaged file is moved away: it may have held keys."""
        self._required = True
        return _refused(f"is unreadable ({why})", self.path, cause)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Read-modify-write under this object's lock and an exclusive file lock, so two `embedder keys` commands
        at once do not lose one's change."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, keys: dict[str, dict[str, Any]]) -> None:
        """Atomically, owner-only: a reader sees the old file or the new one."""
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "keys": keys}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _refused(problem: str, path: Path, cause: BaseException | None = None) -> UnauthenticatedError:
    """The refusal of every call while the key file is not usable; the path goes to the log, not to callers."""
    log.error("key file %s %s%s; refusing every call but --token's", path, problem, f": {cause}" if cause else "")
    return UnauthenticatedError(f"the server's key file {problem}; every call but the server token's is refused until "
                                "an operator puts back a good copy of it, or writes a new one with `embedder keys "
                                "add` (a damaged one moved away first); calls stay refused meanwhile")


def _checked(keys: Any) -> dict[str, dict[str, Any]]:
    """The key records, if every one has the shape `embedder keys add` writes; ValueError if any does not (a
    hand-edited file must fail closed, never grant more: a string allow-list would allow its letters)."""
    if not isinstance(keys, dict):
        raise ValueError(f"`keys` is a {type(keys).__name__}, not an object of key records")
    for key_id, record in keys.items():
        collections = record.get("collections") if isinstance(record, dict) else None
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str) and record.get("role") in ROLES
                and (collections is None or (isinstance(collections, list)
                                             and all(isinstance(c, str) for c in collections)))):
            raise ValueError(f"key record {key_id[:40]!r} is malformed")
    return keys


class Gate:
    """The check every front door makes: ``--token`` (an admin key) or a key from the :class:`KeyStore`."""

    def __init__(self, token: str, keys: KeyStore | None) -> None:
        self._token = token.encode()
        self.keys = keys

    @classmethod
    def from_config(cls, config: Any) -> Gate:
        """The gate of a server run with ``config``, its key file read once now (keys there keep auth on should the
        file go later). A ``--keys-file`` given must exist: :class:`SettingError` otherwise."""
        path = config.keys_path
        if config.keys_file and not path.exists():
            raise SettingError(f"the keys file {path} (--keys-file / EMBEDDER_KEYS_FILE) does not exist; create it "
                               f"with `embedder keys add NAME --role ROLE --keys-file {path}`, or, where replicas "
                               "share one file mounted from a Secret, check that the Secret is mounted there")
        keys = KeyStore(config.data_dir, path=path, required=bool(config.keys_file))
        keys.in_use()  # now, not at the first call: a file moved away before it must not open the server
        return cls(config.token, keys)

    @property
    def required(self) -> bool:
        """Whether calls need a token or key (true also while the key file is damaged or gone: failing closed)."""
        return bool(self._token) or (self.keys is not None and self.keys.in_use())

    def principal(self, authorization: str | bytes | None) -> Principal | None:
        """The caller named by an ``authorization`` value; None when no auth is configured.

        Raises :class:`UnauthenticatedError` saying what was wrong otherwise."""
        try:
            keyed, unusable = self.keys is not None and self.keys.enforced(), None
        except UnauthenticatedError as e:  # the key file is damaged, or gone after it held keys: only --token passes
            keyed, unusable = True, e
        if not (self._token or keyed):
            return None
        given = authorization.encode() if isinstance(authorization, str) else (authorization or b"")
        scheme, _, credentials = given.partition(b" ")
        bearer = credentials if scheme.lower() == b"bearer" else b""  # the scheme is case-insensitive (RFC 7235)
        if self._token and bearer and hmac.compare_digest(bearer, self._token):  # constant time
            return TOKEN_PRINCIPAL
        if unusable is not None:  # said whatever was sent: the operator's problem, not the caller's key
            raise unusable
        found = self.keys.authenticate(bearer.decode("utf-8", "replace")) if self.keys and bearer else None
        if found is not None:
            return found
        why = ("missing `authorization`" if not given else
               "wrong token, or an unknown or revoked key, in `authorization`")
        raise UnauthenticatedError(f"{why}; {_HOW}")


def authorization(pairs: Iterable[tuple[Any, Any]] | None) -> str | bytes | None:
    """The one ``authorization`` value among a call's headers or metadata; two are refused (which of a proxy's
    and the caller's would count must not depend on their order)."""
    found = [v for k, v in pairs or () if k in ("authorization", b"authorization")]
    if len(found) > 1:
        raise UnauthenticatedError(f"{len(found)} `authorization` values in one call; send one")
    return found[0] if found else None


def _key_id(key: str) -> str | None:
    if not key.startswith(_PREFIX):
        return None
    key_id, sep, _ = key[len(_PREFIX):].partition("_")
    return key_id if sep else None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _info(key_id: str, record: dict[str, Any]) -> KeyInfo:
    return KeyInfo(key_id, record["name"], record["role"], record.get("collections"), record["created"],
                   record.get("revoked"))
