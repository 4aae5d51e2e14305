"""Exception types. Messages say what was received and how to fix it."""
from __future__ import annotations


class EmbedderError(Exception):
    """Base class for this package's errors."""


class WeightsNotFoundError(EmbedderError, FileNotFoundError):
    """A backbone's pretrained weights are not installed."""


class WeightsHashError(EmbedderError, ValueError):
    """A weights file does not match its recorded sha256."""


class UnknownModelError(EmbedderError, KeyError):
    """No backbone is registered under that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ImageDecodeError(EmbedderError, ValueError):
    """One input could not be turned into an image (corrupt, empty, too large, wrong shape)."""


class ExportError(EmbedderError, RuntimeError):
    """Exporting a backbone to ONNX failed; we never fall back to a different model silently."""


class BatchError(EmbedderError, ValueError):
    """Some items of a batch failed; ``errors`` maps item index to its message."""

    def __init__(self, errors: dict[int, str], total: int) -> None:
        self.errors = errors
        shown = "; ".join(f"item {i}: {msg}" for i, msg in list(errors.items())[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(
            f"{len(errors)} of {total} items could not be embedded: {shown}{more}. "
            "Use Embedder.embed_batch() to get per-item results instead of an exception."
        )


class NotFoundError(EmbedderError, KeyError):
    """A collection or stored item does not exist (gRPC: NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class CollectionMismatchError(EmbedderError):
    """Vectors do not fit the collection they were sent to (gRPC: FAILED_PRECONDITION)."""


class ModelMismatchError(CollectionMismatchError):
    """The vectors come from another model than the one the collection is bound to."""


class DimensionMismatchError(CollectionMismatchError):
    """The vectors have another dimension than the collection's."""


class StoreLockedError(EmbedderError):
    """Another process has the store's data directory open."""


class StoreClosedError(EmbedderError):
    """The store was closed (the server is shutting down); retry on a running instance."""
