"""``embedder backup DEST`` and ``embedder restore SRC``: a consistent copy of a data dir, and putting one back.

Examples::

    embedder backup /backups/embedder-2026-12-06 --data-dir /srv/embedder     # while the server serves
    embedder restore /backups/embedder-2026-12-06 --data-dir /srv/embedder --force   # with the server stopped

See :mod:`embedder.store.backup` for what is copied and how. With the collections in Milvus (the data dir
records its ``--store``), a milvus-lite store is copied too (with its server stopped: it cannot be copied
alongside), and from a Milvus server the heads (with EMBEDDER_STORE_TOKEN); the output says where the rest is.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help="copy a data dir consistently into a new folder, also while a server serves it")
    p.add_argument("dest", type=Path, help="a new (or empty) folder for the backup")
    p.add_argument("--data-dir", type=Path, help=f"the data dir to back up (default: EMBEDDER_DATA_DIR, else "
                                                 f"./{Config.data_dir})")
    p.set_defaults(handler=run_backup)

    p = sub.add_parser("restore", help="put a backup into a data dir that no server holds (checked first)")
    p.add_argument("src", type=Path, help="a folder written by `embedder backup`")
    p.add_argument("--data-dir", type=Path, help=f"the data dir to restore into (default: EMBEDDER_DATA_DIR, else "
                                                 f"./{Config.data_dir}); stop the server that uses it first")
    p.add_argument("--force", action="store_true", help="replace the store the data dir holds (everything in it)")
    p.add_argument("--store", metavar="URI", help="where a backed-up Milvus part goes: the milvus-lite "
                                                  "milvus:///abs/path.db, or the Milvus server that gets the heads "
                                                  "back (default: where the backup came from)")
    p.set_defaults(handler=run_restore)


def run_backup(args: argparse.Namespace) -> int:
    from ..store.backup import backup

    config = Config.from_env(data_dir=args.data_dir)
    s = backup(config.data_dir, args.dest, store_token=config.store_token, keys_path=config.keys_path)
    print(f"backed up {config.data_dir} to {s.path}: {s.files} files, {s.bytes / 1e6:.1f} MB in {s.seconds:.1f} s")
    for note in s.notes:
        print(note)
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from ..store.backup import restore

    config = Config.from_env(data_dir=args.data_dir)
    s = restore(args.src, config.data_dir, force=args.force, store=args.store or "", store_token=config.store_token,
                keys_path=config.keys_path)
    print(f"restored {args.src} into {s.path}: {s.files} files, {s.bytes / 1e6:.1f} MB in {s.seconds:.1f} s; "
          "start the server on it")
    for note in s.notes:
        print(note)
    return 0
