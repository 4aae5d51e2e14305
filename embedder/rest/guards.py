"""What every HTTP request passes before and after its route, as plain ASGI middleware (no per-request threads).

Outermost first: :class:`Measure` (Prometheus, by route and status), :class:`LimitConcurrency`
(``max_concurrent_rpcs``, like the gRPC port's cap), :class:`SameOrigin` (no writes from another site's page),
:class:`KnownHosts` (without auth, only requests addressed by IP or an allowed name: no DNS rebinding),
:class:`Authenticate` (the bearer token, checked before a byte
of the body is read), :class:`LimitBody` (``max_message_bytes``, like gRPC's receive limit, and
``stream_idle_seconds`` between body chunks), :class:`AnswerErrors` (whatever a route raises becomes the
table's status and JSON error).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Category, UnauthenticatedError
from ..keys import Gate, authorization
from .convert import error_body, item_error

log = logging.getLogger(__name__)

PRINCIPAL = "embedder.principal"  # the ASGI scope key of the caller's embedder.keys.Principal (None: no auth)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs"})  # probes and the API's description
PAGE_PREFIX = "/page/"  # the web page's files (and "/", its start) hold no data: its calls to /v1 carry the token
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_open(path: str) -> bool:
    """Answered without a token: probes, the API's description and the web page."""
    return path in OPEN_PATHS or path == "/" or path.startswith(PAGE_PREFIX)


async def send_error(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    """Answer with ``{"error": body}`` (a :class:`~.schema.ErrorBody`)."""
    payload = json.dumps({"error": body.model_dump()}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class AnswerErrors:
    """Turn an exception from a route into its status and JSON error through the one table; never a trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            if started:  # too late for a status: the connection is cut, which the client sees
                log.exception("error after the response started")
                raise
            await send_error(send, *error_body(e))


class LimitConcurrency:
    """At most ``limit`` requests at once (:data:`OPEN_PATHS` aside: probes always answer), 429 beyond.

    Counted on the event loop's one thread, so no lock. Outside :class:`Authenticate`: refusals count too.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            return await send_error(send, 429, item_error(
                Category.RESOURCE_EXHAUSTED,
                f"the server is answering its limit of {self.limit} concurrent requests; retry with backoff, or "
                "raise --max-concurrent-rpcs / EMBEDDER_MAX_CONCURRENT_RPCS"), {"retry-after": "1"})
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class LimitBody:
    """Refuse bodies above ``limit`` bytes with 413, by Content-Length or while reading a chunked one; end an
    upload that sends nothing for ``idle_seconds`` with 408 (a slow sender holds a concurrency slot).

    The body is read whole before the route runs (every route needs all of it), so the route never sees a
    partial one; later ``receive`` calls go to the server (they report the client leaving).
    """

    def __init__(self, app: ASGIApp, limit: int, idle_seconds: float) -> None:
        self.app, self.limit, self.idle_seconds = app, limit, idle_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle_seconds)
            except asyncio.TimeoutError:
                return await send_error(send, 408, item_error(
                    Category.DEADLINE, f"no request body bytes for {self.idle_seconds:g}s, the server's limit; send "
                    "the body at once (or raise --stream-idle-seconds / EMBEDDER_STREAM_IDLE_SECONDS)"),
                    {"connection": "close"})
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send, size)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int) -> None:
        await send_error(send, 413, item_error(
            Category.RESOURCE_EXHAUSTED,
            f"request body is {'at least ' if size <= self.limit else ''}{size:,} bytes, above the server's limit of "
            f"{self.limit:,} (max_message_bytes); send fewer or smaller images per call, or raise the limit "
            "with --max-message-bytes / EMBEDDER_MAX_MESSAGE_BYTES"), {"connection": "close"})


class SameOrigin:
    """Refuse a state-changing request (any method but GET, HEAD, OPTIONS) that a browser sent from another site's
    page: its ``Origin`` header is there and names another host than the ``Host`` it was sent to (or the
    ``X-Forwarded-Host`` a reverse proxy that rewrites ``Host`` sets; a page cannot set that header on a
    cross-site request without a CORS preflight, which this server never grants).

    A server without a token would otherwise take a form posted by any page its user visits. Clients other than
    browsers send no ``Origin`` and pass; so do the server's own page and reads (no CORS headers are sent, so
    another site's page cannot read the answers).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        if origin is not None:
            sent_from = origin.decode("latin-1").strip().lower()
            names = [headers.get(b"host", b""), *headers.get(b"x-forwarded-host", b"").split(b",")]
            hosts = {h.decode("latin-1").strip().lower() for h in names} - {""}
            if sent_from.partition("://")[2] not in hosts:
                return await send_error(send, 403, item_error(
                    Category.PERMISSION_DENIED,
                    f"cross-site request refused: a page at {sent_from[:200]!r} may not {scope['method']} to this "
                    f"server ({', '.join(sorted(hosts))[:200]!r}); use the page this server serves at / or a "
                    "client that is not a browser"))
        await self.app(scope, receive, send)


class KnownHosts:
    """While the service asks for no token (:attr:`Gate.required` is false), answer only requests addressed to it
    by IP address, ``localhost`` or a name in ``allowed`` (``*``: any). Without auth, a page on any site could
    otherwise reach it through DNS rebinding: a name the attacker controls, pointed at this server, makes
    ``Host`` and ``Origin`` agree, so :class:`SameOrigin` alone cannot tell. Probes and the page's own files
    (:func:`is_open`) hold no data and stay open."""

    def __init__(self, app: ASGIApp, gate: Gate, allowed: str) -> None:
        self.app, self._gate = app, gate
        self._allowed = {h.strip().lower() for h in allowed.split(",") if h.strip()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]) or "*" in self._allowed or self._gate.required:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
        name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] if ":" in host else host
        if not (_is_address(name) or name == "localhost" or name.endswith(".localhost") or name in self._allowed):
            return await send_error(send, 403, item_error(
                Category.PERMISSION_DENIED,
                f"this server has no token, so it answers requests addressed to it by IP address or localhost, not "
                f"{host[:100]!r} (another site could reach it through a DNS name: DNS rebinding); set --token or "
                "add an API key, or list the name in --allowed-hosts / EMBEDDER_ALLOWED_HOSTS"))
        await self.app(scope, receive, send)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Authenticate:
    """Require ``Authorization: Bearer <token or API key>`` on every path but the open ones (:func:`is_open`) once the
    :class:`~embedder.keys.Gate` requires it, as the gRPC port does; the caller's key goes into
    ``scope[PRINCIPAL]`` for the route's ``Call`` (roles and allow-lists are the core's to check)."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app, self._gate = app, gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            return await self.app(scope, receive, send)
        try:
            scope[PRINCIPAL] = self._gate.principal(authorization(scope["headers"]))
        except UnauthenticatedError as e:
            return await send_error(send, 401, item_error(
                Category.UNAUTHENTICATED, f"{e} (OpenAI clients: api_key=<key>)"), {"www-authenticate": "Bearer"})
        await self.app(scope, receive, send)


class Measure:
    """Count requests by route and status, and time them, in the service's request metrics (``door="http"``)."""

    def __init__(self, app: ASGIApp, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            route = scope.get("route")  # set by the router when a route matched: a bounded label set
            name = getattr(route, "name", None) or "unmatched"
            self.metrics.requests.labels("http", name, str(status)).inc()
            self.metrics.latency.labels("http", name).observe(time.monotonic() - start)
