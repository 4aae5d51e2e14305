"""Model cards: serve your own model. A small JSON or TOML file names a model's files and how to feed it.

A card is registered as a backbone (:func:`register_card`), so the model pool, the cache, collections, heads
and every runtime take it like a built-in one. Its model id comes from the files' sha256, the preprocessing
recipe and how its output is read; a card may pin the sha256 and is refused when the files differ.

Formats (``format``):

``onnx``
    An ONNX file taking float images; the input size comes from its static shape or ``input_size``. It is
    wrapped (uint8 channels-last in, normalisation, ``layout``, the ``output`` tensor, ``pool``) into the graph
    ONNX Runtime and OpenVINO run: no torch involved, so it cannot run on the torch runtime nor be fine-tuned.
``torchscript``
    A TorchScript file taking ``(N, 3, H, W)`` (or ``NHWC``) float images.
``torchvision``
    ``arch`` (a torchvision architecture name) and a state dict file; the last Linear layer is removed.
``timm``
    ``arch`` (a timm model name) and a state dict file; built with ``pretrained=False`` and no classifier.
``transformers``
    A Hugging Face model folder (vision encoders, CLIP, SigLIP), loaded with ``local_files_only=True``; its
    preprocessing comes from its own ``preprocessor_config.json``, and a CLIP-style model embeds text too.

Example (``my-cnn.toml``; relative paths are read from the card's folder)::

    name = "my-cnn"
    format = "onnx"
    path = "my-cnn.onnx"
    sha256 = "9f2c..."          # optional pin
    input_size = 224            # the center crop; resize defaults to input_size / 0.875
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]
    layout = "NCHW"             # NCHW | NHWC
    output = ""                 # ONNX output tensor name; empty: the first
    pool = "none"               # none | spatial_mean (N,C,H,W) | token_mean (N,T,D) | first_token (N,T,D)
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .backbones import (IMAGENET_224, IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, Preprocessing, WeightsFile,
                        _stat_key, _strip_head, load_backbone, register_backbone, registered_backbone, sha256_path)
from .errors import ModelCardError, NotSupportedByModelError, WeightsHashError, WeightsNotFoundError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "torchvision", "timm", "transformers")
LAYOUTS = ("NCHW", "NHWC")
POOLS = ("none", "spatial_mean", "token_mean", "first_token")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA = re.compile(r"[0-9a-f]{64}")
# The ONNX wrapper's own tensor names: prefixed so they never clash with the model's.
_IN, _OUT, _P = "embedder_images", "embedder_features", "embedder_card_"


@dataclass(frozen=True)
class ModelCard:
    """What a card file says. Preprocessing fields do not apply to ``transformers`` (read from the folder)."""

    name: str
    format: str
    path: Path
    arch: str = ""
    sha256: str = ""
    dim: int = 0  # 0: read from the model (static shapes, the folder's config) or measured with one forward pass
    input_size: int = 0  # the center crop; 0: the ONNX input's static size
    resize: int = 0  # the shorter side before the crop; 0: input_size / 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    output: str = ""
    pool: str = "none"
    description: str = ""

    def __post_init__(self) -> None:
        where = f"model card {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ModelCardError(f"model card name {str(self.name)[:80]!r} is not usable; use 1-64 letters, digits, "
                                 "'.', '_' or '-', starting with a letter or digit")
        if self.format not in FORMATS:
            raise ModelCardError(f"{where}: unknown format {str(self.format)[:40]!r}; use one of {', '.join(FORMATS)}")
        if self.format in ("torchvision", "timm") and not self.arch:
            raise ModelCardError(f"{where}: format {self.format!r} needs `arch`, the {self.format} architecture name "
                                 "(e.g. \"resnet18\") that the state dict file was saved from")
        if self.format not in ("torchvision", "timm") and self.arch:
            raise ModelCardError(f"{where}: `arch` applies to formats torchvision and timm, not {self.format!r}")
        for key in ("arch", "sha256", "output", "description", "interpolation"):
            if not isinstance(getattr(self, key), str):
                raise ModelCardError(f"{where}: {key} must be a string, got {getattr(self, key)!r}")
        if self.sha256 and not _SHA.fullmatch(self.sha256):
            raise ModelCardError(f"{where}: sha256 must be 64 lower-case hex digits (`sha256sum FILE`), got "
                                 f"{self.sha256[:80]!r}")
        if self.layout not in LAYOUTS:
            raise ModelCardError(f"{where}: layout must be NCHW or NHWC, got {str(self.layout)[:20]!r}")
        if self.pool not in POOLS:
            raise ModelCardError(f"{where}: pool must be one of {', '.join(POOLS)}, got {str(self.pool)[:40]!r}")
        if self.output and self.format != "onnx":
            raise ModelCardError(f"{where}: `output` names an ONNX output tensor; format {self.format!r} has none")
        for key in ("dim", "input_size", "resize"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ModelCardError(f"{where}: {key} must be a whole number >= 0, got {value!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ModelCardError(f"{where}: {key} must be three numbers (R, G, B), got {list(value)!r}")
        if not all(v > 0 for v in self.std):
            raise ModelCardError(f"{where}: std values must be > 0, got {list(self.std)!r}")
        for key in ("mean", "std"):  # frozen: a card is a dict key of the registrations
            object.__setattr__(self, key, tuple(float(v) for v in getattr(self, key)))
        object.__setattr__(self, "path", Path(self.path))
        if self.format == "transformers":
            own = ("input_size", "resize", "mean", "std", "interpolation", "layout", "pool")
            given = [f.name for f in fields(self) if f.name in own and getattr(self, f.name) != f.default]
            if given:
                raise ModelCardError(f"{where}: a transformers folder brings its own preprocessing "
                                     f"(preprocessor_config.json) and output; remove {', '.join(given)} from the card")

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """Read a ``.json`` or ``.toml`` card; a relative ``path`` in it is relative to the card's folder."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise WeightsNotFoundError(f"model card {path} cannot be read ({e.strerror or e}); check the path given "
                                       "to --model-card / EMBEDDER_MODEL_CARDS") from None
        try:
            data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ModelCardError(f"model card {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: "
                                 f"{e}") from None
        if not isinstance(data, dict):
            raise ModelCardError(f"model card {path} must hold one object (keys name, format, path, ...)")
        return cls.from_dict(data, base=path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: Path = Path(".")) -> ModelCard:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelCardError(f"model card {data.get('name', '?')!r}: unknown key(s) {', '.join(unknown)}; "
                                 f"a card has {', '.join(sorted(known))}")
        missing = [k for k in ("name", "format", "path") if not data.get(k)]
        if missing:
            raise ModelCardError(f"model card {data.get('name', '?')!r} needs {', '.join(missing)}")
        values = dict(data)
        values["path"] = (base / Path(str(data["path"])).expanduser()).resolve()
        return cls(**values)

    @property
    def recipe(self) -> str:
        """Fingerprint of how the output is read (layout, output tensor, pooling): part of the model id, beside the
        files and the preprocessing; empty for the defaults, so a plain file's id is ``name:sha:pp`` as ever."""
        read = {"layout": self.layout, "output": self.output, "pool": self.pool}
        if read == {"layout": "NCHW", "output": "", "pool": "none"}:
            return ""
        return hashlib.sha256(json.dumps(read, sort_keys=True).encode()).hexdigest()[:8]


# --- registration ----------------------------------------------------------------------------------

_lock = threading.Lock()
_digests: dict[tuple, str] = {}  # file states -> sha256
_specs: dict[tuple[ModelCard, str], BackboneSpec] = {}  # (card, files' sha256) -> the spec registered for it


def register_cards(paths: Iterable[str | Path]) -> list[BackboneSpec]:
    """Read and register every card in ``paths`` (an already registered, identical card is a no-op)."""
    return [register_card(ModelCard.read(p)) for p in paths]


def register_card(card: ModelCard, *, overwrite: bool = False) -> BackboneSpec:
    """Check the card's files (existence, pinned sha256) and register it as a backbone; returns its spec."""
    if not card.path.exists():
        raise WeightsNotFoundError(f"model card {card.name!r}: {card.path} does not exist; put the model's "
                                   f"{'folder' if card.format == 'transformers' else 'file'} there or fix `path` "
                                   "in the card")
    if card.format == "transformers" and not card.path.is_dir():
        raise ModelCardError(f"model card {card.name!r}: format transformers takes a model folder (config.json, "
                             f"weights, preprocessor_config.json), but {card.path} is a file")
    if card.format != "transformers" and not card.path.is_file():
        raise ModelCardError(f"model card {card.name!r}: format {card.format} takes one file, but {card.path} is "
                             "a folder")
    digest = _digest(card.path)
    with _lock:
        known = _specs.get((card, digest))
    if known is not None and registered_backbone(known.name) is known:
        return known  # the same card and files again (another Embedder, the pool): nothing to read or measure
    if card.sha256 and digest != card.sha256:
        raise WeightsHashError(f"model card {card.name!r}: {card.path} has sha256 {digest}, but the card pins "
                               f"{card.sha256}; restore the expected files, or update `sha256` in the card if the "
                               "new files are intended (vectors of the old ones will not mix with the new)")
    if not overwrite and registered_backbone(card.name) is not None:  # before building: the builder may read a large file
        raise ModelCardError(f"model card {card.name!r}: a model of that name is already registered (a built-in, "
                             "or another card); give this card another `name`")
    weights = WeightsFile(sha256=digest, path=card.path, filename=card.path.name)
    spec = register_backbone(_SPECS[card.format](card, weights), overwrite=overwrite)
    log.info("registered model card %s (%s, %d-d): %s", card.name, card.format, spec.dim, spec.model_id)
    with _lock:
        _specs[card, digest] = spec
    return spec


def register_local(name: str, path: str | Path, *, arch: str | None = None,
                   preprocessing: Preprocessing = IMAGENET_224, overwrite: bool = False) -> BackboneSpec:
    """Register a local weights file as a backbone: the card of a torchvision ``arch`` + state dict, or, without
    ``arch``, of a TorchScript file whose output is the ``(N, dim)`` features. The dim is measured."""
    pp = preprocessing
    card = ModelCard(name=name, format="torchvision" if arch else "torchscript", path=Path(path).expanduser().resolve(),
                     arch=arch or "", input_size=pp.crop, resize=pp.resize, mean=pp.mean, std=pp.std,
                     interpolation=pp.interpolation)
    return register_card(card, overwrite=overwrite)


def _digest(path: Path) -> str:
    """sha256 of the file or folder, computed once per state of its files."""
    key = _stat_key(path)
    with _lock:
        if key in _digests:
            return _digests[key]
    digest = sha256_path(path)
    with _lock:
        _digests[key] = digest
    return digest


def _preprocessing(card: ModelCard, crop: int) -> Preprocessing:
    try:
        return Preprocessing(resize=card.resize or round(crop / 0.875), crop=crop, mean=tuple(card.mean),
                             std=tuple(card.std), interpolation=card.interpolation)
    except ValueError as e:
        raise ModelCardError(f"model card {card.name!r}: {e}") from None


def _spec(card: ModelCard, weights: WeightsFile, pp: Preprocessing, build: Callable[[Path], nn.Module], dim: int,
          **extra: Any) -> BackboneSpec:
    return BackboneSpec(name=card.name, dim=dim, preprocessing=pp, weights=weights, build=build, recipe=card.recipe,
                        description=card.description or f"model card: {card.format} {card.arch} {card.path}".replace(
                            "  ", " "), **extra)


def _torch_spec(card: ModelCard, weights: WeightsFile, build: Callable[[Path], nn.Module], *,
                strip_head: bool) -> BackboneSpec:
    """A spec for a torch-built model; its dim is the card's or measured with one forward pass."""
    if not card.input_size:
        raise ModelCardError(f"model card {card.name!r}: format {card.format} needs `input_size` (the crop side "
                             "in pixels the model was trained on, e.g. 224)")
    pp = _preprocessing(card, card.input_size)

    def adapted(path: Path) -> nn.Module:
        module = build(path)
        if strip_head:
            module = _strip_head(module)
        return _adapter(module, card.layout, card.pool)

    torchscript = card.format == "torchscript"
    spec = _spec(card, weights, pp, adapted, card.dim, torchscript=torchscript, features_only=not torchscript)
    if card.dim:
        return spec
    import torch

    with torch.inference_mode():
        out = load_backbone(spec)(torch.zeros(1, 3, pp.crop, pp.crop))
    if out.dim() != 2:
        raise ModelCardError(f"model card {card.name!r}: {card.path} outputs shape {tuple(out.shape)}; a backbone must "
                             "output (N, dim) features: set the card's `pool` (spatial_mean, token_mean or "
                             "first_token)")
    return _spec(card, weights, pp, adapted, int(out.shape[1]), torchscript=torchscript,
                 features_only=not torchscript)


def _adapter(module: nn.Module, layout: str, pool: str) -> nn.Module:
    """``module`` fed NCHW images in its own layout, its output pooled to ``(N, dim)``."""
    from torch import nn

    class CardAdapter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: Any) -> Any:
            out = self.inner(x.permute(0, 2, 3, 1) if layout == "NHWC" else x)
            if pool == "spatial_mean":
                out = out.mean(dim=(2, 3))
            elif pool == "token_mean":
                out = out.mean(dim=1)
            elif pool == "first_token":
                out = out[:, 0]
            return out if pool == "none" else out.flatten(1)  # "none": (N, dim) already, checked below

    return CardAdapter()


def _onnx_only(card: ModelCard) -> Callable[[Path], nn.Module]:
    def build(path: Path) -> nn.Module:
        raise NotSupportedByModelError(
            f"model {card.name!r} is an ONNX file: it runs on the onnxruntime or openvino runtime (CPU), not on "
            "torch, and cannot be fine-tuned; use --runtime onnxruntime/openvino (device cpu), or give a "
            "torchscript / torchvision / timm / transformers card of the same model")
    return build


def _onnx_spec(card: ModelCard, weights: WeightsFile) -> BackboneSpec:
    import onnx

    try:
        model = onnx.load(str(card.path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file: onnx raises DecodeError and friends
        raise ModelCardError(f"model card {card.name!r}: {card.path} is not a readable ONNX file ({e})") from None
    inp = _onnx_input(model, card)
    shape = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
    if len(shape) != 4:
        raise ModelCardError(f"model card {card.name!r}: the ONNX input {inp.name!r} has {len(shape)} axes; an image "
                             "model takes (N, 3, H, W) or, with layout NHWC, (N, H, W, 3)")
    if shape[0]:
        raise ModelCardError(f"model card {card.name!r}: the ONNX input has a fixed batch size of {shape[0]}; export "
                             "it with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: "
                             "'batch'}}))")
    h, w = (shape[2], shape[3]) if card.layout == "NCHW" else (shape[1], shape[2])
    if h != w:
        raise ModelCardError(f"model card {card.name!r}: the ONNX input is {h}x{w}; only square inputs are served")
    if card.input_size and h and card.input_size != h:
        raise ModelCardError(f"model card {card.name!r}: input_size is {card.input_size}, but the ONNX input is "
                             f"{h}x{w}; set input_size = {h} or leave it out")
    out = next((o for o in model.graph.output if o.name == (card.output or model.graph.output[0].name)), None)
    rank = len(out.type.tensor_type.shape.dim) if out is not None and out.type.tensor_type.HasField("shape") else 0
    if card.pool == "none" and rank not in (0, 2):
        raise ModelCardError(f"model card {card.name!r}: {card.path} outputs {rank}-d tensors; a backbone must "
                             "output (N, dim) features: set the card's `pool` (spatial_mean, token_mean or "
                             "first_token)")
    crop = card.input_size or h
    if not crop:
        raise ModelCardError(f"model card {card.name!r}: the ONNX input has no static size; set `input_size`")
    pp = _preprocessing(card, crop)

    def export(src: Path, dst: Path) -> None:
        _wrap_onnx(card, pp, src, dst)

    spec = _spec(card, weights, pp, _onnx_only(card), card.dim, exporter=export)
    return spec if card.dim else _spec(card, weights, pp, _onnx_only(card), _onnx_dim(card, pp), exporter=export)


def _onnx_input(model: Any, card: ModelCard) -> Any:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelCardError(f"model card {card.name!r}: the ONNX graph has {len(inputs)} inputs "
                             f"({', '.join(i.name for i in inputs)}); an image model card needs exactly one")
    return inputs[0]


def _wrap_onnx(card: ModelCard, pp: Preprocessing, src: Path, dst: Path) -> None:
    """Write the graph the ONNX runtimes run: uint8 ``(N, H, W, 3)`` -> the card's normalisation and layout ->
    the model -> its ``output`` tensor, pooled and flattened to float32 ``(N, dim)``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inp = _onnx_input(model, card)
    outputs = [o.name for o in graph.output]
    out = card.output or outputs[0]
    if out not in outputs:
        raise ModelCardError(f"model card {card.name!r}: the ONNX graph has no output {out!r}; its outputs are "
                             f"{', '.join(outputs)}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    mean = np.asarray(pp.mean, np.float32).reshape(1, 1, 1, 3) * 255.0
    inv_scale = 1.0 / (np.asarray(pp.std, np.float32).reshape(1, 1, 1, 3) * 255.0)
    node = helper.make_node
    pre = [node("Cast", [_IN], [_P + "f"], to=TensorProto.FLOAT),
           node("Sub", [_P + "f", _P + "mean"], [_P + "c"]),
           node("Mul", [_P + "c", _P + "inv_scale"], [_P + "n"])]
    last = _P + "n"
    if card.layout == "NCHW":
        pre.append(node("Transpose", [last], [_P + "t"], perm=[0, 3, 1, 2]))
        last = _P + "t"
    elem = inp.type.tensor_type.elem_type
    pre.append(node("Identity", [last], [inp.name]) if elem == TensorProto.FLOAT else
               node("Cast", [last], [inp.name], to=elem))
    extra = [numpy_helper.from_array(mean, _P + "mean"), numpy_helper.from_array(inv_scale, _P + "inv_scale")]
    post, x = [], out
    if card.pool in ("spatial_mean", "token_mean"):
        axes = [2, 3] if card.pool == "spatial_mean" else [1]
        if opset >= 18:  # ReduceMean took its axes as an attribute before opset 18, as an input since
            extra.append(numpy_helper.from_array(np.asarray(axes, np.int64), _P + "axes"))
            post.append(node("ReduceMean", [x, _P + "axes"], [_P + "pooled"], keepdims=0))
        else:
            post.append(node("ReduceMean", [x], [_P + "pooled"], axes=axes, keepdims=0))
        x = _P + "pooled"
    elif card.pool == "first_token":
        extra.append(numpy_helper.from_array(np.asarray(0, np.int64), _P + "zero"))
        post.append(node("Gather", [x, _P + "zero"], [_P + "pooled"], axis=1))
        x = _P + "pooled"
    post += [node("Flatten", [x], [_P + "flat"], axis=1), node("Cast", [_P + "flat"], [_OUT], to=TensorProto.FLOAT)]
    nodes = [*pre, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(nodes)
    others = [i for i in graph.input if i.name != inp.name]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(_IN, TensorProto.UINT8, ["batch", pp.crop, pp.crop, 3]),
                        *others])
    graph.initializer.extend(extra)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(_OUT, TensorProto.FLOAT, ["batch", None])])
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ModelCardError(f"model card {card.name!r}: the wrapped ONNX graph is invalid ({e}); check layout, "
                             "output and pool") from None
    onnx.save(model, str(dst))


def _onnx_dim(card: ModelCard, pp: Preprocessing) -> int:
    """The wrapped graph's output width, from one zero image through ONNX Runtime."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        wrapped = Path(tmp) / "wrapped.onnx"
        _wrap_onnx(card, pp, card.path, wrapped)
        try:
            session = ort.InferenceSession(str(wrapped), providers=["CPUExecutionProvider"])
            out = session.run(None, {_IN: np.zeros((1, pp.crop, pp.crop, 3), np.uint8)})[0]
        except Exception as e:  # onnxruntime's errors are plain RuntimeErrors with the node that failed
            raise ModelCardError(f"model card {card.name!r}: the model does not run on a {pp.crop}x{pp.crop} "
                                 f"{card.layout} image ({e}); check input_size and layout") from None
    return int(out.shape[1])


def _torchscript_spec(card: ModelCard, weights: WeightsFile) -> BackboneSpec:
    def build(path: Path) -> nn.Module:
        import torch

        # a TorchScript file is a program and loading runs it: cards are the operator's files, like their code
        return torch.jit.load(str(path), map_location="cpu")

    return _torch_spec(card, weights, build, strip_head=False)


def _torchvision_spec(card: ModelCard, weights: WeightsFile) -> BackboneSpec:
    import torchvision

    if card.arch not in torchvision.models.list_models():
        raise ModelCardError(f"model card {card.name!r}: unknown torchvision architecture {card.arch!r}; see "
                             "torchvision.models.list_models()")
    def build(path: Path) -> nn.Module:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        # the classifier (removed below) may have any number of classes: the last 2-d weight says how many
        classes = next((v.shape[0] for k, v in reversed(state.items()) if k.endswith("weight") and v.dim() == 2), None)
        model = torchvision.models.get_model(card.arch, weights=None, **({"num_classes": classes} if classes else {}))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelCardError(f"model card {card.name!r}: {path.name} is not a state dict of torchvision "
                                 f"{card.arch!r} ({str(e)[:300]}); check `arch`") from None
        return model

    return _torch_spec(card, weights, build, strip_head=True)


def _timm_spec(card: ModelCard, weights: WeightsFile) -> BackboneSpec:
    try:
        import timm
    except ImportError:
        raise ModelCardError(f"model card {card.name!r} needs timm; install it with: pip install 'embedder[cards]'") \
            from None
    if card.arch not in timm.list_models():
        raise ModelCardError(f"model card {card.name!r}: unknown timm model {card.arch!r}; see timm.list_models()")

    def build(path: Path) -> nn.Module:
        import torch

        model = timm.create_model(card.arch, pretrained=False, num_classes=0)  # pooled features, no classifier
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        head = model.default_cfg.get("classifier", "head")
        stray = [k for k in unexpected if not k.startswith(head if isinstance(head, str) else tuple(head))]
        if missing or stray:
            raise ModelCardError(f"model card {card.name!r}: {path.name} is not a state dict of timm {card.arch!r} "
                                 f"(missing {missing[:3]}, unexpected {stray[:3]}); check `arch`")
        return model

    return _torch_spec(card, weights, build, strip_head=False)


def _transformers_spec(card: ModelCard, weights: WeightsFile) -> BackboneSpec:
    from . import hf

    found = hf.inspect(card.path, card.name)
    return _spec(card, weights, found.preprocessing, hf.image_builder(found), card.dim or found.dim,
                 features_only=True, text_tower=hf.text_builder(found) if found.has_text else None)


_SPECS: dict[str, Callable[[ModelCard, WeightsFile], BackboneSpec]] = {
    "onnx": _onnx_spec, "torchscript": _torchscript_spec, "torchvision": _torchvision_spec, "timm": _timm_spec,
    "transformers": _transformers_spec,
}

