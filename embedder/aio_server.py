"""The gRPC front door on ``grpc.aio``: one event loop thread answers every call (prototype beside the
thread-pool server, for bench_service to compare).

Embed runs on the loop: the core's ``start_embed`` hashes, looks the cache up and queues the misses without
waiting; the handler awaits the batcher's futures within the call's deadline, then ``finish`` collects the
vectors. Calls that block (store writes, training, a model's first load, a full queue) run in a bounded
thread pool so the loop never waits on them.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import threading
import time
from concurrent import futures
from typing import Any, AsyncIterator, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto import embedder_pb2 as pb
from ._proto import embedder_pb2_grpc as pb_grpc
from .config import Config
from .core import Call, Service, open_data_dir
from .core.embedding import Pending
from .errors import Category, EmbedderError, QueueFullError, category_of
from .metrics import Metrics
from .server import _METHOD_PREFIX, SERVICE_NAME, _host_port, _wrap_handler
from .servicer import STREAM_WINDOW, EmbedderServicer, _add_item, _item, status_of

log = logging.getLogger(__name__)

BLOCKING_THREADS = 64  # core calls that block (store writes, training, searches) run here, off the loop
_END = object()


class _Gone:
    """Whether the caller left; set by the handler when grpc cancels it, read by the batcher's threads."""

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = False

    def __call__(self) -> bool:
        return self.gone


def _call(context: grpc.aio.ServicerContext, gone: _Gone) -> Call:
    left = context.time_remaining()
    return Call.within(None if left is None or left > 1e7 else max(0.0, left), gone)


class AioEmbedderServicer(pb_grpc.EmbedderServicer):
    """Handlers for ``embedder.v1.Embedder`` over one :class:`embedder.core.Service`, on one event loop."""

    def __init__(self, service: Service | None, executor: futures.ThreadPoolExecutor) -> None:
        self.service = service
        self._executor = executor
        self._sync = EmbedderServicer(service)  # request/response conversions shared with the sync handlers

    async def _blocking(self, context: grpc.aio.ServicerContext, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the blocking pool, or abort the call with the status its error maps to."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                    functools.partial(fn, *args, **kwargs))
        except Exception as e:
            failed = e
        await context.abort(*status_of(failed))

    async def _now(self, context: grpc.aio.ServicerContext, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the loop (it must not block), or abort with its status."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            failed = e
        await context.abort(*status_of(failed))

    def _loaded(self, model: str) -> bool:
        """Whether ``model`` needs no load (a load takes seconds: never on the loop)."""
        return not model or any(m.matches(model) for m in self.service.models.models)

    async def _start(self, context: grpc.aio.ServicerContext, request: pb.EmbedRequest, call: Call,
                     block: bool = False) -> Pending:
        items = [_item(i) for i in request.items]
        if self._loaded(request.model):
            try:
                return self.service.start_embed(items, model=request.model, call=call)
            except QueueFullError:
                if not block:
                    raise
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(self.service.start_embed, items, model=request.model, call=call,
                                              block=block))

    async def _finish(self, pending: Pending, call: Call, gone: _Gone) -> Any:
        """Await the pending items within the deadline, then collect them (``finish`` no longer waits)."""
        distinct = {id(f): f for f in pending.futures.values()}
        if distinct:
            try:
                await asyncio.wait([asyncio.wrap_future(f) for f in distinct.values()], timeout=call.time_left())
            except asyncio.CancelledError:  # the caller went away: skip its items, give the lease back
                gone.gone = True
                if pending.on_done is not None:
                    pending.on_done()
                raise
        return self.service.finish(pending, call)  # raises DeadlineError if the wait above timed out

    # ------------------------------------------------------------------ embedding

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        gone = _Gone()
        call = _call(context, gone)
        try:
            result = await self._finish(await self._start(context, request, call), call, gone)
        except Exception as e:
            failed = e
        else:
            return self._sync._embed_response(result)
        await context.abort(*status_of(failed))

    async def EmbedStream(self, request_iterator: AsyncIterator[pb.EmbedRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        await self._now(context, self.service.list_models)  # UNAVAILABLE before reading anything
        gone = _Gone()
        call = _call(context, gone)
        # A reader task submits requests while earlier ones are still in the batcher (pipelining); the bounded
        # queue between them is the stream's window, and a full window stops reading: flow control.
        window: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(context, request_iterator, call, window))
        try:
            while True:
                entry = await window.get()
                if entry is _END:
                    return
                if isinstance(entry, BaseException):
                    await context.abort(*status_of(entry))
                try:
                    result = await self._finish(entry, call, gone)
                except Exception as e:
                    await context.abort(*status_of(e))
                yield self._sync._embed_response(result)
        finally:
            gone.gone = gone.gone or not reader.done()
            reader.cancel()
            while not window.empty():  # never finished: give their leases back
                entry = window.get_nowait()
                if isinstance(entry, Pending) and entry.on_done is not None:
                    entry.on_done()

    async def _read_stream(self, context: grpc.aio.ServicerContext, request_iterator: AsyncIterator[pb.EmbedRequest],
                           call: Call, window: asyncio.Queue) -> None:
        try:
            async for request in request_iterator:
                # Streams wait for queue room instead of failing: a bulk job should slow down, not die.
                pending: Pending | BaseException
                try:
                    pending = await self._start(context, request, call, block=True)
                except Exception as e:
                    if category_of(e) is Category.DEADLINE:
                        return
                    pending = e
                await window.put(pending)
                if isinstance(pending, BaseException):
                    return
        except (grpc.RpcError, asyncio.CancelledError):
            pass
        except Exception as e:
            await window.put(e)
        finally:
            try:
                window.put_nowait(_END)
            except asyncio.QueueFull:
                asyncio.get_running_loop().create_task(window.put(_END))

    async def ListModels(self, request, context):
        return await self._now(context, self._sync.ListModels, request, _SyncContext(context))


class _SyncContext:
    """A sync handler's context over an aio one, for handlers run whole in the blocking pool."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._loop = asyncio.get_running_loop()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def is_active(self) -> bool:
        return not self._context.done()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Abort(code, details)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _delegate(name: str) -> Callable:
    """An aio handler running the sync handler ``name`` whole in the blocking pool."""

    async def handler(self: AioEmbedderServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        sync_context = _SyncContext(context)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, getattr(self._sync, name), request, sync_context)
        except _Abort as e:
            failed = (e.code, e.details)
        await context.abort(*failed)

    handler.__name__ = name
    return handler


for _name in ("Add", "Delete", "SetLabels", "Get", "Search", "Stats", "Train", "Predict", "LearningCurve",
              "ListHeads", "DeleteHead", "FineTune", "GetJob", "CancelJob"):
    setattr(AioEmbedderServicer, _name, _delegate(_name))


# ---------------------------------------------------------------------------------------------- interceptors

class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_METHOD_PREFIX):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials, self._expected):
            return handler
        why = ("missing `authorization` metadata" if not given else "wrong token in `authorization` metadata")

        message = (f"{why}; send `authorization: Bearer <token>` (EmbedderClient(token=...), "
                   "`embedder embed --token`, or EMBEDDER_TOKEN)")

        def deny(behaviour: Callable, streaming: bool) -> Callable:
            if streaming:
                async def abort_stream(request_or_iterator, context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                    yield  # never reached: an async generator, like every streaming handler here
                return abort_stream

            async def abort(request_or_iterator, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            return abort

        return _wrap_handler(handler, deny)


class AioMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(_METHOD_PREFIX):
            return handler
        name = method[len(_METHOD_PREFIX):]
        m = self._metrics

        def record(context, start: float, failed: BaseException | None) -> None:
            code = context.code()
            if code is None or isinstance(code, int):
                code = {c.value[0]: c for c in grpc.StatusCode}.get(code) if code is not None else None
            if code is None:
                if failed is None:
                    code = grpc.StatusCode.OK
                elif isinstance(failed, (asyncio.CancelledError, GeneratorExit)):
                    code = grpc.StatusCode.CANCELLED
                else:
                    code = grpc.StatusCode.UNKNOWN
            m.requests.labels(name, code.name).inc()
            m.latency.labels(name).observe(time.monotonic() - start)

        def timed(behaviour: Callable, streaming: bool) -> Callable:
            if streaming:
                async def stream(request_or_iterator, context):
                    start, failed = time.monotonic(), None
                    try:
                        async for response in behaviour(request_or_iterator, context):
                            yield response
                    except BaseException as e:
                        failed = e
                        raise
                    finally:
                        record(context, start, failed)
                return stream

            async def unary(request_or_iterator, context):
                start, failed = time.monotonic(), None
                try:
                    return await behaviour(request_or_iterator, context)
                except BaseException as e:
                    failed = e
                    raise
                finally:
                    record(context, start, failed)
            return unary

        return _wrap_handler(handler, timed)


# ---------------------------------------------------------------------------------------------- server

class AioEmbedderServer:
    """:class:`embedder.server.EmbedderServer`'s interface over a ``grpc.aio`` server on its own loop thread."""

    def __init__(self, config: Config, embedder: Any = None) -> None:
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ValueError("TLS needs both a certificate and a key: set --tls-cert and --tls-key "
                             "(EMBEDDER_TLS_CERT / EMBEDDER_TLS_KEY), or neither for plaintext")
        if config.max_items > config.max_queue:
            raise ValueError(f"max_items ({config.max_items}) is above max_queue ({config.max_queue}), so a full "
                             "request could never be queued; lower --max-items or raise --max-queue")
        self.config = config
        self.metrics = Metrics()
        self.embedder = embedder
        self.service: Service | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._executor = futures.ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="embedder-blocking")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedder-grpc", daemon=True)
        self._thread.start()
        self._servicer = AioEmbedderServicer(None, self._executor)
        self._on_loop(self._build())
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _build(self) -> None:
        cfg = self.config
        interceptors: list[grpc.aio.ServerInterceptor] = [AioMetricsInterceptor(self.metrics)]
        if cfg.token:
            interceptors.append(AioAuthInterceptor(cfg.token))
        limit = cfg.max_message_bytes
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer()
        pb_grpc.add_EmbedderServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)

    def _on_loop(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def address(self) -> str:
        return _host_port(self.config.host, self.port)

    def start(self) -> int:
        cfg = self.config
        if self.service is None:
            store, heads, jobs = open_data_dir(cfg)
            self.service = Service(cfg, store=store, heads=heads, jobs=jobs, metrics=self.metrics,
                                   on_death=self._worker_died)
            self._servicer.service = self._servicer._sync.service = self.service
        try:
            self.port = self._on_loop(self._bind())
        except BaseException:
            self.service.close(grace=0)
            self.service = None
            raise
        self._on_loop(self._server.start())
        if cfg.metrics_port > 0:
            self.metrics_port = self.metrics.start_http(cfg.metrics_port, cfg.host)
        log.info("listening on %s (%s), health NOT_SERVING until the model is warm",
                 self.address, "TLS" if cfg.tls_cert else "plaintext")
        return self.port

    async def _bind(self) -> int:
        cfg = self.config
        target = _host_port(cfg.host, cfg.port)
        try:
            if cfg.tls_cert:
                with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
                port = self._server.add_secure_port(target, creds)
            else:
                port = self._server.add_insecure_port(target)
        except RuntimeError as e:
            raise EmbedderError(f"could not listen on {target} ({e}); is the port in use? choose another "
                                "with --port / EMBEDDER_PORT (0 picks a free one)") from None
        if not port:
            raise EmbedderError(f"could not listen on {target}; is the port in use? choose another with --port")
        return port

    def load(self) -> None:
        import sys
        default = self.service.start(self.embedder)
        if default.info["runtime"] != "torch" and default.info["device"] == "cpu" and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down: health NOT_SERVING, finishing in-flight calls (up to %.1fs)", grace)
        self.metrics.serving.set(0)
        self._on_loop(self.health.enter_graceful_shutdown())
        # grpc's stop refuses new calls and lets those in flight finish, an open stream's next requests included
        # (the core's refuse_calls would refuse those too)
        self._on_loop(self._server.stop(grace))
        if self.service is not None:
            self.service.close(grace)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop_http()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        if self._stopped:
            return True
        return self._on_loop(self._server.wait_for_termination(timeout))

    def _set_health(self, status: int) -> None:
        async def set_all() -> None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)
        if threading.current_thread() is self._thread:
            self._loop.create_task(set_all())
        else:
            self._on_loop(set_all())
        self.metrics.serving.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    def _worker_died(self, reason: str) -> None:
        log.critical("health -> NOT_SERVING: %s", reason)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
