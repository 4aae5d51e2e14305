"""Access: ``keys add|list|revoke`` manage the API keys of a data dir (a running server sees changes with its
next call), ``forget`` deletes cached vectors of images from a running `embedder serve`.

Examples::

    embedder keys add ci-bot --role write --collection pets --collection toys --data-dir /srv/embedder
    embedder keys list --data-dir /srv/embedder
    embedder keys revoke 3f2a9c01b7e4 --data-dir /srv/embedder
    embedder forget 9f86d081884c7d65...  --server 127.0.0.1:50051 --token "$KEY"

Keys are managed on the data dir's file system, not over the API: whoever may write the data dir is the
operator. Each key is printed once by ``keys add``; only its SHA-256 is stored.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import Config
from ..errors import NotFoundError
from ..keys import ROLES, KeyInfo, KeyStore
from .options import add_remote_options, client_from, printable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="manage API keys (roles read, write, admin; collection allow-lists)")
    actions = p.add_subparsers(dest="keys_command", required=True)
    a = actions.add_parser("add", help="create a key and print it (once: only its hash is stored)")
    a.add_argument("name", help="who or what uses the key (shown by `keys list`)")
    a.add_argument("--role", choices=ROLES, default="read", help="what the key may do (default %(default)s)")
    a.add_argument("--collection", action="append", metavar="NAME",
                   help="allow only this collection (repeat for more; default: every collection)")
    a.set_defaults(handler=add)
    ls = actions.add_parser("list", help="every key: id, name, role, collections, created, revoked")
    ls.set_defaults(handler=list_keys)
    r = actions.add_parser("revoke", help="refuse a key from its next call on")
    r.add_argument("key_id", metavar="KEY_ID", help="the id `keys list` shows")
    r.set_defaults(handler=revoke)
    for parser in (a, ls, r):
        parser.add_argument("--data-dir", type=Path, help=f"the server's data dir (default: EMBEDDER_DATA_DIR, else "
                                                          f"./{Config.data_dir})")
        parser.add_argument("--keys-file", help="the keys file the servers read with --keys-file (default: "
                                                "EMBEDDER_KEYS_FILE, else keys.json in the data dir)")

    p = sub.add_parser("forget", help="delete the server's cached vectors of images (your key's; admin: everyone's)")
    p.add_argument("sha256s", nargs="+", metavar="SHA256", help="hex sha256 of each image's bytes")
    add_remote_options(p)
    p.set_defaults(handler=forget)


def _store(args: argparse.Namespace) -> KeyStore:
    config = Config.from_env(data_dir=args.data_dir, keys_file=args.keys_file)
    return KeyStore(config.data_dir, path=config.keys_path)


def add(args: argparse.Namespace) -> int:
    info, key = _store(args).add(args.name, args.role, args.collection)
    print(f"key {info.key_id} ({printable(info.name)}, role {info.role}, collections "
          f"{_collections(info)}); send it as `authorization: Bearer <key>`. It is shown only now:")
    print(key)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    store = _store(args)
    if not store.path.exists():  # a mistyped --keys-file or --data-dir must not read as "no keys"
        raise NotFoundError(f"no keys file at {store.path}: check --keys-file / --data-dir (or EMBEDDER_KEYS_FILE / "
                            "EMBEDDER_DATA_DIR); `embedder keys add` creates it with the first key")
    for info in store.list():
        state = f"revoked {_when(info.revoked)}" if info.revoked else "live"
        print(f"{info.key_id}  {printable(info.name)}  {info.role}  {_collections(info)}  created "
              f"{_when(info.created)}  {state}")
    return 0


def revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    info = store.revoke(args.key_id)
    print(f"key {info.key_id} ({printable(info.name)}) revoked; a running server refuses it from its next call")
    if store.live() == 0:
        print("note: no live key is left, so a server on this data dir refuses every call (but --token's); add "
              "one with `embedder keys add NAME --role ROLE`", file=sys.stderr)
    return 0


def forget(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        n = client.forget(args.sha256s)
    print(f"forgot {n} cached vector(s)")
    return 0


def _collections(info: KeyInfo) -> str:
    return "all" if info.collections is None else ",".join(printable(c) for c in info.collections)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t or 0))
