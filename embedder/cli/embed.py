"""``embedder embed``: image files and folders (recursively), or texts -> ``.npy`` vectors + a ``.json`` beside them.

Locally, or on a running `embedder serve` with ``--server`` (then only the client is imported: no torch).
The ``.json`` holds the model id, the runtime, the paths in row order, and every file that could not be
embedded with why; those are also reported on stderr and make the command exit 1.

Examples::

    embedder embed photos/ extra.jpg --out vectors.npy
    EMBEDDER_RUNTIME=openvino embedder embed photos/ --out vectors.npy --model efficientnet_lite2
    EMBEDDER_TOKEN=s3cret embedder embed photos/ --out vectors.npy --server 127.0.0.1:50051
    embedder embed --text "a photo of a cat" --text "a dog" --out t.npy --model-card clip.toml --model clip-b32
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .options import (add_model_options, add_remote_options, client_from, collect_images, config_from, no_images,
                      progress_bar, report)

if TYPE_CHECKING:
    from ..client import ItemResult
    from ..results import BatchResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed image files and folders (recursively), or texts, into a .npy file")
    p.add_argument("paths", nargs="*", type=Path, help="image files or folders")
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="embed this text instead, with a text-image model (a CLIP/SigLIP model card); repeatable")
    p.add_argument("--out", type=Path, required=True,
                   help="output .npy; a .json with paths and failures goes beside it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the summary line")
    add_remote_options(p, title="remote (embed on an `embedder serve` instance instead of locally)",
                       server_help="send the images to this server (with --model: embed with that model there; "
                                   "default: the server's default model)")
    add_model_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """0 when every file was embedded, 1 when some were skipped (listed on stderr and in the .json)."""
    _check_out(args.out)
    if args.text:
        if args.paths:
            raise ValueError("give image paths or --text, not both: one .npy holds one kind of input")
        return _write_embeddings(args, args.text, [], *_embed_texts(args), kind="texts")
    if not args.paths:
        raise ValueError("name the image files or folders to embed (or --text TEXT)")
    files, failed = collect_images(args.paths)
    if not files:
        raise no_images(args.paths, failed)
    if args.server:
        return _write_embeddings(args, files, failed, *_embed_remote(args, files))
    from ..pipeline import Embedder  # imports torch: only the local path needs it

    with Embedder(config=config_from(args)) as emb:
        result = emb.embed_batch(files, progress=not args.quiet)
        info = emb.info()
    return _write_embeddings(args, files, failed, result, info)


def _embed_remote(args: argparse.Namespace, files: list[Path]) -> tuple["BatchResult", dict]:
    """Embed ``files`` on ``--server``; the same outputs as the local path, with the info of the model that
    embedded them (asked after embedding: a model other than the default loads on first use)."""
    from ..results import BatchResult

    with client_from(args) as client:
        results = []
        bar = progress_bar(len(files), quiet=args.quiet, desc=f"embedding ({args.server})")
        try:  # the bar gives the terminal back even when the server fails midway
            for r in client.embed_iter((str(f), f) for f in files):
                results.append(r)
                bar.update()
        finally:
            bar.close()
        info = {**_model_info(client.list_models(), results, args.model), "server": args.server}
    dim = info["dim"]
    vectors = np.stack([r.vector if r.ok else np.zeros(dim, np.float32) for r in results]) if results else \
        np.zeros((0, dim), np.float32)
    return BatchResult(vectors, [r.error for r in results]), info


def _embed_texts(args: argparse.Namespace) -> tuple["BatchResult", dict]:
    """Embed the ``--text`` values here or on ``--server``; a text fails alone on the server, all at once here."""
    from ..results import BatchResult

    if args.server:
        from ..client import Text

        with client_from(args) as client:
            results = list(client.embed_iter((str(i), Text(t)) for i, t in enumerate(args.text)))
            info = {**_model_info(client.list_models(), results, args.model), "server": args.server}
        vectors = np.stack([r.vector if r.ok else np.zeros(info["dim"], np.float32) for r in results])
        return BatchResult(vectors, [r.error for r in results]), info
    from ..pipeline import Embedder

    with Embedder(config=config_from(args)) as emb:
        return BatchResult(emb.embed_texts(args.text), [None] * len(args.text)), emb.info()


def _model_info(models: list[dict], results: list["ItemResult"], requested: str | None) -> dict:
    """The server's entry for the model that embedded ``results`` (by the model id they carry); where none
    was embedded, the one ``--model`` named, else the server's default (listed first)."""
    model_id = next((r.model_id for r in results if r.ok and r.model_id), None)
    wanted = (lambda m: m["model_id"] == model_id) if model_id else (lambda m: requested in (m["name"], m["model_id"]))
    return next((m for m in models if wanted(m)), models[0])


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot take the vectors before any image is embedded, not after."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name a .npy file, e.g. {out / 'vectors.npy'}")
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: name a .npy file (the paths and failures go beside it as .json)")
    parent = out.parent
    while not parent.exists():  # created on write: the nearest existing ancestor must be a writable folder
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not a writable folder; choose another path")


def _write_embeddings(args: argparse.Namespace, inputs: list[Path] | list[str], failed: list[dict[str, str]],
                      result: "BatchResult", info: dict, *, kind: str = "images") -> int:
    """Write the good rows to --out and the inputs (``paths``, or ``texts``), failures and model info to the .json
    beside it."""
    ok = result.ok
    key = "path" if kind == "images" else "text"
    failed += [{key: str(f), "error": e} for f, e in zip(inputs, result.errors) if e is not None]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, result.vectors[ok])
    meta = {**info, "count": int(ok.sum()), f"{key}s": [str(f) for f, good in zip(inputs, ok) if good],
            "failed": failed}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    report(failed)
    print(f"embedded {int(ok.sum())} {kind} ({len(failed)} skipped) with {info['model_id']} via {info['runtime']} "
          f"-> {args.out} (+ {args.out.with_suffix('.json').name})")
    return 0 if not failed else 1
