"""What the web page asks of a 100k-item collection: one page of the listing, against reading the whole collection.

Usage::

    python benchmarks/bench_page.py            # 100k items
    python benchmarks/bench_page.py --quick    # smoke test: 20k items

Through :class:`embedder.store.Store` (SQLite, checksums, the kept-image flag): ``Store.page`` of 60 items (the
page's default) at the start, in the middle and at the end of the collection, filtered by a label held by 10% of
items and by "unlabelled" (the other 90%), and a kept image by id; beside ``Store.vectors``, the one read of
every item the listing replaces. Median of 50 interleaved rounds (the whole read: of 3); each row also as a
ratio to the full read, measured in the same run. The vectors are random (a listing never looks at their
values); 1280-d as mobilenet_v2's. Then what a page of thumbnails weighs: the page's 256-px JPEG thumbnails
(``embedder.core.thumbnails``) of the benchmark's real photos against the photos as added, bytes and the time
to make one.
Results go to ``benchmarks/results/bench_page.json`` (``bench_page_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embedder.config import Config
from embedder.core.thumbnails import thumbnail
from embedder.inputs import content_hash
from embedder.store import Store
from images import real_jpegs, write_json

log = logging.getLogger("bench_page")

DIM = 1280
MODEL_ID = "synthetic-1280"
PAGE = 60
ADD_BATCH = 1000
KEPT_IMAGES = 1000  # items added with their image kept (real JPEGs), the rest without
WHOLE = "whole collection (Store.vectors)"
WHOLE_REPEATS = 3  # tens of seconds each at 100k
THUMB_SIDE = 256  # the page's (embedder/rest/static/page.js)
MAX_PIXELS = Config.max_pixels


def median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each of ``fns``, timed in interleaved rounds: on a shared machine, load from other
    processes falls on every row alike instead of on whichever ran at the time."""
    for fn in fns.values():
        fn()  # warm: SQLite's page cache as a running server has it
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: round(1000 * statistics.median(t), 3) for name, t in times.items()}


def fill(store: Store, n: int) -> None:
    rng = np.random.default_rng(0)
    photos = real_jpegs()
    for start in range(0, n, ADD_BATCH):
        ids = [f"item-{i:06d}" for i in range(start, min(n, start + ADD_BATCH))]
        images = [photos[i % len(photos)] if i < KEPT_IMAGES else None for i in range(start, start + len(ids))]
        store.add("big", ids, rng.standard_normal((len(ids), DIM), dtype=np.float32), model_id=MODEL_ID,
                  labels=["rare" if i % 10 == 0 else None for i in range(start, start + len(ids))],
                  sha256s=[content_hash(x) if x is not None else None for x in images], images=images)


def run(n: int, repeats: int) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-page-"))
    try:
        with Store(scratch) as store:
            start = time.perf_counter()
            fill(store, n)
            log.info("added %d items in %.1fs", n, time.perf_counter() - start)
            rows = {
                "page, start": lambda: store.page("big", limit=PAGE),
                "page, middle": lambda: store.page("big", offset=n // 2, limit=PAGE),
                "page, end": lambda: store.page("big", offset=n - PAGE, limit=PAGE),
                "page, label (10%), end": lambda: store.page("big", offset=n // 10 - PAGE, limit=PAGE, label="rare"),
                "page, unlabelled (90%), end": lambda: store.page("big", offset=n - n // 10 - PAGE, limit=PAGE,
                                                                  unlabelled=True),
                "one kept image": lambda: store.images("big", ["item-000500"]),
            }
            ms = median_ms(rows, repeats)
            ms |= median_ms({WHOLE: lambda: store.vectors("big")}, WHOLE_REPEATS)
            assert len(store.page("big", offset=n - PAGE, limit=PAGE).items) == PAGE
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    full = ms[WHOLE]
    return {"items": n, "dim": DIM, "page_size": PAGE, "repeats": repeats,
            "rows": {name: {"median_ms": v, "ratio_to_whole": round(v / full, 5)} for name, v in ms.items()}}


def thumbnails(repeats: int) -> dict[str, Any]:
    """The page's thumbnails of real photos against the photos: mean bytes, and the median time to make one."""
    photos = real_jpegs()
    small = [thumbnail(p, THUMB_SIDE, max_pixels=MAX_PIXELS) for p in photos]
    made = median_ms({"thumbnail": lambda: thumbnail(photos[0], THUMB_SIDE, max_pixels=MAX_PIXELS)}, repeats)
    return {"photos": len(photos), "side": THUMB_SIDE, "photo_mean_bytes": round(statistics.mean(map(len, photos))),
            "thumbnail_mean_bytes": round(statistics.mean(map(len, small))),
            "bytes_ratio": round(sum(map(len, small)) / sum(map(len, photos)), 4),
            "thumbnail_of_first_photo_ms": made["thumbnail"], "first_photo_bytes": len(photos[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k items instead of 100k")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = run(20_000 if args.quick else 100_000, repeats=50)
    for name, row in out["rows"].items():
        log.info("%-34s %9.3f ms  %.5fx the whole read", name, row["median_ms"], row["ratio_to_whole"])
    out["thumbnails"] = thumbnails(repeats=50)
    log.info("thumbnails: %s", out["thumbnails"])
    log.info("wrote %s", write_json("bench_page_quick" if args.quick else "bench_page", out))


if __name__ == "__main__":
    main()
