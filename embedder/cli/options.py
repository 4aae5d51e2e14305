"""Options and helpers the command modules share: model flags, server flags, checked number types, the client.

Light on purpose: this module, like every command module, imports no torch, faiss or scikit-learn, so a
command that only talks to a server runs from a client-only install. Defaults are read from
:class:`~embedder.config.Config`, never copied::

    >>> from embedder.cli.options import DEFAULT_SERVER
    >>> DEFAULT_SERVER
    '127.0.0.1:50051'
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..config import JPEG_DECODERS, Config
from ..errors import InvalidArgumentError
from ..inputs import image_files
from ..runtimes import RUNTIMES  # light: torch is imported only to run a model

if TYPE_CHECKING:
    from ..client import EmbedderClient

DEFAULT_SERVER = f"{Config.host}:{Config.port}"
CHUNK = 64  # files per Add / Predict call: only this many are read into memory at once
HEAD_KINDS = ("logreg", "linear_svm", "svm")
# The Config fields the model options set, by flag destination.
MODEL_FIELDS = ("model", "device", "runtime", "max_batch", "micro_batch", "decode_workers", "runtime_threads",
                "max_pixels", "precision", "normalize", "jpeg_decoder", "compile", "cache_dir", "onnx_cache_bytes")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The flags that build the embedding pipeline's :class:`Config` (each beats its ``EMBEDDER_*`` variable)."""
    g = p.add_argument_group("model (also EMBEDDER_* env vars)")
    g.add_argument("--model", help=f"backbone name (see `embedder models`); default {Config.model}")
    g.add_argument("--device", help=f"auto | cpu | cuda | cuda:N (default {Config.device})")
    g.add_argument("--runtime", choices=("auto", *RUNTIMES), help=f"inference runtime (default {Config.runtime})")
    g.add_argument("--max-batch", type=int, help=f"items per runtime call (default {Config.max_batch})")
    g.add_argument("--micro-batch", type=int,
                   help="items per forward pass (default: a small per-device size on CPU, max batch on CUDA)")
    g.add_argument("--decode-workers", type=int, help="decode/resize threads (default: one per core)")
    g.add_argument("--runtime-threads", type=int, help="CPU runtime intra-op threads (default: one per core)")
    g.add_argument("--jpeg-decoder", choices=JPEG_DECODERS,
                   help=f"decoder for plain JPEGs (default {Config.jpeg_decoder}: Pillow on CPU, no torch loaded; "
                        "torchvision's nvJPEG on CUDA; torchvision on CPU is ~1.6x cheaper per photo and loads torch)")
    g.add_argument("--max-pixels", type=int, help=f"refuse larger images (default {Config.max_pixels:,})")
    g.add_argument("--precision", choices=("fp32", "bf16"),
                   help=f"bf16 is opt-in, OpenVINO only (default {Config.precision})")
    g.add_argument("--no-normalize", dest="normalize", action="store_const", const=False,
                   help="return raw pooled features instead of L2-normalised vectors")
    g.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the model (torch runtime only; other runtimes ignore it; slower start); "
                        "also EMBEDDER_COMPILE=1")
    add_model_card_option(g)
    g.add_argument("--cache-dir", type=Path,
                   help="where exported ONNX models are kept (default: EMBEDDER_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/embedder, else ~/.cache/embedder)")
    g.add_argument("--onnx-cache-bytes", type=int,
                   help="keep the ONNX exports in the cache dir under this size, deleting the least recently used "
                        f"(default {Config.onnx_cache_bytes:,})")


def add_model_card_option(g: Any) -> None:
    """``--model-card PATH`` (repeatable): your own model, see :mod:`embedder.cards`."""
    g.add_argument("--model-card", dest="model_cards", metavar="PATH", action="append", type=existing_file,
                   help="a model card (JSON/TOML) naming your own model's files and how to feed it; repeatable; its "
                        "name is then a --model (default: EMBEDDER_MODEL_CARDS, paths separated by ':')")


def card_setting(args: argparse.Namespace) -> str | None:
    """The ``--model-card`` flags as :attr:`Config.model_cards` (None: none given)."""
    return os.pathsep.join(map(str, args.model_cards)) if args.model_cards else None


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags given on the command line (None: not given)."""
    return {**{name: getattr(args, name) for name in MODEL_FIELDS}, "model_cards": card_setting(args)}


def config_from(args: argparse.Namespace) -> Config:
    """Flag > ``EMBEDDER_*`` env var > Config default, for the model options."""
    return Config.from_env(**model_settings(args))


def add_remote_options(p: argparse.ArgumentParser, *, server_help: str | None = None,
                       title: str = "server (also EMBEDDER_SERVER, EMBEDDER_TOKEN)") -> None:
    """``--server``, ``--token``, ``--tls-ca``, ``--timeout``: how a command reaches `embedder serve`."""
    g = p.add_argument_group(title)
    g.add_argument("--server", metavar="HOST:PORT", help=server_help or (
        f"the `embedder serve` instance to talk to (default: EMBEDDER_SERVER, else {DEFAULT_SERVER})"))
    g.add_argument("--token", help="bearer token for the server (default: EMBEDDER_TOKEN)")
    g.add_argument("--tls-ca", type=existing_file,
                   help="PEM certificate to trust for a TLS server (plaintext without it)")
    g.add_argument("--timeout", type=positive_float, default=60.0, help="seconds per request (default %(default)g)")


def client_from(args: argparse.Namespace) -> "EmbedderClient":
    """A client for --server (else EMBEDDER_SERVER, else the default) with --token (else EMBEDDER_TOKEN)."""
    from ..client import EmbedderClient  # grpc and the stubs: only for the commands that talk to a server

    server = args.server or os.environ.get("EMBEDDER_SERVER") or DEFAULT_SERVER
    # only the variable this needs: a server setting (EMBEDDER_PORT=x) must not fail a client command
    token = args.token if args.token is not None else os.environ.get("EMBEDDER_TOKEN", "")
    return EmbedderClient(server, token=token or None, timeout=args.timeout, tls_ca=args.tls_ca,
                          model=getattr(args, "model", None))


def existing_file(text: str) -> Path:
    """An argparse type: a path to a file that exists (argparse names the flag in the usage error)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return Path(text)


def bounded(kind: type, ok: Callable[[Any], bool], need: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` for which ``ok`` holds, else a usage error saying what it must be.

    The numbers of the remote commands use it because in the RPCs 0 means "the server's default": typed on the
    command line it is a mistake to report, not to paper over.
    """
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    return parse


positive_int = bounded(int, lambda v: 1 <= v < 2**31, "a whole number from 1 to 2**31 - 1")
positive_float = bounded(float, lambda v: 0 < v < float("inf"), "a positive number of seconds")
fraction = bounded(float, lambda v: 0 < v < 1, "a fraction between 0 and 1")


def add_where_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--where``: a metadata filter, sent as written (the server parses it and names a bad part)."""
    p.add_argument("--where", metavar="FILTER",
                   help=f"only {what} whose metadata passes FILTER, e.g. 'camera == \"a\" and year >= 2020' or "
                        "the JSON form '{\"camera\": \"a\", \"year\": {\">=\": 2020}}'")


def param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of ``--param``: the value as JSON when it parses (0.1, true, [1, 2]), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE, e.g. C=0.1")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def params(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """The ``--param`` pairs as a dict; a name given twice is refused (the last silently winning surprised)."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise InvalidArgumentError(f"--param {name} is given twice; give each setting once")
        out[name] = value
    return out


def collect_images(paths: Sequence[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand folders recursively (image suffixes only, sorted); missing paths are reported, not dropped."""
    files: list[Path] = []
    missing: list[dict[str, str]] = []
    for p in paths:
        if p.is_dir():
            files.extend(image_files(p))
        elif p.is_file():
            files.append(p)
        else:
            missing.append({"path": str(p), "error": "no such file or directory"})
    return files, missing


def no_images(paths: Sequence[Path], missing: list[dict[str, str]]) -> FileNotFoundError:
    """The error for ``paths`` that hold no image file: that they do not exist, where none of them does."""
    if len(missing) == len(paths):
        return FileNotFoundError(f"no such file or directory: {', '.join(map(str, paths))}")
    return FileNotFoundError(f"no image files found under {', '.join(map(str, paths))}")


class _NoBar:
    """What :func:`progress_bar` gives without tqdm: the same calls, nothing drawn."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, quiet: bool, desc: str) -> Any:
    """A tqdm bar over ``total`` images, or a silent stand-in on a client-only install (tqdm is a server extra)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, disable=quiet, unit="img", desc=desc)


# C0 and C1 controls (ESC and CSI start terminal escape sequences), DEL, and the bidirectional overrides that
# make text display in another order than it reads
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNPRINTABLE_BUT_NEWLINES = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(value: Any, *, newlines: bool = False) -> str:
    """``str(value)`` safe to print on a terminal: control characters as ``\\x1b``-style escapes.

    Stored names, labels, ids and messages come from whoever wrote them; printed raw, an escape sequence in
    one could rewrite the operator's screen. ``newlines`` keeps line breaks (multi-line messages).
    """
    pattern = _UNPRINTABLE_BUT_NEWLINES if newlines else _UNPRINTABLE
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def report(failed: list[dict[str, str]]) -> None:
    """One ``skipped PATH: WHY`` (or ``TEXT``) line on stderr per input that could not be used."""
    for f in failed:
        print(f"skipped {printable(f.get('path', f.get('text', '')))}: {printable(f['error'])}", file=sys.stderr)
