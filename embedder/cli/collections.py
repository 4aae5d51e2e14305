"""Collection commands on a running `embedder serve`: ``add``, ``search``, ``get``, ``delete``, ``labels``, ``stats``.

The server is ``--server``, else ``EMBEDDER_SERVER``, else Config's host and port; the token ``--token``, else
``EMBEDDER_TOKEN``. Only the client is imported (grpc, numpy): these run from a client-only install.

``add`` stores files under their path relative to the folder given (the file name for a file given); it prints
``added N, replaced M, K from cache, F failed -> collection X`` and exits 1 if any file failed.

Examples::

    embedder add pets/ --collection pets --label-from-folder
    embedder add more/ --collection pets-v2 --model mobilenet_v2.pets   # a fine-tuned backbone version
    embedder search query.jpg --collection pets -k 5
    embedder search --id cat/tom.jpg --collection pets --json
    embedder search query.jpg --collection pets --where 'camera == "a" and year >= 2020'
    embedder get cat/tom.jpg dog/rex.jpg --collection pets
    embedder labels --collection pets cat/tom.jpg=cat dog/rex.jpg=dog --clear cat/blurry.jpg
    embedder delete cat/tom.jpg --collection pets
    embedder delete --collection pets --all
    embedder stats
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import Config
from ..inputs import folder_label
from ..jsonrule import parse_json_object
from . import bulk
from .options import (CHUNK, add_remote_options, add_where_option, client_from, collect_images, no_images,
                      positive_int, printable, progress_bar, report)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("add", help="embed image files and folders on the server and store them in a collection")
    p.add_argument("paths", nargs="*", type=Path, help="image files or folders (recursively)")
    p.add_argument("--collection", required=True, help="collection to add to (created on first use)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--label-from-folder", action="store_true", help="label each file with its parent folder's name")
    g.add_argument("--label", help="label every file with LABEL")
    g.add_argument("--label-from-shards", action="store_true",
                   help="with --from-parquet: label each item with the shards' `label` column (written by "
                        "`embedder bulk-embed --label-column COL`); without this or another label option the "
                        "import stores no labels")
    p.add_argument("--model", metavar="NAME",
                   help="backbone the server embeds with, by name or model id, e.g. a fine-tuned version "
                        "mobilenet_v2.pets (see `embedder job`); applies when the collection is created (default: "
                        "the server's default model); an existing collection always embeds with its own model")
    p.add_argument("--index", metavar="INDEX", help="index of a new collection: flat (exact, the default) or "
                                                    "hnsw[:m=..,ef_construction=..,ef_search=..], either with "
                                                    ",codes=fp16|sq8 (compressed) and ,rerank=R; e.g. "
                                                    "hnsw:codes=sq8")
    p.add_argument("--metadata", metavar="JSON",
                   help="a JSON object stored with every file added, e.g. '{\"camera\": \"a\", \"year\": 2021}' "
                        "(then search, train or suggest with --where on it)")
    p.add_argument("--id-from", choices=("relative", "name", "path"), default="relative",
                   help="item ids: the path relative to the folder given, or the file name for a file given "
                        "(relative, default); the file name (name); the path as found (path)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the summary line")
    add_remote_options(p)
    g = p.add_argument_group("import bulk-embed output (into a local data dir: no server, no backbone pass)")
    g.add_argument("--from-parquet", type=Path, metavar="DIR",
                   help="import the shards of `embedder bulk-embed --out DIR` instead of embedding paths")
    g.add_argument("--data-dir", type=Path, help="the store to import into (default: EMBEDDER_DATA_DIR, else "
                                                 f"./{Config.data_dir}); `embedder serve` must not have it open")
    p.set_defaults(handler=add)

    p = sub.add_parser("search", help="the stored items most similar to an image, a text or a stored item")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("image", nargs="?", type=Path, help="query image file")
    q.add_argument("--id", metavar="ITEM_ID", help="query by this stored item of --collection instead")
    q.add_argument("--text", help="query by this text (a text-image model's collection: text-to-image search)")
    p.add_argument("--collection", help="collection to search (default: every collection of --model; --id needs "
                                        "one)")
    p.add_argument("--model", metavar="NAME", help="without --collection: search the collections of this model "
                                                   "(default: the server's)")
    p.add_argument("-k", type=positive_int, default=10, help="number of hits (default %(default)s)")
    p.add_argument("--label", help="only items with this label")
    add_where_option(p, "items")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p)
    p.set_defaults(handler=search)

    p = sub.add_parser("get", help="print stored items as JSON")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--collection", required=True)
    p.add_argument("--vectors", action="store_true", help="include the vectors (as lists of floats)")
    add_remote_options(p)
    p.set_defaults(handler=get)

    p = sub.add_parser("delete", help="delete stored items, or a whole collection with --all")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--collection", required=True)
    p.add_argument("--all", action="store_true", help="delete the collection and every item in it")
    add_remote_options(p)
    p.set_defaults(handler=delete)

    p = sub.add_parser("labels", help="set or clear labels of stored items (all or nothing)")
    p.add_argument("assignments", nargs="*", metavar="ID=LABEL", help="the label is after the last '='")
    p.add_argument("--collection", required=True)
    p.add_argument("--clear", nargs="+", default=[], metavar="ID", help="remove these items' labels")
    add_remote_options(p)
    p.set_defaults(handler=labels)

    p = sub.add_parser("stats", help="collections (items, labels, model, index), cache fill and heads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p)
    p.set_defaults(handler=stats)


def add(args: argparse.Namespace) -> int:
    """Image paths through the server, or ``--from-parquet`` shards into a local data dir; 1 if any file failed."""
    if args.from_parquet is not None:
        if args.paths:
            raise ValueError("give image paths or --from-parquet DIR, not both")
        if args.model is not None:
            raise ValueError("--model goes with image paths; the shards of --from-parquet already hold the vectors "
                             "of the model bulk-embed ran (choose it there: `embedder bulk-embed --model NAME`)")
        return bulk.import_parquet(args)
    if args.data_dir is not None:
        raise ValueError("--data-dir goes with --from-parquet; a server's add writes to the server's own data dir")
    if args.label_from_shards:
        raise ValueError("--label-from-shards goes with --from-parquet; for image paths use --label-from-folder or "
                         "--label LABEL")
    if not args.paths:
        raise ValueError("nothing to add: give image files or folders, or --from-parquet DIR (bulk-embed output)")
    metadata = parse_json_object(args.metadata or "", "--metadata", max_bytes=Config().max_metadata_bytes) or None
    entries, failed = _files_to_add(args)
    if not entries:
        raise no_images(args.paths, failed)
    added = replaced = cached = 0
    with client_from(args) as client:
        bar = progress_bar(len(entries), quiet=args.quiet, desc=f"adding ({client.target})")
        try:  # the bar gives the terminal back even when the server fails midway
            for start in range(0, len(entries), CHUNK):
                chunk = entries[start:start + CHUNK]
                # paths, not bytes: the client reads each chunk's files when it sends them
                summary = client.add(args.collection, [f for f, _, _ in chunk], [i for _, i, _ in chunk],
                                     labels=[label for _, _, label in chunk], metadata=[metadata] * len(chunk),
                                     index=args.index, errors="return")
                added, replaced, cached = added + summary.added, replaced + summary.replaced, cached + summary.cached
                failed += [{"path": str(chunk[i][0]), "error": e} for i, e in summary.failed.items()]
                bar.update(len(chunk))
        finally:
            bar.close()
    report(failed)
    print(f"added {added}, replaced {replaced}, {cached} from cache, {len(failed)} failed "
          f"-> collection {printable(args.collection)}")
    return 0 if not failed else 1


def _files_to_add(args: argparse.Namespace) -> tuple[list[tuple[Path, str, str | None]], list[dict[str, str]]]:
    """``(file, item id, label)`` per image found under ``args.paths``, and the paths that do not exist."""
    entries: list[tuple[Path, str, str | None]] = []
    missing: list[dict[str, str]] = []
    for root in args.paths:
        files, gone = collect_images([root])
        missing += gone
        for f in files:
            if args.id_from == "path":
                item_id = f.as_posix()
            elif args.id_from == "name" or not root.is_dir():
                item_id = f.name
            else:
                item_id = f.relative_to(root).as_posix()
            # absolute: `add cat.jpg` run inside pets/cat/ is labelled cat, not left without a label
            label = folder_label(f.absolute()) if args.label_from_folder else args.label
            entries.append((f, item_id, label))
    seen: dict[str, Path] = {}
    for f, item_id, _ in entries:
        if item_id in seen:
            raise ValueError(f"{seen[item_id]} and {f} would both be stored as id {item_id!r}; pass --id-from path, "
                             "or add them to different collections")
        seen[item_id] = f
    return entries, missing


def delete(args: argparse.Namespace) -> int:
    """Delete the ids given, or the whole collection with --all; 1 when some ids were not there (named on stderr,
    as `get` does: nothing else was wrong, but a script should see that they were not deleted)."""
    if args.all == bool(args.ids):
        raise ValueError("pass the ids to delete, or --all to delete the whole collection (not both)")
    with client_from(args) as client:
        if args.all:
            count = client.delete_collection(args.collection)
            print(f"deleted collection {printable(args.collection)} ({count} items)")
            return 0
        result = client.delete(args.collection, args.ids)
    print(f"deleted {result.deleted} of {len(args.ids)} items from collection {printable(args.collection)}")
    for item_id in result.missing:
        print(f"not found in collection {printable(args.collection)}: {printable(item_id)}", file=sys.stderr)
    return 0 if not result.missing else 1


def labels(args: argparse.Namespace) -> int:
    """Set ``ID=LABEL`` pairs and clear ``--clear`` ids in one all-or-nothing call."""
    changes: dict[str, str | None] = {}
    for a in args.assignments:
        item_id, sep, label = a.rpartition("=")
        if not sep or not item_id or not label:
            raise ValueError(f"{a!r} is not ID=LABEL; to remove a label use --clear ID")
        changes[item_id] = label
    for item_id in args.clear:
        if item_id in changes:
            raise ValueError(f"{item_id!r} is both labelled and cleared; name each item once")
        changes[item_id] = None
    if not changes:
        raise ValueError("nothing to change; pass ID=LABEL pairs and/or --clear ID ...")
    with client_from(args) as client:
        updated = client.set_labels(args.collection, changes)
    cleared = len(args.clear)
    print(f"updated {updated} items in collection {printable(args.collection)} "
          f"({len(changes) - cleared} labelled, {cleared} cleared)")
    return 0


def search(args: argparse.Namespace) -> int:
    """The hits for an image file, a text or a stored item, as a table or JSON."""
    from ..client import Text

    if args.image is not None and not args.image.is_file():
        raise FileNotFoundError(f"no such file: {args.image}")
    with client_from(args) as client:
        query = Text(args.text) if args.text is not None else args.image
        hits = client.search(query, collection=args.collection, item_id=args.id, k=args.k, label=args.label,
                             where=args.where, model=args.model)
    if args.json:
        print(json.dumps([dataclasses.asdict(h) for h in hits], indent=2))
        return 0
    if not hits:
        print("no matching items" + (f" in collection {printable(args.collection)}" if args.collection else ""))
        return 0
    ids = [printable(h.id if args.collection else f"{h.collection}/{h.id}") for h in hits]
    width = max(2, *map(len, ids))
    print(f"{'rank':>4} {'score':>7}  {'id' if args.collection else 'collection/id':<{width}}  label")
    for rank, (h, item_id) in enumerate(zip(hits, ids), 1):
        print(f"{rank:>4} {h.score:>7.4f}  {item_id:<{width}}  {printable(h.label) if h.label is not None else '-'}")
    return 0


def get(args: argparse.Namespace) -> int:
    """The stored items as JSON; 1 if any id is not in the collection (named on stderr)."""
    with client_from(args) as client:
        items = client.get(args.collection, args.ids, vectors=args.vectors)
    rows = []
    for s in items:
        if s is not None:
            row = {"id": s.id, "collection": s.collection, "label": s.label, "metadata": s.metadata,
                   "sha256": s.sha256, "created": s.created, "updated": s.updated}
            if args.vectors:
                row["vector"] = s.vector.tolist()
            rows.append(row)
    print(json.dumps(rows, indent=2))
    missing = [i for i, s in zip(args.ids, items) if s is None]
    for item_id in missing:
        print(f"not found in collection {printable(args.collection)}: {printable(item_id)}", file=sys.stderr)
    return 0 if not missing else 1


def stats(args: argparse.Namespace) -> int:
    """Collections (items, model, index, labels), cache fill, heads and disk use."""
    with client_from(args) as client:
        summary = client.stats()
    if args.json:
        print(json.dumps({**summary, "collections": [dataclasses.asdict(c) for c in summary["collections"]]}, indent=2))
        return 0
    cols = summary["collections"]
    if cols:
        rows = [(printable(c.name), printable(c.model_id), printable(c.index), c) for c in cols]
        name_w = max(10, *(len(r[0]) for r in rows))
        model_w = max(5, *(len(r[1]) for r in rows))
        index_w = max(5, *(len(r[2]) for r in rows))
        print(f"{'collection':<{name_w}} {'items':>7}  {'model':<{model_w}}  {'index':<{index_w}}  labels")
        for name, model_id, index, c in rows:
            shown = ", ".join(f"{printable(k)} {v}" for k, v in sorted(c.labels.items()))
            if c.unlabeled:
                shown += f"{', ' if shown else ''}unlabeled {c.unlabeled}"
            print(f"{name:<{name_w}} {c.count:>7}  {model_id:<{model_w}}  {index:<{index_w}}  {shown or '-'}")
        print()
    else:
        print("no collections\n")
    print(f"items: {summary['items']} in {len(cols)} collection{'' if len(cols) == 1 else 's'}; "
          f"cache: {summary['cache_items']} / {summary['cache_max_items']} vectors; heads: {summary['heads']}; "
          f"disk: {summary['disk_bytes'] / 1e6:.1f} MB")
    return 0
