"""embedder: image embeddings from frozen pretrained backbones, with a cache, search and classifier heads.

The names below load on first use (PEP 562), so ``import embedder.client`` or ``import classifier`` does not
pull in torch through this package: only touching ``Embedder`` or the backbone registry does.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BackboneSpec": "backbones", "Preprocessing": "backbones", "get_backbone": "catalog",
    "list_backbones": "backbones", "register_local": "cards",
    "Config": "config",
    "BatchError": "errors", "EmbedderError": "errors", "ImageDecodeError": "errors", "WeightsNotFoundError": "errors",
    "Embedder": "pipeline",
    "BatchResult": "results",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static tools see the eager imports
    from .backbones import BackboneSpec, Preprocessing, list_backbones
    from .cards import register_local
    from .catalog import get_backbone
    from .config import Config
    from .errors import BatchError, EmbedderError, ImageDecodeError, WeightsNotFoundError
    from .pipeline import Embedder
    from .results import BatchResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # AttributeError (not KeyError) lets `from embedder import cli` fall back to importing the submodule
        raise AttributeError(f"module 'embedder' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
