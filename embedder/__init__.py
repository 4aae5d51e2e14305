"""embedder: image embeddings from frozen pretrained backbones, with a cache, search and classifier heads."""
from .backbones import BackboneSpec, Preprocessing, get_backbone, list_backbones, register_local
from .config import Config
from .errors import BatchError, EmbedderError, ImageDecodeError, WeightsNotFoundError
from .pipeline import Embedder
from .results import BatchResult

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec", "BatchError", "BatchResult", "Config", "Embedder", "EmbedderError", "ImageDecodeError",
    "Preprocessing", "WeightsNotFoundError", "get_backbone", "list_backbones", "register_local",
]
