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

Security: with ``token`` set or an API key in the data dir (``embedder keys add``), every ``embedder.v1`` RPC
(unary and streaming) needs metadata ``authorization: Bearer <token or key>``, else UNAUTHENTICATED; the
core checks each key's role and collection allow-list (:mod:`embedder.keys`). Health and reflection stay open on purpose: load
balancers and orchestrators probe health without credentials, and reflection only describes the API.
With ``tls_cert`` and ``tls_key`` set the port speaks TLS only.
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto import embedder_pb2 as pb
from ._proto import embedder_pb2_grpc as pb_grpc
from .cards import register_cards
from .catalog import find_backbone
from .config import Config
from .core import Service, open_data_dir
from .errors import SettingError, UnauthenticatedError
from .keys import Gate, authorization
from .metrics import Metrics
from .servicer import EmbedderServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name  # "embedder.v1.Embedder"
_METHOD_PREFIX = f"/{SERVICE_NAME}/"
# Handler threads: an embedder.v1 call holds one while its items are in the batcher, a stream holds one plus a
# reader thread; up to Config.max_concurrent_rpcs of them at once (64 concurrent callers must all be inside the
# batcher for it to form full batches). Beside them the pool keeps threads no embedder.v1 call can take:
# reflection and health Watch streams (each kind capped) and short calls (health Check, refusals), so probes
# answer however many calls are open.
_REFLECTION_PREFIX = "/grpc.reflection."  # v1alpha and v1 alike
_WATCH_METHOD = "/grpc.health.v1.Health/Watch"
REFLECTION_STREAMS = 4  # reflection clients (grpcurl, Postman) need one at a time
WATCH_STREAMS = 8
SPARE_THREADS = 16  # health Check and refusals: they return at once
RESERVED_THREADS = REFLECTION_STREAMS + WATCH_STREAMS + SPARE_THREADS


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


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler answering ``code`` before a byte of the request is read: it is request-streaming whatever
    ``handler`` is, and grpc only receives a streaming call's messages when the handler asks for them."""
    def refuse(request_iterator: Iterator, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kw)
    return grpc.stream_unary_rpc_method_handler(refuse, **kw)


def _request_streaming(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with its request read inside its behaviour: grpc calls a unary-request behaviour only once the
    request has arrived (a caller that never sends it would keep a slot taken for good) and reads it before any
    interceptor's wrapper runs."""
    if handler.request_streaming:
        return handler
    behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary

    def read_then_run(request_iterator: Iterator, context: grpc.ServicerContext) -> Any:
        request = next(request_iterator, None)
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended before its request message was sent")
        return behaviour(request, context)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(read_then_run, **kw)
    return grpc.stream_unary_rpc_method_handler(read_then_run, **kw)


def _within_idle(requests: Iterator, context: grpc.ServicerContext, idle_seconds: float) -> Iterator:
    """``requests`` as they come; the call ends with DEADLINE_EXCEEDED once none came for ``idle_seconds``.

    grpc's request iterator blocks with no timeout, so a feeder thread reads it; it ends with the call.
    """
    received: queue.Queue = queue.Queue(maxsize=1)
    end = object()

    def feed() -> None:
        try:
            for request in requests:
                while context.is_active():  # bounded: a fast sender waits for the handler
                    try:
                        received.put(request, timeout=0.5)
                        break
                    except queue.Full:
                        pass
        except grpc.RpcError:
            pass  # the call ended
        finally:
            try:
                received.put_nowait(end)
            except queue.Full:
                pass  # the handler is gone or will see the call end

    threading.Thread(target=feed, name="embedder-idle-feeder", daemon=True).start()
    while True:
        try:
            request = received.get(timeout=idle_seconds)
        except queue.Empty:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no request on this stream for {idle_seconds:g}s, the server's limit for idle streams; "
                          "open a stream when there is work (or raise --stream-idle-seconds / "
                          "EMBEDDER_STREAM_IDLE_SECONDS)")
        if request is end:
            return
        yield request


class LimitInterceptor(grpc.ServerInterceptor):
    """Cap the calls that hold a handler thread, by kind, RESOURCE_EXHAUSTED beyond; idle reflection streams end.

    Decided on grpc's serving thread before the call takes a handler thread, so a refusal costs one brief task.
    Admitted calls are made request-streaming (:func:`_request_streaming`): their messages are received only
    inside the cap, so received and unanswered bytes stay below ``max_concurrent_rpcs x max_message_bytes``, and
    the slot is given back whenever the call ends. Placed outside :class:`AuthInterceptor`, so its refusals are
    bounded too.
    """

    def __init__(self, max_rpcs: int, idle_seconds: float) -> None:
        self._idle_seconds = idle_seconds
        self._limits = (  # (method prefix, free slots, what a refused caller reads)
            (_METHOD_PREFIX, threading.BoundedSemaphore(max_rpcs),
             f"the server is running its limit of {max_rpcs} concurrent {SERVICE_NAME} calls; retry with backoff, "
             "or raise --max-concurrent-rpcs / EMBEDDER_MAX_CONCURRENT_RPCS"),
            (_REFLECTION_PREFIX, threading.BoundedSemaphore(REFLECTION_STREAMS),
             f"{REFLECTION_STREAMS} reflection streams are open, the server's limit; close one and retry"),
            (_WATCH_METHOD, threading.BoundedSemaphore(WATCH_STREAMS),
             f"{WATCH_STREAMS} health Watch streams are open, the server's limit; use Check, or close one"),
        )

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        for prefix, slots, refused in self._limits:
            if method.startswith(prefix):
                break
        else:
            return handler  # health Check: answered at once from the reserve
        if not slots.acquire(blocking=False):
            return _refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        idle = self._idle_seconds if prefix == _REFLECTION_PREFIX else None

        def holding(behaviour: Callable, streaming: bool) -> Callable:
            if streaming:
                def stream(request_iterator, context):
                    try:
                        if idle is not None:
                            request_iterator = _within_idle(request_iterator, context, idle)
                        yield from behaviour(request_iterator, context)
                    finally:
                        slots.release()
                return stream

            def unary(request_iterator, context):
                try:
                    return behaviour(request_iterator, context)
                finally:
                    slots.release()
            return unary

        return _wrap_handler(_request_streaming(handler), holding)


class AuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token or API key>`` on every ``embedder.v1`` RPC once ``--token`` is set or
    a key exists (:class:`embedder.keys.Gate`); health and reflection stay open. Roles and allow-lists are the
    core's to check: the servicer passes the key on in its ``Call``."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_METHOD_PREFIX):
            return handler
        try:
            self._gate.principal(authorization(handler_call_details.invocation_metadata))
            return handler
        except UnauthenticatedError as e:
            # refused before the request is read: 64 unauthenticated 60 MB messages are never received
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, str(e))


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
            m.requests.labels("grpc", name, code.name).inc()
            m.latency.labels("grpc", name).observe(time.monotonic() - start)

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

        # metrics outermost (refusals are counted), then the caps (unauthenticated calls count against them too)
        interceptors: list[grpc.ServerInterceptor] = [
            MetricsInterceptor(self.metrics), LimitInterceptor(config.max_concurrent_rpcs, config.stream_idle_seconds)]
        # one gate for both doors and the servicer: a key any of them saw keeps auth on for all
        self.gate = Gate.from_config(config)
        interceptors.append(AuthInterceptor(self.gate))  # inside metrics: refusals are counted
        limit = config.max_message_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(config.max_concurrent_rpcs + RESERVED_THREADS,
                                       thread_name_prefix="embedder-rpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],  # a second server on the same port must fail, not share it
        )
        self._servicer = EmbedderServicer(None, self.gate)  # its service is set by start()
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
            if cfg.role != "store":  # a bad --model is named before anything says listening, not when it loads
                register_cards(cfg.card_paths)
                find_backbone(cfg.model, cfg.data_dir)  # after the Service: it fetched the versions in Milvus
            self.port = self._bind()
            if cfg.http_port > 0:
                self._http = self._http_door()
                self.http_port = self._http.start()
            if cfg.metrics_port > 0:
                self.metrics_port = self._start_metrics()
        except BaseException:
            if self._http is not None:
                self._http.stop(0)
                self._http = None
            self.service.close(grace=0)  # the data dir is free again for whoever tries next
            self.service = None
            raise
        self._server.start()
        log.info("listening on %s (%s), health NOT_SERVING until the model is warm",
                 self.address, "TLS" if cfg.tls_cert else "plaintext")
        return self.port

    @property
    def http_address(self) -> str | None:
        """``host:port`` of the HTTP/JSON door (after :meth:`start`; None when it is off)."""
        return None if self.http_port is None else _host_port(self.config.host, self.http_port)

    def _start_metrics(self) -> int:
        cfg = self.config
        try:
            return self.metrics.start_http(cfg.metrics_port, cfg.host)
        except OSError as e:
            raise SettingError(f"could not serve metrics on {cfg.host}:{cfg.metrics_port} ({e.strerror}); is the port "
                               "in use? choose another with --metrics-port / EMBEDDER_METRICS_PORT") from None

    def _http_door(self) -> Any:
        """The HTTP/JSON front door over the same service, token, TLS, limits and metrics."""
        from .rest import HttpServer, create_app  # FastAPI and uvicorn load only when HTTP is on

        app = create_app(self.service, self.config, metrics=self.metrics, ready=lambda: self._serving, gate=self.gate)
        return HttpServer(app, self.config, self.config.http_port)

    def _bind(self) -> int:
        cfg = self.config
        target = _host_port(cfg.host, cfg.port)
        if cfg.tls_cert:
            check_tls_files(cfg.tls_cert, cfg.tls_key)
        try:
            if cfg.tls_cert:
                with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
                port = self._server.add_secure_port(target, creds)
            else:
                port = self._server.add_insecure_port(target)
        except RuntimeError as e:  # grpc raises RuntimeError when the bind fails
            raise SettingError(f"could not listen on {target} ({e}); is the port in use? choose another "
                               "with --port / EMBEDDER_PORT (0 picks a free one)") from None
        if not port:
            raise SettingError(f"could not listen on {target}; is the port in use? choose another with --port")
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


def check_tls_files(cert: str, key: str) -> None:
    """Load the TLS certificate and key once, so a bad pair is named as such (grpc reports it as a failed bind)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise SettingError(f"the TLS certificate {cert!r} and key {key!r} do not load as a pair ({e}); pass the PEM "
                           "certificate chain to --tls-cert and its private key to --tls-key") from None


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
