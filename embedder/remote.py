"""A pool of stateless embedding replicas (``embedder serve --role embed``) in place of a local model.

A store node (``--role store --embed-target HOST:PORT[,HOST:PORT...]``) keeps the data dir, the cache, the
collections and the heads, and sends every cache miss to the pool through :class:`RemoteBatcher`, which
offers the servicer the same ``submit`` as :class:`embedder.batcher.Batcher`. Balancing is gRPC's own:
one channel over every address with the ``round_robin`` policy and client-side health checking, so a replica
that dies or turns NOT_SERVING is skipped; calls it was serving fail UNAVAILABLE and the client retries them
on the others.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from .errors import BatcherClosedError, DroppedError, ItemError
from .client import EmbedderClient, ServiceError
from .config import Config

log = logging.getLogger(__name__)

CALL_THREADS = 32  # Embed calls to the pool in flight at once


def pool_target(addresses: str) -> str:
    """``IP:PORT,IP:PORT,...`` -> one gRPC target naming them all (``ipv4:``/``ipv6:`` lists); a single address
    (e.g. ``dns:///embedders.internal:50051``, which may resolve to many replicas) is used as it is."""
    parts = [a.strip() for a in addresses.split(",") if a.strip()]
    if not parts:
        raise ValueError("--embed-target needs at least one HOST:PORT of an `embedder serve --role embed` replica")
    if len(parts) == 1:
        return parts[0]
    v6 = parts[0].startswith("[")
    for part in parts:
        host = part.rsplit(":", 1)[0].strip("[]")
        if not all(ch.isdigit() or ch in ".:abcdefABCDEF" for ch in host) or part.startswith("[") != v6:
            raise ValueError(f"{part!r}: a list of replicas must be IP:PORT addresses of one family; for host "
                             "names give one dns:///NAME:PORT target that resolves to every replica")
    return f"{'ipv6' if v6 else 'ipv4'}:{','.join(parts)}"


def pool_client(config: Config) -> EmbedderClient:
    """A client that spreads calls over the replicas round-robin and skips the unhealthy ones."""
    service_config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                                 "healthCheckConfig": {"serviceName": ""}})
    return EmbedderClient(pool_target(config.embed_target), token=config.token or None, timeout=60.0,
                          retries=8, max_message_bytes=config.max_message_bytes, max_items=config.max_items,
                          channel_options=[("grpc.service_config", service_config)])


class RemoteBatcher:
    """``submit`` like :class:`embedder.batcher.Batcher`, answered by the embedding pool."""

    def __init__(self, client: EmbedderClient, *, on_death: Callable[[str], None] | None = None) -> None:
        self._client = client
        self._pool = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="embedder-remote")
        self._closed = False
        self._in_flight = 0
        self._lock = threading.Lock()
        self._on_death = on_death

    def info(self) -> dict[str, Any]:
        """The pool's model info (what every replica must serve), waiting for the pool to answer."""
        models = self._client.list_models()
        return {**models[0], "runtime": f"remote ({models[0]['runtime']})"}

    def submit(self, items: Sequence[Any], *, deadline: float | None = None,
               is_active: Callable[[], bool] | None = None, block: bool = False) -> list[Future]:
        if self._closed:
            raise BatcherClosedError("the server is shutting down")
        futures = [Future() for _ in items]
        if items:
            with self._lock:
                self._in_flight += len(items)
            self._pool.submit(self._call, list(items), futures, deadline)
        return futures

    def _call(self, items: list[Any], futures: list[Future], deadline: float | None) -> None:
        try:
            if deadline is not None and deadline <= time.monotonic():
                for fut in futures:
                    fut.set_exception(DroppedError("the call's deadline passed before the embedding pool was asked"))
                return
            result = self._client.embed(items, errors="return", chunk=len(items))
            for fut, vector, error in zip(futures, result.vectors, result.errors):
                if error is None:
                    fut.set_result(vector)
                else:
                    fut.set_exception(ItemError(error))
        except ServiceError as e:  # the whole pool failed this call after its retries
            log.warning("embedding pool call failed: %s", e)
            for fut in futures:
                if not fut.done():
                    fut.set_exception(BatcherClosedError(f"no embedding replica answered: {e}"))
        finally:
            with self._lock:
                self._in_flight -= len(items)

    @property
    def queue_depth(self) -> int:
        return self._in_flight

    @property
    def alive(self) -> bool:
        return not self._closed

    def stats(self) -> dict[str, float]:
        return {"in_flight": self._in_flight}

    def close(self, timeout: float | None = 10.0) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()


class RemoteEmbedder:
    """What the servicer needs of a model when the pool embeds: its info and its config."""

    def __init__(self, config: Config, batcher: RemoteBatcher) -> None:
        self.config = config
        self._info = batcher.info()

    def info(self) -> dict[str, Any]:
        return self._info

    def close(self) -> None:
        pass
