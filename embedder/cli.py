"""Command line interface.

Examples:
    embedder models
    embedder demo
    embedder embed photos/ extra.jpg --out vectors.npy
    EMBEDDER_RUNTIME=openvino embedder embed photos/ --out vectors.npy --model efficientnet_lite2
    EMBEDDER_TOKEN=s3cret embedder serve --port 50051 --metrics-port 9100
    EMBEDDER_TOKEN=s3cret embedder embed photos/ --out vectors.npy --server 127.0.0.1:50051

Store and classifier commands (on a running `embedder serve`: --server, else EMBEDDER_SERVER, else 127.0.0.1:50051;
token from --token or EMBEDDER_TOKEN):
    embedder add pets/ --collection pets --label-from-folder
    embedder add more/ --collection pets-v2 --model mobilenet_v2.pets   # a fine-tuned backbone version
    embedder search query.jpg --collection pets -k 5
    embedder search --id cat/tom.jpg --collection pets --json
    embedder get cat/tom.jpg dog/rex.jpg --collection pets
    embedder labels --collection pets cat/tom.jpg=cat dog/rex.jpg=dog --clear cat/blurry.jpg
    embedder stats
    embedder train --collection pets --head logreg --param C=0.5 --head-id pets
    embedder predict --head pets new/ one.jpg --top-k 3
    embedder predict --head pets --collection pets --ids cat/tom.jpg
    embedder heads
    embedder delete cat/tom.jpg --collection pets
    embedder delete --collection pets --all
    embedder delete-head pets

Bulk jobs on Ray Data (`pip install 'embedder[scale]'`), then an import into a local data dir (no backbone pass):
    embedder bulk-embed photos/ --out vectors/ [--ray-address ray://head:10001]
    embedder add --from-parquet vectors/ --collection pets --label-from-folder --data-dir embedder-data
    embedder add --from-parquet vectors/ --collection pets --label-from-shards   # bulk-embed --label-column

``embed`` writes ``vectors.npy`` (float32, one row per embedded file) and ``vectors.json`` beside it:
the model id, the runtime, the paths in row order, and every file that could not be embedded with why.
``add`` stores files under their path relative to the folder given (the file name for a file given); it
prints ``added N, replaced M, K from cache, F failed -> collection X`` and exits 1 if any file failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from . import bulk
from .backbones import list_backbones
from .config import JPEG_DECODERS, Config
from .errors import EmbedderError, StoreLockedError
from .inputs import image_files
from .results import BatchResult
from .runtimes import RUNTIMES, installed, resolve_runtime

if TYPE_CHECKING:
    from .client import EmbedderClient

log = logging.getLogger("embedder.cli")

DEFAULT_SERVER = "127.0.0.1:50051"
CHUNK = 64  # files per Add / Predict call: only this many are read into memory at once


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (also EMBEDDER_* env vars)")
    g.add_argument("--model", help="backbone name (see `embedder models`); default mobilenet_v2")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--runtime", choices=("auto", *RUNTIMES), help="inference runtime (default auto)")
    g.add_argument("--max-batch", type=int, help="items per runtime call (default 64)")
    g.add_argument("--micro-batch", type=int, help="items per forward pass (default: 4 on CPU, max batch on CUDA)")
    g.add_argument("--decode-workers", type=int, help="decode/resize threads (default: one per core)")
    g.add_argument("--runtime-threads", type=int, help="CPU runtime intra-op threads (default: one per core)")
    g.add_argument("--jpeg-decoder", choices=JPEG_DECODERS,
                   help="decoder for plain JPEGs (default torchvision: libjpeg-turbo on CPU, nvJPEG on CUDA)")
    g.add_argument("--max-pixels", type=int, help="refuse larger images (default 64,000,000)")
    g.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 is opt-in, OpenVINO only")
    g.add_argument("--no-normalize", dest="normalize", action="store_const", const=False,
                   help="return raw pooled features instead of L2-normalised vectors")
    g.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the model (torch runtime only; other runtimes ignore it; slower start); "
                        "also EMBEDDER_COMPILE=1")
    g.add_argument("--cache-dir", type=Path,
                   help="where exported ONNX models are kept (default: EMBEDDER_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/embedder, else ~/.cache/embedder)")


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(
        model=args.model, device=args.device, runtime=args.runtime, max_batch=args.max_batch,
        micro_batch=args.micro_batch, decode_workers=args.decode_workers, runtime_threads=args.runtime_threads,
        max_pixels=args.max_pixels, precision=args.precision, normalize=args.normalize,
        jpeg_decoder=args.jpeg_decoder, compile=args.compile, cache_dir=args.cache_dir,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered backbones and whether their weights are installed")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="the main job through the service: add labelled images, train a head, "
                                    "predict held-out images, search")
    p.add_argument("--data-dir", type=Path, help="where the collection, cache and head are kept "
                                                  "(default ./embedder-data; a second run is served from its cache)")
    p.add_argument("--train-size", type=int, default=5000, help="labelled images to add (default 5000)")
    p.add_argument("--test-size", type=int, default=1000, help="held-out images to predict (default 1000)")
    p.add_argument("--head", choices=("logreg", "linear_svm", "svm"), default="logreg", help="head type")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(p)

    p = sub.add_parser("embed", help="embed image files and folders (recursively) into a .npy file")
    p.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", type=Path, required=True, help="output .npy; a .json with paths and failures goes beside it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the summary line")
    _add_remote_options(p, title="remote (embed on an `embedder serve` instance instead of locally)",
                        server_help="send the images to this server (--model, if given, must match the server's)")
    _add_model_options(p)

    p = sub.add_parser("serve", help="run the gRPC embedding service (health, reflection, metrics)")
    _add_model_options(p)
    _add_service_options(p)
    _add_bulk_parser(sub)
    _add_store_commands(sub)
    return parser


def _add_bulk_parser(sub: Any) -> None:
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
    p.add_argument("--shard-size", type=int, default=bulk.DEFAULT_SHARD_SIZE,
                   help=f"inputs per output shard (default {bulk.DEFAULT_SHARD_SIZE}); change it and every shard "
                        "is redone")
    p.add_argument("--batch-size", type=int, default=bulk.DEFAULT_BATCH_SIZE,
                   help=f"images per decode batch and per actor call (default {bulk.DEFAULT_BATCH_SIZE})")
    p.add_argument("--bytes-column", default="image", help="Parquet input: column of encoded images (default image)")
    p.add_argument("--id-column", default="id", help="Parquet input: column of ids (default id; '' for FILE#ROW)")
    p.add_argument("--label-column", help="Parquet input: carry this column into the shards as `label`")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the summary line")
    _add_model_options(p)


def _bulk_embed(args: argparse.Namespace) -> int:
    """``embedder bulk-embed``: 0 when every input was embedded, 1 when some failed (listed on stderr)."""
    if args.decode_workers is not None:
        raise ValueError("--decode-workers does not apply to bulk-embed: Ray runs the decoding, one task per CPU "
                         "of the cluster; size it with the cluster (or `ray start --num-cpus`)")
    settings = {k: getattr(args, k) for k in ("device", "runtime", "max_batch", "micro_batch", "runtime_threads",
                                              "max_pixels", "precision", "normalize", "compile", "cache_dir",
                                              "jpeg_decoder")}
    manifest = bulk.bulk_embed(args.src, args.out, model=args.model, ray_address=args.ray_address,
                               actors=args.actors, batch_size=args.batch_size, shard_size=args.shard_size,
                               progress=not args.quiet, bytes_column=args.bytes_column,
                               id_column=args.id_column or None, label_column=args.label_column,
                               **{k: v for k, v in settings.items() if v is not None})
    for f in manifest["failures"]:
        print(f"skipped {f['id']}: {f['error']}", file=sys.stderr)
    c = manifest["counts"]
    print(f"embedded {c['embedded']} of {c['inputs']} inputs ({c['failed']} failed) with {manifest['model_id']} "
          f"-> {args.out}: {c['shards']} shards ({c['skipped_shards']} already complete), "
          f"{bulk.MANIFEST} in {manifest['seconds']:.1f} s")
    return 0 if not c["failed"] else 1


def _import_parquet(args: argparse.Namespace) -> int:
    """``embedder add --from-parquet DIR --collection X [--data-dir D]``: into a local data dir, no server.

    The store is opened directly: a server running on that data dir holds its lock, and this refuses with a
    message saying so rather than writing behind the server's back.
    """
    from .store import Store

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
    column = _shard_label_column(args.from_parquet)
    if column and labels_from is None and args.label is None:  # say so rather than drop them silently
        print(f"note: the shards carry labels (bulk-embed --label-column {column}) that were not imported; "
              "rerun with --label-from-shards to store them", file=sys.stderr)
    return 0


def _shard_label_column(directory: Path) -> str | None:
    """The input column bulk-embed carried into the shards as ``label`` (its manifest's settings), if any."""
    try:
        settings = json.loads((directory / bulk.MANIFEST).read_text()).get("settings") or {}
    except (OSError, ValueError):
        return None  # import_parquet has already read this manifest; a hint is not worth failing over
    return settings.get("label_column") or None


def _add_remote_options(p: argparse.ArgumentParser, *, server_help: str | None = None,
                        title: str = "server (also EMBEDDER_SERVER, EMBEDDER_TOKEN)") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--server", metavar="HOST:PORT", help=server_help or (
        f"the `embedder serve` instance to talk to (default: EMBEDDER_SERVER, else {DEFAULT_SERVER})"))
    g.add_argument("--token", help="bearer token for the server (default: EMBEDDER_TOKEN)")
    g.add_argument("--tls-ca", type=Path, help="PEM certificate to trust for a TLS server (plaintext without it)")
    g.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds per request (default 60)")


def _bounded(kind: type, ok: Callable[[Any], bool], need: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` for which ``ok`` holds, else a usage error saying what it must be.

    The numbers of the remote commands use it because in the RPCs 0 means "the server's default": typed on the
    command line it is a mistake to report, not to paper over.
    """
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    return parse


_positive_int = _bounded(int, lambda v: 1 <= v < 2**31, "a whole number from 1 to 2**31 - 1")
_positive_float = _bounded(float, lambda v: 0 < v < float("inf"), "a positive number of seconds")
_fraction = _bounded(float, lambda v: 0 < v < 1, "a fraction between 0 and 1")


def _param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of ``train --param``: the value as JSON when it parses (0.1, true, [1, 2]), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE, e.g. C=0.1")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _add_store_commands(sub: Any) -> None:
    """The commands that talk to a running `embedder serve`: store, search and classifier heads."""
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
                                                    "hnsw[:m=..,ef_construction=..,ef_search=..]")
    p.add_argument("--id-from", choices=("relative", "name", "path"), default="relative",
                   help="item ids: the path relative to the folder given, or the file name for a file given "
                        "(relative, default); the file name (name); the path as found (path)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the summary line")
    _add_remote_options(p)
    g = p.add_argument_group("import bulk-embed output (into a local data dir: no server, no backbone pass)")
    g.add_argument("--from-parquet", type=Path, metavar="DIR",
                   help="import the shards of `embedder bulk-embed --out DIR` instead of embedding paths")
    g.add_argument("--data-dir", type=Path, help="the store to import into (default: EMBEDDER_DATA_DIR, else "
                                                 "./embedder-data); `embedder serve` must not have it open")

    p = sub.add_parser("search", help="the stored items most similar to an image or to a stored item")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("image", nargs="?", type=Path, help="query image file")
    q.add_argument("--id", metavar="ITEM_ID", help="query by this stored item of --collection instead")
    p.add_argument("--collection", required=True, help="collection to search")
    p.add_argument("-k", type=_positive_int, default=10, help="number of hits (default 10)")
    p.add_argument("--label", help="only items with this label")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_remote_options(p)

    p = sub.add_parser("get", help="print stored items as JSON")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--collection", required=True)
    p.add_argument("--vectors", action="store_true", help="include the vectors (as lists of floats)")
    _add_remote_options(p)

    p = sub.add_parser("delete", help="delete stored items, or a whole collection with --all")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--collection", required=True)
    p.add_argument("--all", action="store_true", help="delete the collection and every item in it")
    _add_remote_options(p)

    p = sub.add_parser("labels", help="set or clear labels of stored items (all or nothing)")
    p.add_argument("assignments", nargs="*", metavar="ID=LABEL", help="the label is after the last '='")
    p.add_argument("--collection", required=True)
    p.add_argument("--clear", nargs="+", default=[], metavar="ID", help="remove these items' labels")
    _add_remote_options(p)

    p = sub.add_parser("stats", help="collections (items, labels, model, index), cache fill and heads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_remote_options(p)

    p = sub.add_parser("train", help="train a classifier head on the labelled items of a collection")
    p.add_argument("--collection", required=True)
    p.add_argument("--head", default="logreg", choices=("logreg", "linear_svm", "svm"), help="kind (default logreg)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="train on these labels only (default: all)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="head parameter, repeatable; values are JSON when they parse (C=0.1), else strings")
    p.add_argument("--test-size", type=_fraction, default=0.2, help="hold-out fraction for the metrics (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-id", metavar="NAME", help="name of the head (replaces one of that name); default: generated")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the hold-out confusion matrix to this PNG")
    p.add_argument("--adapt-to", metavar="COLLECTION",
                   help="adapt to the domain of this collection's (unlabelled) images, e.g. another camera")
    p.add_argument("--adapt-method", choices=("coral", "standardize"), help="how to adapt (default coral)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_remote_options(p)

    p = sub.add_parser("predict", help="top labels of images, or of stored items, from a trained head")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files or folders (recursively)")
    p.add_argument("--head", required=True, metavar="HEAD_ID")
    p.add_argument("--collection", help="collection of --ids")
    p.add_argument("--ids", nargs="+", default=[], metavar="ID", help="stored items to predict")
    p.add_argument("--top-k", type=_positive_int, default=3, help="labels per input (default 3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_remote_options(p)

    p = sub.add_parser("finetune", help="fine-tune the last block(s) on a labelled collection -> a new backbone")
    p.add_argument("--collection", required=True)
    p.add_argument("--suffix", required=True, help="the new backbone is <parent>.<suffix>")
    p.add_argument("--unfreeze", type=_positive_int, default=1, help="blocks trained, from the end (default 1)")
    p.add_argument("--epochs", type=_positive_int, default=10,
                   help="at most this many epochs (default 10; early stopping)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="only these labels (default: all)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="further settings: lr, weight_decay, batch_size, val_fraction, patience, dropout, noise, "
                        "mixup, seed")
    p.add_argument("--adabn", action="store_true",
                   help="no labels: re-estimate BatchNorm statistics on the collection's images (a target domain)")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return")
    _add_remote_options(p)

    p = sub.add_parser("job", help="a job's state, progress and result (--cancel stops it)")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--cancel", action="store_true", help="ask the job to stop")
    _add_remote_options(p)

    p = sub.add_parser("evaluate", help="learning curve: would labelling more pay off? (accuracy vs labels per class)")
    p.add_argument("--collection", required=True)
    p.add_argument("--curve", action="store_true", required=True, help="accuracy at growing labels per class")
    p.add_argument("--head", default="logreg", choices=("logreg", "linear_svm", "svm"), help="kind (default logreg)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="only these labels (default: all)")
    p.add_argument("--per-class", nargs="+", type=int, metavar="N", help="sizes (default 2 5 10 20 50 ...)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="random draws per size (default 5)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the curve with its 95%% band to this PNG")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_remote_options(p)

    p = sub.add_parser("heads", help="list the trained classifier heads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_remote_options(p)

    p = sub.add_parser("delete-head", help="delete a trained classifier head")
    p.add_argument("head_id", metavar="HEAD_ID")
    _add_remote_options(p)


def _add_service_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service (also EMBEDDER_* env vars)")
    g.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, help="port to bind (default 50051; 0 picks a free one, printed on stdout)")
    g.add_argument("--max-delay-ms", type=float,
                   help="how long the batcher waits to fill a batch while more items are on the way (default 5)")
    g.add_argument("--max-batch-pixels", type=int,
                   help="source pixels decoding at once, so bursts of huge images cannot OOM (default 64Mi)")
    g.add_argument("--max-queue", type=int,
                   help="queued items before calls fail with RESOURCE_EXHAUSTED (default 4096)")
    g.add_argument("--max-message-bytes", type=int, help="gRPC message limit, both directions (default 64 MiB)")
    g.add_argument("--max-items", type=int, help="items per request (default 1024)")
    g.add_argument("--role", choices=("all", "embed", "store"),
                   help="all (default); embed: a stateless embedding replica; store: the data dir, with cache misses "
                        "sent to --embed-target")
    g.add_argument("--embed-target", metavar="IP:PORT,...",
                   help="store role: the embedding replicas (round-robin, unhealthy ones skipped)")
    g.add_argument("--max-models", type=int,
                   help="backbones held at once: the default plus versions loaded on first use (default 3)")
    g.add_argument("--data-dir", type=Path, help="store and classifier data (default ./embedder-data)")
    g.add_argument("--cache-max-items", type=int,
                   help="vectors kept in the cache outside any collection, least recently used evicted beyond it "
                        "(default 1,000,000; 0 turns the cache off); also EMBEDDER_CACHE_MAX_ITEMS")
    g.add_argument("--no-keep-images", dest="keep_images", action="store_const", const=False,
                   help="do not keep added images' bytes (then collections cannot be fine-tuned on)")
    g.add_argument("--token",
                   help="require `authorization: Bearer TOKEN` (prefer EMBEDDER_TOKEN: flags show in ps)")
    g.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key the port speaks TLS only")
    g.add_argument("--tls-key", help="PEM private key for --tls-cert")
    g.add_argument("--metrics-port", type=int, help="Prometheus /metrics HTTP port (default 0 = off)")
    g.add_argument("--grace-seconds", type=float, help="time in-flight calls get on SIGTERM (default 10)")


def _serve_config(args: argparse.Namespace) -> Config:
    """Flag > EMBEDDER_* env var > default, for the model and the service fields alike."""
    service = {k: getattr(args, k) for k in (
        "host", "port", "max_delay_ms", "max_batch_pixels", "max_queue", "max_message_bytes", "max_items",
        "max_models", "role", "embed_target", "data_dir", "cache_max_items", "keep_images", "token", "tls_cert",
        "tls_key", "metrics_port", "grace_seconds")}
    # _config() already read every EMBEDDER_* variable; replace() re-runs Config's validation.
    return dataclasses.replace(_config(args), **{k: v for k, v in service.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "models":
            return _models(args)
        if args.command == "demo":
            from .demo import run

            config = _config(args)
            if args.data_dir is not None:
                config = dataclasses.replace(config, data_dir=args.data_dir)
            run(config, train_size=args.train_size, test_size=args.test_size, head=args.head, progress=not args.quiet)
            return 0
        if args.command == "serve":
            return _serve(args)
        if args.command == "bulk-embed":
            return _bulk_embed(args)
        if args.command in REMOTE_COMMANDS:
            return REMOTE_COMMANDS[args.command](args)
        return _embed(args)
    # EmbedderError covers the client's ServiceError (unreachable server, bad token, NOT_FOUND, ...); OSError an
    # output or data path that cannot be written (its message names the path)
    except (EmbedderError, ValueError, OSError) as e:
        print(f"embedder: error: {e}", file=sys.stderr)
        return 2


def _models(args: argparse.Namespace) -> int:
    cpu_runtime = resolve_runtime("auto", "cpu")
    rows = [{"name": s.name, "model_id": s.model_id, "dim": s.dim, "input_size": s.preprocessing.crop,
             "weights": "installed" if s.weights.present() else f"missing: {s.weights.install}",
             "description": s.description} for s in list_backbones()]
    if args.json:
        print(json.dumps({"models": rows, "cpu_runtime": cpu_runtime,
                          "runtimes_installed": [r for r in RUNTIMES if installed(r)]}, indent=2))
        return 0
    print(f"{'name':<20} {'dim':>5} {'input':>5}  {'model id':<44} weights")
    for r in rows:
        print(f"{r['name']:<20} {r['dim']:>5} {r['input_size']:>5}  {r['model_id']:<44} {r['weights']}")
    print(f"\nCPU runtime: {cpu_runtime} (installed: {', '.join(r for r in RUNTIMES if installed(r))})")
    return 0


def collect_images(paths: Sequence[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand folders recursively (image suffixes only, sorted); missing paths are reported, not dropped."""
    files: list[Path] = []
    missing: list[dict[str, str]] = []
    for p in paths:
        if p.is_dir():
            files.extend(image_files(p))
        elif p.is_file():
            files.append(p)
        else:
            missing.append({"path": str(p), "error": "no such file or directory"})
    return files, missing


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    # The one line scripts parse: with --port 0 it is the only way to learn the port.
    return serve(_serve_config(args), on_listening=lambda addr: print(f"listening on {addr}", flush=True))


def _embed_remote(args: argparse.Namespace, files: list[Path]) -> tuple[np.ndarray, list[str | None], dict]:
    """Embed ``files`` on ``--server``; same outputs as the local path (the server's model info)."""
    from tqdm.auto import tqdm

    with _client(args) as client:
        info = {**client.list_models()[0], "server": args.server}
        rows, errors = [], []
        results = client.embed_iter((str(f), f) for f in files)
        bar = tqdm(results, total=len(files), disable=args.quiet, unit="img", desc=f"embedding ({args.server})")
        for r in bar:
            rows.append(r.vector if r.ok else np.zeros(info["dim"], np.float32))
            errors.append(r.error)
    vectors = np.stack(rows) if rows else np.zeros((0, info["dim"]), np.float32)
    return vectors, errors, info


def _embed(args: argparse.Namespace) -> int:
    from .pipeline import Embedder  # imports torch: keep `embedder models --help` fast

    _check_out(args.out)
    files, failed = collect_images(args.paths)
    if not files:
        raise FileNotFoundError(f"no image files found under {', '.join(map(str, args.paths))}")
    if args.server:
        vectors, errors, info = _embed_remote(args, files)
        return _write_embeddings(args, files, failed, BatchResult(vectors, errors), info)
    with Embedder(config=_config(args)) as emb:
        result = emb.embed_batch(files, progress=not args.quiet)
        info = emb.info()
    return _write_embeddings(args, files, failed, result, info)


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot take the vectors before any image is embedded, not after."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name a .npy file, e.g. {out / 'vectors.npy'}")
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: name a .npy file (the paths and failures go beside it as .json)")
    parent = out.parent
    while not parent.exists():  # created on write: the nearest existing ancestor must be a writable folder
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not a writable folder; choose another path")


def _write_embeddings(args: argparse.Namespace, files: list[Path], failed: list[dict[str, str]],
                      result: BatchResult, info: dict) -> int:
    ok = result.ok
    failed += [{"path": str(f), "error": e} for f, e in zip(files, result.errors) if e is not None]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, result.vectors[ok])
    meta = {**info, "count": int(ok.sum()), "paths": [str(f) for f, good in zip(files, ok) if good], "failed": failed}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    for f in failed:
        print(f"skipped {f['path']}: {f['error']}", file=sys.stderr)
    print(f"embedded {int(ok.sum())} images ({len(failed)} skipped) with {info['model_id']} via {info['runtime']} "
          f"-> {args.out} (+ {args.out.with_suffix('.json').name})")
    return 0 if not failed else 1


# ---------------------------------------------------------------------------- store and classifier commands


def _client(args: argparse.Namespace) -> "EmbedderClient":
    """A client for --server (else EMBEDDER_SERVER, else 127.0.0.1:50051) with --token (else EMBEDDER_TOKEN)."""
    from .client import EmbedderClient

    server = args.server or os.environ.get("EMBEDDER_SERVER") or DEFAULT_SERVER
    token = args.token if args.token is not None else Config.from_env().token
    return EmbedderClient(server, token=token or None, timeout=args.timeout, tls_ca=args.tls_ca,
                          model=getattr(args, "model", None))


def _report(failed: list[dict[str, str]]) -> None:
    for f in failed:
        print(f"skipped {f['path']}: {f['error']}", file=sys.stderr)


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
            label = f.absolute().parent.name if args.label_from_folder else args.label
            entries.append((f, item_id, label))
    seen: dict[str, Path] = {}
    for f, item_id, _ in entries:
        if item_id in seen:
            raise ValueError(f"{seen[item_id]} and {f} would both be stored as id {item_id!r}; pass --id-from path, "
                             "or add them to different collections")
        seen[item_id] = f
    return entries, missing


def _add(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.from_parquet is not None:
        if args.paths:
            raise ValueError("give image paths or --from-parquet DIR, not both")
        if args.model is not None:
            raise ValueError("--model goes with image paths; the shards of --from-parquet already hold the vectors "
                             "of the model bulk-embed ran (choose it there: `embedder bulk-embed --model NAME`)")
        return _import_parquet(args)
    if args.data_dir is not None:
        raise ValueError("--data-dir goes with --from-parquet; a server's add writes to the server's own data dir")
    if args.label_from_shards:
        raise ValueError("--label-from-shards goes with --from-parquet; for image paths use --label-from-folder or "
                         "--label LABEL")
    if not args.paths:
        raise ValueError("nothing to add: give image files or folders, or --from-parquet DIR (bulk-embed output)")
    entries, failed = _files_to_add(args)
    if not entries:
        raise FileNotFoundError(f"no image files found under {', '.join(map(str, args.paths))}")
    added = replaced = cached = 0
    with _client(args) as client:
        bar = tqdm(total=len(entries), disable=args.quiet, unit="img", desc=f"adding ({client.target})")
        for start in range(0, len(entries), CHUNK):
            chunk = entries[start:start + CHUNK]
            # paths, not bytes: the client reads each chunk's files when it sends them
            summary = client.add(args.collection, [f for f, _, _ in chunk], [i for _, i, _ in chunk],
                                 labels=[label for _, _, label in chunk], index=args.index, errors="return")
            added, replaced, cached = added + summary.added, replaced + summary.replaced, cached + summary.cached
            failed += [{"path": str(chunk[i][0]), "error": e} for i, e in summary.failed.items()]
            bar.update(len(chunk))
        bar.close()
    _report(failed)
    print(f"added {added}, replaced {replaced}, {cached} from cache, {len(failed)} failed "
          f"-> collection {args.collection}")
    return 0 if not failed else 1


def _search(args: argparse.Namespace) -> int:
    if args.image is not None and not args.image.is_file():
        raise FileNotFoundError(f"no such file: {args.image}")
    with _client(args) as client:
        hits = client.search(args.image, collection=args.collection, item_id=args.id, k=args.k, label=args.label)
    if args.json:
        print(json.dumps([dataclasses.asdict(h) for h in hits], indent=2))
        return 0
    if not hits:
        print(f"no matching items in collection {args.collection}")
        return 0
    width = max(2, *(len(h.id) for h in hits))
    print(f"{'rank':>4} {'score':>7}  {'id':<{width}}  label")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:>4} {h.score:>7.4f}  {h.id:<{width}}  {h.label if h.label is not None else '-'}")
    return 0


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
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
        print(f"not found in collection {args.collection}: {item_id}", file=sys.stderr)
    return 0 if not missing else 1


def _delete(args: argparse.Namespace) -> int:
    if args.all == bool(args.ids):
        raise ValueError("pass the ids to delete, or --all to delete the whole collection (not both)")
    with _client(args) as client:
        if args.all:
            count = client.delete_collection(args.collection)
            print(f"deleted collection {args.collection} ({count} items)")
            return 0
        result = client.delete(args.collection, args.ids)
    print(f"deleted {result.deleted} of {len(args.ids)} items from collection {args.collection}")
    if result.missing:  # deleting what is not there is a no-op, not an error
        print(f"not found (nothing deleted): {', '.join(result.missing)}")
    return 0


def _labels(args: argparse.Namespace) -> int:
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
    with _client(args) as client:
        updated = client.set_labels(args.collection, changes)
    cleared = len(args.clear)
    print(f"updated {updated} items in collection {args.collection} "
          f"({len(changes) - cleared} labelled, {cleared} cleared)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
    if args.json:
        print(json.dumps({**stats, "collections": [dataclasses.asdict(c) for c in stats["collections"]]}, indent=2))
        return 0
    cols = stats["collections"]
    if cols:
        name_w = max(10, *(len(c.name) for c in cols))
        model_w = max(5, *(len(c.model_id) for c in cols))
        index_w = max(5, *(len(c.index) for c in cols))
        print(f"{'collection':<{name_w}} {'items':>7}  {'model':<{model_w}}  {'index':<{index_w}}  labels")
        for c in cols:
            labels = ", ".join(f"{k} {v}" for k, v in sorted(c.labels.items()))
            if c.unlabeled:
                labels += f"{', ' if labels else ''}unlabeled {c.unlabeled}"
            print(f"{c.name:<{name_w}} {c.count:>7}  {c.model_id:<{model_w}}  {c.index:<{index_w}}  {labels or '-'}")
        print()
    else:
        print("no collections\n")
    print(f"items: {stats['items']} in {len(cols)} collection{'' if len(cols) == 1 else 's'}; "
          f"cache: {stats['cache_items']} / {stats['cache_max_items']} vectors; heads: {stats['heads']}; "
          f"disk: {stats['disk_bytes'] / 1e6:.1f} MB")
    return 0


def _train(args: argparse.Namespace) -> int:
    with _client(args) as client:
        r = client.train(args.collection, args.head, labels=args.labels, params=dict(args.param),
                         test_size=args.test_size, seed=args.seed, head_id=args.head_id, adapt_to=args.adapt_to,
                         adapt_method=args.adapt_method)
    metrics = r["metrics"] or {}
    if args.plot is not None:
        if "confusion" not in metrics:
            raise ValueError(f"no confusion matrix to plot: {metrics.get('reason', 'the head has no hold-out metrics')}")
        from classifier import plot_confusion

        plot_confusion(metrics["confusion"], metrics["classes"], args.plot,
                       title=f"{r['head_id']}: hold-out accuracy {metrics['accuracy']:.1%}")
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"trained {r['kind']} head {r['head_id']} on {r['samples']} samples ({len(r['classes'])} classes) "
          f"from collection {args.collection} in {r['total_seconds']:.2f} s")
    if args.plot is not None:
        print(f"confusion matrix -> {args.plot}")
    if r["adaptation"]:
        a = r["adaptation"]
        print(f"adapted to collection {a['adapt_to']} ({a['n_target']} images) by {a['method']}")
    if "accuracy" not in metrics:
        print(metrics.get("reason") or "no hold-out metrics")
        return 0
    what = "hold-out" if metrics.get("method") == "holdout" else metrics.get("method", "hold-out")
    print(f"{what}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"on {metrics.get('n_evaluated', '?')} samples")
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = max(5, *(len(c) for c in per_class))
        print(f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
        for c, m in per_class.items():
            print(f"{c:<{width}} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} {m['support']:>8}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        points = client.learning_curve(args.collection, args.head, labels=args.labels, per_class=args.per_class,
                                       repeats=args.repeats)
    if args.plot is not None:
        from classifier import plot_learning_curve

        plot_learning_curve(points, args.plot, title=f"{args.collection}: {args.head} head")
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in points], indent=2))
        return 0
    print(f"{'per class':>9} {'train':>7} {'accuracy':>9} {'95% CI':>15} {'fit s':>7}")
    for p in points:
        print(f"{p.per_class:>9} {p.n_train:>7} {p.accuracy_mean:>9.4f} {p.ci_low:>7.4f}-{p.ci_high:<7.4f} "
              f"{p.fit_seconds:>7.3f}")
    if args.plot is not None:
        print(f"curve -> {args.plot}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.finetune(args.collection, args.suffix, unfreeze=args.unfreeze, epochs=args.epochs,
                              labels=args.labels, params=dict(args.param),
                              method="adabn" if args.adabn else "finetune")
        parent = job["params"]["parent"].split(":")[0]
        print(f"job {job['job_id']}: fine-tuning collection {args.collection} -> {parent}.{args.suffix} "
              f"({job['params']['images']} images)")
        if not args.wait:
            return 0
        shown: set[int] = set()

        def progress(j: dict) -> None:
            p = j["progress"]
            if p.get("epoch") and p["epoch"] not in shown:
                shown.add(p["epoch"])
                print(f"  epoch {p['epoch']}/{p['epochs']}: loss {p['train_loss']:.4f}, hold-out accuracy "
                      f"{p['val_accuracy']:.4f} ({p['seconds']:.1f} s)", flush=True)

        job = client.wait_job(job["job_id"], on_progress=progress)
    return _print_job(job)


def _job(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.job_id) if args.cancel else client.get_job(args.job_id)
    return _print_job(job)


def _print_job(job: dict) -> int:
    print(f"job {job['job_id']}: {job['state']}" + (f" ({job['error']})" if job["error"] else ""))
    r = job["result"]
    if r:
        how = (f"hold-out accuracy {r['val_accuracy']:.4f} at epoch {r['best_epoch']}; {r['trunk_passes']} trunk "
               "passes" if "val_accuracy" in r else f"BatchNorm statistics of {r['images']} images")
        print(f"new backbone {r['name']} ({r['model_id']}), {how}; embed with it: {r['use']}")
    return 0 if job["state"] in ("finished", "queued", "running") else 1


def _predict(args: argparse.Namespace) -> int:
    if args.ids and not args.collection:
        raise ValueError("--ids needs --collection, the collection that holds them")
    if args.collection and not args.ids:
        raise ValueError("--collection is for --ids; pass the stored ids to predict")
    files, failed = collect_images(args.images)
    if args.images and not files and not args.ids:
        raise FileNotFoundError(f"no image files found under {', '.join(map(str, args.images))}")
    if not files and not args.ids:
        raise ValueError("nothing to predict; pass image files or folders, or --collection X --ids ID ...")
    rows: list[tuple[str, Any]] = []
    with _client(args) as client:
        for start in range(0, len(files), CHUNK):
            chunk = files[start:start + CHUNK]
            rows += zip(map(str, chunk), client.predict(args.head, chunk, top_k=args.top_k))
        if args.ids:
            rows += zip(args.ids, client.predict(args.head, ids=args.ids, collection=args.collection,
                                                 top_k=args.top_k))
    if args.json:  # missing paths too, so every input is in the output
        print(json.dumps([{"input": name, "labels": p.labels, "probabilities": p.probabilities, "error": p.error}
                          for name, p in rows] + [{"input": f["path"], "labels": [], "probabilities": [],
                                                   "error": f["error"]} for f in failed], indent=2))
    else:
        for name, p in rows:
            if p.error is None:
                print(f"{name}  " + "  ".join(f"{label} {prob:.4f}" for label, prob in zip(p.labels, p.probabilities)))
    failed += [{"path": name, "error": p.error} for name, p in rows if p.error is not None]
    _report(failed)
    return 0 if not failed else 1


def _heads(args: argparse.Namespace) -> int:
    with _client(args) as client:
        heads = client.list_heads()
    if args.json:
        print(json.dumps(heads, indent=2))
        return 0
    if not heads:
        print("no heads")
        return 0
    width = max(7, *(len(h["head_id"]) for h in heads))
    print(f"{'head id':<{width}}  {'kind':<10} {'classes':>7} {'accuracy':>8}  {'created':<25}  collection")
    for h in heads:
        accuracy = (h["metrics"] or {}).get("accuracy")
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        print(f"{h['head_id']:<{width}}  {h['kind']:<10} {len(h['classes']):>7} {shown:>8}  {h['created']:<25}  "
              f"{h['collection'] or '-'}")
    return 0


def _delete_head(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_head(args.head_id)
    print(f"deleted head {args.head_id}")
    return 0


REMOTE_COMMANDS = {"add": _add, "search": _search, "get": _get, "delete": _delete, "labels": _labels,
                   "stats": _stats, "train": _train, "predict": _predict, "heads": _heads, "delete-head": _delete_head,
                   "finetune": _finetune, "job": _job, "evaluate": _evaluate}


if __name__ == "__main__":  # `python -m embedder.cli ...`, e.g. to run the service under a supervisor
    sys.exit(main())
