"""Heads built from text: ``zero_shot`` (class prompts only, no labelled image) and ``few_shot`` (starts there and
learns from a few labelled vectors).

Both score an image by the cosine of its vector with one weight vector per class, times a temperature
(``logit_scale``, 100 as CLIP learned it), softmaxed: a text-image model's zero-shot classifier. The class
vectors of a zero-shot head are the normalised means of the class prompts' text embeddings (prompt ensembling,
"a photo of a {label}", "a drawing of a {label}", ...); the features are not standardised (the cosine is what the
model was trained on).

The few-shot head starts from the zero-shot class vectors (``prior``) and moves each towards the mean of its
labelled vectors, the prior counting as ``prior_weight`` labelled images: a posterior mean of the class direction.
Where the text prior and the few labels are each noisy, it beats both the zero-shot head and a plain logreg on
the same 1-10 labels per class (tests/test_zero_shot.py measures it on such data).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import Head, check_linear, softmax
from .validation import HeadError


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


class _CosineHead(Head):
    """Softmax over ``logit_scale * cos(x, coef[c]) + intercept[c]``; features are not standardised."""

    standardize = False
    _model_arrays = ("coef", "intercept")

    def _proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.logit_scale * (_unit(X) @ _unit(self.coef_).T) + self.intercept_)

    def _check_shapes(self) -> None:
        super()._check_shapes()
        check_linear(self)


class ZeroShotHead(_CosineHead):
    """Built from class prompts' text vectors with :meth:`from_text`, never fitted on labels."""

    kind = "zero_shot"

    def __init__(self, *, logit_scale: float = 100.0) -> None:
        self.logit_scale = logit_scale

    @classmethod
    def from_text(cls, prompt_vectors: Mapping[Any, np.ndarray], *, model_id: str, **params: Any) -> ZeroShotHead:
        """A fitted head: ``prompt_vectors`` maps each label to its prompts' text vectors ``(n_prompts, dim)``."""
        if len(prompt_vectors) < 2:
            raise HeadError(f"a zero-shot head needs prompts for at least two labels, got {len(prompt_vectors)}; "
                            "give class_prompts={label: [prompt, ...]} for every class to tell apart")
        head = cls._create(**params)
        labels = sorted(prompt_vectors)
        head.coef_ = class_vectors(prompt_vectors, labels).astype(np.float32)
        d = head.coef_.shape[1]
        head.classes_ = np.asarray(labels)
        head.class_counts_ = np.asarray([len(prompt_vectors[c]) for c in labels], np.int64)  # prompts per class
        head.intercept_ = np.zeros(len(labels), np.float32)
        head.mean_, head.scale_ = np.zeros(d, np.float32), np.ones(d, np.float32)
        head.n_features_in_ = d
        head.model_id_ = model_id
        return head

    def fit(self, X: Any, y: Any, *, model_id: str | None = None) -> ZeroShotHead:
        raise HeadError("a zero_shot head is built from class prompts, not fitted on labelled vectors: "
                        "Train(head='zero_shot', class_prompts={label: ['a photo of a {label}', ...]}); to learn "
                        "from labelled items too, train head='few_shot' with the same class_prompts")


class FewShotHead(_CosineHead):
    """Cosine head whose class vectors start at the zero-shot ones and move towards the labelled images.

    Each class vector is the normalised sum of ``prior_weight`` times the class's zero-shot vector and its
    labelled vectors (each normalised): the text prior counts as ``prior_weight`` labelled images, so one label
    moves it a little and ten move it most of the way. ``prior`` maps each label to its zero-shot class vector (what
    :func:`class_vectors` makes of the prompts); it is needed to fit, not to predict, and is not saved.
    """

    kind = "few_shot"
    min_per_class = 1

    def __init__(self, *, prior: Mapping[Any, Any] | None = None, prior_weight: float = 2.0,
                 logit_scale: float = 100.0) -> None:
        self.prior = prior
        self.prior_weight = prior_weight
        self.logit_scale = logit_scale

    def saved_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.get_params().items() if k != "prior"}

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        if not self.prior:
            raise HeadError("a few_shot head starts from zero-shot class vectors: give class_prompts={label: "
                            "[prompt, ...]} for every label of the training items")
        labels = self.classes_.tolist()
        missing = [c for c in labels if c not in self.prior]
        if missing:
            raise HeadError(f"class_prompts has no prompts for label(s) {', '.join(map(repr, missing[:10]))}; give "
                            "prompts for every label of the training items")
        prior = _unit(np.stack([np.asarray(self.prior[c], np.float64) for c in labels]))
        if prior.shape[1] != X.shape[1]:
            raise HeadError(f"the class prompts' vectors are {prior.shape[1]}-d, the training vectors "
                            f"{X.shape[1]}-d: both must come from the same model")
        images = np.zeros_like(prior)
        np.add.at(images, y, _unit(X))
        self.coef_ = _unit(self.prior_weight * prior + images).astype(np.float32)
        self.intercept_ = np.zeros(len(labels), np.float32)


def class_vectors(prompt_vectors: Mapping[Any, np.ndarray], labels: list[Any]) -> np.ndarray:
    """Prompt ensembling: per label, the normalised mean of its prompts' normalised text vectors ``(k, dim)``."""
    return _unit(np.stack([_unit(np.asarray(prompt_vectors[c])).mean(axis=0) for c in labels]))
