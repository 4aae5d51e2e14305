"""Fine-tuning the last block on cached trunk activations -> a new, registered backbone version."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from embedder import Embedder, backbones
from embedder.activations import ActivationCache
from embedder.errors import UnknownModelError, WeightsHashError
from embedder.finetune import FineTuneCancelled, FineTuneConfig, FineTuneError, finetune

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
    parent = backbones.get_backbone("mobilenet_v2")
    spec = backbones.get_backbone(result.spec.model_id)
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
        backbones.get_backbone("mobilenet_v2.cancelled")


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
    with pytest.raises(FineTuneError, match="supports mobilenet_v2"):
        finetune(images[:6], ["a", "b"] * 3, data_dir=tmp_path, suffix="x", model="efficientnet_lite0")
    with pytest.raises(FineTuneError, match="one label per image"):
        finetune(images[:6], ["a"], data_dir=tmp_path, suffix="x")
    with pytest.raises(FineTuneError, match="suffix"):
        finetune(images[:6], ["a", "b"] * 3, data_dir=tmp_path, suffix="../x")
    with pytest.raises(FineTuneError, match="unfreeze"):
        FineTuneConfig(unfreeze=0)


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
