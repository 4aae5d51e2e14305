"""The gRPC embedding service: ``embedder.v1.Embedder`` + grpc.health.v1 + server reflection.

Data flow: RPC handler (:mod:`embedder.servicer`: protobuf <-> Python) -> :class:`embedder.core.Service` (cache
hits from the store, misses through the model pool) -> :class:`embedder.batcher.Batcher` (one queue for all
callers, decode ahead, dynamic batches) -> :class:`embedder.pipeline.Embedder` -> per-item results. Collections
and the cache live in a :class:`embedder.store.Store`, classifier heads in a :class:`classifier.HeadRegistry`,
both under ``data_dir``.

Life cycle (:class:`EmbedderServer`): ``start()`` binds the port with health NOT_SERVING, so probes get an
answer while the model loads; ``load()`` opens the data dir, loads the model, starts the batcher and runs one
warm-up image through the whole path, and only then turns health SERVING. Health goes NOT_SERVING again when a batcher thread dies
or on ``stop()`` (SIGTERM/SIGINT under :func:`serve`), which then stops accepting calls and gives in-flight
ones ``grace_seconds`` to finish.

Security: with ``token`` set, every ``embedder.v1`` RPC (unary and streaming) needs metadata
``authorization: Bearer <token>``, else UNAUTHENTICATED. Health and reflection stay open on purpose: load
balancers and orchestrators probe health without credentials, and reflection only describes the API.
With ``tls_cert`` and ``tls_key`` set the port speaks TLS only.
"""
from __future__ import annotations

import gc
import hmac
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto import embedder_pb2 as pb
from ._proto import embedder_pb2_grpc as pb_grpc
from .config import Config
from .core import Service, open_data_dir
from .errors import EmbedderError
from .metrics import Metrics
from .servicer import EmbedderServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name  # "embedder.v1.Embedder"
_METHOD_PREFIX = f"/{SERVICE_NAME}/"
# Handler threads: a unary call holds one while its items are in the batcher, a stream holds one plus a
# reader thread; 64 concurrent callers must all be inside the batcher for it to form full batches.
HANDLER_THREADS = 128


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"  # IPv6


# ---------------------------------------------------------------------------------------------- interceptors

def _wrap_handler(handler: grpc.RpcMethodHandler,
                  wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    """Rebuild ``handler`` with its behaviour wrapped, keeping its streaming kind and (de)serializers."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **kw)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **kw)


class AuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every ``embedder.v1`` RPC; health and reflection stay open."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_METHOD_PREFIX):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        scheme, _, credentials = given.partition(b" ")
        # the scheme is case-insensitive (RFC 7235: "bearer" and "Bearer" alike); the token is compared in
        # constant time
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials, self._expected):
            return handler
        why = ("missing `authorization` metadata" if not given else "wrong token in `authorization` metadata")

        def deny(behaviour: Callable, streaming: bool) -> Callable:
            def abort(request_or_iterator, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"{why}; send `authorization: Bearer <token>` (EmbedderClient(token=...), "
                              "`embedder embed --token`, or EMBEDDER_TOKEN)")
            return abort

        return _wrap_handler(handler, deny)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Count ``embedder.v1`` RPCs by method and final status code, and time them."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(_METHOD_PREFIX):
            return handler
        name = method[len(_METHOD_PREFIX):]
        m = self._metrics

        def record(context: grpc.ServicerContext, start: float, failed: BaseException | None) -> None:
            code = context.code()
            if code is None:
                if failed is None:
                    code = grpc.StatusCode.OK
                elif isinstance(failed, GeneratorExit) or not context.is_active():
                    code = grpc.StatusCode.CANCELLED  # the client went away mid-stream
                else:
                    code = grpc.StatusCode.UNKNOWN  # a bug: grpc answers UNKNOWN for uncaught exceptions
            m.requests.labels(name, code.name).inc()
            m.latency.labels(name).observe(time.monotonic() - start)

        def timed(behaviour: Callable, streaming: bool) -> Callable:
            if streaming:
                def stream(request_or_iterator, context):
                    start, failed = time.monotonic(), None
                    try:
                        yield from behaviour(request_or_iterator, context)
                    except BaseException as e:
                        failed = e
                        raise
                    finally:
                        record(context, start, failed)
                return stream

            def unary(request_or_iterator, context):
                start, failed = time.monotonic(), None
                try:
                    return behaviour(request_or_iterator, context)
                except BaseException as e:
                    failed = e
                    raise
                finally:
                    record(context, start, failed)
            return unary

        return _wrap_handler(handler, timed)


# ---------------------------------------------------------------------------------------------- server

class EmbedderServer:
    """The service around one :class:`embedder.pipeline.Embedder`.

    >>> server = EmbedderServer(Config.from_env(port=0))
    >>> port = server.start()        # bound; health NOT_SERVING
    >>> server.load()                # model loaded and warmed; health SERVING
    >>> server.stop()                # NOT_SERVING, drain in-flight calls, release everything

    Pass ``embedder=`` to serve an already loaded model (it is not closed by :meth:`stop`).
    """

    def __init__(self, config: Config, embedder: Any = None) -> None:
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ValueError("TLS needs both a certificate and a key: set --tls-cert and --tls-key "
                             "(EMBEDDER_TLS_CERT / EMBEDDER_TLS_KEY), or neither for plaintext")
        if config.max_items > config.max_queue:
            raise ValueError(f"max_items ({config.max_items}) is above max_queue ({config.max_queue}), so a full "
                             "request could never be queued; lower --max-items or raise --max-queue")
        self.config = config
        self.metrics = Metrics()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.embedder = embedder  # served as the default model; not closed by stop()
        self.service: Service | None = None  # from start(): the data dir is opened first
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: Any = None  # the HTTP/JSON front door (embedder.rest.HttpServer) when config.http_port is set
        self._serving = False  # health SERVING: what the HTTP door's /readyz answers
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

        interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(self.metrics)]
        if config.token:
            interceptors.append(AuthInterceptor(config.token))  # inside metrics: refusals are counted
        limit = config.max_message_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="embedder-rpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],  # a second server on the same port must fail, not share it
        )
        self._servicer = EmbedderServicer(None)  # its service is set by start()
        pb_grpc.add_EmbedderServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)

    @property
    def address(self) -> str:
        """``host:port`` actually bound (after :meth:`start`)."""
        return _host_port(self.config.host, self.port)

    def start(self) -> int:
        """Open the data dir, bind and start answering (health NOT_SERVING until :meth:`load`); returns the port.

        The data dir comes first: one held by another server fails here, before anything says "listening".
        """
        cfg = self.config
        if self.service is None:
            store, heads, jobs = open_data_dir(cfg)
            self.service = Service(cfg, store=store, heads=heads, jobs=jobs, metrics=self.metrics,
                                   on_death=self._worker_died)
            self._servicer.service = self.service
        try:
            self.port = self._bind()
            if cfg.http_port > 0:
                self._http = self._http_door()
                self.http_port = self._http.start()
        except BaseException:
            self.service.close(grace=0)  # the data dir is free again for whoever tries next
            self.service = None
            raise
        self._server.start()
        if cfg.metrics_port > 0:
            self.metrics_port = self.metrics.start_http(cfg.metrics_port, cfg.host)
        log.info("listening on %s (%s), health NOT_SERVING until the model is warm",
                 self.address, "TLS" if cfg.tls_cert else "plaintext")
        return self.port

    @property
    def http_address(self) -> str | None:
        """``host:port`` of the HTTP/JSON door (after :meth:`start`; None when it is off)."""
        return None if self.http_port is None else _host_port(self.config.host, self.http_port)

    def _http_door(self) -> Any:
        """The HTTP/JSON front door over the same service, token, TLS, limits and metrics."""
        from .rest import HttpServer, create_app  # FastAPI and uvicorn load only when HTTP is on

        app = create_app(self.service, self.config, metrics=self.metrics, ready=lambda: self._serving)
        return HttpServer(app, self.config, self.config.http_port)

    def _bind(self) -> int:
        cfg = self.config
        target = _host_port(cfg.host, cfg.port)
        try:
            if cfg.tls_cert:
                with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
                port = self._server.add_secure_port(target, creds)
            else:
                port = self._server.add_insecure_port(target)
        except RuntimeError as e:  # grpc raises RuntimeError when the bind fails
            raise EmbedderError(f"could not listen on {target} ({e}); is the port in use? choose another "
                                "with --port / EMBEDDER_PORT (0 picks a free one)") from None
        if not port:
            raise EmbedderError(f"could not listen on {target}; is the port in use? choose another with --port")
        return port

    def load(self) -> None:
        """Load the default model (the one given, else ``config.model``), warm it up, then health SERVING
        (after :meth:`start`).

        ``role="embed"``: no data dir, embedding only. ``role="store"``: no local model; cache misses go to
        the embedding replicas at ``embed_target``.
        """
        default = self.service.start(self.embedder)
        if default.info["runtime"] != "torch" and default.info["device"] == "cpu" and "torch" in sys.modules:
            # torch only trains heads here; two OpenMP threads beside the embedding runtime's stall each other
            # (logreg on 60k vectors: 17 s with 2 threads under load, 5 s with 1)
            sys.modules["torch"].set_num_threads(1)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, give in-flight ones ``grace`` seconds, release everything."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down: health NOT_SERVING, finishing in-flight calls (up to %.1fs)", grace)
        self.metrics.serving.set(0)
        self._serving = False  # /readyz answers 503 from now on, as health says NOT_SERVING
        self.health.enter_graceful_shutdown()
        # grpc's stop refuses new calls and lets those in flight finish, an open stream's next requests included;
        # both doors drain at once, within one grace period
        stopped = self._server.stop(grace)
        if self._http is not None:
            self._http.stop(grace)
        stopped.wait()
        if self.service is not None:
            self.service.close(grace)
        self.metrics.stop_http()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):  # "" is the whole server, as probes ask by default
            self.health.set(name, status)
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        self.metrics.serving.set(1 if self._serving else 0)

    def _worker_died(self, reason: str) -> None:
        log.critical("health -> NOT_SERVING: %s", reason)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)


def freeze_heap() -> None:
    """Exempt everything alive now (the loaded server: torch, the runtime, the model) from garbage collection.

    They live as long as the process, yet every full collection walked them: ~470k objects, a 0.25 s pause
    of every caller about every 15 s under load. Objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()


def serve(config: Config, *, on_listening: Callable[[str], None] | None = None,
          on_http: Callable[[str], None] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; returns 0 after a graceful stop.

    ``on_listening(address)`` is called once the port is bound (the CLI prints it: with ``--port 0`` it is
    the only way to learn the port), before the model loads; ``on_http(address)`` likewise for the HTTP door.
    """
    server = EmbedderServer(config)
    stop = threading.Event()
    previous = {}

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: the operator does not want to wait for in-flight calls
            log.warning("second %s: exiting without waiting for in-flight calls", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        server.start()
        if on_listening is not None:
            on_listening(server.address)
        if on_http is not None and server.http_address is not None:
            on_http(server.http_address)
        if not stop.is_set():
            server.load()
            freeze_heap()
            log.info("serving %s", server.service.default.model_id)  # a store node has no local embedder
        while not stop.wait(0.5):  # a timeout keeps the main thread responsive to signals
            pass
        server.stop()
    except BaseException:
        server.stop(grace=0)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
