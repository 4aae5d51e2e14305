"""Labelling commands on a running `embedder serve`: ``suggest`` (which items to label next) and ``label-issues``
(which labels look wrong). Only the client is imported; the server reads its stored vectors, no backbone pass.

Examples::

    embedder suggest --collection pets -n 20                    # hybrid: uncertain and diverse
    embedder suggest --collection pets -n 50 --strategy representative --json
    embedder label-issues --collection pets --limit 30
"""
from __future__ import annotations

import argparse
import json

from .options import add_remote_options, add_where_option, client_from, positive_int, printable

STRATEGIES = ("auto", "hybrid", "margin", "entropy", "diversity", "representative")  # classifier.active's


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suggest", help="which unlabelled items of a collection to label next, and why")
    p.add_argument("--collection", required=True)
    p.add_argument("-n", type=positive_int, default=20, help="how many (default %(default)s, at most 1000)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="auto (default): hybrid once a head can be trained on the labels, representative before")
    p.add_argument("--head-id", help="score uncertainty with this trained head (default: one trained on the fly)")
    p.add_argument("--ids", nargs="+", metavar="ID", help="only these items (default: every unlabelled item)")
    add_where_option(p, "unlabelled items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p)
    p.set_defaults(handler=suggest)

    p = sub.add_parser("label-issues", help="labelled items whose label looks wrong, and duplicates with two labels")
    p.add_argument("--collection", required=True)
    p.add_argument("--limit", type=positive_int, default=100, help="most issues of each kind (default %(default)s)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="only these labels (default: all)")
    p.add_argument("--folds", type=positive_int, default=5, help="out-of-fold folds (default %(default)s)")
    p.add_argument("--near-duplicate", type=float, default=0.0, metavar="COSINE",
                   help="cosine at or above which two items are near-identical (default 0.995)")
    add_where_option(p, "labelled items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p)
    p.set_defaults(handler=label_issues)


def suggest(args: argparse.Namespace) -> int:
    """The suggestions as a table (or JSON), best first."""
    with client_from(args) as client:
        result = client.suggest(args.collection, args.n, strategy=args.strategy, head_id=args.head_id, ids=args.ids,
                                seed=args.seed, where=args.where)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['strategy']}: {len(result['suggestions'])} of {result['candidates']} unlabelled items "
          f"({result['labelled']} labelled)")
    for s in result["suggestions"]:
        print(f"{printable(s['id'])}\t{s['score']:.4f}\t{printable(s['reason'])}")
    return 0


def label_issues(args: argparse.Namespace) -> int:
    """The likely wrong labels, then the duplicates, as tables (or JSON)."""
    with client_from(args) as client:
        result = client.label_issues(args.collection, limit=args.limit, labels=args.labels, folds=args.folds,
                                     near_duplicate=args.near_duplicate, seed=args.seed, where=args.where)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"checked {result['checked']} labelled items ({result['folds']} folds); estimated noise rate "
          f"{result['noise_rate']:.1%}; {len(result['issues'])} likely wrong, {len(result['duplicates'])} in "
          "duplicates with another label")
    for i in result["issues"] + result["duplicates"]:
        other = f"\tsame as {printable(i['other'])}" if i["other"] else ""
        print(f"{printable(i['id'])}\t{printable(i['label'])} -> {printable(i['suggested'])}\t{i['score']:.4f}\t"
              f"{i['kind']}{other}")
    return 0
