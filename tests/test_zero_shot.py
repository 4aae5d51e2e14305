"""Zero-shot and few-shot heads on vectors (no model): accuracy against zero-shot and logreg, persistence,
refusals. The text-image model path (prompts embedded by a CLIP card) is in test_clip_cards.py."""
from __future__ import annotations

import numpy as np
import pytest

from classifier import HeadRegistry
from classifier.heads import FewShotHead, HeadError, ZeroShotHead, make_head

K, D = 10, 64


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _task(seed: int, shots: int, test: int = 100):
    """Classes as directions; images scattered around them, text vectors a noisy guess of them plus a shared
    offset (the modality gap): neither the prompts alone nor a few labels alone pin a class down."""
    rng = np.random.default_rng(seed)
    mu = _unit(rng.normal(size=(K, D)))
    text = _unit(mu + _unit(rng.normal(size=D)) + 1.5 * rng.normal(size=(K, D)) / np.sqrt(D))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(K), n)
        return (mu[y] + 3.0 * rng.normal(size=(K * n, D)) / np.sqrt(D)).astype(np.float32), y.astype(str)

    labels = [str(c) for c in range(K)]
    return {c: text[i:i + 1] for i, c in enumerate(labels)}, sample(shots), sample(test)


@pytest.mark.parametrize("shots", [1, 2, 5, 10])
def test_few_shot_beats_zero_shot_and_logreg(shots):
    """Mean hold-out accuracy over 5 draws: few_shot > zero_shot, and > logreg where logreg can train (>= 2)."""
    accuracy = {"zero_shot": [], "few_shot": [], "logreg": []}
    for seed in range(5):
        prompts, (X, y), (X_test, y_test) = _task(seed, shots)
        zero = ZeroShotHead.from_text(prompts, model_id="m")
        prior = {c: v[0] for c, v in prompts.items()}
        heads = {"zero_shot": zero, "few_shot": FewShotHead(prior=prior).fit(X, y, model_id="m")}
        if shots >= 2:
            heads["logreg"] = make_head("logreg").fit(X, y, model_id="m")
        for kind, head in heads.items():
            accuracy[kind].append(np.mean(head.predict(X_test, model_id="m") == y_test))
    mean = {k: np.mean(v) for k, v in accuracy.items() if v}
    assert mean["few_shot"] > mean["zero_shot"] + 0.02, mean
    if shots >= 2:
        assert mean["few_shot"] > mean["logreg"] + 0.02, mean


def test_zero_shot_is_the_argmax_of_cosine_with_the_prompt_means():
    rng = np.random.default_rng(0)
    prompts = {"a": rng.normal(size=(3, 8)), "b": rng.normal(size=(2, 8)), "c": rng.normal(size=(1, 8))}
    head = ZeroShotHead.from_text(prompts, model_id="m")
    X = rng.normal(size=(20, 8)).astype(np.float32)
    means = _unit(np.stack([_unit(prompts[c]).mean(0) for c in "abc"]))
    assert list(head.predict(X, model_id="m")) == ["abc"[j] for j in (_unit(X) @ means.T).argmax(1)]
    assert head.class_counts_.tolist() == [3, 2, 1]
    with pytest.raises(HeadError, match="built from class prompts"):
        head.fit(X, ["a"] * 20)


def test_text_heads_save_and_load_predicting_the_same(tmp_path):
    prompts, (X, y), (X_test, _) = _task(0, 3)
    registry = HeadRegistry(tmp_path)
    zero = registry.add(ZeroShotHead.from_text(prompts, model_id="m"), head_id="zs")
    few = registry.train(X, y, model_id="m", kind="few_shot", params={"prior": {c: v[0] for c, v in prompts.items()}},
                         head_id="fs")
    assert zero.info.kind == "zero_shot" and few.info.kind == "few_shot" and "prior" not in few.info.params
    reopened = HeadRegistry(tmp_path)
    for head_id in ("zs", "fs"):
        before = registry.get(head_id).predict_proba(X_test, model_id="m")
        assert np.array_equal(reopened.get(head_id).predict_proba(X_test, model_id="m"), before)


def test_few_shot_refusals_name_the_fix():
    prompts, (X, y), _ = _task(0, 2)
    with pytest.raises(HeadError, match="give class_prompts"):
        FewShotHead().fit(X, y, model_id="m")
    with pytest.raises(HeadError, match="no prompts for label"):
        FewShotHead(prior={"0": prompts["0"][0]}).fit(X, y, model_id="m")
    with pytest.raises(HeadError, match="at least two labels"):
        ZeroShotHead.from_text({"only": prompts["0"]}, model_id="m")
