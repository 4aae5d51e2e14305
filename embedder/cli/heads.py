"""Classifier-head commands on a running `embedder serve`: ``train``, ``predict``, ``evaluate``, ``heads``,
``delete-head``. Only the client is imported: no torch, no scikit-learn here; ``--plot`` also needs matplotlib and
the classifier package (the server extra), checked before the server is asked to work.

Examples::

    embedder train --collection pets --head logreg --param C=0.5 --head-id pets
    embedder train --collection pets --plot confusion.png --json
    embedder predict --head pets new/ one.jpg --top-k 3
    embedder predict --head pets --collection pets --ids cat/tom.jpg
    embedder evaluate --collection pets --curve --plot curve.png   # would labelling more pay off?
    embedder heads
    embedder delete-head pets
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from .options import (CHUNK, HEAD_KINDS, add_remote_options, add_where_option, client_from, collect_images,
                      fraction, no_images, param, params, positive_int, printable, report)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier head on the labelled items of a collection")
    p.add_argument("--collection", required=True)
    p.add_argument("--head", default="logreg", choices=(*HEAD_KINDS, "zero_shot", "few_shot"),
                   help="kind (default %(default)s); zero_shot and few_shot need --prompt and a text-image model")
    p.add_argument("--prompt", type=label_prompt, action="append", default=[], metavar="LABEL=TEXT",
                   help="zero_shot / few_shot: a text describing LABEL, repeatable ({label} is replaced), e.g. "
                        "--prompt 'cat=a photo of a {label}'")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="train on these labels only (default: all)")
    p.add_argument("--param", type=param, action="append", default=[], metavar="NAME=VALUE",
                   help="head parameter, repeatable; values are JSON when they parse (C=0.1), else strings")
    p.add_argument("--test-size", type=fraction, default=0.2,
                   help="hold-out fraction for the metrics (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-id", metavar="NAME", help="name of the head (replaces one of that name); default: generated")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the hold-out confusion matrix to this PNG")
    p.add_argument("--adapt-to", metavar="COLLECTION",
                   help="adapt to the domain of this collection's (unlabelled) images, e.g. another camera")
    p.add_argument("--adapt-method", choices=("coral", "standardize"), help="how to adapt (default coral)")
    add_where_option(p, "labelled items")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p)
    p.set_defaults(handler=train)

    p = sub.add_parser("predict", help="top labels of images, or of stored items, from a trained head")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files or folders (recursively)")
    p.add_argument("--head", required=True, metavar="HEAD_ID")
    p.add_argument("--collection", help="collection of --ids")
    p.add_argument("--ids", nargs="+", default=[], metavar="ID", help="stored items to predict")
    p.add_argument("--top-k", type=positive_int, default=3, help="labels per input (default %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p)
    p.set_defaults(handler=predict)

    p = sub.add_parser("evaluate", help="learning curve: would labelling more pay off? (accuracy vs labels per class)")
    p.add_argument("--collection", required=True)
    p.add_argument("--curve", action="store_true", required=True, help="accuracy at growing labels per class")
    p.add_argument("--head", default="logreg", choices=HEAD_KINDS, help="kind (default %(default)s)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="only these labels (default: all)")
    p.add_argument("--per-class", nargs="+", type=int, metavar="N", help="sizes (default 2 5 10 20 50 ...)")
    p.add_argument("--repeats", type=positive_int, default=5, help="random draws per size (default %(default)s)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the curve with its 95%% band to this PNG")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p)
    p.set_defaults(handler=evaluate)

    p = sub.add_parser("heads", help="list the trained classifier heads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_remote_options(p)
    p.set_defaults(handler=heads)

    p = sub.add_parser("delete-head", help="delete a trained classifier head")
    p.add_argument("head_id", metavar="HEAD_ID")
    add_remote_options(p)
    p.set_defaults(handler=delete_head)


def _plotting(name: str) -> Any:
    """The plot function ``name`` of the classifier package, imported before any RPC: on a client-only install
    the ModuleNotFoundError (scikit-learn, matplotlib: the server extra) then comes before the server does work."""
    import matplotlib  # noqa: F401 - imported only inside the plot functions, so checked here

    import classifier

    return getattr(classifier, name)


def label_prompt(text: str) -> tuple[str, str]:
    """An argparse type: ``LABEL=TEXT``."""
    label, sep, prompt = text.partition("=")
    if not sep or not label or not prompt:
        raise argparse.ArgumentTypeError(f"expected LABEL=TEXT, e.g. 'cat=a photo of a {{label}}', got {text!r}")
    return label, prompt


def _prompts(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    prompts: dict[str, list[str]] = {}
    for label, prompt in pairs:
        prompts.setdefault(label, []).append(prompt)
    return prompts


def train(args: argparse.Namespace) -> int:
    """Train on the server; print the hold-out metrics per class (or JSON), optionally plot the confusion."""
    plot_confusion = _plotting("plot_confusion") if args.plot is not None else None
    with client_from(args) as client:
        r = client.train(args.collection, args.head, labels=args.labels, params=params(args.param),
                         test_size=args.test_size, seed=args.seed, head_id=args.head_id, adapt_to=args.adapt_to,
                         adapt_method=args.adapt_method, where=args.where, class_prompts=_prompts(args.prompt))
    metrics = r["metrics"] or {}
    if args.plot is not None:
        if "confusion" not in metrics:
            why = metrics.get("reason", "the head has no hold-out metrics")
            raise ValueError(f"no confusion matrix to plot: {why}")
        plot_confusion(metrics["confusion"], metrics["classes"], args.plot,
                       title=f"{r['head_id']}: hold-out accuracy {metrics['accuracy']:.1%}")
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"trained {printable(r['kind'])} head {printable(r['head_id'])} on {r['samples']} samples "
          f"({len(r['classes'])} classes) from collection {printable(args.collection)} in {r['total_seconds']:.2f} s")
    if args.plot is not None:
        print(f"confusion matrix -> {args.plot}")
    if r["adaptation"]:
        a = r["adaptation"]
        print(f"adapted to collection {printable(a['adapt_to'])} ({a['n_target']} images) by "
              f"{printable(a['method'])}")
    if "accuracy" not in metrics:
        print(printable(metrics.get("reason") or "no hold-out metrics"))
        return 0
    what = "hold-out" if metrics.get("method") == "holdout" else metrics.get("method", "hold-out")
    print(f"{what}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"on {metrics.get('n_evaluated', '?')} samples")
    per_class = metrics.get("per_class") or {}
    if per_class:
        names = {c: printable(c) for c in per_class}
        width = max(5, *map(len, names.values()))
        print(f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
        for c, m in per_class.items():
            print(f"{names[c]:<{width}} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} {m['support']:>8}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """The learning curve as a table (or JSON), optionally plotted."""
    plot_learning_curve = _plotting("plot_learning_curve") if args.plot is not None else None
    with client_from(args) as client:
        points = client.learning_curve(args.collection, args.head, labels=args.labels, per_class=args.per_class,
                                       repeats=args.repeats)
    if plot_learning_curve is not None:
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


def predict(args: argparse.Namespace) -> int:
    """Top labels per image file and per stored id; 1 if any input failed (listed on stderr)."""
    if args.ids and not args.collection:
        raise ValueError("--ids needs --collection, the collection that holds them")
    if args.collection and not args.ids:
        raise ValueError("--collection is for --ids; pass the stored ids to predict")
    files, failed = collect_images(args.images)
    if args.images and not files and not args.ids:
        raise no_images(args.images, failed)
    if not files and not args.ids:
        raise ValueError("nothing to predict; pass image files or folders, or --collection X --ids ID ...")
    rows: list[tuple[str, Any]] = []
    with client_from(args) as client:
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
                print(f"{printable(name)}  " + "  ".join(f"{printable(label)} {prob:.4f}"
                                                         for label, prob in zip(p.labels, p.probabilities)))
    failed += [{"path": name, "error": p.error} for name, p in rows if p.error is not None]
    report(failed)
    return 0 if not failed else 1


def heads(args: argparse.Namespace) -> int:
    """The trained heads as a table (or JSON)."""
    with client_from(args) as client:
        listed = client.list_heads()
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    if not listed:
        print("no heads")
        return 0
    ids = [printable(h["head_id"]) for h in listed]
    width = max(7, *map(len, ids))
    print(f"{'head id':<{width}}  {'kind':<10} {'classes':>7} {'accuracy':>8}  {'created':<25}  collection")
    for head_id, h in zip(ids, listed):
        accuracy = (h["metrics"] or {}).get("accuracy")
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        print(f"{head_id:<{width}}  {printable(h['kind']):<10} {len(h['classes']):>7} {shown:>8}  "
              f"{printable(h['created']):<25}  {printable(h['collection'] or '-')}")
    return 0


def delete_head(args: argparse.Namespace) -> int:
    """Delete one head; an unknown id is NOT_FOUND."""
    with client_from(args) as client:
        client.delete_head(args.head_id)
    print(f"deleted head {printable(args.head_id)}")
    return 0
