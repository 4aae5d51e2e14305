"""``embedder serve``: the gRPC embedding service (health, reflection, metrics), and the HTTP/JSON API beside it
with ``--http-port``, until SIGTERM.

Every flag beats its ``EMBEDDER_*`` variable, which beats :class:`~embedder.config.Config`'s default. The
first line printed on stdout, ``listening on HOST:PORT``, is what scripts parse (with ``--port 0`` the only way
to learn the port); with ``--http-port`` a second says where the HTTP/JSON API is.

Examples::

    EMBEDDER_TOKEN=s3cret embedder serve --port 50051 --metrics-port 9100
    embedder serve --http-port 8080                   # also REST + OpenAI's /v1/embeddings on :8080
    embedder serve --role embed --port 50052          # a stateless embedding replica
    python -m embedder.cli serve --port 0             # under a supervisor
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ..config import Config
from .options import add_model_options, config_from

# The Config fields the service options set, by flag destination.
SERVICE_FIELDS = ("host", "port", "max_delay_ms", "max_batch_pixels", "max_queue", "max_message_bytes", "max_items",
                  "max_metadata_bytes", "max_concurrent_rpcs", "stream_idle_seconds", "max_models", "role",
                  "embed_target", "data_dir", "store", "store_token", "cache_max_items", "cache_max_age_seconds", "cache_shared",
                  "keep_images", "token", "keys_file", "tls_cert", "tls_key", "metrics_port", "http_port", "allowed_hosts",
                  "grace_seconds")


def _mebi(n: int) -> str:
    """``64 * 2**20`` -> ``64Mi``: the limits are powers of two, read better that way."""
    return f"{n // 2**20}Mi" if n % 2**20 == 0 else f"{n:,}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC embedding service (health, reflection, metrics)")
    add_model_options(p)
    g = p.add_argument_group("service (also EMBEDDER_* env vars)")
    g.add_argument("--host", help=f"address to bind (default {Config.host}; 0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, help=f"port to bind (default {Config.port}; 0 picks a free one, printed on "
                                            "stdout)")
    g.add_argument("--max-delay-ms", type=float, help="how long the batcher waits to fill a batch while more items "
                                                      f"are on the way (default {Config.max_delay_ms:g})")
    g.add_argument("--max-batch-pixels", type=int, help="source pixels decoding at once, so bursts of huge images "
                                                        f"cannot OOM (default {_mebi(Config.max_batch_pixels)})")
    g.add_argument("--max-queue", type=int, help="queued items before calls fail with RESOURCE_EXHAUSTED "
                                                 f"(default {Config.max_queue})")
    g.add_argument("--max-message-bytes", type=int,
                   help=f"gRPC message limit, both directions (default {_mebi(Config.max_message_bytes)}B)")
    g.add_argument("--max-items", type=int, help=f"items per request (default {Config.max_items})")
    g.add_argument("--max-metadata-bytes", type=int,
                   help="an added item's metadata JSON, in UTF-8 bytes; larger is refused per item "
                        f"(default {Config.max_metadata_bytes // 1024}KiB)")
    g.add_argument("--max-concurrent-rpcs", type=int,
                   help="embedder.v1 calls (and HTTP requests) served at once; more are refused with "
                        f"RESOURCE_EXHAUSTED / 429 (default {Config.max_concurrent_rpcs}); health and reflection "
                        "keep their own threads")
    g.add_argument("--stream-idle-seconds", type=float,
                   help="a stream (or an HTTP upload) that sends nothing this long is ended "
                        f"(default {Config.stream_idle_seconds:g})")
    g.add_argument("--role", choices=("all", "embed", "store"),
                   help="all: the whole service; embed: a stateless embedding replica; store: the data dir, with "
                        f"cache misses sent to --embed-target (default {Config.role})")
    g.add_argument("--embed-target", metavar="IP:PORT,...",
                   help="store role: the embedding replicas (round-robin, unhealthy ones skipped)")
    g.add_argument("--max-models", type=int, help="backbones held at once: the default plus versions loaded on "
                                                  f"first use (default {Config.max_models})")
    g.add_argument("--data-dir", type=Path, help=f"store and classifier data (default ./{Config.data_dir})")
    g.add_argument("--allowed-hosts", metavar="NAME,...",
                   help="while no --token or key is set, the HTTP door answers requests addressed to it by IP "
                        "address or localhost only (so another site's page cannot reach it through a DNS name it "
                        "controls); list the host names it is served under here, or * for any. Also "
                        "EMBEDDER_ALLOWED_HOSTS")
    g.add_argument("--store", metavar="URI",
                   help="where the collections live: empty for FAISS + SQLite in --data-dir (default); "
                        "milvus:///abs/path.db for milvus-lite in a local file; http(s)://host:port for a Milvus "
                        "server that every --role all replica can share. The cache stays in --data-dir. Also "
                        "EMBEDDER_STORE")
    g.add_argument("--store-token", help="the Milvus server's token (user:password or an API key); prefer "
                                         "EMBEDDER_STORE_TOKEN, which `ps` does not show")
    g.add_argument("--cache-max-items", type=int,
                   help="vectors kept in the cache outside any collection, least recently used evicted beyond it "
                        f"(default {Config.cache_max_items:,}; 0 turns the cache off); also EMBEDDER_CACHE_MAX_ITEMS")
    g.add_argument("--cache-max-age-seconds", type=float,
                   help="cached vectors older than this are misses and deleted (default "
                        f"{Config.cache_max_age_seconds:g}; 0 keeps them until evicted); "
                        "also EMBEDDER_CACHE_MAX_AGE_SECONDS")
    g.add_argument("--cache-shared", dest="cache_shared", action="store_const", const=True,
                   help="one cache for every API key (faster; then a key can tell what others embedded); also "
                        "EMBEDDER_CACHE_SHARED")
    g.add_argument("--no-keep-images", dest="keep_images", action="store_const", const=False,
                   help="do not keep added images' bytes (then collections cannot be fine-tuned on)")
    g.add_argument("--token", help="require `authorization: Bearer TOKEN`, an admin key beside `embedder keys` (prefer "
                                   "EMBEDDER_TOKEN: flags show in ps)")
    g.add_argument("--keys-file", help="the API keys file (`embedder keys ... --keys-file`; default keys.json in "
                                       "--data-dir). Replicas sharing one Milvus each read their own unless this is "
                                       "one file for all, e.g. mounted from a Kubernetes Secret; it must exist at "
                                       "start, and auth is on with it; also EMBEDDER_KEYS_FILE")
    g.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key the port speaks TLS only")
    g.add_argument("--tls-key", help="PEM private key for --tls-cert")
    g.add_argument("--metrics-port", type=int,
                   help=f"Prometheus /metrics HTTP port (default {Config.metrics_port} = off)")
    g.add_argument("--http-port", type=int,
                   help="HTTP/JSON API port on --host, beside gRPC: REST for every call, OpenAI's /v1/embeddings, "
                        f"/docs (default {Config.http_port} = off); also EMBEDDER_HTTP_PORT")
    g.add_argument("--grace-seconds", type=float,
                   help=f"time in-flight calls get on SIGTERM (default {Config.grace_seconds:g})")
    p.set_defaults(handler=run)


def serve_config(args: argparse.Namespace) -> Config:
    """Flag > EMBEDDER_* env var > default, for the model and the service fields alike."""
    service = {k: getattr(args, k) for k in SERVICE_FIELDS}
    # config_from() already read every EMBEDDER_* variable; replace() re-runs Config's validation.
    return dataclasses.replace(config_from(args), **{k: v for k, v in service.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; the server's own exit status."""
    # Nothing the server forks uses gRPC, so gRPC's fork handlers only ever logged "skipping fork() handlers"
    # (read when gRPC starts, so set before it does; an operator's own setting wins).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from ..server import serve  # the whole stack

    config = serve_config(args)
    for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)):
        if path and not Path(path).is_file():  # said here, by flag, before the model loads
            raise FileNotFoundError(f"{flag} / EMBEDDER_{flag[2:].upper().replace('-', '_')} {path}: no such file; "
                                    "name the PEM file")
    scheme = "https" if config.tls_cert else "http"
    return serve(config, on_listening=lambda addr: print(f"listening on {addr}", flush=True),
                 on_http=lambda addr: print(f"HTTP/JSON on {scheme}://{addr} (API docs at /docs)", flush=True))
