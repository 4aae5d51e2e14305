"""Fine-tune the later layers of a backbone on cached trunk activations; the result is a new backbone version.

The network is cut in two. The *trunk* (every layer before the cut, frozen) runs once per image and its
output is cached (:class:`embedder.activations.ActivationCache`, keyed by image sha256, model id and cut).
The *top* (the last ``unfreeze`` blocks plus the layers after them, pooling, and a new task head) trains for
every epoch from that cache, so an epoch costs only the top's forward and backward pass. Where a network can be
cut is a table (``CUT_POINTS``): the blocks of each architecture, e.g. mobilenet_v2's 17 inverted-residual
blocks between its stem conv and its final 1x1 conv. The learning rate follows a cosine schedule with a short
linear warm-up (``schedule``), and training stops early once the accuracy on a stratified hold-out of the
labelled images has not improved for ``patience`` epochs; the best epoch's weights are kept.

What this trades away: pixel-space augmentation (random crops, flips, colour jitter) needs the trunk to run
again on every augmented image. Instead the top is regularised in feature space: dropout before the task
head, Gaussian noise on the cached activations (``noise``, relative to their spread) and mixup
(``mixup``: convex combinations of activation pairs and their labels).

The result is saved under ``<data_dir>/backbones/<name>/`` (safetensors weights with their sha256 +
``backbone.json`` recording the parent's model id), atomically: a crash or a cancel leaves nothing
registered. It is registered as a backbone named ``<parent>.<suffix>`` with its own model id, so its
embeddings never mix with the parent's in any cache or index; the parent and its caches are untouched.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import math
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import ActivationCache
from .backbones import (DERIVED_META, DERIVED_WEIGHTS, BackboneSpec, FrozenBackbone, load_backbone, register_derived,
                        sha256_file, split_layers)
from .catalog import get_backbone
from .config import Config
from .durable import fsync_dir, fsync_file
from .errors import Category, EmbedderError
from .jobs import JobCancelled
from .pipeline import CPU_MICRO_BATCH
from .preprocess import Preprocessor
from .inputs import content_hash

log = logging.getLogger(__name__)

TRUNK_BATCH = 32  # images decoded, cached and checked for cancel at a time


class FineTuneError(EmbedderError, ValueError):
    """The fine-tune cannot run as asked (unsupported backbone, too few labels, bad settings)."""

    category = Category.INVALID_ARGUMENT


class TooFewLabelsError(FineTuneError):
    """Fewer than two classes, or a class with fewer than two labelled images: label more."""

    category = Category.FAILED_PRECONDITION


class FineTuneCancelled(JobCancelled):
    """The fine-tune was cancelled; nothing was saved or registered."""


SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")
WARMUP_FRACTION = 0.05  # of all steps: a new, randomly initialised head must not shake the pretrained top early

# Where each architecture can be cut: how many blocks may be unfrozen (counted from the end). The layers of a
# network, in order, are a stem, these blocks and a tail (backbones.split_layers); `unfreeze` blocks + the tail train.
CUT_POINTS = {"mobilenet_v2": 17, "efficientnet_lite0": 16, "efficientnet_lite2": 21}


def check_unfreeze(model: BackboneSpec, unfreeze: int) -> None:
    """``unfreeze`` blocks can be cut from ``model``: an original backbone of a supported architecture."""
    if model.parent is not None or model.name not in CUT_POINTS:
        raise FineTuneError(f"fine-tuning supports {', '.join(CUT_POINTS)}, not {model.name!r}; "
                            "fine-tune the original backbone")
    if not 1 <= unfreeze <= CUT_POINTS[model.name]:
        raise FineTuneError(f"unfreeze must be 1..{CUT_POINTS[model.name]} blocks for {model.name}, got {unfreeze}")


def check_adabn(model: BackboneSpec) -> None:
    """AdaBN can adapt ``model``: an original backbone of a supported architecture (its BatchNorm layers are
    where :func:`split_layers` finds them; a recipe, an ensemble or a derived version is refused)."""
    if model.parent is not None or model.name not in CUT_POINTS:
        raise FineTuneError(f"AdaBN supports {', '.join(CUT_POINTS)}, not {model.name!r}; adapt the original "
                            "backbone")


# The attribute path of each architecture's classifier: where the task head goes.
HEAD_SLOTS = {"mobilenet_v2": "classifier.1", "efficientnet_lite0": "_fc", "efficientnet_lite2": "_fc"}


# What one job may ask for: a fine-tune holds a core for its whole run, and an epoch of 10k kept images takes
# minutes on a CPU, so 500 epochs is already days; early stopping ends most runs within tens.
CAPS = {"epochs": 500, "batch_size": 4096, "patience": 500}


@dataclass(frozen=True)
class FineTuneConfig:
    """Settings of one fine-tune. Seeded: the same settings and images give the same split, batches and
    hold-out accuracies, and weights equal to ~1e-3 (CPU BLAS sums are not bit-identical from run to run,
    and Adam's per-weight scaling magnifies that last-bit noise in weights whose gradients are near zero)."""

    unfreeze: int = 1  # blocks trained, counted from the end, plus the layers after them (CUT_POINTS)
    epochs: int = 10
    lr: float = 1e-3  # the new task head's peak learning rate; the unfrozen pretrained layers get lr / 10
    schedule: str = "cosine"  # "cosine": warm-up then cosine decay to 0 over `epochs`; "constant"
    weight_decay: float = 1e-4
    batch_size: int = 64
    val_fraction: float = 0.2  # stratified hold-out for early stopping and the reported accuracy
    patience: int = 3  # epochs without a better hold-out accuracy before stopping
    dropout: float = 0.2
    noise: float = 0.0  # std of Gaussian noise on activations, relative to their std
    mixup: float = 0.0  # mixup alpha; 0 turns it off
    seed: int = 0
    device: str = "auto"
    # "bf16": the training step runs under bfloat16 autocast, ~1.5x faster on CPUs with AVX512-BF16 or AMX
    # (slower on others) and on recent GPUs; the weights, the hold-out check and the saved version stay fp32.
    precision: str = "fp32"

    @classmethod
    def from_params(cls, params: dict) -> "FineTuneConfig":
        """From a dict of settings (e.g. a request's JSON); unknown names and wrong types are FineTuneErrors."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise FineTuneError(f"unknown fine-tune setting(s) {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(sorted(known))}")
        for name, value in params.items():
            kind = cls.__dataclass_fields__[name].type
            ok = (isinstance(value, str) if kind == "str" else
                  isinstance(value, int) and not isinstance(value, bool) if kind == "int" else
                  isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise FineTuneError(f"fine-tune setting {name!r} must be a {kind}, got {value!r}")
        return cls(**params)

    def __post_init__(self) -> None:
        if self.unfreeze < 1:
            raise FineTuneError(f"unfreeze must be >= 1 block, got {self.unfreeze}")
        if self.schedule not in SCHEDULES:
            raise FineTuneError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule[:50]!r}")
        if self.precision not in PRECISIONS:
            raise FineTuneError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision[:50]!r}")
        for name in ("epochs", "batch_size", "patience"):
            if not 1 <= getattr(self, name) <= CAPS[name]:
                raise FineTuneError(f"{name} must be between 1 and {CAPS[name]}, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise FineTuneError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or self.noise < 0 or self.mixup < 0 or not 0 <= self.dropout < 1:
            raise FineTuneError("lr must be > 0; weight_decay, noise and mixup >= 0; dropout in [0, 1)")


@dataclass
class FineTuneResult:
    spec: BackboneSpec  # the new backbone, registered
    path: Path  # its directory under <data_dir>/backbones
    classes: list[str]
    history: list[dict[str, float]]  # per epoch: train loss, hold-out accuracy, seconds
    best_epoch: int
    val_accuracy: float
    trunk_passes: int  # images that went through the trunk in this run (0 when every activation was cached)
    trunk_seconds: float
    train_seconds: float
    failed: dict[int, str] = field(default_factory=dict)  # input index -> why it could not be used


class Split(nn.Module):
    """A network cut before its last ``unfreeze`` blocks: ``trunk`` (frozen) and ``top`` (trainable), both
    made of ``net``'s own modules, so ``net`` with a task head in its classifier slot is the tuned model."""

    def __init__(self, spec: BackboneSpec, unfreeze: int) -> None:
        super().__init__()
        check_unfreeze(spec, unfreeze)
        self.arch = spec.name
        self.net = load_backbone(spec)  # verified weights, classifier removed
        stem, blocks, tail = split_layers(self.net, self.arch)
        self.head_slot = HEAD_SLOTS[self.arch]
        if len(blocks) != CUT_POINTS[self.arch]:
            raise RuntimeError(f"{spec.name} has {len(blocks)} blocks, CUT_POINTS says {CUT_POINTS[self.arch]}")
        self.cut = len(stem) + len(blocks) - unfreeze  # layers before the cut: the activation cache's key
        self.trunk = FrozenBackbone(nn.Sequential(*stem, *blocks[:-unfreeze]), spec.preprocessing).eval()
        self.top = nn.Sequential(*blocks[-unfreeze:], *tail, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for p in self.top.parameters():
            p.requires_grad_(True)

    def tuned(self, head: nn.Linear) -> nn.Module:
        """The whole network with ``head`` in its classifier slot (on CPU, in eval mode)."""
        parent_name, _, child = self.head_slot.rpartition(".")
        setattr(self.net.get_submodule(parent_name) if parent_name else self.net, child, head)
        return self.net.cpu().eval()


def finetune(images: Sequence[bytes], labels: Sequence[str], *, data_dir: str | Path, suffix: str,
             model: str = "mobilenet_v2", config: FineTuneConfig = FineTuneConfig(),
             cache: ActivationCache | None = None, progress: bool = False,
             cancel: threading.Event | None = None,
             on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> FineTuneResult:
    """Fine-tune ``model`` on encoded ``images`` with ``labels``; save and register ``<model>.<suffix>``.

    Images that cannot be decoded are left out and reported in ``failed``. ``cancel`` (set from another
    thread) stops between batches with :class:`FineTuneCancelled`; ``on_epoch(epoch, stats)`` reports progress.
    """
    if len(images) != len(labels):
        raise FineTuneError(f"got {len(images)} images and {len(labels)} labels; pass one label per image")
    parent = get_backbone(model)
    check_unfreeze(parent, config.unfreeze)
    name = check_suffix(suffix, parent, data_dir)
    root = Path(data_dir) / "backbones"
    check_labels(labels)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    split = Split(parent, config.unfreeze)
    own_cache = cache is None
    cache = cache or ActivationCache(Path(data_dir) / "activations.sqlite3")
    try:
        started = time.perf_counter()
        acts, keep, failed, passes = _activations(split, parent, images, cache, device, progress, cancel)
        trunk_seconds = time.perf_counter() - started
    finally:
        if own_cache:
            cache.close()
    y_text = [labels[i] for i in keep]
    check_labels(y_text)
    classes = sorted(set(y_text))
    y = np.array([classes.index(v) for v in y_text], dtype=np.int64)
    started = time.perf_counter()
    head, history, best_epoch, best_acc = _train(split.top, acts, y, len(classes), config, device, progress,
                                                 cancel, on_epoch)
    train_seconds = time.perf_counter() - started
    path = save_version(root, name, parent, split.tuned(head), num_classes=len(classes),
                        how=f"fine-tuned (last {config.unfreeze} block(s) + the layers after them)",
                        classes=classes, cut=split.cut, config=asdict(config), history=history, val_accuracy=best_acc)
    spec = register_derived(path)
    log.info("fine-tuned %s -> %s (hold-out accuracy %.3f at epoch %d; %d trunk passes)", parent.model_id,
             spec.model_id, best_acc, best_epoch, passes)
    return FineTuneResult(spec, path, classes, history, best_epoch, best_acc, passes, trunk_seconds, train_seconds,
                          failed)


def check_suffix(suffix: str, parent: BackboneSpec, data_dir: str | Path) -> str:
    """The new backbone's name ``<parent>.<suffix>``, if the suffix is valid and the name free."""
    if not suffix or len(suffix) > 64 or not all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in suffix):
        raise FineTuneError(f"suffix must be 1-64 letters, digits, '-' or '_', got {suffix[:80]!r}")
    name = f"{parent.name}.{suffix}"
    if (Path(data_dir) / "backbones" / name).exists():
        raise FineTuneError(f"a backbone named {name!r} already exists; choose another suffix")
    return name


def check_labels(labels: Sequence[str]) -> None:
    """Labels a fine-tune can hold out from: two classes or more, each with two examples or more."""
    values, counts = np.unique(np.asarray(list(labels), dtype=object).astype(str), return_counts=True)
    if len(values) < 2:
        raise TooFewLabelsError("need labelled images of at least two classes to fine-tune")
    few = [f"{str(v)!r} has {n}" for v, n in zip(values, counts) if n < 2]
    if few:
        raise TooFewLabelsError(f"every class needs at least 2 labelled images (one for the hold-out): "
                            f"{', '.join(few[:10])}; label more or leave those classes out")


def _activations(split: Split, spec: BackboneSpec, images: Sequence[bytes], cache: ActivationCache,
                 device: torch.device, progress: bool,
                 cancel: threading.Event | None) -> tuple[np.ndarray, list[int], dict[int, str], int]:
    """Trunk outputs (float16) of every decodable image, from the cache or computed once and cached."""
    shas = [content_hash(b) for b in images]
    cached = cache.get(spec.model_id, split.cut, shas)
    todo = [i for i, a in enumerate(cached) if a is None]
    failed: dict[int, str] = {}
    pre = Preprocessor(spec.preprocessing, max_pixels=Config().max_pixels)
    trunk = split.trunk.to(device)
    with tqdm(total=len(todo), unit="img", desc="trunk (once per image)", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), TRUNK_BATCH):
            if cancel is not None and cancel.is_set():
                raise FineTuneCancelled("fine-tune cancelled while computing trunk activations")
            batch, idx = [], []
            for i in todo[start:start + TRUNK_BATCH]:
                try:
                    batch.append(pre(images[i]))
                    idx.append(i)
                except EmbedderError as e:
                    failed[i] = str(e)
            if batch:
                # On CPU the trunk runs in micro-batches, as the pipeline does (measured 3x faster than 32 at once:
                # large batches fall out of cache); on CUDA the whole batch.
                step = CPU_MICRO_BATCH if device.type == "cpu" else len(batch)
                x_all = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
                with torch.inference_mode():
                    out = np.concatenate([trunk.features((x_all[s:s + step].to(device).float() - trunk.mean)
                                                         * trunk.inv_scale).cpu().numpy().astype(np.float16)
                                          for s in range(0, len(batch), step)])
                cache.put(spec.model_id, split.cut, [shas[i] for i in idx], out)
                for i, a in zip(idx, out):
                    cached[i] = a
            bar.update(len(todo[start:start + TRUNK_BATCH]))
    keep = [i for i, a in enumerate(cached) if a is not None]
    if not keep:
        raise FineTuneError("none of the images could be decoded")
    return np.stack([cached[i] for i in keep]), keep, failed, len(todo) - len(failed)


def _train(top: nn.Sequential, acts: np.ndarray, y: np.ndarray, k: int, config: FineTuneConfig,
           device: torch.device, progress: bool, cancel: threading.Event | None,
           on_epoch: Callable[[int, dict[str, float]], None] | None) -> tuple[nn.Linear, list[dict], int, float]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    n_val = max(k, int(round(config.val_fraction * len(y))))
    tr, va = train_test_split(idx, test_size=n_val, stratify=y, random_state=config.seed)
    torch.manual_seed(config.seed)  # here, not earlier: the head's init and dropout draw from the global RNG
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    x_all = torch.from_numpy(acts)  # float16; batches are converted as they are used
    y_all = torch.from_numpy(y)
    scale = float(x_all[tr[:512]].float().std()) or 1.0
    head = nn.Linear(_feature_dim(top, acts.shape[1:]), k)
    model = nn.Sequential(top, nn.Dropout(config.dropout), head).to(device)
    # BatchNorm keeps its pretrained statistics: batches of a few labelled images would only add noise.
    optimizer = torch.optim.AdamW([{"params": top.parameters(), "lr": config.lr / 10},
                                   {"params": head.parameters(), "lr": config.lr}], weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(tr) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config.schedule,
                                                                        config.epochs * steps_per_epoch))
    best = (-1.0, 0, None)
    history: list[dict[str, float]] = []
    bad_epochs = 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        _freeze_bn(model)
        order = torch.randperm(len(tr), generator=gen).numpy()
        total, seen = 0.0, 0
        for s in tqdm(range(0, len(tr), config.batch_size), desc=f"epoch {epoch}/{config.epochs}",
                      unit="batch", disable=not progress, leave=False):
            if cancel is not None and cancel.is_set():
                raise FineTuneCancelled(f"fine-tune cancelled in epoch {epoch}")
            b = tr[order[s:s + config.batch_size]]
            x = x_all[b].to(device).float()
            target = nn.functional.one_hot(y_all[b], k).float().to(device)
            if config.noise:
                x = x + torch.randn(x.shape, generator=gen).to(device) * (config.noise * scale)
            if config.mixup:
                lam = float(rng.beta(config.mixup, config.mixup))
                perm = torch.randperm(len(b), generator=gen).to(device)
                x, target = lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                logits = model(x)
            loss = torch.sum(-target * torch.log_softmax(logits.float(), dim=1), dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(b)
            seen += len(b)
        accuracy = _accuracy(model, x_all[va], y_all[va], device, config.batch_size)
        stats = {"epoch": epoch, "train_loss": total / max(seen, 1), "val_accuracy": accuracy,
                 "lr": optimizer.param_groups[1]["lr"], "seconds": time.perf_counter() - started}
        history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch, stats)
        log.info("epoch %d: loss %.4f, hold-out accuracy %.4f (%.1f s)", epoch, stats["train_loss"], accuracy,
                 stats["seconds"])
        if accuracy > best[0]:
            best, bad_epochs = (accuracy, epoch, copy.deepcopy(model.state_dict())), 0
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                break
    model.load_state_dict(best[2])
    return head.cpu(), history, best[1], best[0]


def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate after ``step`` optimiser steps."""
    if schedule == "constant":
        return lambda step: 1.0
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total_steps - warmup) / max(1, total_steps - warmup)))

    return cosine


def _feature_dim(top: nn.Sequential, shape: tuple[int, ...]) -> int:
    with torch.inference_mode():
        return int(top.eval()(torch.zeros(1, *shape)).shape[1])


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int) -> float:
    model.eval()
    right = 0
    with torch.inference_mode():
        for s in range(0, len(y), batch):
            right += int((model(x[s:s + batch].to(device).float()).argmax(1).cpu() == y[s:s + batch]).sum())
    return right / max(len(y), 1)


def save_version(root: Path, name: str, parent: BackboneSpec, model: nn.Module, *, num_classes: int, how: str,
                 **details: object) -> Path:
    """Write a derived backbone (weights + ``backbone.json``) into a temp dir, fsync, then rename it into
    ``root/name``: the version appears whole or not at all."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{hashlib.sha256(str(time.time()).encode()).hexdigest()[:8]}"
    tmp.mkdir()
    try:
        weights = tmp / DERIVED_WEIGHTS
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        fsync_file(weights)
        meta = {"name": name, "arch": parent.name, "parent_model_id": parent.model_id, "parent": parent.name,
                "how": how, "sha256": sha256_file(weights), "num_classes": num_classes, **details,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        (tmp / DERIVED_META).write_text(json.dumps(meta, indent=2))
        fsync_file(tmp / DERIVED_META)
        fsync_dir(tmp)
        final = root / name
        tmp.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- AdaBN: the same weights, BatchNorm statistics of the target domain ---------------------------

ADABN_MIN_IMAGES = 8
ADABN_BATCH = 32


@dataclass
class AdaptResult:
    spec: BackboneSpec  # the new backbone, registered
    path: Path
    images: int  # target images the statistics were estimated on
    seconds: float
    failed: dict[int, str] = field(default_factory=dict)


def adabn(images: Sequence[bytes], *, data_dir: str | Path, suffix: str, model: str = "mobilenet_v2",
          progress: bool = False, cancel: threading.Event | None = None) -> AdaptResult:
    """AdaBN (Li et al. 2016): re-estimate every BatchNorm layer's statistics on unlabelled target images.

    No label and no gradient: the weights stay the parent's, only the per-channel means and variances
    become the target domain's, which undoes much of a shift in lighting, contrast or camera. The result is
    registered as ``<parent>.<suffix>`` like a fine-tune; heads for it are trained on its own vectors.
    """
    parent = get_backbone(model)
    check_adabn(parent)
    name = check_suffix(suffix, parent, data_dir)
    if len(images) < ADABN_MIN_IMAGES:
        raise TooFewLabelsError(f"AdaBN needs at least {ADABN_MIN_IMAGES} target images to estimate statistics, "
                                f"got {len(images)}; add more unlabelled images of the target domain")
    started = time.perf_counter()
    net = load_backbone(parent, with_head=True)  # keep the ImageNet classifier: the version stays a full network
    stem, blocks, tail = split_layers(net, parent.name)
    features = nn.Sequential(*stem, *blocks, *tail)  # every BatchNorm; the classifier has none
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every target image, not an exponential one
            m.train()
    pre = Preprocessor(parent.preprocessing, max_pixels=Config().max_pixels)
    normalize = FrozenBackbone(nn.Identity(), parent.preprocessing)
    failed: dict[int, str] = {}
    used = 0
    with torch.no_grad(), tqdm(total=len(images), unit="img", desc="AdaBN statistics", disable=not progress) as bar:
        for start in range(0, len(images), ADABN_BATCH):
            if cancel is not None and cancel.is_set():
                raise FineTuneCancelled("AdaBN cancelled while estimating statistics")
            batch = []
            for i in range(start, min(start + ADABN_BATCH, len(images))):
                try:
                    batch.append(pre(images[i]))
                except EmbedderError as e:
                    failed[i] = str(e)
            if len(batch) > 1:  # BatchNorm in training mode needs two or more images per batch
                x = (torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() - normalize.mean) * normalize.inv_scale
                features(x)
                used += len(batch)
            bar.update(min(ADABN_BATCH, len(images) - start))
    if used < ADABN_MIN_IMAGES:
        raise TooFewLabelsError(f"only {used} target images could be used (need {ADABN_MIN_IMAGES})")
    net.eval()
    path = save_version(Path(data_dir) / "backbones", name, parent, net, num_classes=1000,
                        how=f"AdaBN (BatchNorm statistics of {used} target images)", images=used)
    spec = register_derived(path)
    log.info("AdaBN %s -> %s on %d images", parent.model_id, spec.model_id, used)
    return AdaptResult(spec, path, used, time.perf_counter() - started, failed)
