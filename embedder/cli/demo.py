"""``embedder demo``: the main job through the service (add labelled images, train a head, predict, search).

Examples::

    embedder demo
    embedder demo --train-size 500 --test-size 100 --head linear_svm --data-dir /tmp/demo
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import Config
from .options import HEAD_KINDS, add_model_options, config_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job through the service: add labelled images, train a head, "
                                    "predict held-out images, search")
    p.add_argument("--data-dir", type=Path, help=f"where the collection, cache and head are kept (default "
                                                  f"./{Config.data_dir}; a second run is served from its cache)")
    p.add_argument("--train-size", type=int, default=5000, help="labelled images to add (default %(default)s)")
    p.add_argument("--test-size", type=int, default=1000, help="held-out images to predict (default %(default)s)")
    p.add_argument("--head", choices=HEAD_KINDS, default="logreg", help="head type")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run :func:`embedder.demo.run` with the model flags; it prints its own figures."""
    from ..demo import run as run_demo  # starts a server in process: the whole stack

    config = config_from(args)
    if args.data_dir is not None:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    run_demo(config, train_size=args.train_size, test_size=args.test_size, head=args.head, progress=not args.quiet)
    return 0
