"""Command line interface.

Examples:
    embedder models
    embedder demo
    embedder embed photos/ extra.jpg --out vectors.npy
    EMBEDDER_RUNTIME=openvino embedder embed photos/ --out vectors.npy --model efficientnet_lite2
    EMBEDDER_TOKEN=s3cret embedder serve --port 50051 --metrics-port 9100
    EMBEDDER_TOKEN=s3cret embedder embed photos/ --out vectors.npy --server 127.0.0.1:50051

``embed`` writes ``vectors.npy`` (float32, one row per embedded file) and ``vectors.json`` beside it:
the model id, the runtime, the paths in row order, and every file that could not be embedded with why.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .backbones import list_backbones
from .config import Config
from .errors import EmbedderError
from .runtimes import RUNTIMES, installed, resolve_runtime

if TYPE_CHECKING:
    from .pipeline import BatchResult

log = logging.getLogger("embedder.cli")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (also EMBEDDER_* env vars)")
    g.add_argument("--model", help="backbone name (see `embedder models`); default mobilenet_v2")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--runtime", choices=("auto", *RUNTIMES), help="inference runtime (default auto)")
    g.add_argument("--max-batch", type=int, help="items per runtime call (default 64)")
    g.add_argument("--micro-batch", type=int, help="items per forward pass (default: 4 on CPU, max batch on CUDA)")
    g.add_argument("--decode-workers", type=int, help="decode/resize threads (default: one per core)")
    g.add_argument("--runtime-threads", type=int, help="CPU runtime intra-op threads (default: one per core)")
    g.add_argument("--max-pixels", type=int, help="refuse larger images (default 64,000,000)")
    g.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 is opt-in, OpenVINO only")
    g.add_argument("--no-normalize", dest="normalize", action="store_const", const=False,
                   help="return raw pooled features instead of L2-normalised vectors")


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(
        model=args.model, device=args.device, runtime=args.runtime, max_batch=args.max_batch,
        micro_batch=args.micro_batch, decode_workers=args.decode_workers, runtime_threads=args.runtime_threads,
        max_pixels=args.max_pixels, precision=args.precision, normalize=args.normalize,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered backbones and whether their weights are installed")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="the main job on the default backbone: embed bundled sample photos")
    _add_model_options(p)

    p = sub.add_parser("embed", help="embed image files and folders (recursively) into a .npy file")
    p.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", type=Path, required=True, help="output .npy; a .json with paths and failures goes beside it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the summary line")
    g = p.add_argument_group("remote (embed on an `embedder serve` instance instead of locally)")
    g.add_argument("--server", metavar="HOST:PORT",
                   help="send the images to this server (--model, if given, must match the server's)")
    g.add_argument("--token", help="bearer token for the server (default: EMBEDDER_TOKEN)")
    g.add_argument("--tls-ca", type=Path, help="PEM certificate to trust for a TLS server (plaintext without it)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    _add_model_options(p)

    p = sub.add_parser("serve", help="run the gRPC embedding service (health, reflection, metrics)")
    _add_model_options(p)
    _add_service_options(p)
    return parser


def _add_service_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service (also EMBEDDER_* env vars)")
    g.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, help="port to bind (default 50051; 0 picks a free one, printed on stdout)")
    g.add_argument("--max-delay-ms", type=float, help="how long the batcher waits to fill a batch (default 5)")
    g.add_argument("--max-batch-pixels", type=int,
                   help="source pixels decoding at once, so bursts of huge images cannot OOM (default 64Mi)")
    g.add_argument("--max-queue", type=int,
                   help="queued items before calls fail with RESOURCE_EXHAUSTED (default 4096)")
    g.add_argument("--max-message-bytes", type=int, help="gRPC message limit, both directions (default 64 MiB)")
    g.add_argument("--max-items", type=int, help="items per request (default 1024)")
    g.add_argument("--data-dir", type=Path, help="store and classifier data (default ./embedder-data)")
    g.add_argument("--token",
                   help="require `authorization: Bearer TOKEN` (prefer EMBEDDER_TOKEN: flags show in ps)")
    g.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key the port speaks TLS only")
    g.add_argument("--tls-key", help="PEM private key for --tls-cert")
    g.add_argument("--metrics-port", type=int, help="Prometheus /metrics HTTP port (default 0 = off)")
    g.add_argument("--grace-seconds", type=float, help="time in-flight calls get on SIGTERM (default 10)")


def _serve_config(args: argparse.Namespace) -> Config:
    """Flag > EMBEDDER_* env var > default, for the model and the service fields alike."""
    service = {k: getattr(args, k) for k in (
        "host", "port", "max_delay_ms", "max_batch_pixels", "max_queue", "max_message_bytes", "max_items",
        "data_dir", "token", "tls_cert", "tls_key", "metrics_port", "grace_seconds")}
    # _config() already read every EMBEDDER_* variable; replace() re-runs Config's validation.
    return dataclasses.replace(_config(args), **{k: v for k, v in service.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "models":
            return _models(args)
        if args.command == "demo":
            from .demo import run

            run(_config(args))
            return 0
        if args.command == "serve":
            return _serve(args)
        return _embed(args)
    except (EmbedderError, ValueError, FileNotFoundError) as e:
        print(f"embedder: error: {e}", file=sys.stderr)
        return 2


def _models(args: argparse.Namespace) -> int:
    cpu_runtime = resolve_runtime("auto", "cpu")
    rows = [{"name": s.name, "model_id": s.model_id, "dim": s.dim, "input_size": s.preprocessing.crop,
             "weights": "installed" if s.weights.present() else f"missing: {s.weights.install}",
             "description": s.description} for s in list_backbones()]
    if args.json:
        print(json.dumps({"models": rows, "cpu_runtime": cpu_runtime,
                          "runtimes_installed": [r for r in RUNTIMES if installed(r)]}, indent=2))
        return 0
    print(f"{'name':<20} {'dim':>5} {'input':>5}  {'model id':<44} weights")
    for r in rows:
        print(f"{r['name']:<20} {r['dim']:>5} {r['input_size']:>5}  {r['model_id']:<44} {r['weights']}")
    print(f"\nCPU runtime: {cpu_runtime} (installed: {', '.join(r for r in RUNTIMES if installed(r))})")
    return 0


def collect_images(paths: Sequence[Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand folders recursively (image suffixes only, sorted); missing paths are reported, not dropped."""
    files: list[Path] = []
    missing: list[dict[str, str]] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            missing.append({"path": str(p), "error": "no such file or directory"})
    return files, missing


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    # The one line scripts parse: with --port 0 it is the only way to learn the port.
    return serve(_serve_config(args), on_listening=lambda addr: print(f"listening on {addr}", flush=True))


def _embed_remote(args: argparse.Namespace, files: list[Path]) -> tuple[np.ndarray, list[str | None], dict]:
    """Embed ``files`` on ``--server``; same outputs as the local path (the server's model info)."""
    from tqdm.auto import tqdm

    from .client import EmbedderClient

    token = args.token if args.token is not None else Config.from_env().token
    with EmbedderClient(args.server, token=token or None, timeout=args.timeout, tls_ca=args.tls_ca,
                        model=args.model) as client:
        info = {**client.list_models()[0], "server": args.server}
        rows, errors = [], []
        results = client.embed_iter((str(f), f) for f in files)
        bar = tqdm(results, total=len(files), disable=args.quiet, unit="img", desc=f"embedding ({args.server})")
        for r in bar:
            rows.append(r.vector if r.ok else np.zeros(info["dim"], np.float32))
            errors.append(r.error)
    vectors = np.stack(rows) if rows else np.zeros((0, info["dim"]), np.float32)
    return vectors, errors, info


def _embed(args: argparse.Namespace) -> int:
    from .pipeline import BatchResult, Embedder  # imports torch: keep `embedder models --help` fast

    files, failed = collect_images(args.paths)
    if not files:
        raise FileNotFoundError(f"no image files found under {', '.join(map(str, args.paths))}")
    if args.server:
        vectors, errors, info = _embed_remote(args, files)
        return _write_embeddings(args, files, failed, BatchResult(vectors, errors), info)
    with Embedder(config=_config(args)) as emb:
        result = emb.embed_batch(files, progress=not args.quiet)
        info = emb.info()
    return _write_embeddings(args, files, failed, result, info)


def _write_embeddings(args: argparse.Namespace, files: list[Path], failed: list[dict[str, str]],
                      result: "BatchResult", info: dict) -> int:
    ok = result.ok
    failed += [{"path": str(f), "error": e} for f, e in zip(files, result.errors) if e is not None]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, result.vectors[ok])
    meta = {**info, "count": int(ok.sum()), "paths": [str(f) for f, good in zip(files, ok) if good], "failed": failed}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    for f in failed:
        print(f"skipped {f['path']}: {f['error']}", file=sys.stderr)
    print(f"embedded {int(ok.sum())} images ({len(failed)} skipped) with {info['model_id']} via {info['runtime']} "
          f"-> {args.out} (+ {args.out.with_suffix('.json').name})")
    return 0 if not failed else 1


if __name__ == "__main__":  # `python -m embedder.cli ...`, e.g. to run the service under a supervisor
    sys.exit(main())
