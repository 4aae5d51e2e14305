"""Fine-tuning the last blocks on cached trunk activations -> a new, registered backbone version; AdaBN."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import torch
from conftest import small_jpegs

from embedder import Embedder, backbones, get_backbone
from embedder.activations import ActivationCache
from embedder.config import Config
from embedder.errors import UnknownModelError, WeightsHashError
from embedder.finetune import (CUT_POINTS, FineTuneCancelled, FineTuneConfig, FineTuneError, Split, adabn,
                               check_unfreeze, finetune)
from embedder.preprocess import Preprocessor

FAST = FineTuneConfig(epochs=3, patience=3)


@pytest.fixture(scope="module")
def tuned(digit_images, tmp_path_factory):
    """One fine-tune of the 0/1/7 digits, shared; the registry entry is re-added per test by `registered`."""
    images, labels = digit_images
    data_dir = tmp_path_factory.mktemp("ft")
    epochs: list[dict] = []
    result = finetune(images, labels, data_dir=data_dir, suffix="digits", config=FAST,
                      on_epoch=lambda e, stats: epochs.append(stats))
    with backbones._registry_lock:
        backbones._REGISTRY.pop(result.spec.name)  # tests register it again under restore_registry
    return result, data_dir, epochs


@pytest.fixture(scope="module")
def cache(tuned):
    """The activations the shared fine-tune cached: later fine-tunes of the same images run no trunk pass."""
    with ActivationCache(tuned[1] / "activations.sqlite3") as c:
        yield c


@pytest.fixture
def registered(tuned, restore_registry):
    result, data_dir, _ = tuned
    backbones.load_derived(data_dir / "backbones")
    return result, data_dir


def test_a_fine_tune_registers_a_new_backbone_that_records_its_parent(registered, tuned, digit_images, embedder):
    result, data_dir = registered
    parent = get_backbone("mobilenet_v2")
    spec = get_backbone(result.spec.model_id)
    assert spec.name == "mobilenet_v2.digits" and spec.parent == parent.model_id
    assert spec.model_id != parent.model_id and spec.model_id.startswith("mobilenet_v2.digits:")
    meta = json.loads((result.path / backbones.DERIVED_META).read_text())
    assert meta["parent_model_id"] == parent.model_id and meta["classes"] == ["0", "1", "7"]
    assert len(tuned[2]) == len(result.history) and result.val_accuracy == max(h["val_accuracy"] for h in result.history)
    assert result.val_accuracy >= 0.8 and result.trunk_passes == len(digit_images[0])


def test_its_embeddings_differ_from_the_parent_which_stays_untouched(registered, digit_images, embedder):
    result, data_dir = registered
    images = digit_images[0][:6]
    before = embedder.embed(images)
    with Embedder(model=result.spec.name, device="cpu", runtime="torch", data_dir=data_dir) as tuned_model:
        assert tuned_model.model_id == result.spec.model_id
        vectors = tuned_model.embed(images)
    assert vectors.shape == before.shape and np.isfinite(vectors).all()
    assert float(np.mean(np.sum(vectors * before, axis=1))) < 0.99  # the last block really changed
    np.testing.assert_array_equal(embedder.embed(images), before)


def test_a_second_fine_tune_reads_the_activation_cache_and_runs_no_trunk_pass(tuned, digit_images,
                                                                             restore_registry):
    _, data_dir, _ = tuned  # its own cache file in the data dir, opened afresh
    again = finetune(*digit_images, data_dir=data_dir, suffix="again", config=FineTuneConfig(epochs=1))
    assert again.trunk_passes == 0 and again.trunk_seconds < 2


def test_fine_tuning_is_reproducible(tuned, cache, digit_images, tmp_path, restore_registry):
    result, _, _ = tuned
    redo = finetune(*digit_images, data_dir=tmp_path, suffix="digits", config=FAST, cache=cache)
    assert [h["val_accuracy"] for h in redo.history] == [h["val_accuracy"] for h in result.history]
    assert [h["train_loss"] for h in redo.history] == pytest.approx([h["train_loss"] for h in result.history],
                                                                     rel=1e-4)
    from safetensors.numpy import load_file

    a, b = (load_file(str(r.path / backbones.DERIVED_WEIGHTS)) for r in (result, redo))
    # Adam divides by the gradients' running RMS, which magnifies the last-bit noise of CPU BLAS sums
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=2e-3) for k in a)


def test_a_bf16_fine_tune_trains_under_autocast_and_saves_fp32_weights(tuned, cache, digit_images, tmp_path,
                                                                       restore_registry):
    from safetensors.numpy import load_file

    result, _, _ = tuned
    seen: dict[bool, set] = {True: set(), False: set()}  # training? -> dtypes of the convolutions' outputs

    def record(module, _inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            seen[module.training].add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        bf16 = finetune(*digit_images, data_dir=tmp_path, suffix="digits", cache=cache,
                        config=FineTuneConfig(epochs=3, patience=3, precision="bf16"))
    finally:
        hook.remove()
    assert seen == {True: {torch.bfloat16}, False: {torch.float32}}  # the step in bf16, the hold-out check in fp32
    assert bf16.spec.name == "mobilenet_v2.digits" and bf16.val_accuracy >= result.val_accuracy - 0.1  # 18 images
    assert [h["train_loss"] for h in bf16.history] == pytest.approx([h["train_loss"] for h in result.history],
                                                                     rel=0.01)
    a, b = (load_file(str(r.path / backbones.DERIVED_WEIGHTS)) for r in (result, bf16))
    assert {k: v.dtype for k, v in b.items()} == {k: v.dtype for k, v in a.items()}  # saved as fp32, as always
    with Embedder(model=bf16.spec.model_id, device="cpu", runtime="torch", data_dir=tmp_path) as tuned_model:
        assert np.isfinite(tuned_model.embed(digit_images[0][:4])).all()


def test_a_cancelled_fine_tune_leaves_nothing_registered(digit_images, cache, tmp_path, restore_registry):
    cancel = threading.Event()
    with pytest.raises(FineTuneCancelled, match="epoch 2"):  # set after epoch 1, noticed in epoch 2
        finetune(*digit_images, data_dir=tmp_path, suffix="cancelled", config=FAST, cancel=cancel, cache=cache,
                 on_epoch=lambda epoch, stats: cancel.set())
    cancel.set()
    with pytest.raises(FineTuneCancelled, match="trunk"):
        finetune([b"never seen" * 9, *digit_images[0][:3]], ["a", "a", "b", "b"], data_dir=tmp_path,
                 suffix="cancelled", cancel=cancel, cache=cache)
    assert not (tmp_path / "backbones").exists() or not list((tmp_path / "backbones").iterdir())
    with pytest.raises(UnknownModelError):
        get_backbone("mobilenet_v2.cancelled")


def test_tampered_weights_are_refused_and_a_missing_parent_is_named(tuned, tmp_path, restore_registry):
    import shutil

    result, _, _ = tuned
    copy = tmp_path / "mobilenet_v2.digits"
    shutil.copytree(result.path, copy)
    blob = bytearray((copy / backbones.DERIVED_WEIGHTS).read_bytes())
    blob[-10] ^= 0xFF
    (copy / backbones.DERIVED_WEIGHTS).write_bytes(bytes(blob))
    spec = backbones.register_derived(copy)
    with pytest.raises(WeightsHashError):
        backbones.load_backbone(spec)
    meta = json.loads((copy / backbones.DERIVED_META).read_text())
    meta["parent_model_id"] = "mobilenet_v2:000000000000:pp2-gone"
    (copy / backbones.DERIVED_META).write_text(json.dumps(meta))
    with pytest.raises(UnknownModelError, match="mobilenet_v2:000000000000"):
        backbones.register_derived(copy, overwrite=True)


def test_bad_fine_tune_requests_say_what_is_wrong(digit_images, tmp_path, restore_registry):
    images, labels = digit_images
    with pytest.raises(FineTuneError, match="two classes"):
        finetune(images[:5], ["a"] * 5, data_dir=tmp_path, suffix="x")
    with pytest.raises(FineTuneError, match="at least 2"):
        finetune(images[:5], ["a", "a", "b", "b", "c"], data_dir=tmp_path, suffix="x")
    with pytest.raises(FineTuneError, match="1..16 blocks for efficientnet_lite0"):
        finetune(images[:6], ["a", "b"] * 3, data_dir=tmp_path, suffix="x", model="efficientnet_lite0",
                 config=FineTuneConfig(unfreeze=17))
    with pytest.raises(FineTuneError, match="one label per image"):
        finetune(images[:6], ["a"], data_dir=tmp_path, suffix="x")
    with pytest.raises(FineTuneError, match="suffix"):
        finetune(images[:6], ["a", "b"] * 3, data_dir=tmp_path, suffix="../x")
    with pytest.raises(FineTuneError, match="unfreeze"):
        FineTuneConfig(unfreeze=0)
    with pytest.raises(FineTuneError, match="schedule must be one of cosine, constant"):
        FineTuneConfig.from_params({"schedule": "linear"})
    with pytest.raises(FineTuneError, match="precision must be one of fp32, bf16"):
        FineTuneConfig.from_params({"precision": "fp16"})


def test_undecodable_images_are_reported_and_left_out(digit_images, cache, tmp_path, restore_registry):
    images, labels = digit_images
    result = finetune([b"junk", *images[::3]], ["0", *labels[::3]], data_dir=tmp_path, suffix="partial",
                      config=FineTuneConfig(epochs=1), cache=cache)
    assert list(result.failed) == [0] and "image" in result.failed[0]
    assert result.trunk_passes == 0 and sorted(result.classes) == ["0", "1", "7"]


def test_the_activation_cache_is_bounded_and_reads_torn_rows_as_misses(tmp_path):
    rows = np.random.default_rng(0).standard_normal((10, 4, 2, 2)).astype(np.float16)  # 32 bytes each
    with ActivationCache(tmp_path / "a.sqlite3", max_bytes=32 * 6) as cache:
        cache.put("m", 3, [f"s{i}" for i in range(10)], rows)
        got = cache.get("m", 3, [f"s{i}" for i in range(10)])
        assert [g is None for g in got] == [True] * 4 + [False] * 6  # the 4 least recently used went
        np.testing.assert_array_equal(got[9], rows[9])
        assert cache.get("m", 4, ["s9"]) == [None] and cache.nbytes == 32 * 6  # the cut is part of the key
        cache._db.execute("UPDATE activations SET data = x'00' WHERE sha256 = 's9'")
        assert cache.get("m", 3, ["s9"]) == [None]


def _normalised(spec: backbones.BackboneSpec, images: list[bytes]) -> torch.Tensor:
    """Images as the network's input: decoded, preprocessed, normalised (float32 NCHW)."""
    pre = Preprocessor(spec.preprocessing, max_pixels=Config().max_pixels)
    x = torch.from_numpy(np.stack([pre(b) for b in images])).permute(0, 3, 1, 2).float()
    norm = backbones.FrozenBackbone(torch.nn.Identity(), spec.preprocessing)
    return (x - norm.mean) * norm.inv_scale


@pytest.mark.parametrize("arch", sorted(CUT_POINTS))
def test_each_architecture_is_cut_before_its_last_blocks_and_fp16_activations_give_the_fp32_features(arch,
                                                                                                    digit_images):
    spec = get_backbone(arch)
    full = backbones.load_backbone(spec)
    x = _normalised(spec, digit_images[0][::30])
    with torch.inference_mode():
        expected = full(x)
    n_params = sum(p.numel() for p in full.parameters())
    cuts = []
    for unfreeze in (1, 2, 3):
        split = Split(spec, unfreeze)
        cuts.append(split.cut)
        trunk_params = sum(p.numel() for p in split.trunk.parameters())
        top_params = [p for p in split.top.parameters()]
        assert trunk_params + sum(p.numel() for p in top_params) == n_params  # nothing lost or doubled
        assert all(p.requires_grad for p in top_params) and not any(p.requires_grad for p in split.trunk.parameters())
        with torch.inference_mode():
            cached = split.trunk.features(x).half()  # what the activation cache holds
            got = split.top.eval()(cached.float())
        cosine = torch.nn.functional.cosine_similarity(got, expected)
        assert float(cosine.min()) > 0.9999 and float((got - expected).abs().max()) < 2e-2 * float(expected.abs().max())
    assert cuts[0] - cuts[1] == cuts[1] - cuts[2] == 1  # one block per step, counted from the end
    check_unfreeze(spec, CUT_POINTS[arch])
    with pytest.raises(FineTuneError, match=f"1..{CUT_POINTS[arch]} blocks for {arch}"):
        check_unfreeze(spec, CUT_POINTS[arch] + 1)


def test_early_stopping_stops_when_the_hold_out_stops_improving_and_the_schedule_decays(digit_images, cache,
                                                                                       tmp_path, restore_registry):
    # a learning rate too small to change a prediction: the hold-out accuracy of epoch 1 is never beaten
    still = finetune(*digit_images, data_dir=tmp_path, suffix="still", cache=cache,
                     config=FineTuneConfig(epochs=10, patience=2, lr=1e-9))
    assert len(still.history) == 3 and still.best_epoch == 1
    lrs = [h["lr"] for h in still.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # cosine: decays epoch by epoch
    constant = finetune(*digit_images, data_dir=tmp_path, suffix="constant", cache=cache,
                        config=FineTuneConfig(epochs=2, schedule="constant"))
    assert [h["lr"] for h in constant.history] == [1e-3, 1e-3] and constant.trunk_passes == 0


def test_efficientnet_lite_fine_tunes_into_a_backbone_that_loads_and_cannot_be_fine_tuned_again(digit_images,
                                                                                               tmp_path,
                                                                                               restore_registry):
    images, labels = digit_images[0][::3], digit_images[1][::3]
    result = finetune(images, labels, data_dir=tmp_path, suffix="lite", model="efficientnet_lite0",
                      config=FineTuneConfig(unfreeze=2, epochs=1))
    assert json.loads((result.path / backbones.DERIVED_META).read_text())["arch"] == "efficientnet_lite0"
    with Embedder(model=result.spec.name, device="cpu", runtime="torch", data_dir=tmp_path) as tuned_model, \
            Embedder(model="efficientnet_lite0", device="cpu", runtime="torch") as parent:
        vectors, before = tuned_model.embed(images[:4]), parent.embed(images[:4])
    assert vectors.shape == before.shape == (4, 1280) and float(np.mean(np.sum(vectors * before, axis=1))) < 0.999
    with pytest.raises(FineTuneError, match="fine-tune the original backbone"):
        finetune(images, labels, data_dir=tmp_path, suffix="again", model=result.spec.name)


def test_adabn_re_estimates_every_batchnorm_on_the_target_images_and_keeps_the_weights(digit_images, tmp_path,
                                                                                      restore_registry):
    from PIL import Image
    import io

    inverted = [255 - np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in digit_images[0][:64]]
    target = small_jpegs(inverted)  # 64 images: two full batches, so the running mean is the plain mean
    result = adabn(target, data_dir=tmp_path, suffix="inverted")
    parent_spec = get_backbone("mobilenet_v2")
    parent = backbones.load_backbone(parent_spec, with_head=True)
    adapted = backbones.load_backbone(result.spec, with_head=True)
    weights = {k: v for k, v in parent.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in weights.items())  # only statistics change
    bns = [(a, p) for a, p in zip(adapted.modules(), parent.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    assert len(bns) == 52 and not any(torch.equal(a.running_mean, p.running_mean) or
                                      torch.equal(a.running_var, p.running_var) for a, p in bns)
    with torch.inference_mode():  # the first BatchNorm holds exactly the target's per-channel statistics
        conv = parent.features[0][0](_normalised(parent_spec, target))
    bn = adapted.features[0][1]
    torch.testing.assert_close(bn.running_mean, conv.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(bn.running_var, conv.var(dim=(0, 2, 3)), rtol=0.1, atol=1e-4)
