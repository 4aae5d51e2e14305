"""The gRPC embedding service: ``embedder.v1.Embedder`` + grpc.health.v1 + server reflection.

Data flow: RPC handler (validates, converts items) -> :class:`embedder.batcher.Batcher` (one queue for all
callers, decode ahead, dynamic batches) -> :class:`embedder.pipeline.Embedder` -> per-item results.

Life cycle (:class:`EmbedderServer`): ``start()`` binds the port with health NOT_SERVING, so probes get an
answer while the model loads; ``load()`` loads the model, starts the batcher and runs one warm-up image through
the whole path, and only then turns health SERVING. Health goes NOT_SERVING again when a batcher thread dies
or on ``stop()`` (SIGTERM/SIGINT under :func:`serve`), which then stops accepting calls and gives in-flight
ones ``grace_seconds`` to finish.

Security: with ``token`` set, every ``embedder.v1`` RPC (unary and streaming) needs metadata
``authorization: Bearer <token>``, else UNAUTHENTICATED. Health and reflection stay open on purpose: load
balancers and orchestrators probe health without credentials, and reflection only describes the API.
With ``tls_cert`` and ``tls_key`` set the port speaks TLS only.
"""
from __future__ import annotations

import hmac
import logging
import math
import os
import queue
import signal
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto import embedder_pb2 as pb
from ._proto import embedder_pb2_grpc as pb_grpc
from .batcher import (Batcher, BatcherClosedError, BatchFailedError, DroppedError, ItemError,
                      QueueFullError)
from .config import Config
from .errors import EmbedderError
from .metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name  # "embedder.v1.Embedder"
_METHOD_PREFIX = f"/{SERVICE_NAME}/"
# Handler threads: a unary call holds one while its items are in the batcher, a stream holds one plus a
# reader thread; 64 concurrent callers must all be inside the batcher for it to form full batches.
HANDLER_THREADS = 128
STREAM_WINDOW = 4  # requests of one stream in the batcher at once: pipelining without hogging the queue

_DTYPES = {pb.DTYPE_UINT8: np.dtype(np.uint8), pb.DTYPE_FLOAT32: np.dtype("<f4")}
_OK = grpc.StatusCode.OK.value[0]


def _code(status: grpc.StatusCode) -> int:
    return status.value[0]


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"  # IPv6


# ---------------------------------------------------------------------------------------------- requests

def item_input(item: pb.Item) -> Any:
    """An :class:`embedder.v1.Item` -> what the pipeline decodes (bytes or an array); ItemError if malformed."""
    kind = item.WhichOneof("input")
    if kind == "image":
        return item.image
    if kind == "tensor":
        return tensor_array(item.tensor)
    raise ItemError("item has neither `image` (encoded bytes) nor `tensor` (raw pixels) set")


def tensor_array(t: pb.Tensor) -> np.ndarray:
    """Validate a Tensor message and view its data as an ``(H, W[, C])`` array without copying."""
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise ItemError(f"tensor dtype {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype} "
                        "is not supported; use DTYPE_UINT8 (0..255) or DTYPE_FLOAT32 (0..1)")
    shape = tuple(t.shape)
    if len(shape) not in (2, 3) or any(d < 1 for d in shape) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise ItemError(f"tensor shape {list(shape)} is not an image; expected [H, W] or [H, W, C] "
                        "with C in 1, 3, 4 (channels last)")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape cannot overflow
    if len(t.data) != expected:
        raise ItemError(f"tensor data is {len(t.data)} bytes, but shape {list(shape)} of {dtype.name} "
                        f"needs {expected}; send the pixels row-major, channels last, little-endian")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def _time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the call's deadline, or None without one (grpc reports "no deadline" as ~forever)."""
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(0.0, left)


def _item_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ItemError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, DroppedError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    if isinstance(error, BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, BatchFailedError):
        return grpc.StatusCode.INTERNAL, str(error)
    log.error("unexpected per-item error: %r", error)
    return grpc.StatusCode.INTERNAL, f"server fault, not your input ({type(error).__name__}); retry"


class _Pending:
    """A request whose items are in the batcher: futures for the good ones, ready errors for the rest."""

    def __init__(self, request: pb.EmbedRequest, slots: list[Future | BaseException]) -> None:
        self.request = request
        self.slots = slots

    def futures(self) -> list[Future]:
        return [s for s in self.slots if isinstance(s, Future)]


class _Abort:
    """A stream reader's request to end the stream with a status (the reader thread cannot abort)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


_END = object()


# ---------------------------------------------------------------------------------------------- servicer

class EmbedderServicer(pb_grpc.EmbedderServicer):
    """Handlers for ``embedder.v1.Embedder``. Answers UNAVAILABLE until :meth:`attach` is called."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._embedder: Any = None
        self._batcher: Batcher | None = None
        self._model_info: dict[str, Any] = {}
        self.shutting_down = False

    def attach(self, embedder: Any, batcher: Batcher) -> None:
        self._model_info = embedder.info()
        self.metrics.set_model(self._model_info)
        self._embedder, self._batcher = embedder, batcher

    # --- RPCs

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        batcher = self._ready(context)
        self._validate(request, context)
        try:
            pending = self._submit(request, context, batcher, block=False)
        except QueueFullError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except BatcherClosedError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return self._collect(pending, context)

    def EmbedStream(self, request_iterator: Iterator[pb.EmbedRequest],
                    context: grpc.ServicerContext) -> Iterator[pb.EmbedResponse]:
        batcher = self._ready(context)
        # A reader thread submits requests while earlier ones are still in the batcher (pipelining); the
        # bounded queue between them is the stream's window, and a full window stops reading: flow control.
        window: queue.Queue = queue.Queue(maxsize=STREAM_WINDOW)
        threading.Thread(target=self._read_stream, args=(request_iterator, context, batcher, window),
                         name="embedder-stream-reader", daemon=True).start()
        while True:
            entry = window.get()
            if entry is _END:
                return
            if isinstance(entry, _Abort):
                context.abort(entry.code, entry.message)
            yield self._collect(entry, context)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        self._ready(context)
        info = self._model_info
        model = pb.ModelInfo(name=info["name"], model_id=info["model_id"], dim=info["dim"], device=info["device"],
                             runtime=info["runtime"], precision=info["precision"], input_size=info["input_size"],
                             normalize=info["normalize"])
        limits = pb.ServerLimits(max_message_bytes=self.config.max_message_bytes, max_items=self.config.max_items,
                                 max_pixels=getattr(self._embedder.config, "max_pixels", self.config.max_pixels))
        return pb.ListModelsResponse(models=[model], limits=limits)

    # --- helpers

    def _ready(self, context: grpc.ServicerContext) -> Batcher:
        batcher = self._batcher
        if self.shutting_down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry another instance")
        if batcher is None:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the model is still loading and warming up; retry shortly (health turns SERVING when ready)")
        if not batcher.alive:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the embedding worker is not running; the server must be restarted")
        return batcher

    def _request_error(self, request: pb.EmbedRequest) -> _Abort | None:
        n, limit = len(request.items), self.config.max_items
        if n > limit:
            return _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"request has {n} items, above the server's limit of {limit} per request (max_items); "
                          "send fewer per request (EmbedderClient splits for you) or raise the limit on the server "
                          "with --max-items / EMBEDDER_MAX_ITEMS")
        info = self._model_info
        if request.model and request.model not in (info["name"], info["model_id"]):
            return _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"this server embeds with {info['name']} ({info['model_id']}), not {request.model!r}; "
                          "leave `model` empty or ask a server that runs that model")
        return None

    def _validate(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> None:
        error = self._request_error(request)
        if error is not None:
            context.abort(error.code, error.message)

    def _submit(self, request: pb.EmbedRequest, context: grpc.ServicerContext, batcher: Batcher,
                *, block: bool) -> _Pending:
        """Convert the items and queue the good ones; malformed ones get their error without queueing."""
        slots: list[Future | BaseException | None] = []
        inputs: list[Any] = []
        for item in request.items:
            try:
                inputs.append(item_input(item))
                slots.append(None)  # its future, below
            except ItemError as e:
                slots.append(e)
            except Exception as e:  # whatever a malformed item does, it fails alone
                slots.append(ItemError(f"malformed item ({type(e).__name__}: {e})"))
        left = _time_left(context)
        deadline = None if left is None else time.monotonic() + left
        queued = iter(batcher.submit(inputs, deadline=deadline, is_active=context.is_active, block=block))
        return _Pending(request, [next(queued) if s is None else s for s in slots])

    def _collect(self, pending: _Pending, context: grpc.ServicerContext) -> pb.EmbedResponse:
        """Wait for a request's futures (within the call's deadline) and build its response."""
        futs = pending.futures()
        _, not_done = futures.wait(futs, timeout=_time_left(context))
        if not_done:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"deadline passed with {len(not_done)} of {len(pending.slots)} items still queued or "
                          "embedding; give the call a longer timeout or send fewer items per call")
        info = self._model_info
        model_id, dim = info["model_id"], info["dim"]
        results, ok, failed = [], 0, 0
        for item, slot in zip(pending.request.items, pending.slots):
            error = slot if isinstance(slot, BaseException) else slot.exception()
            if error is None:
                vector = np.asarray(slot.result(), dtype="<f4").tobytes()
                results.append(pb.Result(id=item.id, vector=vector, dim=dim, model_id=model_id,
                                         status=pb.Status(code=_OK)))
                ok += 1
                continue
            code, message = _item_status(error)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Not the item's fault: fail the call so the client's retry/timeout logic sees it.
                context.abort(code, message)
            results.append(pb.Result(id=item.id, dim=dim, model_id=model_id,
                                     status=pb.Status(code=_code(code), message=message)))
            failed += 1
        self.metrics.images.labels("ok").inc(ok)
        self.metrics.images.labels("error").inc(failed)
        return pb.EmbedResponse(results=results, model_id=model_id, dim=dim)

    def _read_stream(self, request_iterator: Iterator[pb.EmbedRequest], context: grpc.ServicerContext,
                     batcher: Batcher, window: queue.Queue) -> None:
        """Stream reader thread: validate and submit each request in order, then hand it to the writer."""
        try:
            for request in request_iterator:
                error = self._request_error(request)
                if error is not None:
                    self._put(window, error, context)
                    return
                # Streams wait for queue room instead of failing: a bulk job should slow down, not die.
                if not self._put(window, self._submit(request, context, batcher, block=True), context):
                    return
        except BatcherClosedError as e:
            self._put(window, _Abort(grpc.StatusCode.UNAVAILABLE, str(e)), context)
        except DroppedError:
            pass  # the caller went away while we waited for room
        except grpc.RpcError:
            pass  # the client cancelled or the call ended; nothing to answer
        except Exception as e:  # never let a reader bug hang the writer
            log.exception("stream reader failed")
            self._put(window, _Abort(grpc.StatusCode.INTERNAL, f"server fault reading the stream ({e!r})"), context)
        finally:
            self._put(window, _END, context)

    @staticmethod
    def _put(window: queue.Queue, entry: Any, context: grpc.ServicerContext) -> bool:
        """Put into the window, waiting while it is full, unless the call ends meanwhile."""
        while True:
            try:
                window.put(entry, timeout=0.1)
                return True
            except queue.Full:
                if not context.is_active():
                    return False


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
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_METHOD_PREFIX):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
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
        self.servicer = EmbedderServicer(config, self.metrics)
        self.embedder = embedder
        self._owns_embedder = embedder is None
        self.batcher: Batcher | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
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
        pb_grpc.add_EmbedderServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)

    @property
    def address(self) -> str:
        """``host:port`` actually bound (after :meth:`start`)."""
        return _host_port(self.config.host, self.port)

    def start(self) -> int:
        """Bind and start answering (health NOT_SERVING until :meth:`load`); returns the bound port."""
        cfg = self.config
        target = _host_port(cfg.host, cfg.port)
        try:
            if cfg.tls_cert:
                with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
                self.port = self._server.add_secure_port(target, creds)
            else:
                self.port = self._server.add_insecure_port(target)
        except RuntimeError as e:  # grpc raises RuntimeError when the bind fails
            raise EmbedderError(f"could not listen on {target} ({e}); is the port in use? choose another "
                                "with --port / EMBEDDER_PORT (0 picks a free one)") from None
        if not self.port:
            raise EmbedderError(f"could not listen on {target}; is the port in use? choose another with --port")
        self._server.start()
        if cfg.metrics_port > 0:
            self.metrics_port = self.metrics.start_http(cfg.metrics_port, cfg.host)
        log.info("listening on %s (%s), health NOT_SERVING until the model is warm",
                 self.address, "TLS" if cfg.tls_cert else "plaintext")
        return self.port

    def load(self) -> None:
        """Load the model (unless given), start the batcher, warm up with one image, then health SERVING."""
        cfg = self.config
        if self.embedder is None:
            from .pipeline import Embedder  # imports torch: keep `import embedder.server` light

            self.embedder = Embedder(config=cfg)
        self.batcher = Batcher(self.embedder, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms,
                               max_batch_pixels=cfg.max_batch_pixels, max_queue=cfg.max_queue,
                               on_batch=self.metrics.observe_batch, on_drop=self.metrics.dropped.inc,
                               on_death=self._worker_died)
        self.metrics.track_queue(lambda: self.batcher.queue_depth if self.batcher else 0)
        crop = int(self.embedder.info()["input_size"])
        warm = np.full((crop, crop, 3), 128, np.uint8)
        start = time.monotonic()
        self.batcher.submit([warm])[0].result()  # one forward through decode, batcher and model
        log.info("warm-up forward took %.2fs", time.monotonic() - start)
        self.servicer.attach(self.embedder, self.batcher)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, give in-flight ones ``grace`` seconds, release everything."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down: health NOT_SERVING, finishing in-flight calls (up to %.1fs)", grace)
        self.servicer.shutting_down = True
        self.metrics.serving.set(0)
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.close(timeout=grace)
        self.metrics.stop_http()
        if self._owns_embedder and self.embedder is not None:
            self.embedder.close()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):  # "" is the whole server, as probes ask by default
            self.health.set(name, status)
        self.metrics.serving.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    def _worker_died(self, reason: str) -> None:
        log.critical("health -> NOT_SERVING: %s", reason)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)


def serve(config: Config, *, on_listening: Callable[[str], None] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; returns 0 after a graceful stop.

    ``on_listening(address)`` is called once the port is bound (the CLI prints it: with ``--port 0`` it is
    the only way to learn the port), before the model loads.
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
        if not stop.is_set():
            server.load()
            log.info("serving %s", server.embedder.model_id)
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
