"""Hugging Face ``transformers`` model folders as backbones: vision encoders, and CLIP-style text-image models.

:func:`inspect` reads the folder's ``config.json`` and ``preprocessor_config.json`` (plain JSON: no
transformers import, so listing models stays light); the builders load the model with ``local_files_only=True``
when a runtime first needs it. Nothing is downloaded: the folder is what the user saved or downloaded.

A text-image model (its config has a ``text_config``: CLIP, SigLIP, ...) embeds images with
``get_image_features`` and texts with ``get_text_features``, into one space; other encoders give their pooled
output (or the first token of the last hidden state).
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .backbones import Preprocessing
from .errors import ModelCardError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# PIL resample codes as the processors store them
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class FolderInfo:
    """What a model folder says about itself."""

    path: Path
    name: str  # the card's name, for messages
    model_type: str
    preprocessing: Preprocessing
    dim: int
    has_text: bool
    max_text_tokens: int


def inspect(path: Path, name: str) -> FolderInfo:
    """Read a folder's configs; a :class:`ModelCardError` names what is missing or not supported."""
    config = _json(path / "config.json", name)
    proc = _json(path / "preprocessor_config.json", name)
    model_type = str(config.get("model_type", ""))
    text = config.get("text_config")
    vision = config.get("vision_config") or config
    has_text = isinstance(text, dict)
    dim = int(config.get("projection_dim") or 0) if model_type == "clip" else 0
    dim = dim or int(vision.get("hidden_size") or (vision.get("hidden_sizes") or [0])[-1] or 0)
    if not dim:
        raise ModelCardError(f"model card {name!r}: cannot tell the embedding size from {path / 'config.json'}; "
                             "set `dim` in the card")
    tokens = int((text or {}).get("max_position_embeddings") or 64)
    return FolderInfo(path, name, model_type, _preprocessing(proc, name), dim, has_text, tokens)


def _json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelCardError(f"model card {name!r}: {path} is missing; a transformers folder needs config.json and "
                             "preprocessor_config.json (save both with save_pretrained)") from None
    except (OSError, ValueError) as e:
        raise ModelCardError(f"model card {name!r}: {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"model card {name!r}: {path} must hold a JSON object")
    return data


def _preprocessing(proc: dict[str, Any], name: str) -> Preprocessing:
    """The image processor's recipe as ours: resize the shorter side, center-crop, normalise.

    A processor that resizes to a fixed height x width (SigLIP, ViT) is read as resize-shorter-side-then-crop of
    the same size: identical for square images, a center crop instead of a squash for others.
    """
    size = proc.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    side = size.get("shortest_edge") or size.get("height")
    if not side or ("width" in size and size["width"] != size.get("height")):
        raise ModelCardError(f"model card {name!r}: preprocessor size {size!r} is not supported; it must be "
                             "{'shortest_edge': N} or a square {'height': N, 'width': N}")
    crop = proc.get("crop_size") if proc.get("do_center_crop", False) else None
    crop = crop if isinstance(crop, dict) else {"height": crop or side, "width": crop or side}
    if crop["height"] != crop["width"]:
        raise ModelCardError(f"model card {name!r}: crop_size {crop!r} is not square; only square inputs are served")
    resample = proc.get("resample", 3)
    if resample not in _RESAMPLE:
        raise ModelCardError(f"model card {name!r}: resample {resample!r} is not supported; use 2 (bilinear) or 3 "
                             "(bicubic)")
    if proc.get("do_rescale", True) is False or float(proc.get("rescale_factor", 1 / 255)) != 1 / 255:
        raise ModelCardError(f"model card {name!r}: only pixels rescaled by 1/255 are supported")
    normalize = proc.get("do_normalize", True)
    mean = tuple(proc.get("image_mean", (0.0, 0.0, 0.0))) if normalize else (0.0, 0.0, 0.0)
    std = tuple(proc.get("image_std", (1.0, 1.0, 1.0))) if normalize else (1.0, 1.0, 1.0)
    try:
        return Preprocessing(resize=int(side), crop=int(crop["height"]), mean=mean, std=std,
                             interpolation=_RESAMPLE[resample])
    except ValueError as e:
        raise ModelCardError(f"model card {name!r}: {e}") from None


def _load_model(info: FolderInfo) -> Any:
    try:
        from transformers import AutoModel
    except ImportError:
        raise ModelCardError(f"model card {info.name!r} needs transformers; install it with: "
                             "pip install 'embedder[cards]'") from None
    # eager attention exports to ONNX with the legacy exporter; the fused kernels may not
    model = AutoModel.from_pretrained(info.path, local_files_only=True, attn_implementation="eager")
    return model.eval()


def _pooled(out: Any) -> Any:
    """A tensor as it is; a model output's pooled output, else the first token of its last hidden state."""
    if hasattr(out, "dim"):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state[:, 0]


def image_builder(info: FolderInfo) -> Callable[[Path], nn.Module]:
    """The backbone builder: normalised ``(N, 3, H, W)`` images -> ``(N, dim)`` image features."""
    def build(path: Path) -> nn.Module:
        from torch import nn

        model = _load_model(info)

        class ImageTower(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: Any) -> Any:
                if info.has_text:
                    return _pooled(self.model.get_image_features(pixel_values=x))
                return _pooled(self.model(pixel_values=x))

        return ImageTower()

    return build


def text_builder(info: FolderInfo) -> Callable[[Path], TextTower]:
    def build(path: Path) -> TextTower:
        return TextTower(info)

    return build


class TextTower:
    """Texts -> ``(N, dim)`` float32 features in the image space (torch; one forward at a time)."""

    def __init__(self, info: FolderInfo) -> None:
        from transformers import AutoTokenizer

        self.info = info
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelCardError(f"model card {info.name!r}: the folder's tokenizer does not load ({e}); save it "
                                 "there with tokenizer.save_pretrained(folder)") from None
        self.model = _load_model(info)
        # SigLIP was trained on texts padded to a fixed length; CLIP reads its end-of-text token, so any padding
        self.padding: bool | str = "max_length" if info.model_type.startswith("siglip") else True
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(list(texts), padding=self.padding, truncation=True,
                               max_length=self.info.max_text_tokens, return_tensors="pt")
        with self._lock, torch.inference_mode():
            out = self.model.get_text_features(**{k: v for k, v in batch.items()
                                                  if k in ("input_ids", "attention_mask")})
        return _pooled(out).float().numpy()
