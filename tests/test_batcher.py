"""The dynamic batcher: batching rules, per-item failures, backpressure, dropping dead work, decode budget, fairness.

Most tests drive it with a small stand-in model whose behaviour they control (a gate to hold a batch in
the model, values that fail); one runs it on the real model and compares with the in-process pipeline.
"""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from embedder import preprocess
from embedder.batcher import Batcher
from embedder.errors import (BatcherClosedError, BatchFailedError, DroppedError, ImageDecodeError, ItemError,
                             QueueFullError)

BAD = 255  # an item filled with this value fails to "decode"
POISON = 254  # the model raises whenever this value is in its batch
LETHAL = 253  # the model raises a BaseException: the worker thread dies
SLOW = 252  # this item takes 0.3 s to "decode"
UNREADABLE = 251  # the model's probe refuses this item


class _Lethal(BaseException):
    pass


def item(value: int, side: int = 8) -> np.ndarray:
    return np.full((side, side, 3), value, np.uint8)


class FakeModel:
    """Stands in for Embedder: the probe's cost is the item's pixels, "decoding" keeps the item's value, the
    "vector" is [value]."""

    def __init__(self, decode_workers: int = 4, micro_batch: int | None = None) -> None:
        self.decode_workers = decode_workers
        if micro_batch is not None:  # as the Embedder on CPU: the model runs this many at a time
            self.micro_batch = micro_batch
        self._pool = ThreadPoolExecutor(decode_workers)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[int]] = []
        self.decode_order: list[int] = []
        self._lock = threading.Lock()
        self.decoding = 0
        self.decoding_pixels = 0
        self.in_flight_log: list[tuple[int, int]] = []  # (items, source pixels) decoding, at each submit

    def probe(self, x: np.ndarray) -> SimpleNamespace:
        if int(x[0, 0, 0]) == UNREADABLE:
            raise ImageDecodeError("corrupt image header")
        return SimpleNamespace(pixels=x.shape[0] * x.shape[1], value=int(x[0, 0, 0]))

    def submit(self, x: np.ndarray, probe: SimpleNamespace) -> Future:
        assert probe.value == int(x[0, 0, 0])  # the item's own probe came back with it
        px = probe.pixels
        with self._lock:
            self.decode_order.append(int(x[0, 0, 0]))
            self.decoding += 1
            self.decoding_pixels += px
            self.in_flight_log.append((self.decoding, self.decoding_pixels))

        def decode():
            time.sleep(0.3 if int(x[0, 0, 0]) == SLOW else 0.001)  # let decodes overlap, as real ones do
            with self._lock:
                self.decoding -= 1
                self.decoding_pixels -= px
            v = int(x[0, 0, 0])
            if v == BAD:
                raise ImageDecodeError("corrupt image data")
            return np.full((2, 2, 3), v, np.uint8)

        return self._pool.submit(decode)

    def embed_arrays(self, images: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(30), "test forgot to open the gate"
        values = [int(v) for v in images[:, 0, 0, 0]]
        self.batches.append(values)
        if LETHAL in values:
            raise _Lethal("worker killed")
        if POISON in values:
            raise ValueError("poisoned batch")
        return images[:, 0, 0, :1].astype(np.float32)

    def seen(self) -> list[int]:
        return [v for b in self.batches for v in b if v not in (POISON, LETHAL)]


@pytest.fixture
def model():
    m = FakeModel()
    yield m
    m.gate.set()
    m._pool.shutdown()


def values(futures) -> list[int]:
    return [int(f.result(timeout=10)[0]) for f in futures]


def hold_model(batcher: Batcher, model: FakeModel) -> Future:
    """Put one item in the model and keep it there (gate closed); returns its future."""
    model.gate.clear()
    model.entered.clear()
    (blocker,) = batcher.submit([item(1)])
    assert model.entered.wait(10)
    return blocker


def test_results_in_order_and_batches_capped_by_max_batch(model):
    with Batcher(model, max_batch=4, max_delay_ms=2) as b:
        with ThreadPoolExecutor(3) as callers:
            jobs = [callers.submit(b.submit, [item(10 * r + i) for i in range(7)]) for r in range(1, 4)]
            for r, job in enumerate(jobs, start=1):
                assert values(job.result()) == [10 * r + i for i in range(7)]
    assert max(len(batch) for batch in model.batches) <= 4
    assert sorted(model.seen()) == sorted(10 * r + i for r in range(1, 4) for i in range(7))


def test_full_batch_leaves_at_once_and_partial_after_the_delay(model):
    # With an hour-long delay, only "a full batch leaves at once" can answer within the timeout.
    with Batcher(model, max_batch=4, max_delay_ms=3_600_000) as b:
        assert values(b.submit([item(v) for v in (1, 2, 3, 4)])) == [1, 2, 3, 4]
    with Batcher(model, max_batch=64, max_delay_ms=1) as b:
        assert values(b.submit([item(7)])) == [7]


def test_a_partial_batch_waits_only_while_more_items_are_on_the_way(model):
    """With nothing else queued or decoding, a partial batch leaves at once (an hour-long delay cannot hold a
    lone caller); while an item is still decoding, the ready ones wait for it, up to max_delay."""
    with Batcher(model, max_batch=64, max_delay_ms=3_600_000) as b:
        start = time.monotonic()
        assert values(b.submit([item(5), item(6)])) == [5, 6]
        assert values(b.submit([item(1), item(2), item(SLOW)])) == [1, 2, SLOW]
        assert time.monotonic() - start < 5
    assert [sorted(b) for b in model.batches] == [[5, 6], [1, 2, SLOW]]  # 1 and 2 waited for the slow one
    model.batches.clear()
    with Batcher(model, max_batch=64, max_delay_ms=50) as b:
        assert values(b.submit([item(1), item(2), item(SLOW)])) == [1, 2, SLOW]
    assert [sorted(b) for b in model.batches] == [[1, 2], [SLOW]]  # the delay ran out before the slow one was ready


def test_a_bad_item_fails_alone(model):
    """An item the model's probe refuses fails at once, without a queue slot or a decode; one that fails to decode
    fails with the model's own error object. The others go on."""
    with Batcher(model) as b:
        blocker = hold_model(b, model)
        good1, unreadable, bad, good2 = b.submit([item(3), item(UNREADABLE), item(BAD), item(4)])
        with pytest.raises(ImageDecodeError, match="corrupt image header"):
            unreadable.result(timeout=0)  # failed at submit
        depth = b.queue_depth  # the blocker and the three probed items, less `bad` once its decode has failed
        assert depth == 4 or (depth == 3 and bad.done())
        model.gate.set()
        assert values([blocker, good1, good2]) == [1, 3, 4]
        with pytest.raises(ImageDecodeError, match="corrupt image data"):
            bad.result(timeout=10)
        assert b.stats()["failed"] == 2 and b.queue_depth == 0
    assert UNREADABLE not in model.decode_order and BAD not in model.seen()


def test_model_error_fails_only_the_culprit_and_the_worker_survives(model):
    with Batcher(model, max_batch=8, max_delay_ms=1) as b:
        blocker = hold_model(b, model)
        mine = b.submit([item(POISON), item(5)])  # another caller's items share the next batch
        theirs = b.submit([item(6)])
        model.gate.set()
        assert values([blocker]) == [1]
        with pytest.raises(BatchFailedError, match="server fault"):
            mine[0].result(timeout=10)
        assert values([mine[1], *theirs]) == [5, 6]
        assert any(POISON in batch and len(batch) > 1 for batch in model.batches)  # they did share a batch
        assert values(b.submit([item(8)])) == [8]  # still working


def test_a_broken_model_fails_every_future_of_the_batch(model):
    model.embed_arrays = lambda images: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with Batcher(model, max_batch=8) as b:
        futures = b.submit([item(v) for v in (1, 2, 3)])
        for f in futures:
            with pytest.raises(BatchFailedError, match="out of memory"):
                f.result(timeout=10)
        assert b.alive


def test_queue_full_fails_fast_or_waits_for_room(model):
    with Batcher(model, max_queue=3, max_batch=8, max_delay_ms=1) as b:
        blocker = hold_model(b, model)
        queued = b.submit([item(2), item(3)])  # the queue now holds 3 items
        assert b.queue_depth == 3
        with pytest.raises(QueueFullError, match=r"no room for this request \(1 item; 3 of 3 already waiting\)"):
            b.submit([item(4)])
        with pytest.raises(QueueFullError, match="can never fit"):
            b.submit([item(v) for v in range(4)])
        with ThreadPoolExecutor(1) as waiter:
            waiting = waiter.submit(b.submit, [item(9)], block=True)
            model.gate.set()
            assert values([blocker, *queued, *waiting.result(timeout=10)]) == [1, 2, 3, 9]
        assert b.queue_depth == 0


def test_work_of_gone_callers_never_reaches_the_model(model):
    with Batcher(model, max_batch=8, max_delay_ms=1) as b:
        (expired,) = b.submit([item(21)], deadline=time.monotonic() - 1)
        (cancelled,) = b.submit([item(22)], is_active=lambda: False)
        blocker = hold_model(b, model)
        wanted = threading.Event()
        wanted.set()
        (left,) = b.submit([item(23)], is_active=wanted.is_set)  # queued while the model is busy...
        wanted.clear()  # ...then its caller goes away
        model.gate.set()
        assert values([blocker]) == [1]
        for f in (expired, cancelled, left):
            with pytest.raises(DroppedError):
                f.result(timeout=10)
        assert b.stats()["dropped"] == 3
    assert not {21, 22, 23} & set(model.seen())


def test_decode_budget_caps_source_pixels_in_flight(model):
    budget = 3 * 100 * 100
    items = [item(10 + i, side=100) for i in range(20)] + [item(99, side=400)]  # the last is over budget
    with Batcher(model, max_batch_pixels=budget, max_batch=4, max_delay_ms=1) as b:
        assert values(b.submit(items)) == [10 + i for i in range(20)] + [99]
    concurrent = [px for n, px in model.in_flight_log if n > 1]
    assert concurrent and max(concurrent) <= budget  # several decoded at once, never over budget
    assert (1, 400 * 400) in model.in_flight_log  # an image bigger than the budget still runs, alone


def test_requests_are_served_round_robin(model):
    # One caller's 20 images must not make another caller's single image wait behind all of them.
    with Batcher(model, max_batch=1, max_delay_ms=0, max_ahead=1) as b:
        blocker = hold_model(b, model)
        big = b.submit([item(100 + i) for i in range(20)])
        small = b.submit([item(7)])
        model.gate.set()
        values([blocker, *big, *small])
    assert model.decode_order.index(7) <= 4


def wait_until(condition, timeout: float = 10) -> None:
    """Poll a state change no event announces (not a timing assert: the limit only stops a hung test)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the batcher never reached the expected state"
        time.sleep(0.001)


def test_a_small_request_behind_a_big_one_waits_for_a_few_items_not_all():
    """With the defaults and a CPU-like model (micro-batch 4), a 1-image call sent right after another caller's
    64-image call reaches the decoder and the model within the first few items, and its future resolves with its
    own micro-batch: neither the decode pool's FIFO nor the crops decoded ahead nor one 64-item model call makes
    it wait for all 64."""
    cpu = FakeModel(micro_batch=4)
    try:
        with Batcher(cpu) as b:
            blocker = hold_model(b, cpu)
            big = b.submit([item(100 + i) for i in range(64)])
            small = b.submit([item(7)])
            cpu.gate.set()
            values([blocker, *big, *small])
            assert cpu.decode_order.index(7) <= 24  # behind the few decoding ahead (4 batches + 4 workers)
            assert max(len(batch) for batch in cpu.batches) <= 4
            # The model may take a few more of the big call's crops while the small one decodes: not half of them.
            assert cpu.seen().index(7) < 32

            # Crops already decoded are batched round-robin too: the small call's one goes in the next batch.
            cpu.batches.clear()
            blocker = hold_model(b, cpu)
            big = b.submit([item(100 + i) for i in range(12)])
            wait_until(lambda: b.stats()["ready"] == 12)
            small = b.submit([item(7)])
            wait_until(lambda: b.stats()["ready"] == 13)
            cpu.gate.set()
            values([blocker, *big, *small])
        assert 7 in cpu.batches[1]  # the batch right after the blocker, not the last of four
    finally:
        cpu.gate.set()
        cpu._pool.shutdown()


def test_worker_death_fails_queued_work_and_reports(model):
    deaths: list[str] = []
    b = Batcher(model, max_batch=8, max_delay_ms=1, on_death=deaths.append)
    blocker = hold_model(b, model)
    doomed = b.submit([item(LETHAL)])
    model.gate.set()
    assert values([blocker]) == [1]
    with pytest.raises(BatcherClosedError, match="worker"):
        doomed[0].result(timeout=10)
    assert len(deaths) == 1 and "worker" in deaths[0]
    assert not b.alive
    with pytest.raises(BatcherClosedError, match="restart"):
        b.submit([item(2)])
    b.close()


def test_a_dispatch_failure_fails_queued_work_and_reports(model):
    """No thread of its own dispatches to the decode pool; a fault there must not strand queued items."""
    deaths: list[str] = []
    b = Batcher(model, max_batch=8, max_delay_ms=1, max_ahead=1, on_death=deaths.append)
    blocker = hold_model(b, model)
    (stuck,) = b.submit([item(2)])  # decoded, then waits: the budget (max_ahead=1) is full
    waiting = b.submit([item(3)])  # pending until the model takes item 2

    def broken() -> bool:
        raise RuntimeError("is_active blew up")

    (doomed,) = b.submit([item(4)], is_active=broken)
    model.gate.set()
    for f in (stuck, *waiting, doomed):
        try:
            f.result(timeout=10)  # resolved one way or the other: never stranded
        except BatcherClosedError:
            pass
    with pytest.raises(BatcherClosedError, match="dispatch"):
        doomed.result(timeout=10)
    assert len(deaths) == 1 and "dispatch" in deaths[0] and not b.alive
    assert values([blocker]) == [1]
    b.close()


def test_close_finishes_admitted_work_then_refuses(model):
    b = Batcher(model, max_batch=4, max_delay_ms=1)
    futures = b.submit([item(v) for v in range(1, 11)])
    b.close(timeout=30)
    assert values(futures) == list(range(1, 11))
    with pytest.raises(BatcherClosedError, match="shutting down"):
        b.submit([item(1)])


def test_each_item_is_probed_once_through_batcher_and_embedder(embedder, photos, photo_arrays, monkeypatch):
    """Through the batcher and the real Embedder, each item is probed once, at submit, and its probe goes with it
    to the decoder, which checks nothing again: an encoded image is opened again only by Pillow's own decode (the
    default on CPU; with jpeg_decoder="torchvision" a clean JPEG is opened once in all, see test_jpeg.py); an
    array is probed from its shape."""
    buf = io.BytesIO()
    Image.fromarray(photo_arrays["chelsea"]).save(buf, "PNG")
    items = [*photos, buf.getvalue(), photo_arrays["coffee"]]
    expected = embedder.embed(items)
    probed: list[object] = []
    opened: list[bytes] = []
    real_probe, real_open = preprocess.probe, Image.open

    def counting_probe(item, *, max_pixels):
        probed.append(item)
        return real_probe(item, max_pixels=max_pixels)

    def counting_open(fp, *args, **kwargs):
        opened.append(bytes(fp.getbuffer()))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(preprocess, "probe", counting_probe)
    monkeypatch.setattr(Image, "open", counting_open)
    with Batcher(embedder, max_batch=4, max_delay_ms=2) as b:
        got = np.stack([f.result(timeout=60) for f in b.submit(items)])
    assert sorted(map(id, probed)) == sorted(map(id, items))  # every item once
    assert embedder.jpeg_decoder == "pillow"
    assert [opened.count(p) for p in [*photos, items[-2]]] == [2] * (len(photos) + 1)  # the probe, Pillow's decode
    assert len(opened) == 2 * (len(photos) + 1)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_real_model_through_the_batcher_matches_the_pipeline(embedder, photos):
    expected = embedder.embed(photos)
    with Batcher(embedder, max_batch=4, max_delay_ms=2) as b:
        futures = b.submit([*photos, b"\xff\xd8 truncated"])
        got = np.stack([f.result(timeout=60) for f in futures[:-1]])
        with pytest.raises(ItemError):
            futures[-1].result(timeout=60)
    np.testing.assert_allclose(got, expected, atol=1e-6)
