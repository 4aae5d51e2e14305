"""Deeper fine-tuning from cached activations vs the frozen head on Fashion-MNIST, and what an epoch costs.

Usage::

    python benchmarks/bench_finetune.py --part accuracy            # unfreeze 3, 100 and 600 labels/class, 3 seeds
    python benchmarks/bench_finetune.py --part accuracy --ns 100 --test 2000   # a subset, for a busy CPU
    python benchmarks/bench_finetune.py --part accuracy --ns 600 --seeds 1 --name s1 \
        --cache benchmarks/.cache/s1/activations.sqlite3             # one seed; a cache per concurrent process
    python benchmarks/bench_finetune.py --part accuracy --merge benchmarks/results/s0.json benchmarks/results/s1.json \
        --name merged                                                # runs split over processes, one JSON
    python benchmarks/bench_finetune.py --part speed               # cached vs full epochs, unfreeze 1-3
    python benchmarks/bench_finetune.py --part accuracy --ns 100 --seeds 0 --precision bf16 --name bf16
                                                                   # the same fine-tune trained under bf16

Data: Fashion-MNIST train/test splits (Debian ``dataset-fashion-mnist``). For ``n`` labels per class and seed
``s`` the labelled set is the first ``n`` images of each class in a seeded shuffle of the train split (the same
draw as ``bench_transfer.py``); every method is scored on the whole 10k test split.

- **frozen**: the mobilenet_v2 features of ``bench_train.fashion_features`` (``Embedder``, cached) + the logreg
  head (``make_head("logreg")``).
- **fine-tuned**: ``finetune(...)`` on the labelled images as PNG bytes with ``--unfreeze`` blocks (+ the final
  1x1 conv), the cosine schedule and early stopping on its 20% stratified hold-out (``FT_CONFIG``), then the
  logreg head on the fine-tuned backbone's features of all labelled images (and the fine-tune's own task head).
  The trunk activations (the layers before the cut, fp16) are computed once into one ``ActivationCache``
  (``benchmarks/.cache/finetune/``) shared by every run; the fine-tuned features come from the trained top
  on those activations (the identical network; ``bench_transfer`` checks it against ``Embedder``).
- Significance, per seed: McNemar's exact test on the test images exactly one of the two gets right; pooled over
  seeds: the same test on the summed discordant counts, and a paired t-test on the per-seed accuracy gaps.

Epoch speed (``--epoch-images`` labelled images, batch 64): one epoch of ``finetune``'s training step from the
cached fp16 activations vs one that re-runs decode + preprocessing + the frozen trunk (micro-batches of 4, the
fastest on CPU) before the same step, for unfreeze 1, 2 and 3, interleaved rounds, fastest epoch of each kind;
each epoch is split into its parts (data, trunk, top forward, backward, optimiser step) to show what limits
the ratio. A third kind runs the cached epoch with the top and its input in channels_last memory format; two
more run the cached and the full epoch under bfloat16 autocast (``FineTuneConfig(precision="bf16")``; the full
one's trunk too), for CPUs with AVX512-BF16 or AMX.

``--part accuracy`` writes ``benchmarks/results/bench_finetune_accuracy.json``, ``--part speed``
``bench_finetune_speed.json``; each prints a markdown block for the README.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import fashion_features  # noqa: E402
from bench_transfer import finetuned_features, png, stratified  # noqa: E402
from embedder.datasets import FASHION_MNIST_CLASSES  # noqa: E402
from images import write_json  # noqa: E402

from classifier import make_head  # noqa: E402

CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "finetune"
MODEL = "mobilenet_v2"
FT_CONFIG = dict(epochs=12, patience=4, schedule="cosine")  # the rest: FineTuneConfig's defaults
TRUNK_MICRO_BATCH = 4
EPOCH_BATCH = 64
# full: decode + preprocess + trunk, then the same step; bf16: the step (and a full epoch's trunk) under bfloat16
# autocast, FineTuneConfig(precision="bf16")
KINDS = ("cached", "cached, channels_last", "full", "cached, bf16", "full, bf16")

log = logging.getLogger("bench_finetune")


class Trunk:
    """The frozen trunk of ``finetune`` for ``unfreeze`` blocks and the shared activation cache it fills."""

    def __init__(self, unfreeze: int, cache_path: Path = CACHE_DIR / "activations.sqlite3") -> None:
        from embedder import get_backbone
        from embedder.activations import ActivationCache
        from embedder.config import Config
        from embedder.finetune import Split
        from embedder.preprocess import Preprocessor

        self.spec = get_backbone(MODEL)
        self.split = Split(self.spec, unfreeze)
        self.pre = Preprocessor(self.spec.preprocessing, max_pixels=Config().max_pixels)
        self.cache = ActivationCache(cache_path, max_bytes=4 * 1024**3)
        self.computed, self.seconds = 0, 0.0

    def decode(self, pngs: Sequence[bytes]) -> torch.Tensor:
        """Decode + preprocess, as ``finetune`` does: uint8 NCHW."""
        return torch.from_numpy(np.stack([self.pre(b) for b in pngs])).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, micro_batch: int = TRUNK_MICRO_BATCH, bf16: bool = False) -> torch.Tensor:
        """Trunk outputs (float16) of preprocessed uint8 images, in micro-batches (under bf16 autocast)."""
        t = self.split.trunk
        outs = []
        with torch.inference_mode():
            for s in range(0, len(x), micro_batch):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = t.features((x[s:s + micro_batch].float() - t.mean) * t.inv_scale)
                outs.append(out.half())  # outside autocast, which has no rule for float16 on CPU
        return torch.cat(outs)

    def fill(self, pngs: Sequence[bytes]) -> None:
        """Cache the activations of ``pngs`` not cached yet."""
        from embedder.inputs import content_hash

        shas = [content_hash(b) for b in pngs]
        todo = [i for i, a in enumerate(self.cache.get(self.spec.model_id, self.split.cut, shas)) if a is None]
        log.info("trunk activations: %d of %d images not cached yet", len(todo), len(pngs))
        started = time.perf_counter()
        for s in range(0, len(todo), 256):
            idx = todo[s:s + 256]
            out = self.forward(self.decode([pngs[i] for i in idx])).numpy()
            self.cache.put(self.spec.model_id, self.split.cut, [shas[i] for i in idx], out)
            if s % 1024 == 0:
                log.info("  %d / %d", s + len(idx), len(todo))
        if todo:
            self.seconds += time.perf_counter() - started
            self.computed += len(todo)

    def get(self, pngs: Sequence[bytes]) -> np.ndarray:
        from embedder.inputs import content_hash

        acts = self.cache.get(self.spec.model_id, self.split.cut, [content_hash(b) for b in pngs])
        missing = sum(a is None for a in acts)
        if missing:
            raise RuntimeError(f"{missing} activations are not cached; call fill() first")
        return np.stack(acts)

    def img_s(self) -> float | None:
        """Images per second of the trunk passes this run computed (None if all came from the cache)."""
        return self.computed / self.seconds if self.computed else None

    def close(self) -> None:
        self.cache.close()


# --- fine-tuned vs frozen ------------------------------------------------------------------------------------


def mcnemar(first: np.ndarray, second: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test on paired right/wrong vectors over the same test images."""
    from scipy.stats import binomtest

    only_first, only_second = int((first & ~second).sum()), int((~first & second).sum())
    p = binomtest(only_first, only_first + only_second, 0.5).pvalue if only_first + only_second else 1.0
    return {"only_first_right": only_first, "only_second_right": only_second, "mcnemar_p": float(p)}


def accuracy_part(args: argparse.Namespace) -> dict[str, Any]:
    from embedder.datasets import fashion_mnist
    from embedder.finetune import FineTuneConfig, finetune

    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    test_idx = np.arange(args.test)  # the first N of the test split's file order
    x_test, y_test = x_test[test_idx], y_test[test_idx]
    features = fashion_features(MODEL)
    F_train, F_test = features["train"][0], features["test"][0][test_idx]
    make_head("logreg").fit(F_train[:200], y_train[:200])  # warm-up: thread pools, BLAS
    trunk = Trunk(args.unfreeze, args.cache)
    runs: list[dict[str, Any]] = []
    try:
        test_pngs = [png(im) for im in x_test]
        trunk.fill(test_pngs)
        test_acts = trunk.get(test_pngs)
        for n in args.ns:
            for seed in args.seeds:
                idx = stratified(y_train, np.arange(len(y_train)), n, 1000 + seed)
                y = y_train[idx]
                frozen = make_head("logreg").fit(F_train[idx], y)
                frozen_right = frozen.predict(F_test) == y_test
                pngs = [png(x_train[i]) for i in idx]
                trunk.fill(pngs)
                data_dir = args.cache.parent / f"ft-{n}-{seed}"
                shutil.rmtree(data_dir, ignore_errors=True)
                try:
                    config = FineTuneConfig(**{**FT_CONFIG, "epochs": args.epochs}, unfreeze=args.unfreeze,
                                            seed=seed, device="cpu", precision=args.precision)
                    result = finetune(pngs, [FASHION_MNIST_CLASSES[c] for c in y], data_dir=data_dir,
                                      suffix=f"bf{n}s{seed}", config=config, cache=trunk.cache)
                    test_feats, task_pred = finetuned_features(result, test_acts)
                    train_feats, _ = finetuned_features(result, trunk.get(pngs))
                finally:
                    shutil.rmtree(data_dir, ignore_errors=True)
                started = time.perf_counter()
                tuned_right = make_head("logreg").fit(train_feats, y).predict(test_feats) == y_test
                head_s = time.perf_counter() - started
                task_right = task_pred == np.asarray([FASHION_MNIST_CLASSES[c] for c in y_test])
                run = {"n": n, "seed": seed, "frozen": float(frozen_right.mean()),
                       "finetuned": float(tuned_right.mean()), "finetuned_task_head": float(task_right.mean()),
                       "vs_frozen": mcnemar(tuned_right, frozen_right),
                       "task_head_vs_frozen": mcnemar(task_right, frozen_right),
                       "epochs_run": len(result.history), "best_epoch": result.best_epoch,
                       "val_accuracy": result.val_accuracy, "epochs_s": result.train_seconds, "head_fit_s": head_s,
                       "history": result.history}
                runs.append(run)
                # Each finished run is written at once, marked partial: hours-long runs may be cut short.
                write_json(result_name(args), {**accuracy_result(args, runs, trunk.img_s()), "partial": True,
                                               "model": MODEL, "torch_threads": args.threads, "argv": sys.argv[1:]})
                log.info("n=%d seed=%d: frozen %.4f, fine-tuned %.4f (task head %.4f), %d epochs (best %d), "
                         "%.0f s; McNemar p=%.2g", n, seed, run["frozen"], run["finetuned"],
                         run["finetuned_task_head"], run["epochs_run"], run["best_epoch"], result.train_seconds,
                         run["vs_frozen"]["mcnemar_p"])
    finally:
        trunk.close()
    return accuracy_result(args, runs, trunk.img_s())


def accuracy_result(args: argparse.Namespace, runs: list[dict[str, Any]], trunk_img_s: float | None
                    ) -> dict[str, Any]:
    """The JSON payload of the runs done so far: per-n means, pooled McNemar and the paired t-test."""
    from scipy.stats import ttest_rel

    summary = []
    for n in args.ns:
        rs = [r for r in runs if r["n"] == n]
        if not rs:
            continue
        row: dict[str, Any] = {"n": n, "seeds": [r["seed"] for r in rs]}
        for method in ("frozen", "finetuned", "finetuned_task_head"):
            values = [r[method] for r in rs]
            row[method] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(rs) > 1
                           else 0.0, "values": values}
        pooled = {k: sum(r["vs_frozen"][k] for r in rs) for k in ("only_first_right", "only_second_right")}
        row["pooled_mcnemar"] = mcnemar(np.r_[np.ones(pooled["only_first_right"], bool),
                                              np.zeros(pooled["only_second_right"], bool)],
                                        np.r_[np.zeros(pooled["only_first_right"], bool),
                                              np.ones(pooled["only_second_right"], bool)])
        row["paired_t_p"] = (float(ttest_rel([r["finetuned"] for r in rs], [r["frozen"] for r in rs]).pvalue)
                             if len(rs) > 1 else None)
        row["gain_points"] = 100 * (row["finetuned"]["mean"] - row["frozen"]["mean"])
        summary.append(row)
    return {"unfreeze": args.unfreeze, "test_images": args.test,
            "finetune_config": {**FT_CONFIG, "epochs": args.epochs, "precision": args.precision}, "summary": summary, "runs": runs,
            "trunk_img_s": trunk_img_s}


def merge_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """One accuracy result from the runs of several accuracy JSONs (e.g. one seed per concurrent process)."""
    parts = [json.loads(p.read_text()) for p in args.merge]
    for key in ("unfreeze", "test_images", "finetune_config"):
        if any(part[key] != parts[0][key] for part in parts):
            raise SystemExit(f"cannot merge runs with different {key}: {[part[key] for part in parts]}")
    runs = sorted((r for part in parts for r in part["runs"]), key=lambda r: (r["n"], r["seed"]))
    args.ns = sorted({r["n"] for r in runs})
    args.unfreeze, args.test = parts[0]["unfreeze"], parts[0]["test_images"]
    args.epochs, args.threads = parts[0]["finetune_config"]["epochs"], parts[0]["torch_threads"]
    res = accuracy_result(args, runs, None)
    res["merged_from"] = [{"file": p.name, "argv": part["argv"], "partial": part.get("partial", False),
                           "total_s": part.get("total_s")} for p, part in zip(args.merge, parts)]
    return res


# --- epoch speed ---------------------------------------------------------------------------------------------


def speed_part(args: argparse.Namespace) -> dict[str, Any]:
    """Per unfreeze: a cached epoch vs a full re-run epoch, split into their parts."""
    from embedder.datasets import fashion_mnist
    from embedder.finetune import _freeze_bn

    x_train, y_train = fashion_mnist("train")
    per_class = max(1, args.epoch_images // 10)
    idx = stratified(y_train, np.arange(len(y_train)), per_class, 1000)
    pngs, y = [png(x_train[i]) for i in idx], torch.from_numpy(y_train[idx])
    out = {}
    for unfreeze in (1, 2, 3):
        trunk = Trunk(unfreeze)
        gen = torch.Generator().manual_seed(0)
        acts = trunk.forward(trunk.decode(pngs))  # float16, as the cache holds them
        models = {}
        for kind in KINDS:  # each kind trains its own copy: the same work, none warms the other's weights
            top = copy.deepcopy(trunk.split.top)
            head = nn.Linear(1280, 10)
            model = nn.Sequential(top, nn.Dropout(0.2), head)
            if kind == "cached, channels_last":
                model = model.to(memory_format=torch.channels_last)
            models[kind] = (model, torch.optim.AdamW([{"params": top.parameters(), "lr": 1e-4},
                                                      {"params": head.parameters(), "lr": 1e-3}], weight_decay=1e-4))

        def epoch(kind: str) -> dict[str, float]:
            parts = dict.fromkeys(("decode + preprocess", "trunk forward", "load batch", "top forward",
                                   "backward", "optimiser step"), 0.0)
            model, opt = models[kind]
            model.train()
            _freeze_bn(model)
            order = torch.randperm(len(y), generator=gen)
            for s in range(0, len(y), EPOCH_BATCH):
                b = order[s:s + EPOCH_BATCH]
                t0 = time.perf_counter()
                if kind.startswith("cached"):
                    x = acts[b].float()
                    if kind == "cached, channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    parts["load batch"] += time.perf_counter() - t0
                else:
                    raw = trunk.decode([pngs[i] for i in b.tolist()])
                    t1 = time.perf_counter()
                    parts["decode + preprocess"] += t1 - t0
                    x = trunk.forward(raw, bf16="bf16" in kind).float()
                    parts["trunk forward"] += time.perf_counter() - t1
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in kind):
                    logits = model(x)
                loss = nn.functional.cross_entropy(logits.float(), y[b])
                t1 = time.perf_counter()
                opt.zero_grad()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                parts["top forward"] += t1 - t0
                parts["backward"] += t2 - t1
                parts["optimiser step"] += t3 - t2
            return {k: v for k, v in parts.items() if v}

        for kind in KINDS[:2]:
            epoch(kind)  # warm-up
        rounds: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for _ in range(args.epoch_rounds):  # interleaved, so load changes hit both kinds
            for kind in rounds:
                rounds[kind].append(epoch(kind))
                log.info("unfreeze %d, %s epoch: %.2f s %s", unfreeze, kind, sum(rounds[kind][-1].values()),
                         {k: round(v, 2) for k, v in rounds[kind][-1].items()})
        best = {k: min(v, key=lambda p: sum(p.values())) for k, v in rounds.items()}
        seconds = {k: sum(p.values()) for k, p in best.items()}
        out[str(unfreeze)] = {
            "cut": trunk.split.cut, "activation_shape": list(acts.shape[1:]),
            "activation_kb_fp16": acts[0].numel() * 2 / 1024,
            "seconds": seconds, "parts": {k: {p: round(v, 3) for p, v in parts.items()} for k, parts in best.items()},
            "ratio": seconds["full"] / seconds["cached"],
            "ratio_channels_last": seconds["full"] / seconds["cached, channels_last"],
            "ratio_bf16": seconds["full, bf16"] / seconds["cached, bf16"],  # both kinds under autocast
            "ratio_bf16_vs_fp32_full": seconds["full"] / seconds["cached, bf16"],
            "ratio_per_round": [sum(f.values()) / sum(c.values()) for c, f in zip(rounds["cached"], rounds["full"])],
            "img_s": {k: len(y) / v for k, v in seconds.items()}}
        trunk.close()
    return {"images": len(y), "batch": EPOCH_BATCH, "trunk_micro_batch": TRUNK_MICRO_BATCH, "by_unfreeze": out}


# --- main ----------------------------------------------------------------------------------------------------


def markdown_accuracy(res: dict[str, Any]) -> str:
    lines = [f"| labels/class | frozen + logreg | fine-tuned (unfreeze {res['unfreeze']}) + logreg | its own task head "
             "| gain | per-seed McNemar p | pooled p | paired t p | epochs (best) |",
             "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for row in res["summary"]:
        rs = [r for r in res["runs"] if r["n"] == row["n"]]
        cells = [f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}"
                 for m in ("frozen", "finetuned", "finetuned_task_head")]
        p_seed = ", ".join(f"{r['vs_frozen']['mcnemar_p']:.2g}" for r in rs)
        epochs = ", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in rs)
        t_p = "-" if row["paired_t_p"] is None else f"{row['paired_t_p']:.2g}"
        lines.append(f"| {row['n']} | {' | '.join(cells)} | {row['gain_points']:+.1f} | {p_seed} | "
                     f"{row['pooled_mcnemar']['mcnemar_p']:.2g} | {t_p} | {epochs} |")
    return "\n".join(lines)


def markdown_speed(res: dict[str, Any]) -> str:
    lines = ["| unfreeze | cut activation (fp16) | cached epoch | full re-run epoch | ratio | ratio, channels_last "
             "| cached epoch, bf16 | ratio, bf16 both | bf16 cached vs fp32 full "
             "| full epoch: decode / trunk / top fwd+bwd+step | cached epoch: load / top fwd / bwd / step |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for u, r in res["by_unfreeze"].items():
        f, c = r["parts"]["full"], r["parts"]["cached"]
        top_f = f["top forward"] + f["backward"] + f["optimiser step"]
        lines.append(f"| {u} | {'x'.join(map(str, r['activation_shape']))} ({r['activation_kb_fp16']:.1f} KB) | "
                     f"{r['seconds']['cached']:.2f} s | {r['seconds']['full']:.2f} s | {r['ratio']:.2f}x | "
                     f"{r['ratio_channels_last']:.2f}x | {r['seconds']['cached, bf16']:.2f} s | "
                     f"{r['ratio_bf16']:.2f}x | {r['ratio_bf16_vs_fp32_full']:.2f}x | "
                     f"{f['decode + preprocess']:.2f} / {f['trunk forward']:.2f} / {top_f:.2f} s | "
                     f"{c['load batch']:.3f} / {c['top forward']:.2f} / {c['backward']:.2f} / "
                     f"{c['optimiser step']:.2f} s |")
    return "\n".join(lines)


def result_name(args: argparse.Namespace) -> str:
    """The JSON's name under benchmarks/results."""
    return args.name or f"bench_finetune_{args.part}"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("classifier").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("accuracy", "speed"), required=True,
                    help="accuracy: fine-tuned vs frozen; speed: cached vs full re-run epochs")
    ap.add_argument("--unfreeze", type=int, default=3, help="blocks fine-tuned in the accuracy part (default 3)")
    ap.add_argument("--ns", type=int, nargs="+", default=[100, 600], help="labels per class (default 100 600)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every n (default 0 1 2)")
    ap.add_argument("--epochs", type=int, default=FT_CONFIG["epochs"],
                    help=f"most epochs per fine-tune (default {FT_CONFIG['epochs']}; early stopping may end sooner)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="the fine-tune's training precision in the accuracy part (default fp32)")
    ap.add_argument("--test", type=int, default=10000, help="test images: the first N of the test split")
    ap.add_argument("--epoch-images", type=int, default=600, help="labelled images per timed epoch")
    ap.add_argument("--epoch-rounds", type=int, default=3, help="interleaved rounds of timed epochs")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--cache", type=Path, default=CACHE_DIR / "activations.sqlite3",
                    help="the activation cache file; runs at the same time each need their own (SQLite, one writer)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="with --part accuracy: combine the runs of these result files into one (no training)")
    ap.add_argument("--name", help="the JSON's name under benchmarks/results (default bench_finetune_<part>)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.part == "accuracy":
        res = merge_accuracy(args) if args.merge else accuracy_part(args)
        md = markdown_accuracy(res)
    else:
        res = speed_part(args)
        md = markdown_speed(res)
    res.update({"model": MODEL, "torch_threads": args.threads, "total_s": time.perf_counter() - started,
                "argv": sys.argv[1:]})
    path = write_json(result_name(args), {**res, "partial": False})
    print("\n--- markdown for the README ---\n" + md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
