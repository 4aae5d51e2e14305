"""What the client raises: a whole call that failed (:class:`ServiceError`), or items that failed in a call."""
from __future__ import annotations

from typing import Sequence

import grpc

from ..errors import BatchError, Category, EmbedderError, category_for_grpc


class ServiceError(EmbedderError):
    """A whole call failed; ``code`` is the :class:`grpc.StatusCode`, the message says what to do.

    ``category`` is the code's row of :data:`embedder.errors.TABLE`, so a caller (or the CLI) answers a remote
    failure exactly as it would the same failure in process.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(f"{code.name}: {message}")

    @property
    def category(self) -> Category:  # type: ignore[override] - per instance: it depends on the code
        return category_for_grpc(self.code.name)


class RemoteBatchError(BatchError):
    """Some items could not be embedded; ``errors`` maps input index to message, ``ids`` are the item ids."""

    def __init__(self, errors: dict[int, str], ids: Sequence[str], *, action: str = "embedded") -> None:
        self.errors = errors
        self.ids = list(ids)
        shown = "; ".join(f"item {i} ({self.ids[i]!r}): {msg}" for i, msg in list(errors.items())[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        EmbedderError.__init__(self, f"{len(errors)} of {len(ids)} items could not be {action}: {shown}{more}. "
                                     'Pass errors="return" to get the other results and per-item errors.')
