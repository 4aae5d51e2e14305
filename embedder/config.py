"""The one configuration object, read from keyword arguments, CLI flags and ``EMBEDDER_*`` env vars.

Precedence: explicit value (keyword or CLI flag) > environment variable > default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import InvalidArgumentError

ENV_PREFIX = "EMBEDDER_"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embedder"


JPEG_DECODERS = ("auto", "torchvision", "pillow")  # what decodes plain JPEGs (embedder.jpeg, or Pillow)


def resolve_jpeg_decoder(name: str, device: str) -> str:
    """``auto``: torchvision on CUDA (nvJPEG, torch is loaded there anyway), Pillow on CPU.

    On CPU torchvision's decode + resize is ~1.65x cheaper per photo (2.2 vs 3.6 core-ms), but it needs torch
    and torchvision in the process: ~860 MB of RSS a server on the default OpenVINO/ONNX runtime otherwise never
    loads (benchmarks/results/decode.json). Both stay within cosine 0.99997 of the reference recipe.
    """
    if name == "auto":
        return "pillow" if device == "cpu" else "torchvision"
    return name


@dataclass
class Config:
    """Settings for the embedding pipeline (and, later, the service).

    Every field can be set from the environment as ``EMBEDDER_<FIELD NAME IN CAPS>``,
    e.g. ``EMBEDDER_RUNTIME=openvino`` or ``EMBEDDER_MAX_PIXELS=100000000``.
    """

    model: str = "mobilenet_v2"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    runtime: str = "auto"  # auto | torch | onnxruntime | openvino
    max_batch: int = 64  # items the batcher gathers per runtime call
    micro_batch: int = 0  # items per forward pass; 0 = per-device default (4 on CPU, max_batch on CUDA)
    decode_workers: int = 0  # threads that decode and resize; 0 = one per core
    runtime_threads: int = 0  # CPU runtime intra-op threads; 0 = one per core
    jpeg_decoder: str = "auto"  # auto (torchvision on CUDA, Pillow on CPU) | torchvision | pillow
    max_pixels: int = 64_000_000  # larger images are refused as likely decompression bombs
    normalize: bool = True  # L2-normalise the output vectors
    precision: str = "fp32"  # fp32 | bf16 (OpenVINO only, opt-in) ; CUDA always autocasts to fp16
    compile: bool = False  # torch.compile the torch runtime's module
    cache_dir: Path = field(default_factory=_default_cache_dir)  # exported ONNX files live here
    # the ONNX exports in cache_dir are kept under this many bytes (least recently used deleted first): every recipe
    # name is a new 9-28 MB export, and callers choose the names
    onnx_cache_bytes: int = 2 * 1024**3
    # model card files (JSON/TOML, see embedder.cards) registered as backbones, separated by os.pathsep (':' on
    # POSIX) like PATH; `--model-card` is repeatable
    model_cards: str = ""

    # --- service ---
    host: str = "127.0.0.1"
    port: int = 50051
    max_delay_ms: float = 5.0  # how long the batcher waits to fill a batch while more items are on the way
    max_batch_pixels: int = 64 * 1024 * 1024  # source pixels decoding at once, so bursts of huge images cannot OOM
    max_queue: int = 4096  # queued items before calls fail fast with RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC send/receive limit, both directions
    max_items: int = 1024  # items per request
    max_metadata_bytes: int = 64 * 1024  # an item's metadata JSON (UTF-8), refused per item beyond it
    max_concurrent_rpcs: int = 100  # embedder.v1 calls (and HTTP requests) at once, RESOURCE_EXHAUSTED / 429 beyond
    stream_idle_seconds: float = 30.0  # a stream (or HTTP upload) with nothing received this long is ended
    token: str = ""  # bearer token required in `authorization` metadata when set
    tls_cert: str = ""  # PEM paths; TLS is on when both are set
    tls_key: str = ""
    metrics_port: int = 0  # Prometheus metrics HTTP port; 0 = off
    http_port: int = 0  # HTTP/JSON API (REST and OpenAI's /v1/embeddings) on `host`, beside gRPC; 0 = off
    # host names the HTTP door answers while no token or key is set (IP addresses and localhost always; "*": any),
    # comma-separated: without auth, a DNS name could be any site's (DNS rebinding)
    allowed_hosts: str = ""
    grace_seconds: float = 10.0  # in-flight work allowed to finish on SIGTERM
    max_models: int = 3  # backbones one server holds: the default plus versions loaded on first use
    role: str = "all"  # all | embed (a stateless replica: embedding only) | store (misses go to --embed-target)
    embed_target: str = ""  # store role: the embedding replicas, IP:PORT,IP:PORT,... or one dns:/// name

    # --- store ---
    data_dir: Path = Path("embedder-data")  # SQLite metadata, FAISS snapshots, heads
    store: str = ""  # collections: "" FAISS + SQLite in data_dir, milvus:///abs/path.db, or http(s)://host:port
    store_token: str = ""  # a Milvus server's token ("user:password" or an API key)
    # the API keys file; "" = <data_dir>/keys.json. Replicas sharing one Milvus need one file for all (a Secret)
    keys_file: str = ""
    cache_max_items: int = 1_000_000  # cached vectors outside any collection, LRU-evicted beyond this
    cache_max_age_seconds: float = 0.0  # cached vectors older than this are misses and deleted; 0 = kept until evicted
    cache_shared: bool = False  # one cache for every API key (then a key can tell what others embedded)
    keep_images: bool = True  # keep collection items' image bytes, for fine-tuning and new backbone versions

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        self.data_dir = Path(self.data_dir).expanduser()
        for name in ("max_batch", "max_pixels", "max_batch_pixels", "max_queue", "max_message_bytes", "max_items",
                     "max_models", "max_metadata_bytes", "max_concurrent_rpcs", "onnx_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Config.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch", "decode_workers", "runtime_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"Config.{name} must be >= 0 (0 means automatic), got {getattr(self, name)}")
        for name in ("port", "metrics_port", "http_port"):  # 0: a free port for `port`, off for the others
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"Config.{name} must be a TCP port, 0-65535, got {getattr(self, name)}")
        ports = [p for p in (self.port, self.metrics_port, self.http_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError(f"--port {self.port}, --metrics-port {self.metrics_port} and --http-port {self.http_port} "
                             "must differ: each listener needs its own port")
        for name in ("max_delay_ms", "grace_seconds", "cache_max_items", "cache_max_age_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"Config.{name} must be >= 0, got {getattr(self, name)}")
        if not self.stream_idle_seconds > 0:
            raise ValueError(f"Config.stream_idle_seconds must be > 0, got {self.stream_idle_seconds}")
        if self.max_metadata_bytes > self.max_message_bytes:
            raise ValueError(f"Config.max_metadata_bytes ({self.max_metadata_bytes:,}) must be at most "
                             f"max_message_bytes ({self.max_message_bytes:,}): an item must fit in a message")
        if self.jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"Config.jpeg_decoder must be one of {', '.join(JPEG_DECODERS)}, got {self.jpeg_decoder!r}")
        if self.role not in ("all", "embed", "store"):
            raise ValueError(f"Config.role must be 'all', 'embed' or 'store', got {self.role!r}")
        if (self.role == "store") != bool(self.embed_target):
            raise ValueError("--role store and --embed-target go together: a store node sends cache misses to the "
                             "embedding replicas at --embed-target (IP:PORT,IP:PORT,...)")
        parse_store_uri(self.store)
        if self.store_token and not self.store.startswith(("http://", "https://")):
            raise ValueError("--store-token goes with a Milvus server (--store http(s)://host:port)")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"Config.precision must be 'fp32' or 'bf16', got {self.precision!r}")

    @property
    def keys_path(self) -> Path:
        """The API keys file: ``keys_file``, else ``<data_dir>/keys.json``."""
        return Path(self.keys_file).expanduser() if self.keys_file else self.data_dir / "keys.json"

    @property
    def card_paths(self) -> list[Path]:
        """The model card files of ``model_cards``."""
        return [Path(p).expanduser() for p in self.model_cards.split(os.pathsep) if p]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        """Build a Config from ``EMBEDDER_*`` variables, then apply non-None ``overrides``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def parse_store_uri(uri: str) -> tuple[str, str]:
    """``(kind, target)`` of a ``--store`` value: ``("local", "")`` for empty (FAISS + SQLite in the data dir),
    ``("milvus-lite", "/abs/path.db")`` for ``milvus:///abs/path.db``, ``("milvus", uri)`` for
    ``http(s)://host:port``. InvalidArgumentError says which forms there are."""
    forms = ("use empty (FAISS + SQLite in --data-dir), milvus:///absolute/path.db (milvus-lite in a local file) "
             "or http(s)://host:port (a Milvus server)")
    if not uri:
        return "local", ""
    if uri.startswith("milvus://"):
        path = uri[len("milvus://"):]
        if not path.startswith("/") or not path.endswith(".db") or len(path) <= len("/.db"):
            raise InvalidArgumentError(f"--store {uri!r}: a milvus-lite store is milvus:///absolute/path.db (three "
                                       f"slashes, an absolute path ending in .db); {forms}")
        if not Path(path).parent.is_dir():
            raise InvalidArgumentError(f"--store {uri!r}: the folder {Path(path).parent} does not exist; create it "
                                       "first (milvus-lite keeps its data in the .db folder inside it)")
        return "milvus-lite", path
    if uri.startswith(("http://", "https://")):
        host = uri.split("://", 1)[1].split("/", 1)[0]
        if not host or any(c.isspace() for c in uri):
            raise InvalidArgumentError(f"--store {uri!r}: a Milvus server is http(s)://host:port; {forms}")
        return "milvus", uri
    raise InvalidArgumentError(f"--store {uri!r} is not a store this service knows; {forms}")


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}") from None
    return raw
