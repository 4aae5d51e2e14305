"""embedder: image embeddings, a vector store, search and classifier heads, from the command line.

Examples:
    embedder models
    embedder demo
    embedder embed photos/ extra.jpg --out vectors.npy
    EMBEDDER_TOKEN=s3cret embedder serve --port 50051 --metrics-port 9100
    EMBEDDER_TOKEN=s3cret embedder embed photos/ --out vectors.npy --server 127.0.0.1:50051

Store and classifier commands (on a running `embedder serve`: --server, else EMBEDDER_SERVER, else 127.0.0.1:50051;
token from --token or EMBEDDER_TOKEN):
    embedder add pets/ --collection pets --label-from-folder
    embedder search query.jpg --collection pets -k 5
    embedder train --collection pets --head logreg --param C=0.5 --head-id pets
    embedder predict --head pets new/ one.jpg --top-k 3
    embedder finetune --collection pets --suffix pets
    embedder suggest --collection pets -n 20          # which images to label next
    embedder label-issues --collection pets           # which labels look wrong

API keys (in the data dir; a running server sees changes at once) and the cache:
    embedder keys add ci-bot --role write --collection pets      # prints the key once
    embedder keys list ; embedder keys revoke KEY_ID
    embedder forget SHA256 [SHA256 ...]                          # cached vectors of those images

Bulk jobs on Ray Data (`pip install 'embedder[scale]'`), then an import into a local data dir (no backbone pass):
    embedder bulk-embed photos/ --out vectors/ [--ray-address ray://head:10001]
    embedder add --from-parquet vectors/ --collection pets --label-from-folder --data-dir embedder-data

Exit codes: 0 done; 1 done, but some inputs failed (each named on stderr); 2 the command was wrong (bad
arguments, unknown collection or head, missing path, bad token); 3 the server is unavailable, overloaded or
too slow: retry later; 4 an internal error or data loss. See `embedder COMMAND --help` for each command.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Sequence

from .. import __version__
from ..errors import TABLE, Category, EmbedderError, category_of
from . import active, backup, bulk, collections, demo, embed, heads, jobs, keys, models, serve
from .options import config_from, printable

# One module per command group, each owning its parsers and handlers; in `embedder --help` order.
COMMAND_GROUPS = (models, demo, embed, serve, bulk, collections, heads, active, jobs, backup, keys)

# The top-level modules of the `server` extra (pyproject.toml): a command that imports one of them on a client-only
# install is told to install the extra, not shown a traceback.
SERVER_EXTRA_MODULES = frozenset({
    "torch", "torchvision", "PIL", "faiss", "sklearn", "scipy", "tqdm", "skimage", "onnx", "onnxruntime",
    "grpc_health", "grpc_reflection", "prometheus_client", "fastapi", "pydantic", "uvicorn", "httptools", "uvloop",
    "multipart", "python_multipart", "safetensors", "matplotlib"})

# The names tests/test_service.py imports from here (before cli/ became a package).
_config = config_from
_serve_config = serve.serve_config


def build_parser() -> argparse.ArgumentParser:
    """The ``embedder`` parser: every group's commands under one set of subcommands."""
    parser = argparse.ArgumentParser(prog="embedder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def error_category(error: Exception) -> Category:
    """The row of :data:`embedder.errors.TABLE` a failed command answers with."""
    # An OSError that is not one of ours is about a path the caller named (a missing folder, an unwritable
    # --out): theirs to fix, where category_of, which sees no path, would call it an internal fault.
    if isinstance(error, OSError) and not isinstance(error, EmbedderError):
        return Category.NOT_FOUND if isinstance(error, FileNotFoundError) else Category.FAILED_PRECONDITION
    return category_of(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except BrokenPipeError:  # `embedder get ... | head` closed our stdout: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 0
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVER_EXTRA_MODULES:
            return _failed(e)
        print("embedder: error: this command needs the server extra: pip install 'embedder[server]' (or pass "
              f"--server where the command has it); {e.name} is not installed", file=sys.stderr)
        return TABLE[Category.FAILED_PRECONDITION].exit_code
    except Exception as e:  # noqa: BLE001 - every failure is answered by its category, none by a bare traceback
        return _failed(e)


def _failed(e: Exception) -> int:
    """Report a failed command on stderr; the exit code of its category."""
    category = error_category(e)
    if category is Category.INTERNAL and not isinstance(e, EmbedderError):
        traceback.print_exc()  # a bug, not a failure we know: show where for the report (called in `except`)
    print(f"embedder: error: {printable(e, newlines=True)}", file=sys.stderr)
    return TABLE[category].exit_code
