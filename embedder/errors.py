"""Every exception the service raises, and the one table that turns them into answers. Standard library only.

Each :class:`EmbedderError` carries a :class:`Category`; :data:`TABLE` maps a category to the gRPC status
code, the HTTP status and the CLI exit code, so every front door answers the same failure the same way.
Messages say what was received and how to fix it.

Plain ``ValueError``/``TypeError`` are the Python convention for a bad argument and count as
INVALID_ARGUMENT; any other exception is a server fault (INTERNAL).
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import ClassVar

log = logging.getLogger(__name__)
# Characters of a message a caller gets: gRPC trailers are limited (16 KiB by default), and a message that
# quotes the request (e.g. a million labels) must not echo it back.
MAX_MESSAGE = 2000


class Category(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE = "deadline"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    UNIMPLEMENTED = "unimplemented"
    DATA_LOSS = "data_loss"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Answer:
    """How a front door reports a category: gRPC status code name, HTTP status, CLI exit code."""

    grpc: str
    http: int
    exit_code: int


TABLE: dict[Category, Answer] = {
    Category.INVALID_ARGUMENT: Answer("INVALID_ARGUMENT", 400, 2),
    Category.NOT_FOUND: Answer("NOT_FOUND", 404, 2),
    Category.FAILED_PRECONDITION: Answer("FAILED_PRECONDITION", 412, 2),
    Category.RESOURCE_EXHAUSTED: Answer("RESOURCE_EXHAUSTED", 429, 3),
    Category.UNAVAILABLE: Answer("UNAVAILABLE", 503, 3),
    Category.DEADLINE: Answer("DEADLINE_EXCEEDED", 504, 3),
    Category.UNAUTHENTICATED: Answer("UNAUTHENTICATED", 401, 2),
    Category.PERMISSION_DENIED: Answer("PERMISSION_DENIED", 403, 2),
    Category.UNIMPLEMENTED: Answer("UNIMPLEMENTED", 501, 2),
    Category.DATA_LOSS: Answer("DATA_LOSS", 500, 4),
    Category.INTERNAL: Answer("INTERNAL", 500, 4),
}
_BY_GRPC = {answer.grpc: category for category, answer in TABLE.items()}


def category_of(error: BaseException) -> Category:
    """The category of any exception (see the module docstring for the two rules beyond ``.category``)."""
    if isinstance(error, EmbedderError):
        return error.category
    if isinstance(error, (ValueError, TypeError)):
        return Category.INVALID_ARGUMENT
    return Category.INTERNAL


def message_of(error: BaseException, door: str) -> str:
    """What a caller is told about ``error`` at ``door`` ("gRPC", "HTTP"): its message, shortened; a server
    fault is logged with its trace and told only that it is one."""
    if category_of(error) is Category.INTERNAL:
        log.error("server fault answering a %s call", door, exc_info=error)
        return f"server fault, not your input ({type(error).__name__}; the server's log has the details); retry"
    message = str(error)
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 20] + " ... (shortened)"


def category_for_grpc(code_name: str) -> Category:
    """The category of a gRPC status code name (the client's side of the table); unknown names are INTERNAL."""
    return _BY_GRPC.get(code_name, Category.INTERNAL)


class EmbedderError(Exception):
    """Base class for this package's errors."""

    category: ClassVar[Category] = Category.INTERNAL

    def __str__(self) -> str:  # subclasses that are also KeyErrors would repr() the message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class SettingError(EmbedderError):
    """A setting the server cannot use as given: a busy port, TLS files that do not load, a data dir too new."""

    category = Category.FAILED_PRECONDITION


class InvalidArgumentError(EmbedderError, ValueError):
    """An argument the service cannot use; the message says which and how to fix it."""

    category = Category.INVALID_ARGUMENT


# --- models ---

class WeightsNotFoundError(EmbedderError, FileNotFoundError):
    """A backbone's pretrained weights are not installed."""

    category = Category.FAILED_PRECONDITION


class WeightsHashError(EmbedderError, ValueError):
    """A weights file does not match its recorded sha256."""

    category = Category.DATA_LOSS


class UnknownModelError(EmbedderError, KeyError):
    """No backbone is registered under that name."""

    category = Category.NOT_FOUND


class TooManyModelsError(EmbedderError):
    """The server holds ``max_models`` models already."""

    category = Category.RESOURCE_EXHAUSTED


class ModelCardError(EmbedderError, ValueError):
    """A model card that cannot be used as written: an unknown format, a missing or bad field, files that do not
    fit what the card says."""
    category = Category.INVALID_ARGUMENT


class NotSupportedByModelError(EmbedderError):
    """The model cannot do what was asked: text on an image-only model, a zero-shot head without a text tower,
    an ONNX file on the torch runtime, fine-tuning a model card."""
    category = Category.FAILED_PRECONDITION

    @classmethod
    def no_text(cls, model: str) -> NotSupportedByModelError:
        return cls(f"model {model!r} embeds images only: it has no text tower; send text to a text-image model "
                   "(a CLIP or SigLIP folder served with a transformers model card, see `embedder models`)")


class ExportError(EmbedderError, RuntimeError):
    """Exporting a backbone to ONNX failed; we never fall back to a different model silently."""


# --- items and batches ---

class ItemError(EmbedderError, ValueError):
    """One item could not be decoded or preprocessed; the message says why."""

    category = Category.INVALID_ARGUMENT


class ImageDecodeError(ItemError):
    """One input could not be turned into an image (corrupt, empty, too large, wrong shape)."""


class ItemNotFoundError(EmbedderError):
    """An item the server does not hold: a content_sha256 not in the cache, a stored id not in the collection."""

    category = Category.NOT_FOUND


class QueueFullError(EmbedderError):
    """The batcher's queue has no room for the request; the caller should back off and retry."""

    category = Category.RESOURCE_EXHAUSTED


class BatcherClosedError(EmbedderError):
    """The batcher is shutting down or its worker died; nothing more will be embedded."""

    category = Category.UNAVAILABLE


class DroppedError(EmbedderError):
    """The item was dropped before reaching the model because its caller was gone or its deadline passed."""

    category = Category.DEADLINE


class DeadlineError(EmbedderError):
    """The call's deadline passed before its work was done."""

    category = Category.DEADLINE


class BatchFailedError(EmbedderError):
    """The model raised on a batch containing this item; a server fault, not the input's."""


class BatchError(EmbedderError, ValueError):
    """Some items of a batch failed; ``errors`` maps item index to its message."""

    category = Category.INVALID_ARGUMENT

    def __init__(self, errors: dict[int, str], total: int) -> None:
        self.errors = errors
        shown = "; ".join(f"item {i}: {msg}" for i, msg in list(errors.items())[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(
            f"{len(errors)} of {total} items could not be embedded: {shown}{more}. "
            "Use Embedder.embed_batch() to get per-item results instead of an exception."
        )


# --- the store ---

class NotFoundError(EmbedderError, KeyError):
    """A collection, stored item or job does not exist."""

    category = Category.NOT_FOUND


class CollectionMismatchError(EmbedderError):
    """Vectors do not fit the collection (or head) they were sent to."""

    category = Category.FAILED_PRECONDITION


class ModelMismatchError(CollectionMismatchError):
    """Vectors, a collection or a saved head from another backbone model than expected.

    ``expected_model_id`` is the model the collection or head is bound to, ``other_model_id`` the one offered
    (empty when not known).
    """

    def __init__(self, message: str, *, expected_model_id: str = "", other_model_id: str = "") -> None:
        super().__init__(message)
        self.expected_model_id, self.other_model_id = expected_model_id, other_model_id


class DimensionMismatchError(CollectionMismatchError):
    """The vectors have another dimension than the collection's."""


class StoreLockedError(EmbedderError):
    """Another process has the store's data directory open."""

    category = Category.FAILED_PRECONDITION


class DataLossError(EmbedderError):
    """Stored data failed its checksum or does not fit together; the message says what is lost and what to do.

    Messages reach callers, so they name collections and items, never server file paths (those go to the log).
    """

    category = Category.DATA_LOSS


class StoreClosedError(EmbedderError):
    """The store was closed (the server is shutting down); retry on a running instance."""

    category = Category.UNAVAILABLE


class StoreUnavailableError(EmbedderError):
    """The store's server (Milvus) does not answer; the message names the URI and what to check."""

    category = Category.UNAVAILABLE


# --- the service ---

class ResponseTooLargeError(EmbedderError):
    """The answer to a call would not fit in one message; the caller asks for less."""

    category = Category.RESOURCE_EXHAUSTED


class ReplicaOnlyError(EmbedderError):
    """A store, head or job call sent to an embedding replica (``--role embed``)."""

    category = Category.UNIMPLEMENTED


class NotReadyError(EmbedderError):
    """The service is loading, shutting down, or its embedding worker died."""

    category = Category.UNAVAILABLE


# --- access control ---

class UnauthenticatedError(EmbedderError):
    """No key, an unknown or a revoked one; the message says what to send."""

    category = Category.UNAUTHENTICATED


class PermissionDeniedError(EmbedderError):
    """The caller's key lacks the role for the call, or may not name the collection."""

    category = Category.PERMISSION_DENIED
