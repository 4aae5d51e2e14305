"""Active learning and label checks on real features: which strategy saves labels, how well flipped labels are found.

Usage::

    python benchmarks/bench_active.py            # Fashion-MNIST if installed (dataset-fashion-mnist), else digits
    python benchmarks/bench_active.py --quick    # one seed, fewer rounds, timings at 10k only
    python benchmarks/bench_active.py --strategies hybrid   # rerun one strategy into the existing JSON

Features: the dataset's images through ``Embedder(model="mobilenet_v2", device="cpu")``, cached as .npy under
``benchmarks/.cache/active/``. Everything after that runs :mod:`classifier.active` on the vectors, as the
service does (no backbone pass).

- **Suggest** with an oracle: start from 2 random labels per class (20 for 10 classes), then rounds of 50 labels
  chosen by each strategy (and at random), a logreg head retrained each round; test accuracy per round, 3 seeds.
  Reported: labels needed to reach 85% and 88% test accuracy (the mean over the seeds that reached it).
- **Label issues** with 5% and 10% of the training labels flipped at random: precision and recall of the items
  ranked most likely wrong, at the number flipped; test accuracy of a head on the clean, the noisy and the fixed
  labels (each flagged item set to its suggested label).
- **Time** of Suggest (hybrid, n = 50) and label issues on 10k and 60k synthetic 1280-d vectors (10 clusters).

Writes ``benchmarks/results/bench_active.json`` and ``bench_active.png`` (accuracy vs labels per strategy).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifier import active, make_head  # noqa: E402
from embedder.datasets import demo_sets  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "active"
RESULTS = ROOT / "benchmarks" / "results"
STRATEGIES = ("random", "hybrid", "margin", "entropy", "diversity")
UNCERTAIN = ("hybrid", "margin", "entropy")  # the strategies that ask a head
ROUND = 50
TARGETS = (0.85, 0.88)
NOISE = (0.05, 0.10)


def features(name: str, images: np.ndarray) -> np.ndarray:
    """mobilenet_v2 features of ``images``, cached by their content."""
    key = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    path = CACHE / f"{name}-{len(images)}-{key}.npy"
    if path.exists():
        return np.load(path)
    from embedder import Embedder

    emb = Embedder(model="mobilenet_v2", device="cpu")
    vectors = np.concatenate([emb.embed(list(images[i:i + 1000])) for i in range(0, len(images), 1000)])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def accuracy(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray) -> float:
    return fitted(X, y, X_test, y_test)[1]


def fitted(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray) -> tuple[Any, float]:
    """A logreg head on ``X``/``y`` and its test accuracy."""
    head = make_head("logreg").fit(X, list(y))
    return head, float((head.predict(X_test) == y_test).mean())


def start_set(y: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Two random items of every class."""
    return [int(i) for c in np.unique(y) for i in rng.choice(np.flatnonzero(y == c), 2, replace=False)]


def oracle_run(strategy: str, X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int,
               budget: int) -> list[tuple[int, float]]:
    """(labels, test accuracy) after the start and after each round of ROUND labels chosen by ``strategy``."""
    rng = np.random.default_rng(seed)
    labelled = start_set(y, rng)
    head, score = fitted(X[labelled], y[labelled], X_test, y_test)
    curve = [(len(labelled), score)]
    while len(labelled) + ROUND <= budget:
        rest = np.setdiff1d(np.arange(len(y)), labelled)
        if strategy == "random":
            picked = [int(i) for i in rng.choice(rest, ROUND, replace=False)]
        else:  # the round's head scores uncertainty, as a head named by head_id does in the service
            result = active.suggest([str(i) for i in rest], X[rest], X[labelled], list(y[labelled]), n=ROUND,
                                    strategy=strategy, head=head if strategy in UNCERTAIN else None, seed=seed)
            picked = [int(s.id) for s in result.suggestions]
        labelled += picked
        head, score = fitted(X[labelled], y[labelled], X_test, y_test)
        curve.append((len(labelled), score))
    return curve


def labels_to_reach(curves: list[list[tuple[int, float]]], target: float) -> dict[str, Any]:
    reached = [next((n for n, a in c if a >= target), None) for c in curves]
    hits = [n for n in reached if n is not None]
    return {"mean": float(np.mean(hits)) if hits else None, "reached": f"{len(hits)}/{len(curves)}",
            "per_seed": reached}


def suggest_bench(X, y, X_test, y_test, seeds: int, budget: int, strategies: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for strategy in strategies:
        started = time.perf_counter()
        curves = [oracle_run(strategy, X, y, X_test, y_test, seed, budget) for seed in range(seeds)]
        out[strategy] = {"curves": curves, "seconds": time.perf_counter() - started,
                         **{f"labels_to_{round(t * 100)}": labels_to_reach(curves, t) for t in TARGETS}}
        print(strategy, {k: v["mean"] for k, v in out[strategy].items() if k.startswith("labels_to")},
              f"{out[strategy]['seconds']:.1f} s", flush=True)
    return out


def issues_bench(X, y, X_test, y_test, seeds: int) -> dict[str, Any]:
    clean = accuracy(X, y, X_test, y_test)
    out: dict[str, Any] = {"clean_accuracy": clean}
    classes = np.unique(y)
    for noise in NOISE:
        runs = []
        for seed in range(seeds):
            rng = np.random.default_rng(100 + seed)
            flipped = rng.choice(len(y), int(round(noise * len(y))), replace=False)
            noisy = y.copy()
            for i in flipped:
                noisy[i] = rng.choice(classes[classes != y[i]])
            started = time.perf_counter()
            found = active.find_label_issues([str(i) for i in range(len(y))], X, list(noisy), [None] * len(y),
                                             limit=active.MAX_ISSUES, seed=seed)
            seconds = time.perf_counter() - started
            top = [int(i.id) for i in found.issues[:len(flipped)]]
            hits = len(set(top) & set(flipped.tolist()))
            fixed = noisy.copy()
            for issue in found.issues:
                fixed[int(issue.id)] = issue.suggested
            flagged = {int(i.id) for i in found.issues}
            runs.append({"flipped": len(flipped), "flagged": len(flagged),
                         "precision_at_flipped": hits / max(len(top), 1), "recall_at_flipped": hits / len(flipped),
                         "precision_flagged": len(flagged & set(flipped.tolist())) / max(len(flagged), 1),
                         "noisy_accuracy": accuracy(X, noisy, X_test, y_test),
                         "fixed_accuracy": accuracy(X, fixed, X_test, y_test), "seconds": seconds,
                         "noise_rate_estimate": found.noise_rate})
        summary = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        cost = clean - summary["noisy_accuracy"]
        gained = summary["fixed_accuracy"] - summary["noisy_accuracy"]
        summary["recovered_share"] = gained / cost if cost > 0 else None
        out[f"noise_{round(noise * 100)}"] = {"mean": summary, "runs": runs}
        print(f"noise {noise:.0%}", {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()},
              flush=True)
    return out


def timing_bench(sizes: list[int]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        centers = rng.normal(size=(10, 1280)).astype(np.float32)
        truth = rng.integers(0, 10, n)
        X = centers[truth] + 3 * rng.normal(size=(n, 1280)).astype(np.float32)
        labels = truth.astype(str)
        labelled = rng.choice(n, 500, replace=False)
        rest = np.setdiff1d(np.arange(n), labelled)
        started = time.perf_counter()
        active.suggest([str(i) for i in rest], X[rest], X[labelled], list(labels[labelled]), n=50)
        suggest_s = time.perf_counter() - started
        started = time.perf_counter()
        active.find_label_issues([str(i) for i in range(n)], X, list(labels), [None] * n, limit=100)
        issues_s = time.perf_counter() - started
        out[str(n)] = {"suggest_seconds": suggest_s, "label_issues_seconds": issues_s}
        print(f"{n} items: suggest {suggest_s:.1f} s, label issues {issues_s:.1f} s", flush=True)
    return out


def plot(results: dict[str, Any], path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, r in results.items():
        curves = np.array(r["curves"])  # seeds x rounds x (labels, accuracy)
        ax.plot(curves[0, :, 0], curves[:, :, 1].mean(axis=0), marker="o", ms=3, label=strategy)
    for t in TARGETS:
        ax.axhline(t, color="grey", lw=0.6, ls="--")
    ax.set(xlabel="labelled images", ylabel="test accuracy", title=f"{dataset}: active learning vs random")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES,
                    help="rerun only these suggest strategies, replacing their entries in the existing JSON")
    args = ap.parse_args()
    seeds = 1 if args.quick else 3
    import torch

    # the heads fit with torch: on a shared, busy CPU its two OpenMP threads stall at every barrier (bench_train)
    torch.set_num_threads(1)
    train, test = demo_sets(60_000, 10_000)
    if train.name == "fashion-mnist":  # the same images through the same model: bench_train's cache
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_train import fashion_features

        cached = fashion_features()
        X, X_test = cached["train"][0], cached["test"][0]
    else:
        X, X_test = features(f"{train.name}-train", train.images), features(f"{test.name}-test", test.images)
    y, y_test = np.array(train.labels), np.array(test.labels)
    # random labelling needs ~1,640 labels to reach 85% on Fashion-MNIST (this benchmark, 3 seeds)
    budget = 320 if args.quick else 2020 if train.name == "fashion-mnist" else 1020
    print(f"{train.name}: {len(y)} train, {len(y_test)} test, {X.shape[1]}-d", flush=True)
    path = RESULTS / "bench_active.json"
    if args.strategies:
        results = json.loads(path.read_text())
        if (results["dataset"], results["seeds"]) != (train.name, seeds):
            sys.exit(f"{path} holds {results['dataset']} with {results['seeds']} seeds; run all strategies")
        results["suggest"].update(suggest_bench(X, y, X_test, y_test, seeds, budget, args.strategies))
        path.write_text(json.dumps(results, indent=1))
        plot(results["suggest"], RESULTS / "bench_active.png", train.name)
        print(f"-> {path} (strategies {', '.join(args.strategies)} replaced)")
        return
    results = {"dataset": train.name, "train": len(y), "test": len(y_test), "seeds": seeds, "round": ROUND,
               "cpu": platform.processor() or platform.machine(),
               "suggest": suggest_bench(X, y, X_test, y_test, seeds, budget, list(STRATEGIES)),
               "label_issues": issues_bench(X, y, X_test, y_test, seeds),
               "timing_synthetic": timing_bench([10_000] if args.quick else [10_000, 60_000])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    plot(results["suggest"], RESULTS / "bench_active.png", train.name)
    print(f"-> {path}, {RESULTS / 'bench_active.png'}")


if __name__ == "__main__":
    main()
