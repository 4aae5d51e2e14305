"""Prometheus metrics for the service, in their own registry (never the process-global one).

Exposed on ``http://<host>:<metrics_port>/metrics`` when ``metrics_port > 0``. Images per second is
``rate(embedder_images_total[1m])``; mean batch size is
``rate(embedder_batch_size_sum[1m]) / rate(embedder_batch_size_count[1m])``.
"""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The service's counters, histograms and gauges; cheap to create, one per server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # one family for both front doors: `door` is grpc or http; `method` the RPC or the HTTP route's name;
        # `code` the gRPC status code name or the HTTP status
        self.requests = Counter("embedder_requests", "Calls by front door, method and final status code",
                                ["door", "method", "code"], registry=r)
        self.latency = Histogram("embedder_request_seconds", "Call wall time by front door and method",
                                 ["door", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("embedder_batch_size", "Items per model batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("embedder_batch_seconds", "Model time per batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("embedder_queue_depth", "Items admitted and not yet answered", registry=r)
        self.images = Counter("embedder_images", "Items answered, by outcome (ok or error)", ["outcome"],
                              registry=r)
        self.dropped = Counter("embedder_dropped_items",
                               "Items dropped before the model because their caller was gone", registry=r)
        self.cache_hits = Counter("embedder_cache_hits", "Vectors served from the cache", registry=r)
        self.serving = Gauge("embedder_serving", "1 while the health status is SERVING", registry=r)
        # The runtime sits beside the model id, not in it: fp32 outputs of every runtime agree.
        self.model = Gauge("embedder_model_info", "The loaded backbone (value 1)",
                           ["model_id", "runtime", "device", "precision"], registry=r)
        for outcome in ("ok", "error"):  # export zeros before the first request
            self.images.labels(outcome)
        self._http = None

    def set_model(self, info: dict) -> None:
        self.model.labels(info["model_id"], info["runtime"], info["device"], info["precision"]).set(1)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP; returns the bound port (``port=0`` picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = server.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
