"""Run the HTTP front door: uvicorn on its own thread and event loop, in the process of the gRPC server.

The socket is bound in :meth:`HttpServer.start` on the calling thread, so a port in use fails there, before
anything says "listening". :meth:`HttpServer.stop` stops accepting, lets requests in flight finish within the
grace period, then cancels what is left.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from ..config import Config
from ..errors import EmbedderError, SettingError

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds for the event loop to come up


class HttpServer:
    """Serve ``app`` on ``config.host``:``port`` (0 picks a free port), with the gRPC port's TLS settings.

    >>> http = HttpServer(create_app(service, config), config, port=8080)
    >>> http.start()      # bound and answering; returns the port
    >>> http.stop(grace=10)
    """

    def __init__(self, app: Any, config: Config, port: int) -> None:
        self.config, self.port = config, port
        self._server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", server_header=False,
            ssl_certfile=config.tls_cert or None, ssl_keyfile=config.tls_key or None))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host  # IPv6
        return f"{'https' if self.config.tls_cert else 'http'}://{host}:{self.port}"

    def start(self) -> int:
        """Bind, start answering on a thread, and return the bound port."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="embedder-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise EmbedderError(f"the HTTP server on {self.url} did not start (see the log above)")
            time.sleep(0.01)
        log.info("HTTP on %s (%s)", self.url, "TLS" if self.config.tls_cert else "plaintext")
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, give requests in flight ``grace`` seconds (default: the config's), then cancel them."""
        if self._thread is None:
            return
        grace = self.config.grace_seconds if grace is None else grace
        self._server.config.timeout_graceful_shutdown = grace  # read by uvicorn's shutdown
        self._server.should_exit = True
        self._thread.join(grace + 5.0)
        if self._thread.is_alive():
            log.warning("the HTTP server thread did not stop within %.1fs", grace + 5.0)
        self._thread = None

    def _bind(self) -> socket.socket:
        host, port = self.config.host, self.port
        sock = None
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind after a restart (TIME_WAIT)
            sock.bind(address)
            sock.listen(2048)
        except OSError as e:
            if sock is not None:
                sock.close()
            raise SettingError(f"could not listen for HTTP on {host}:{port} ({e}); is the port in use? choose "
                               "another with --http-port / EMBEDDER_HTTP_PORT") from None
        sock.setblocking(False)
        return sock
