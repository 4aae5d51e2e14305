"""Python client for the embedding service (``embedder serve``).

    from embedder.client import EmbedderClient

    with EmbedderClient("127.0.0.1:50051", token="s3cret") as client:
        vectors = client.embed([jpeg_bytes, "dog.png", rgb_array])     # float32 (3, dim), input order
        result = client.embed(images, errors="return")                 # BatchResult: per-item errors
        for r in client.embed_iter(Path("photos").rglob("*.jpg")):     # streaming, input order
            print(r.id, r.ok, r.vector.shape if r.ok else r.error)

Inputs: encoded image bytes; file paths (``str`` or ``os.PathLike``, read here, on the client); numpy arrays
``(H, W)`` / ``(H, W, C)`` of uint8 or float in [0, 1] (sent as raw tensors); PIL images (sent as RGB pixels).

Errors, one design throughout: an item that cannot be embedded (corrupt, too large, unreadable file) is a
*per-item* error and never fails the others. ``embed(errors="raise")`` (the default) raises
:class:`RemoteBatchError` listing every bad item after the rest were embedded; ``errors="return"`` returns a
:class:`embedder.results.BatchResult` exactly like the local ``Embedder.embed_batch``: zero rows for failed
items and ``errors[i]`` saying why. ``embed_iter`` yields :class:`ItemResult` objects carrying their own
``error``. Whole-call failures (unreachable server, bad token, limits) raise :class:`ServiceError` with the
gRPC code, its category in :data:`embedder.errors.TABLE` and what to do about it.

Light on purpose: this package needs only grpcio, protobuf and numpy (``pip install embedder`` without the
``server`` extra); Pillow is touched only when a PIL image is passed, and then it is already loaded.

Large inputs are split into requests of at most ``max_items`` items and ``max_message_bytes`` bytes (the
server's defaults, read from :class:`~embedder.config.Config`; pass the server's values if you changed them
there). UNAVAILABLE (server down, restarting, still warming up) and a server-side CANCELLED (it was shutting
down) are retried with bounded exponential backoff and jitter; a broken stream resumes with the first
unanswered request.

:class:`AsyncEmbedderClient` is the same client on ``grpc.aio`` for callers in an event loop (FastAPI, async
chains): the same methods, arguments, results and errors, as coroutines (``embed_iter``: an async iterator).

Modules of one job each: ``base.py`` (settings, the channel, and every method as a plan: requests built and
answers read once for both clients), ``client.py`` (:class:`EmbedderClient`: blocking calls, retries, streams),
``aio.py`` (:class:`AsyncEmbedderClient`: the same on asyncio), ``chunking.py`` (inputs -> messages within the
limits), ``stream.py`` (the resumable stream's request side), ``results.py`` and ``errors.py`` (what the calls
return and raise).
"""
from __future__ import annotations

from .aio import AsyncEmbedderClient
from .chunking import to_item
from .client import EmbedderClient
from .errors import RemoteBatchError, ServiceError
from .results import AddSummary, Cached, ItemResult, Prediction, Text

__all__ = ["AddSummary", "AsyncEmbedderClient", "Cached", "EmbedderClient", "ItemResult", "Prediction",
           "RemoteBatchError", "ServiceError", "Text", "to_item"]
