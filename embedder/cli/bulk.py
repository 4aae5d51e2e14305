"""``embedder bulk-embed`` on Ray Data, and ``embedder add --from-parquet``: its output into a local data dir.

Ray, pyarrow and the pipeline are imported when a command runs, not when the CLI starts.

Examples (``pip install 'embedder[scale]'``)::

    embedder bulk-embed photos/ --out vectors/ [--ray-address ray://head:10001]
    embedder add --from-parquet vectors/ --collection pets --label-from-folder --data-dir embedder-data
    embedder add --from-parquet vectors/ --collection pets --label-from-shards   # bulk-embed --label-column
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import Config
from ..errors import StoreLockedError
from .options import MODEL_FIELDS, add_model_options, card_setting, printable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bulk-embed", help="embed a folder tree, a list of paths or a Parquet dataset on Ray "
                                          "into Parquet shards + manifest.json (resumable)")
    p.add_argument("src", type=Path, help="a folder of images (recursively), a text file of image paths (one per "
                                          "line), or a .parquet file / folder of them with an image-bytes column")
    p.add_argument("--out", type=Path, required=True, help="folder for part-NNNNN.parquet and manifest.json; "
                                                           "a rerun skips the shards already complete")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to submit to (ray://HOST:10001, or auto); "
                                                         "default: start a local Ray on this machine")
    p.add_argument("--actors", type=int, help="embedding actors, each holding one model (default: one per GPU; "
                                              "without GPUs one per 4 CPUs)")
    # No numbers here: the defaults are bulk_embed's (embedder.bulk imports the pipeline, too heavy to read them
    # at start-up); the manifest's settings record the values a run used.
    p.add_argument("--shard-size", type=int, help="inputs per output shard (default: bulk_embed's, recorded in "
                                                  "manifest.json); change it and every shard is redone")
    p.add_argument("--batch-size", type=int,
                   help="images per decode batch and per actor call (default: bulk_embed's)")
    p.add_argument("--bytes-column", default="image", help="Parquet input: column of encoded images (default image)")
    p.add_argument("--id-column", default="id", help="Parquet input: column of ids (default id; '' for FILE#ROW)")
    p.add_argument("--label-column", help="Parquet input: carry this column into the shards as `label`")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the summary line")
    add_model_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """0 when every input was embedded, 1 when some failed (listed on stderr)."""
    from .. import bulk  # an attribute lookup at call time, so tests can stand in for bulk_embed

    if args.decode_workers is not None:
        raise ValueError("--decode-workers does not apply to bulk-embed: Ray runs the decoding, one task per CPU "
                         "of the cluster; size it with the cluster (or `ray start --num-cpus`)")
    # Only the flags given: bulk_embed's Config reads EMBEDDER_* for the rest, as every other command does.
    given = {k: getattr(args, k) for k in (*MODEL_FIELDS, "shard_size", "batch_size")
             if k not in ("model", "decode_workers")} | {"model_cards": card_setting(args)}
    manifest = bulk.bulk_embed(args.src, args.out, model=args.model, ray_address=args.ray_address,
                               actors=args.actors, progress=not args.quiet, bytes_column=args.bytes_column,
                               id_column=args.id_column or None, label_column=args.label_column,
                               **{k: v for k, v in given.items() if v is not None})
    for f in manifest["failures"]:
        print(f"skipped {printable(f['id'])}: {printable(f['error'])}", file=sys.stderr)
    c = manifest["counts"]
    print(f"embedded {c['embedded']} of {c['inputs']} inputs ({c['failed']} failed) with {manifest['model_id']} "
          f"-> {args.out}: {c['shards']} shards ({c['skipped_shards']} already complete), "
          f"{bulk.MANIFEST} in {manifest['seconds']:.1f} s")
    return 0 if not c["failed"] else 1


def import_parquet(args: argparse.Namespace) -> int:
    """``embedder add --from-parquet DIR --collection X [--data-dir D]``: into a local data dir, no server.

    The store is opened directly: a server running on that data dir holds its lock, and this refuses with a
    message saying so rather than writing behind the server's back.
    """
    from .. import bulk
    from ..store import Store

    config = Config.from_env(data_dir=args.data_dir)
    try:
        store = Store.from_config(config)
    except StoreLockedError as e:
        raise StoreLockedError(f"{e}. If `embedder serve` runs on {config.data_dir}, stop it for the import "
                               "(it picks the items up when it starts again)") from None
    # "label" is the column bulk-embed writes for --label-column, whatever that column was called in its input
    labels_from = "folder" if args.label_from_folder else "label" if args.label_from_shards else None
    with store:
        r = bulk.import_parquet(args.from_parquet, store, args.collection, labels_from=labels_from, label=args.label,
                                index=args.index, progress=not args.quiet)
    print(f"imported {r['items']} vectors of {r['model_id']} from {r['shards']} shards: added {r['added']}, "
          f"replaced {r['replaced']} -> collection {args.collection} in {config.data_dir} (no backbone pass)")
    column = _shard_label_column(args.from_parquet, bulk.MANIFEST)
    if column and labels_from is None and args.label is None:  # say so rather than drop them silently
        print(f"note: the shards carry labels (bulk-embed --label-column {column}) that were not imported; "
              "rerun with --label-from-shards to store them", file=sys.stderr)
    return 0


def _shard_label_column(directory: Path, manifest: str) -> str | None:
    """The input column bulk-embed carried into the shards as ``label`` (its manifest's settings), if any."""
    try:
        settings = json.loads((directory / manifest).read_text()).get("settings") or {}
    except (OSError, ValueError):
        return None  # import_parquet has already read this manifest; a hint is not worth failing over
    return settings.get("label_column") or None
