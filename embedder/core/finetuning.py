"""Fine-tune and AdaBN jobs of the service: check the request, gather the kept images, hand the work to the
job runner. The work itself (:mod:`embedder.finetune`) runs in the runner's thread and registers the new
backbone version, which any call can then name as its model (loaded on first use).
"""
from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import InvalidArgumentError


def _use(name: str) -> str:
    return f"model={name!r} in Embed/Add/Search (loaded on first use)"


def start_finetune(store: Any, jobs: Any, data_dir: Path, collection: str, suffix: str, *, unfreeze: int,
                   epochs: int, params: Mapping[str, Any], labels: Sequence[str], ids: Sequence[str],
                   publish: Callable[[Path], None] | None = None) -> Any:
    """Check a fine-tune of ``collection``'s labelled, kept images and queue it in ``jobs``; the job. ``publish``
    gets the new version's folder (to share it with other replicas)."""
    from classifier import InsufficientDataError

    from ..catalog import get_backbone
    from ..finetune import FineTuneConfig, check_labels, check_suffix, check_unfreeze, finetune

    config = FineTuneConfig.from_params(_merged(params, unfreeze=unfreeze, epochs=epochs))
    parent = get_backbone(store.collection(collection).model_id)
    check_unfreeze(parent, config.unfreeze)
    check_suffix(suffix, parent, data_dir)
    found, _, found_labels = store.labelled(collection, labels=list(labels) or None, ids=list(ids) or None)
    images = store.images(collection, found)
    missing = [i for i, img in zip(found, images) if img is None]
    if missing:
        raise InsufficientDataError(
            f"{len(missing)} of {len(found)} labelled items have no kept image (added as tensors, by hash, or by a "
            f"server run with --no-keep-images), e.g. {missing[0][:100]!r}; add them again as image bytes, or "
            "leave them out with `ids`/`labels`")
    check_labels(found_labels)

    def work(job: Any, cancel: threading.Event, report: Any) -> dict[str, Any]:
        result = finetune(images, found_labels, data_dir=data_dir, suffix=suffix, model=parent.model_id,
                          config=config, cancel=cancel,
                          on_epoch=lambda epoch, stats: report({**stats, "epochs": config.epochs}))
        if publish is not None:
            publish(result.path)
        return {"name": result.spec.name, "model_id": result.spec.model_id, "parent": parent.model_id,
                "classes": result.classes, "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
                "trunk_passes": result.trunk_passes, "trunk_seconds": result.trunk_seconds,
                "train_seconds": result.train_seconds, "history": result.history, "use": _use(result.spec.name)}

    return jobs.submit("finetune", {"collection": collection, "suffix": suffix, "parent": parent.model_id,
                                            "images": len(found), "config": asdict(config)}, work)


def _merged(params: Mapping[str, Any], **fields: int) -> dict[str, Any]:
    """``params`` with the request's own fields (0: not given) added; the same setting given both ways is refused
    unless the two agree (one silently winning was a surprise)."""
    merged = dict(params)
    for name, value in fields.items():
        if not value:
            continue
        if name in merged and merged[name] != value:
            raise InvalidArgumentError(f"{name} is given twice, {value} and params.{name}={merged[name]!r}; "
                                       "give it once")
        merged[name] = value
    return merged


def start_adabn(store: Any, jobs: Any, data_dir: Path, collection: str, suffix: str,
                publish: Callable[[Path], None] | None = None) -> Any:
    """Check an AdaBN pass over ``collection``'s kept images and queue it in ``jobs``; the job (``publish`` as
    for :func:`start_finetune`)."""
    from ..catalog import get_backbone
    from ..finetune import ADABN_MIN_IMAGES, TooFewLabelsError, adabn, check_adabn, check_suffix

    parent = get_backbone(store.collection(collection).model_id)
    check_adabn(parent)  # up front, as a fine-tune's check_unfreeze: a job would only fail later
    check_suffix(suffix, parent, data_dir)
    found, _ = store.vectors(collection)
    images = [img for img in store.images(collection, found) if img is not None]
    if len(images) < ADABN_MIN_IMAGES:
        raise TooFewLabelsError(f"collection {collection!r} has {len(images)} kept images; AdaBN needs at least "
                                f"{ADABN_MIN_IMAGES} images of the target domain (added as image bytes)")

    def work(job: Any, cancel: threading.Event, report: Any) -> dict[str, Any]:
        result = adabn(images, data_dir=data_dir, suffix=suffix, model=parent.model_id, cancel=cancel)
        if publish is not None:
            publish(result.path)
        return {"name": result.spec.name, "model_id": result.spec.model_id, "parent": parent.model_id,
                "images": result.images, "seconds": result.seconds, "use": _use(result.spec.name)}

    return jobs.submit("adabn", {"collection": collection, "suffix": suffix, "parent": parent.model_id,
                                         "images": len(images)}, work)
