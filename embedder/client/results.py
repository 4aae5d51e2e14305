"""What the client's calls take beyond images and give back: :class:`Cached` and :class:`Text` inputs, per-item
results, summaries."""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np


@dataclass
class ItemResult:
    """One item's outcome: ``vector`` is float32 ``(dim,)`` when ``ok``, else ``error`` says why."""

    id: str
    vector: np.ndarray | None
    error: str | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    cached: bool = False
    model_id: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Cached:
    """An image the server has embedded before, named by the sha256 of its bytes (nothing is re-sent)."""

    sha256: str


@dataclass(frozen=True)
class Text:
    """Text to embed with a text-image model (a CLIP/SigLIP model card), into the space of its images:
    ``client.search(Text("a photo of a cat"), collection="photos")``."""

    text: str


@dataclass
class AddSummary:
    """What an :meth:`EmbedderClient.add` stored: counts, and per-item errors by index for the rest."""

    collection: str
    added: int
    replaced: int
    cached: int  # items whose vector came from the server's cache (no model pass)
    failed: dict[int, str] = field(default_factory=dict)


@dataclass
class Prediction:
    """Top labels of one item, best first, with probabilities; or ``error``.

    With several heads, ``by_head`` maps each head id to its ``(labels, probabilities)``; ``labels`` and
    ``probabilities`` are the first head's.
    """

    id: str
    labels: list[str]
    probabilities: list[float]
    error: str | None = None
    cached: bool = False
    by_head: dict[str, tuple[list[str], list[float]]] = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        return self.labels[0] if self.labels else None
