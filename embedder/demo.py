"""The main job, end to end through the service (``embedder demo``, the README's first command).

Starts the gRPC service on a free loopback port, adds a labelled image set (Fashion-MNIST when the Debian
package is installed, else scikit-learn's digits) to a collection, trains a classifier head on the stored
vectors, reports its hold-out metrics, predicts held-out images, runs a similarity search, runs one round of
active learning (suggest 20 images to label, label them from the truth, retrain), and stops the service
cleanly. Everything goes over gRPC with :class:`embedder.client.EmbedderClient`, as another service would.
The data dir persists: a second run finds every image in the cache and runs no backbone pass.

This module is the CLI's job: it prints its report to stdout.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from tqdm.auto import tqdm

from .client import EmbedderClient
from .config import Config
from .datasets import LabelledImages, demo_sets
from .server import EmbedderServer

log = logging.getLogger(__name__)

CHUNK = 256  # images per Add call
ACTIVE_START_PER_CLASS = 2  # labels per class the active-learning round starts from (a logreg head needs 2)
ACTIVE_ROUND = 20  # images the round suggests and "labels"


def run(config: Config, *, train_size: int = 5000, test_size: int = 1000, head: str = "logreg",
        progress: bool = True) -> dict[str, Any]:
    """Run the main job; returns its figures (also printed)."""
    if train_size < 1 or test_size < 1:
        raise ValueError(f"the demo needs at least 1 training and 1 held-out image, got train_size={train_size}, "
                         f"test_size={test_size}")
    train, test = demo_sets(train_size, test_size)
    collection, head_id = train.name, f"{train.name}-{head}"
    config = dataclasses.replace(config, host="127.0.0.1", port=0)  # a free loopback port: never clashes
    server = EmbedderServer(config)
    server.start()
    try:
        server.load()
        with EmbedderClient(server.address, token=config.token or None, timeout=120) as client:
            return _job(client, server, train, test, collection, head_id, head, progress)
    finally:
        server.stop()
        print("\nservice stopped cleanly; data kept in", config.data_dir)


def _job(client: EmbedderClient, server: EmbedderServer, train: LabelledImages, test: LabelledImages,
         collection: str, head_id: str, head: str, progress: bool) -> dict[str, Any]:
    info = client.list_models()[0]
    print(f"service on {server.address}: {info['name']} ({info['dim']}-d, model id {info['model_id']}) "
          f"on {info['device']} via {info['runtime']}")
    print(f"dataset: {train.name}, {len(train)} labelled training images, {len(test)} held out\n")

    # 1. add the labelled images (cache hits on a second run)
    started = time.perf_counter()
    added = replaced = cached = 0
    with tqdm(total=len(train), unit="img", desc=f"adding to '{collection}'", disable=not progress) as bar:
        for start in range(0, len(train), CHUNK):
            idx = range(start, min(start + CHUNK, len(train)))
            summary = client.add(collection, [train.png(i) for i in idx], [f"train-{i}" for i in idx],
                                 labels=[train.labels[i] for i in idx])
            added, replaced, cached = added + summary.added, replaced + summary.replaced, cached + summary.cached
            bar.update(len(idx))
    add_seconds = time.perf_counter() - started
    source = (f"{cached} came from the cache (no backbone pass), {len(train) - cached} embedded" if cached
              else f"all {len(train)} embedded (a second run takes them from the cache)")
    print(f"added {added} new, replaced {replaced}; {source} in {add_seconds:.1f} s "
          f"({len(train) / add_seconds:.0f} img/s)")

    # 2. train a head on the stored vectors: no image is embedded again
    result = client.train(collection, head, head_id=head_id)
    metrics = result["metrics"] or {}
    print(f"\ntrained {head} head '{result['head_id']}' on {result['samples']} vectors: fit {result['train_seconds']:.2f} s, "
          f"with hold-out evaluation {result['total_seconds']:.2f} s")
    if "accuracy" in metrics:
        print(f"hold-out ({metrics['n_evaluated']} images): accuracy {metrics['accuracy']:.1%}, "
              f"macro-F1 {metrics['macro_f1']:.3f}")
        print(f"  {'class':<14} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
        for name, r in metrics["per_class"].items():
            print(f"  {name:<14} {r['precision']:>9.3f} {r['recall']:>7.3f} {r['f1']:>6.3f} {r['support']:>8}")
    else:
        print(f"no hold-out metrics: {metrics.get('reason', 'not enough data')}")

    # 3. predict held-out images the head has never seen
    started = time.perf_counter()
    predictions = client.predict(head_id, [test.png(i) for i in range(len(test))], top_k=2)
    predict_seconds = time.perf_counter() - started
    correct = sum(p.label == y for p, y in zip(predictions, test.labels))
    print(f"\npredicted {len(test)} held-out images in {predict_seconds:.1f} s: {correct / len(test):.1%} correct")
    print(f"  {'image':<10} {'true':<14} {'predicted':<14} {'p':>5}   runner-up")
    for i, p in enumerate(predictions[:8]):
        mark = " " if p.label == test.labels[i] else "x"
        print(f"{mark} test-{i:<5} {test.labels[i]:<14} {p.label:<14} {p.probabilities[0]:>5.2f}   "
              f"{p.labels[1]} {p.probabilities[1]:.2f}")

    # 4. similarity search with a held-out image (its vector is cached since Predict)
    hits = client.search(test.png(0), collection=collection, k=5)
    print(f"\nnearest stored images to test-0 (label {test.labels[0]}):")
    for rank, h in enumerate(hits, 1):
        print(f"  {rank}. {h.id:<12} {h.label:<14} cosine {h.score:.3f}")
    same = sum(h.label == test.labels[0] for h in hits)
    print(f"  {same} of {len(hits)} share its label")

    # 5. an active-learning round on the stored vectors: which 20 images to label next
    active = _active_round(client, train, test, collection)

    stats = client.stats()
    print(f"\nstore: {stats['items']} items in {len(stats['collections'])} collection(s), "
          f"{stats['cache_items']} more vectors cached, {stats['heads']} head(s), {stats['disk_bytes'] / 1e6:.1f} MB")
    return {"dataset": train.name, "train": len(train), "test": len(test), "added": added, "replaced": replaced,
            "cached": cached, "add_seconds": add_seconds, "head_id": head_id, "train_seconds": result["train_seconds"],
            "holdout_accuracy": metrics.get("accuracy"), "test_accuracy": correct / len(test),
            "search_same_label": same, **active}


def _active_round(client: EmbedderClient, train: LabelledImages, test: LabelledImages,
                  collection: str) -> dict[str, Any]:
    """From a few labels per class, suggest ACTIVE_ROUND images, "label" them from the truth, retrain: held-out
    accuracy before and after. The images come from the cache: no backbone pass."""
    pool = f"{collection}-active"
    start = _first_per_class(train.labels, ACTIVE_START_PER_CLASS)
    if len({train.labels[i] for i in start}) < 2 or len(train) <= len(start):
        print("\nactive-learning round skipped: it needs two classes of two images and more images to suggest")
        return {}
    if pool in {c.name for c in client.stats()["collections"]}:
        client.delete_collection(pool)  # a rerun starts from the same few labels
    for begin in range(0, len(train), CHUNK):
        idx = range(begin, min(begin + CHUNK, len(train)))
        client.add(pool, [train.png(i) for i in idx], [f"train-{i}" for i in idx],
                   labels=[train.labels[i] if i in start else None for i in idx])
    before = _pool_accuracy(client, pool, test)
    picked = client.suggest(pool, ACTIVE_ROUND)
    client.set_labels(pool, {s["id"]: train.labels[int(s["id"].split("-")[1])] for s in picked["suggestions"]})
    after = _pool_accuracy(client, pool, test)
    print(f"\nactive learning in '{pool}': from {len(start)} labels, suggest ({picked['strategy']}) labelled "
          f"{len(picked['suggestions'])} more; held-out accuracy {before:.1%} -> {after:.1%}")
    for s in picked["suggestions"][:3]:
        print(f"  {s['id']:<12} {s['reason']}")
    return {"active_start_labels": len(start), "active_labelled": len(picked["suggestions"]),
            "active_accuracy_before": before, "active_accuracy_after": after}


def _first_per_class(labels: list[str], per_class: int) -> set[int]:
    """The first ``per_class`` indices of every class that has that many."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    return {i for idx in by_class.values() if len(idx) >= per_class for i in idx[:per_class]}


def _pool_accuracy(client: EmbedderClient, pool: str, test: LabelledImages) -> float:
    """Train a head on the pool's labels; its accuracy on the held-out images (cached since Predict)."""
    head_id = client.train(pool, head_id=f"{pool}-logreg")["head_id"]
    predictions = client.predict(head_id, [test.png(i) for i in range(len(test))])
    return sum(p.label == y for p, y in zip(predictions, test.labels)) / len(test)
