"""Bad input against a real server: every bad request gets a clear per-item or per-call error, never a crash.

Property-based (hypothesis) where the input space is large: random bytes, truncated and bit-flipped
JPEG/PNG/WebP/GIF/TIFF/BMP, random Tensor messages, random query vectors, random ids and JSON, random
streams. Plain tests for the named cases: 1x1 and 1x100000 images, headers claiming 30000x30000 pixels,
animated GIFs, 16-bit and CMYK images, empty requests, too many items, oversized messages, unknown
model/collection/head/item ids. A canary client embeds and searches through all of it and must notice nothing.

Allowed outcomes: a response whose per-item codes are OK, INVALID_ARGUMENT or NOT_FOUND (a corrupt image that
still decodes may be OK), or a call error INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION or
RESOURCE_EXHAUSTED with a message that says what was wrong. Never UNKNOWN or INTERNAL.

The tests under "found by this file, fixed" each reproduce a server bug this suite found.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import select
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import cosine, jpeg_bytes, running_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.inputs import content_hash

SC = grpc.StatusCode
OK, INVALID, NOT_FOUND = SC.OK.value[0], SC.INVALID_ARGUMENT.value[0], SC.NOT_FOUND.value[0]
ITEM_CODES = {OK, INVALID, NOT_FOUND}
CALL_ERRORS = {SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.FAILED_PRECONDITION, SC.RESOURCE_EXHAUSTED}
MAX_MESSAGE = 2 * 1024 * 1024  # small limits, so the limit tests send little data
MAX_ITEMS = 16
COLLECTION, HEAD = "photos", "h"
RESERVED = {COLLECTION, "json-meta"}  # collections the random tests must not create, train or delete
TIMEOUT = 60

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
HEAD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the documented head id rule


# ------------------------------------------------------------------------------------------ helpers


def assert_clear(message: str) -> None:
    """A message that says something: not empty, not a bare exception dump."""
    assert message and len(message) >= 15, f"vague message {message!r}"
    assert "Exception calling application" not in message and "Traceback" not in message, message


def call(method, request, timeout: float = TIMEOUT):
    """``(response, None)``, or ``(None, RpcError)`` for an allowed call error with a clear message."""
    try:
        return method(request, timeout=timeout), None
    except grpc.RpcError as e:
        assert e.code() in CALL_ERRORS, f"{e.code()}: {e.details()}"
        assert_clear(e.details())
        return None, e


def code_of(error) -> SC:
    return SC.OK if error is None else error.code()


def vec(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


def check_result(result: pb.Result, dim: int) -> None:
    """One per-item outcome obeys the contract: an allowed code; OK means a finite unit vector."""
    assert result.status.code in ITEM_CODES, f"{result.status.code}: {result.status.message}"
    if result.status.code == OK:
        v = vec(result.vector)
        assert v.shape == (dim,) and np.isfinite(v).all()
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-3
    else:
        assert result.vector == b""
        assert_clear(result.status.message)


def ok_vector(result: pb.Result) -> np.ndarray:
    assert result.status.code == OK, result.status.message
    return vec(result.vector)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_by_hand(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte: any header we like, ``rows`` (filter byte + pixels per row) as IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def server(embedder):
    with running_server(embedder, max_message_bytes=MAX_MESSAGE, max_items=MAX_ITEMS) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.EmbedderStub(channel)


@pytest.fixture(scope="module")
def dim(stub) -> int:
    return stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models[0].dim


@pytest.fixture(scope="module")
def stored(stub, photos):
    """Six photos stored in "photos" with labels a/b alternating, and a logreg head "h" trained on them.

    Returns the stored vectors by id."""
    ids = [f"p{i}" for i in range(len(photos))]
    items = [pb.AddItem(item=pb.Item(id=i, image=b), label="ab"[k % 2]) for k, (i, b) in enumerate(zip(ids, photos))]
    added = stub.Add(pb.AddRequest(collection=COLLECTION, items=items), timeout=120)
    assert added.added == len(photos) and all(r.status.code == OK for r in added.results)
    trained = stub.Train(pb.TrainRequest(collection=COLLECTION, head="logreg", head_id=HEAD), timeout=120)
    assert list(trained.head.classes) == ["a", "b"]
    got = stub.Get(pb.GetRequest(collection=COLLECTION, ids=ids), timeout=TIMEOUT)
    return {s.id: vec(s.vector).copy() for s in got.items}


@pytest.fixture(scope="module")
def small(photo_arrays) -> list[np.ndarray]:
    """The photos downscaled to 64x64 RGB arrays."""
    return [np.asarray(Image.fromarray(np.ascontiguousarray(a)).convert("RGB").resize((64, 64), Image.BILINEAR))
            for a in photo_arrays.values()]


@pytest.fixture(scope="module")
def good(small, embedder):
    """A good image (64x64 JPEG) and the vector the model gives it."""
    data = jpeg_bytes(small[0])
    return data, embedder.embed([data])[0]


@pytest.fixture(scope="module")
def sources(small) -> dict[str, bytes]:
    """One real 64x64 photo in every format the server reads, to corrupt."""
    img = Image.fromarray(small[1])
    return {"jpeg": encode(img, "JPEG", quality=90), "png": encode(img, "PNG"), "webp": encode(img, "WEBP"),
            "webp-lossless": encode(img, "WEBP", lossless=True), "gif": encode(img, "GIF"),
            "tiff": encode(img, "TIFF"), "tiff-lzw": encode(img, "TIFF", compression="tiff_lzw"),
            "bmp": encode(img, "BMP")}


# ------------------------------------------------------------------------------------------ strategies

MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM",
         b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00"]
junk_bytes = st.one_of(st.binary(max_size=2048),
                       st.builds(lambda m, tail: m + tail, st.sampled_from(MAGIC), st.binary(max_size=512)))
TRICKY_NAMES = ["", " ", "..", "../", "../../etc/passwd", "/", "photos/../photos", " photos", "PHOTOS", "h/../h",
                "nul\x00byte", "💥", "名前", "a" * 128, "%s%n", "'; DROP TABLE items; --", "\\", "\n"]
names = st.one_of(st.sampled_from(TRICKY_NAMES),
                  st.text(st.characters(exclude_categories=("Cs",)), max_size=24))


@st.composite
def mutated(draw, sources_keys):
    """(format, how, mutation) for an image truncated at a random point or with random bit flips."""
    fmt = draw(st.sampled_from(sources_keys))
    if draw(st.booleans()):
        return fmt, "truncate", draw(st.floats(0.0, 1.0, exclude_max=True))
    flips = draw(st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8))
    return fmt, "flip", flips


def apply_mutation(data: bytes, how: str, mutation) -> bytes:
    if how == "truncate":
        return data[:int(mutation * len(data))]
    out = bytearray(data)
    for where, bit in mutation:
        out[int(where * len(out))] ^= 1 << bit
    return bytes(out)


SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.25, 1.5, -0.0, 1.0, 0.0]


@st.composite
def tensors(draw) -> pb.Tensor:
    """Random Tensor messages: mostly plausible images with one thing wrong (or nothing), some wild."""
    if draw(st.integers(0, 3)) == 0:  # wild: any shape, any dtype number, any bytes
        shape = draw(st.lists(st.one_of(st.integers(-3, 8), st.integers(-2 ** 63, 2 ** 63 - 1),
                                        st.sampled_from([2 ** 31, 2 ** 32 + 1, 10 ** 12])), max_size=5))
        dtype = draw(st.one_of(st.integers(0, 3), st.integers(-2 ** 31, 2 ** 31 - 1)))
        return pb.Tensor(shape=shape, dtype=dtype, data=draw(st.binary(max_size=256)))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    shape = [h, w] + draw(st.sampled_from([[], [1], [3], [4], [0], [2], [5], [3, 1]]))
    dtype = draw(st.sampled_from([pb.DTYPE_UINT8, pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED, 7]))
    n = math.prod(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    if dtype == pb.DTYPE_FLOAT32:
        values = rng.random(n, dtype=np.float32)
        if n and draw(st.booleans()):
            values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIAL_FLOATS))
        data = values.astype("<f4").tobytes()
    else:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    cut = draw(st.sampled_from([0, 0, 0, -1, -4, 1, 4]))
    data = data[:cut] if cut < 0 else data + b"\x00" * cut
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


def tensor_is_valid(t: pb.Tensor) -> bool:
    """The proto's contract for Tensor, written out independently of the server."""
    size = {pb.DTYPE_UINT8: 1, pb.DTYPE_FLOAT32: 4}.get(t.dtype)
    shape = list(t.shape)
    if size is None or len(shape) not in (2, 3) or any(d < 1 for d in shape):
        return False
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        return False
    if len(t.data) != math.prod(shape) * size:
        return False
    if t.dtype == pb.DTYPE_FLOAT32:
        values = np.frombuffer(t.data, dtype="<f4")
        return bool(np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all())
    return True


# ------------------------------------------------------------------------------------------ property tests


@FUZZ
@given(junk=junk_bytes)
@example(junk=b"")
@example(junk=b"\x89PNG\r\n\x1a\n")
def test_random_bytes_get_a_per_item_error_and_the_good_item_beside_them_still_succeeds(stub, dim, good, junk):
    image, expected = good
    response = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="junk", image=junk), pb.Item(id="good", image=image)]),
                          timeout=TIMEOUT)
    assert [r.id for r in response.results] == ["junk", "good"]
    bad = response.results[0]
    check_result(bad, dim)
    assert bad.sha256 == content_hash(junk)
    if not junk:
        assert bad.status.code == INVALID and "empty" in bad.status.message
    np.testing.assert_allclose(ok_vector(response.results[1]), expected, atol=1e-6)


@FUZZ
@given(data=st.data())
def test_truncated_or_bit_flipped_images_fail_alone_or_still_decode(stub, dim, good, sources, data):
    fmt, how, mutation = data.draw(mutated(sorted(sources)))
    broken = apply_mutation(sources[fmt], how, mutation)
    image, expected = good
    response = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="good", image=image), pb.Item(id=fmt, image=broken)]),
                          timeout=TIMEOUT)
    np.testing.assert_allclose(ok_vector(response.results[0]), expected, atol=1e-6)
    result = response.results[1]
    assert result.id == fmt and result.sha256 == content_hash(broken)
    check_result(result, dim)  # a bit flip may leave a decodable image: OK is allowed, with a sane vector
    if how == "truncate" and not broken:
        assert result.status.code == INVALID


@FUZZ
@given(tensor=tensors())
def test_random_tensors_are_accepted_exactly_when_the_proto_contract_says(stub, dim, tensor):
    response = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="t", tensor=tensor)]), timeout=TIMEOUT)
    result = response.results[0]
    check_result(result, dim)
    valid = tensor_is_valid(tensor)
    assert (result.status.code == OK) == valid, (list(tensor.shape), tensor.dtype, len(tensor.data),
                                                 result.status.message)
    if not valid:
        assert result.status.code == INVALID
        assert any(w in result.status.message for w in ("dtype", "shape", "bytes", "NaN", "[0, 1]")), \
            result.status.message


@FUZZ
@given(n_floats=st.one_of(st.none(), st.integers(0, 1300)), extra=st.sampled_from([0, 0, 0, 1, 3]),
       specials=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(SPECIAL_FLOATS)), max_size=3),
       zero=st.booleans(), scale=st.floats(1e-3, 1e3), target=st.sampled_from([COLLECTION, ""]))
def test_search_by_random_vectors(stub, dim, stored, n_floats, extra, specials, zero, scale, target):
    base = stored["p0"] * np.float32(scale)
    v = base.copy() if n_floats is None else np.resize(base, n_floats).astype(np.float32)
    if zero:
        v[:] = 0
    for where, value in specials:
        if len(v):
            v[int(where * len(v))] = value
    data = v.astype("<f4").tobytes() + b"\x01" * extra
    response, error = call(stub.Search, pb.SearchRequest(collection=target, vector=data, k=3))
    if not data or len(data) % 4:
        assert code_of(error) == SC.INVALID_ARGUMENT and "float32" in error.details()
    elif not np.isfinite(v).all() or not v.any():
        assert code_of(error) == SC.INVALID_ARGUMENT and "finite" in error.details()
    elif len(v) != dim:
        assert code_of(error) == SC.FAILED_PRECONDITION and f"{dim}-d" in error.details()
    else:
        assert error is None
        scores = [h.score for h in response.hits]
        assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
        if not specials and not zero:  # the stored vector itself, rescaled: cosine does not care
            assert response.hits[0].id == "p0" and response.hits[0].score > 0.999


@FUZZ
@given(op=st.sampled_from(["get", "search", "delete", "set_labels", "train", "predict", "delete_head",
                           "add_roundtrip"]),
       name=names, item=names, label=names)
def test_random_collection_head_and_item_ids(stub, dim, stored, good, op, name, item, label):
    known = {c.name for c in stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).collections}
    heads = {h.head_id for h in stub.ListHeads(pb.ListHeadsRequest(), timeout=TIMEOUT).heads}
    assume(item not in stored)  # never touch the stored photos
    unknown = name not in known and name != ""
    if op == "get":
        response, error = call(stub.Get, pb.GetRequest(collection=name, ids=[item]))
        if not item:
            assert code_of(error) == SC.INVALID_ARGUMENT and "ids" in error.details()
        elif unknown:
            assert code_of(error) == SC.NOT_FOUND and f"no collection {name!r}" in error.details()
        elif name == COLLECTION:
            assert error is None and list(response.missing) == [item] and not response.items
    elif op == "search":
        response, error = call(stub.Search, pb.SearchRequest(collection=name, item_id=item))
        if name == "" or not item:
            assert code_of(error) == SC.INVALID_ARGUMENT
        elif unknown:
            assert code_of(error) == SC.NOT_FOUND and f"no collection {name!r}" in error.details()
        elif name == COLLECTION:
            assert code_of(error) == SC.NOT_FOUND and repr(item) in error.details()
    elif op == "delete":
        response, error = call(stub.Delete, pb.DeleteRequest(collection=name, ids=[item]))
        if not item:
            assert code_of(error) == SC.INVALID_ARGUMENT
        elif unknown:
            assert code_of(error) == SC.NOT_FOUND and f"no collection {name!r}" in error.details()
        elif name == COLLECTION:
            assert error is None and response.deleted == 0 and list(response.missing) == [item]
    elif op == "set_labels":
        response, error = call(stub.SetLabels, pb.SetLabelsRequest(collection=name, labels={item: label}))
        if not item or not label:
            assert code_of(error) == SC.INVALID_ARGUMENT
        elif unknown:
            assert code_of(error) == SC.NOT_FOUND and f"no collection {name!r}" in error.details()
        elif name == COLLECTION:
            assert code_of(error) == SC.NOT_FOUND and repr(item) in error.details()
    elif op == "train":
        assume(name not in RESERVED)
        _, error = call(stub.Train, pb.TrainRequest(collection=name, head_id="never-saved"))
        assert error is not None
        if unknown:
            assert code_of(error) == SC.NOT_FOUND and f"no collection {name!r}" in error.details()
    elif op == "predict":
        assume(name not in heads)
        _, error = call(stub.Predict, pb.PredictRequest(head_id=name, items=[pb.Item(image=good[0])]))
        assert code_of(error) in (SC.NOT_FOUND, SC.INVALID_ARGUMENT)
        if HEAD_ID.fullmatch(name):
            assert code_of(error) == SC.NOT_FOUND and "no head" in error.details()
        else:
            assert code_of(error) == SC.INVALID_ARGUMENT and "head id" in error.details()
    else:  # add_roundtrip: any non-empty name and id work, and come back unchanged
        assume(name not in RESERVED and name not in known)
        add = pb.AddRequest(collection=name, items=[pb.AddItem(item=pb.Item(id=item, image=good[0]))])
        if label:
            add.items[0].label = label
        response, error = call(stub.Add, add)
        if not name or not item:
            assert code_of(error) == SC.INVALID_ARGUMENT
            return
        assert error is None and response.added == 1 and response.results[0].status.code == OK
        got = stub.Get(pb.GetRequest(collection=name, ids=[item]), timeout=TIMEOUT).items
        assert [s.id for s in got] == [item] and got[0].collection == name
        assert (got[0].label if got[0].HasField("label") else "") == label
        np.testing.assert_allclose(vec(got[0].vector), good[1], atol=1e-6)
        deleted = stub.Delete(pb.DeleteRequest(collection=name, whole_collection=True), timeout=TIMEOUT)
        assert deleted.deleted == 1


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children,
                                                                               max_size=4)),
    max_leaves=12)


@FUZZ
@given(text=st.one_of(st.text(max_size=64), json_values.map(lambda v: json.dumps(v, allow_nan=True)),
                      st.sampled_from(["", "{}", "{", "}", "null", "[]", '{"a": NaN}', '{"a": 1e999}', '{"a": 1}x',
                                       '{"a": 1, "a": 2}', '"{}"', "\x00", "{\"\\ud800\": 1}"])))
def test_random_metadata_json_is_stored_as_is_or_refused_per_item(stub, good, text):
    try:
        parsed = json.loads(text) if text else {}
        valid = isinstance(parsed, dict)
    except ValueError:
        valid = False
    if valid:
        try:
            json.dumps(parsed, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except ValueError:  # NaN/Infinity or a lone surrogate inside: parses, but cannot be stored
            valid = False
    item_id = f"m-{content_hash(text.encode('utf-8', 'surrogatepass'))[:16]}"
    response = stub.Add(pb.AddRequest(collection="json-meta", items=[
        pb.AddItem(item=pb.Item(id=item_id, image=good[0]), metadata_json=text),
        pb.AddItem(item=pb.Item(id="beside", image=good[0]), metadata_json='{"fine": true}')]), timeout=TIMEOUT)
    bad, beside = response.results
    assert beside.status.code == OK  # the other item is stored regardless
    if valid:
        assert bad.status.code == OK
        got = stub.Get(pb.GetRequest(collection="json-meta", ids=[item_id], omit_vectors=True), timeout=TIMEOUT)
        assert json.loads(got.items[0].metadata_json) == parsed
    else:
        assert bad.status.code == INVALID and "metadata_json" in bad.status.message, bad.status.message


stream_kinds = st.lists(st.sampled_from(["good", "junk", "empty", "too_many", "bad_model"]), min_size=1, max_size=5)


@FUZZ
@given(kinds=stream_kinds)
def test_a_stream_answers_every_request_before_the_first_bad_one_then_ends_clearly(stub, dim, good, kinds):
    image, expected = good
    requests = []
    for k, kind in enumerate(kinds):
        if kind == "good":
            requests.append(pb.EmbedRequest(items=[pb.Item(id=f"r{k}", image=image)]))
        elif kind == "junk":
            requests.append(pb.EmbedRequest(items=[pb.Item(id=f"r{k}-junk", image=b"junk" * k),
                                                   pb.Item(id=f"r{k}", image=image)]))
        elif kind == "empty":
            requests.append(pb.EmbedRequest())
        elif kind == "too_many":
            requests.append(pb.EmbedRequest(items=[pb.Item(content_sha256="0" * 64)] * (MAX_ITEMS + 1)))
        else:
            requests.append(pb.EmbedRequest(model="no-such-model", items=[pb.Item(image=image)]))
    first_bad = next((k for k, kind in enumerate(kinds) if kind in ("too_many", "bad_model")), len(kinds))
    answered, error = [], None
    try:
        for response in stub.EmbedStream(iter(requests), timeout=TIMEOUT):
            answered.append(response)
    except grpc.RpcError as e:
        error = e
    assert len(answered) == first_bad
    for k, (request, response) in enumerate(zip(requests, answered)):
        assert [r.id for r in response.results] == [i.id for i in request.items]
        for r in response.results:
            check_result(r, dim)
            if r.id == f"r{k}":
                np.testing.assert_allclose(ok_vector(r), expected, atol=1e-6)
            else:
                assert r.status.code == INVALID
    if first_bad == len(kinds):
        assert error is None
    else:
        too_many = kinds[first_bad] == "too_many"
        assert error is not None and error.code() == (SC.INVALID_ARGUMENT if too_many else SC.NOT_FOUND)
        assert_clear(error.details())
        assert ("--max-items" if too_many else "no-such-model") in error.details()


# ------------------------------------------------------------------------------------------ named cases


def test_1x1_and_1x100000_images_embed_to_finite_vectors(stub, dim, small):
    row = np.resize(small[2].reshape(-1, 3), (100_000, 3)).astype(np.uint8)
    images = {
        "1x1": encode(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"),
        "1x100000": encode(Image.fromarray(row.reshape(1, 100_000, 3)), "PNG"),
        "100000x1": encode(Image.fromarray(row.reshape(100_000, 1, 3)), "PNG"),
    }
    response = stub.Embed(pb.EmbedRequest(items=[pb.Item(id=k, image=v) for k, v in images.items()]), timeout=TIMEOUT)
    assert [r.id for r in response.results] == list(images)
    for r in response.results:
        assert r.status.code == OK, (r.id, r.status.message)
        check_result(r, dim)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_a_header_claiming_30000x30000_pixels_is_refused_fast_without_decoding(stub, small, fmt):
    if fmt == "png":
        bomb = png_by_hand(30000, 30000, 8, 2, b"\x00" * 64)
    else:
        data = bytearray(jpeg_bytes(small[0]))
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", 30000, 30000)
        bomb = bytes(data)
    assert Image.open(io.BytesIO(bomb)).size == (30000, 30000) and len(bomb) < 5000
    start = time.monotonic()
    response = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="bomb", image=bomb)]), timeout=TIMEOUT)
    assert time.monotonic() - start < 5
    result = response.results[0]
    assert result.status.code == INVALID
    assert "30000x30000" in result.status.message and "900,000,000" in result.status.message
    assert "--max-pixels" in result.status.message


def test_an_animated_gif_embeds_its_first_frame(stub, small):
    first, second = Image.fromarray(small[0]), Image.fromarray(small[3])
    animated = io.BytesIO()
    first.save(animated, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(animated.getvalue())).n_frames == 2
    items = [pb.Item(id="anim", image=animated.getvalue()), pb.Item(id="first", image=encode(first, "GIF")),
             pb.Item(id="second", image=encode(second, "GIF"))]
    anim, one, two = (ok_vector(r) for r in stub.Embed(pb.EmbedRequest(items=items), timeout=TIMEOUT).results)
    assert cosine(anim[None], one[None])[0] > 0.99
    assert cosine(anim[None], one[None])[0] > cosine(anim[None], two[None])[0] + 0.05


def test_16_bit_and_cmyk_images_embed_like_their_8_bit_rgb_versions(stub, photo_arrays):
    rgb = np.asarray(Image.fromarray(photo_arrays["coffee"]).resize((160, 120), Image.BILINEAR))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    h, w, _ = rgb.shape
    # 16-bit samples whose high byte is the 8-bit value and whose low byte is noise: reading the wrong byte shows
    low = np.random.default_rng(3).integers(0, 256, rgb.shape, dtype=np.uint16)
    rgb16_values = (rgb.astype(np.uint16) * 256 + low).astype(">u2")
    rgb16 = png_by_hand(w, h, 16, 2, b"".join(b"\x00" + rgb16_values[y].tobytes() for y in range(h)))
    grey16 = encode(Image.fromarray(grey.astype(np.uint16) * 256 + low[:, :, 0]), "PNG")
    cmyk = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(grey16)).mode.startswith("I") and Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    pairs = {"rgb16": (rgb16, encode(Image.fromarray(rgb), "PNG")),
             "grey16": (grey16, encode(Image.fromarray(grey), "PNG")),
             "cmyk": (cmyk, encode(Image.fromarray(rgb), "JPEG", quality=95))}
    items = [pb.Item(id=f"{k}-{j}", image=b) for k, pair in pairs.items() for j, b in enumerate(pair)]
    response = stub.Embed(pb.EmbedRequest(items=items), timeout=TIMEOUT)
    vectors = {r.id: ok_vector(r) for r in response.results}
    for k in pairs:
        assert np.isfinite(vectors[f"{k}-0"]).all()
        assert cosine(vectors[f"{k}-0"][None], vectors[f"{k}-1"][None])[0] > 0.98, k


def test_empty_requests_are_answered_or_refused_clearly(stub, stored):
    embed = stub.Embed(pb.EmbedRequest(), timeout=TIMEOUT)
    assert len(embed.results) == 0 and embed.model_id and embed.dim > 0
    add = stub.Add(pb.AddRequest(collection=COLLECTION), timeout=TIMEOUT)
    assert (add.added, add.replaced, len(add.results)) == (0, 0, 0)
    assert len(stub.Predict(pb.PredictRequest(head_id=HEAD), timeout=TIMEOUT).predictions) == 0
    assert list(stub.EmbedStream(iter([]), timeout=TIMEOUT)) == []
    for method, request, words in [(stub.Add, pb.AddRequest(), "`collection` is empty"),
                                   (stub.Search, pb.SearchRequest(collection=COLLECTION), "the query is empty"),
                                   (stub.Predict, pb.PredictRequest(), "name the head(s) to apply")]:
        _, error = call(method, request)
        assert code_of(error) == SC.INVALID_ARGUMENT and words in error.details()
    nothing = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="nothing")]), timeout=TIMEOUT).results[0]
    assert nothing.status.code == INVALID and "neither" in nothing.status.message
    # nothing was changed by any of it
    counts = {c.name: c.count for c in stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).collections}
    assert counts[COLLECTION] == len(stored) and "" not in counts


def test_more_than_max_items_is_refused_naming_the_limit(stub, stored):
    n = MAX_ITEMS + 1
    items = [pb.Item(id=f"i{k}", content_sha256="0" * 64) for k in range(n)]
    for method, request in [
        (stub.Embed, pb.EmbedRequest(items=items)),
        (stub.Add, pb.AddRequest(collection=COLLECTION, items=[pb.AddItem(item=i) for i in items])),
        (stub.Get, pb.GetRequest(collection=COLLECTION, ids=[f"i{k}" for k in range(n)])),
        (stub.Predict, pb.PredictRequest(head_id=HEAD, items=items)),
    ]:
        _, error = call(method, request)
        assert code_of(error) == SC.INVALID_ARGUMENT
        assert f"{n} items" in error.details() and f"{MAX_ITEMS}" in error.details()
        assert "--max-items" in error.details()


def test_too_many_items_are_refused_before_any_is_read(stub, stored, monkeypatch):
    """The count comes first: a 4 MB message of 2M empty items was made into 2M items (~100x its size in
    memory, held after) only to be refused; now no item of an over-long request is converted."""
    from embedder import servicer

    read, convert = [], servicer._item
    monkeypatch.setattr(servicer, "_item", lambda i: read.append(i) or convert(i))
    items = [pb.Item(id=f"i{k}") for k in range(MAX_ITEMS + 1)]
    for method, request in [(stub.Embed, pb.EmbedRequest(items=items)),
                            (stub.Add, pb.AddRequest(collection=COLLECTION, items=[pb.AddItem(item=i) for i in items])),
                            (stub.Predict, pb.PredictRequest(head_id=HEAD, items=items[:2], ids=["x"] * MAX_ITEMS))]:
        _, error = call(method, request)
        assert code_of(error) == SC.INVALID_ARGUMENT and "--max-items" in error.details()
    assert read == []
    _, error = call(stub.Embed, pb.EmbedRequest(items=items[:1]))  # the spy sees what is read
    assert error is None and len(read) == 1


def test_oversized_messages_are_resource_exhausted_and_the_server_goes_on(stub, good):
    blob = b"\x00" * (MAX_MESSAGE + 1024)
    for method, request in [
        (stub.Embed, pb.EmbedRequest(items=[pb.Item(image=blob)])),
        (stub.Add, pb.AddRequest(collection=COLLECTION, items=[pb.AddItem(item=pb.Item(id="big", image=blob))])),
        (stub.Search, pb.SearchRequest(collection=COLLECTION, vector=blob)),
        (stub.Predict, pb.PredictRequest(head_id=HEAD, items=[pb.Item(image=blob)])),
    ]:
        _, error = call(method, request)
        assert code_of(error) == SC.RESOURCE_EXHAUSTED and "larger than max" in error.details()
    after = stub.Embed(pb.EmbedRequest(items=[pb.Item(image=good[0])]), timeout=TIMEOUT).results[0]
    np.testing.assert_allclose(ok_vector(after), good[1], atol=1e-6)


def test_an_oversized_message_mid_stream_ends_the_stream_after_the_answered_ones(stub, good):
    answered = threading.Event()

    def requests():
        yield pb.EmbedRequest(items=[pb.Item(id="first", image=good[0])])
        assert answered.wait(30)
        yield pb.EmbedRequest(items=[pb.Item(id="big", image=b"\x00" * (MAX_MESSAGE + 1024))])

    responses = []
    with pytest.raises(grpc.RpcError) as e:
        for response in stub.EmbedStream(requests(), timeout=TIMEOUT):
            responses.append(response)
            answered.set()
    assert [[r.id for r in resp.results] for resp in responses] == [["first"]]
    assert e.value.code() == SC.RESOURCE_EXHAUSTED and "larger than max" in e.value.details()


def test_an_unknown_model_is_not_found_and_the_right_one_is_accepted(stub, good):
    info = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models[0]
    _, error = call(stub.Embed, pb.EmbedRequest(model="resnet50", items=[pb.Item(image=good[0])]))
    assert code_of(error) == SC.NOT_FOUND
    assert "resnet50" in error.details() and info.name in error.details()
    for model in (info.name, info.model_id):
        result = stub.Embed(pb.EmbedRequest(model=model, items=[pb.Item(image=good[0])]), timeout=TIMEOUT).results[0]
        np.testing.assert_allclose(ok_vector(result), good[1], atol=1e-6)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0])
def test_search_by_a_nan_inf_or_zero_vector_is_invalid_argument(stub, dim, stored, value):
    v = stored["p0"].copy()
    if value == 0.0:
        v[:] = 0.0
    else:
        v[7] = value
    _, error = call(stub.Search, pb.SearchRequest(collection=COLLECTION, vector=v.astype("<f4").tobytes()))
    assert code_of(error) == SC.INVALID_ARGUMENT and "finite" in error.details()


def test_unknown_collection_is_not_found_everywhere(stub, stored):
    name = "no-such-collection"
    requests = [
        (stub.Get, pb.GetRequest(collection=name, ids=["p0"])),
        (stub.Search, pb.SearchRequest(collection=name, item_id="p0")),
        (stub.Search, pb.SearchRequest(collection=name, vector=stored["p0"].tobytes())),
        (stub.Delete, pb.DeleteRequest(collection=name, ids=["p0"])),
        (stub.Delete, pb.DeleteRequest(collection=name, whole_collection=True)),
        (stub.SetLabels, pb.SetLabelsRequest(collection=name, labels={"p0": "a"})),
        (stub.Train, pb.TrainRequest(collection=name)),
        (stub.Predict, pb.PredictRequest(head_id=HEAD, collection=name, ids=["p0"])),
    ]
    for method, request in requests:
        _, error = call(method, request)
        assert code_of(error) == SC.NOT_FOUND, (request, error)
        assert f"no collection {name!r}" in error.details()


def test_unknown_head_is_not_found_and_a_path_like_head_id_is_invalid(stub, good, stored):
    for method, request in [(stub.Predict, pb.PredictRequest(head_id="no-such-head", items=[pb.Item(image=good[0])])),
                            (stub.DeleteHead, pb.DeleteHeadRequest(head_id="no-such-head"))]:
        _, error = call(method, request)
        assert code_of(error) == SC.NOT_FOUND and "no head 'no-such-head'" in error.details()
    for head_id in ["../h", "h/../h", "/etc/passwd", ".h", ""]:
        _, error = call(stub.DeleteHead, pb.DeleteHeadRequest(head_id=head_id))
        assert code_of(error) == SC.INVALID_ARGUMENT and "invalid head id" in error.details()
    assert HEAD in {h.head_id for h in stub.ListHeads(pb.ListHeadsRequest(), timeout=TIMEOUT).heads}


def test_unknown_item_ids_are_reported_and_change_nothing(stub, stored):
    _, error = call(stub.Search, pb.SearchRequest(collection=COLLECTION, item_id="nope"))
    assert code_of(error) == SC.NOT_FOUND and "'nope'" in error.details()
    _, error = call(stub.SetLabels, pb.SetLabelsRequest(collection=COLLECTION, labels={"p0": "b", "nope": "b"}))
    assert code_of(error) == SC.NOT_FOUND and "'nope'" in error.details()
    p0 = stub.Get(pb.GetRequest(collection=COLLECTION, ids=["p0", "nope"]), timeout=TIMEOUT)
    assert p0.items[0].label == "a" and list(p0.missing) == ["nope"]  # all-or-nothing: p0 kept its label
    predicted = stub.Predict(pb.PredictRequest(head_id=HEAD, collection=COLLECTION, ids=["p0", "nope", "p1"]),
                             timeout=TIMEOUT).predictions
    assert [p.status.code for p in predicted] == [OK, NOT_FOUND, OK]
    assert "'nope'" in predicted[1].status.message and not predicted[1].top
    deleted = stub.Delete(pb.DeleteRequest(collection=COLLECTION, ids=["nope"]), timeout=TIMEOUT)
    assert deleted.deleted == 0 and list(deleted.missing) == ["nope"]


def test_bad_query_images_and_bad_items_for_predict_are_clear(stub, good, stored):
    _, error = call(stub.Search, pb.SearchRequest(collection=COLLECTION, item=pb.Item(image=b"GIF89a garbage")))
    assert code_of(error) == SC.INVALID_ARGUMENT and error.details().startswith("the query image:")
    _, error = call(stub.Search, pb.SearchRequest(collection=COLLECTION, item=pb.Item(content_sha256="0" * 64)))
    assert code_of(error) == SC.NOT_FOUND and "send the image bytes" in error.details()
    predictions = stub.Predict(pb.PredictRequest(head_id=HEAD, items=[
        pb.Item(id="junk", image=b"junk"), pb.Item(id="good", image=good[0]), pb.Item(id="sha", content_sha256="xyz"),
        pb.Item(id="tensor", tensor=pb.Tensor(shape=[2, 2, 2], dtype=pb.DTYPE_UINT8, data=bytes(8)))]),
        timeout=TIMEOUT).predictions
    assert [p.status.code for p in predictions] == [INVALID, OK, INVALID, INVALID]
    assert predictions[1].top[0].label in ("a", "b")
    for p in predictions:
        if p.status.code != OK:
            assert_clear(p.status.message)
            assert not p.top


# ------------------------------------------------------------------------------------------ other clients


class Canary(threading.Thread):
    """A well-behaved client on its own channel: embeds one raw image (never cached: through the batcher every
    time, beside whatever garbage is there) and searches the stored photos, in a loop."""

    def __init__(self, address: str, tensor: pb.Tensor) -> None:
        super().__init__(name="canary", daemon=True)
        self.address, self.tensor = address, tensor
        self.stop = threading.Event()
        self.vectors: list[np.ndarray] = []
        self.hits: list[list[str]] = []
        self.times: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.EmbedderStub(channel)
            while not self.stop.is_set():
                try:
                    result = stub.Embed(pb.EmbedRequest(items=[pb.Item(id="canary", tensor=self.tensor)]),
                                        timeout=30).results[0]
                    if result.status.code != OK or result.cached:
                        self.failures.append(f"embed: {result.status.code} {result.status.message}")
                    else:
                        self.vectors.append(vec(result.vector).copy())
                    hits = stub.Search(pb.SearchRequest(collection=COLLECTION, item_id="p0", k=3), timeout=30).hits
                    self.hits.append([h.id for h in hits])
                    self.times.append(time.monotonic())
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code()}: {e.details()}")


@st.composite
def garbage(draw):
    """One bad call of any kind: (method name, request) or a stream of requests."""
    kind = draw(st.sampled_from(["bytes", "tensor", "too_many", "bad_model", "oversized", "vector", "ids",
                                 "stream", "head"]))
    if kind == "bytes":
        return "Embed", pb.EmbedRequest(items=[pb.Item(image=draw(junk_bytes)) for _ in range(draw(st.integers(1, 4)))])
    if kind == "tensor":
        return "Embed", pb.EmbedRequest(items=[pb.Item(tensor=draw(tensors())) for _ in range(draw(st.integers(1, 4)))])
    if kind == "too_many":
        return "Embed", pb.EmbedRequest(items=[pb.Item(image=b"x")] * (MAX_ITEMS + draw(st.integers(1, 50))))
    if kind == "bad_model":
        return "Embed", pb.EmbedRequest(model=draw(names.filter(bool)), items=[pb.Item(image=b"x")])
    if kind == "oversized":
        return "Embed", pb.EmbedRequest(items=[pb.Item(image=b"\x07" * (MAX_MESSAGE + draw(st.integers(1, 4096))))])
    if kind == "vector":
        return "Search", pb.SearchRequest(collection=draw(st.sampled_from([COLLECTION, ""])),
                                          vector=draw(st.binary(max_size=64)) + struct.pack("<f", math.nan))
    if kind == "ids":
        return "Get", pb.GetRequest(collection=draw(names.filter(lambda n: n not in RESERVED)), ids=[draw(names)])
    if kind == "head":
        return "Predict", pb.PredictRequest(head_id=draw(names.filter(lambda n: n != HEAD)),
                                            items=[pb.Item(image=draw(junk_bytes))])
    return "EmbedStream", [pb.EmbedRequest(items=[pb.Item(image=draw(junk_bytes))]),
                           pb.EmbedRequest(items=[pb.Item(image=b"x")] * (MAX_ITEMS + 1))]


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(bad=garbage())
def hammer(stub, dim, bad):
    method, request = bad
    if method == "EmbedStream":
        with pytest.raises(grpc.RpcError) as e:
            for response in stub.EmbedStream(iter(request), timeout=TIMEOUT):
                for r in response.results:
                    check_result(r, dim)
        assert e.value.code() in CALL_ERRORS and "--max-items" in e.value.details()
        return
    response, error = call(getattr(stub, method), request)
    if method == "Embed" and error is None:
        assert len(response.results) == len(request.items)
        for r in response.results:
            check_result(r, dim)
    elif method == "Search":
        assert error is not None
    elif method == "Predict" and error is None:
        assert all(p.status.code in ITEM_CODES for p in response.predictions)


def test_garbage_from_one_client_leaves_other_clients_untouched(server, channel, stub, dim, stored, small, embedder):
    arr = small[4]
    tensor = pb.Tensor(shape=list(arr.shape), dtype=pb.DTYPE_UINT8, data=arr.tobytes())
    expected = embedder.embed([arr])[0]
    baseline = [h.id for h in stub.Search(pb.SearchRequest(collection=COLLECTION, item_id="p0", k=3),
                                          timeout=TIMEOUT).hits]
    canary = Canary(server.address, tensor)
    canary.start()
    try:
        deadline = time.monotonic() + 30
        while not canary.times and time.monotonic() < deadline:  # the canary is up before the garbage starts
            time.sleep(0.01)
        start = time.monotonic()
        for _ in range(5):  # more garbage until the canary has been served at least 3 times meanwhile
            hammer(stub, dim)
            if sum(start <= t for t in canary.times) >= 3:
                break
        end = time.monotonic()
    finally:
        canary.stop.set()
        canary.join(60)
    assert not canary.is_alive()
    assert canary.failures == []
    assert sum(start <= t <= end for t in canary.times) >= 3, "the canary made no progress while garbage flowed"
    assert len(canary.vectors) == len(canary.hits) >= 3
    np.testing.assert_allclose(np.stack(canary.vectors), np.broadcast_to(expected, (len(canary.vectors), dim)),
                               atol=1e-6)
    assert all(h == baseline for h in canary.hits)
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).heads >= 1


# ------------------------------------------------------------------------------------------ found by this file, fixed


@pytest.mark.parametrize("field", ["metadata_json", "params_json"])
def test_deeply_nested_json_is_invalid_argument(stub, good, stored, field):
    deep = "[" * 100_000
    if field == "metadata_json":
        response, error = call(stub.Add, pb.AddRequest(collection="json-meta", items=[
            pb.AddItem(item=pb.Item(id="deep", image=good[0]), metadata_json=deep)]))
        assert error is None and response.results[0].status.code == INVALID
        assert "metadata_json" in response.results[0].status.message
    else:
        _, error = call(stub.Train, pb.TrainRequest(collection=COLLECTION, head_id="deep", params_json=deep))
        assert code_of(error) == SC.INVALID_ARGUMENT and "params_json" in error.details()


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": 1e999}', '{"\\ud800": 1}'])
def test_unstorable_metadata_fails_only_its_own_item(stub, good, text):
    _, error = call(stub.Add, pb.AddRequest(collection="json-meta", items=[
        pb.AddItem(item=pb.Item(id="fine", image=good[0])),
        pb.AddItem(item=pb.Item(id="nan", image=good[0]), metadata_json=text)]))
    assert error is None, error.details()


@pytest.mark.parametrize("spec", ["hnsw:m=3000000000", "hnsw:ef_search=99999999999",
                                  "hnsw:ef_construction=99999999999", "hnsw:m=1073741824", "hnsw:codes=pq8"])
def test_hnsw_settings_faiss_cannot_hold_are_refused_up_front(embedder, spec):
    with running_server(embedder, max_message_bytes=MAX_MESSAGE, max_items=MAX_ITEMS) as own, \
            grpc.insecure_channel(own.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        t = pb.Tensor(shape=[8, 8, 3], dtype=pb.DTYPE_UINT8, data=bytes(range(192)))
        try:
            _, error = call(stub.Add, pb.AddRequest(collection="hnsw", index=spec,
                                                    items=[pb.AddItem(item=pb.Item(id="a", tensor=t))]))
            assert code_of(error) == SC.INVALID_ARGUMENT and "hnsw" in error.details().lower()
            assert "hnsw" not in {c.name for c in stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).collections}
        finally:
            try:  # leave no unsaveable index behind for the server's shutdown snapshot
                stub.Delete(pb.DeleteRequest(collection="hnsw", whole_collection=True), timeout=TIMEOUT)
            except grpc.RpcError:
                pass


# A server in its own process (a tiny stand-in model: the crash is in the store, not the model), for input that
# kills the process.
_SUBPROCESS_SERVER = textwrap.dedent("""
    import sys, types
    from concurrent.futures import Future
    import numpy as np
    from embedder.config import Config
    from embedder.server import EmbedderServer

    class Model:
        config = types.SimpleNamespace(max_pixels=1_000_000)
        def info(self):
            return {"name": "stand-in", "model_id": "stand-in:1", "dim": 8, "device": "cpu", "runtime": "stand-in",
                    "precision": "fp32", "input_size": 8, "normalize": True}
        def probe(self, item):
            return types.SimpleNamespace(pixels=64)
        def submit(self, item, probe=None):
            future = Future()
            future.set_result(np.full((8, 8, 3), 7, np.uint8))
            return future
        def warm_up(self):
            pass
        def embed_arrays(self, images):
            x = np.ones((len(images), 8), np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    server = EmbedderServer(Config.from_env(environ={}, port=0, data_dir=sys.argv[1], grace_seconds=1.0),
                            embedder=Model())
    server.start()
    server.load()
    print(server.address, flush=True)
    sys.stdin.read()
    server.stop(grace=0)
""")


def test_hnsw_m_1_is_refused_and_does_not_crash_the_server(tmp_path):
    script = tmp_path / "server.py"
    script.write_text(_SUBPROCESS_SERVER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root, env=env)
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "the subprocess server did not start within 120 s"
        address = proc.stdout.readline().strip()
        assert address, "the subprocess server did not start"
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.EmbedderStub(ch)
            t = pb.Tensor(shape=[2, 2, 3], dtype=pb.DTYPE_UINT8, data=bytes(12))
            try:
                stub.Add(pb.AddRequest(collection="c", index="hnsw:m=1", items=[pb.AddItem(item=pb.Item(id="a", tensor=t))]),
                         timeout=TIMEOUT)
                code = SC.OK
            except grpc.RpcError as e:
                code = e.code()
            try:
                died = proc.wait(3)
            except subprocess.TimeoutExpired:
                died = None
            assert died is None, f"the server process died (exit code {died}); the client saw {code}"
            assert code == SC.INVALID_ARGUMENT
            assert health(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_not_found_stays_not_found_whatever_names_other_clients_used(embedder):
    with running_server(embedder, max_message_bytes=MAX_MESSAGE, max_items=MAX_ITEMS) as own, \
            grpc.insecure_channel(own.address) as ch_a, grpc.insecure_channel(own.address) as ch_b:
        a, b = pb_grpc.EmbedderStub(ch_a), pb_grpc.EmbedderStub(ch_b)
        t = pb.Tensor(shape=[8, 8, 3], dtype=pb.DTYPE_UINT8, data=bytes(range(192)))
        a.Add(pb.AddRequest(collection="ok", items=[pb.AddItem(item=pb.Item(id="a", tensor=t))]), timeout=TIMEOUT)
        _, error = call(b.Search, pb.SearchRequest(collection="missing", item_id="a"))
        assert code_of(error) == SC.NOT_FOUND  # before the long name: fine
        _, error = call(a.Add, pb.AddRequest(collection="L" * 20_000, items=[pb.AddItem(item=pb.Item(id="a", tensor=t))]))
        assert code_of(error) == SC.INVALID_ARGUMENT and "1 to 256 characters" in error.details()
        assert len(error.details()) < 1000  # the long name is shortened in the message
        for i in range(12):  # names at the limit, many of them: NOT_FOUND lists some, shortened
            a.Add(pb.AddRequest(collection=f"{i:02d}" + "L" * 254, items=[pb.AddItem(item=pb.Item(id="a", tensor=t))]),
                  timeout=TIMEOUT)
        observed = {}
        for what, request, code in [
                ("unknown collection, after other clients' long names", pb.SearchRequest(collection="missing",
                                                                                        item_id="a"), SC.NOT_FOUND),
                ("own 1024-char unknown item id", pb.SearchRequest(collection="ok", item_id="i" * 1024), SC.NOT_FOUND),
                ("own 30000-char item id", pb.SearchRequest(collection="ok", item_id="i" * 30_000),
                 SC.INVALID_ARGUMENT)]:
            _, error = call(b.Search, request)
            observed[what] = (code_of(error), code, len(error.details()) if error else 0)
        assert all(got == want and 0 < size < 4000 for got, want, size in observed.values()), observed


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_search_scores_do_not_depend_on_the_query_vectors_length(stub, stored, scale):
    query = (stored["p1"] * np.float32(scale)).astype("<f4").tobytes()
    hits = stub.Search(pb.SearchRequest(collection=COLLECTION, vector=query, k=2), timeout=TIMEOUT).hits
    assert hits[0].id == "p1" and abs(hits[0].score - 1.0) < 1e-4


@pytest.mark.parametrize("scale", [1e25, 1e-25])
def test_search_by_a_huge_or_tiny_but_finite_vector_is_not_silently_wrong(stub, stored, scale):
    v = (stored["p1"].astype(np.float64) * scale).astype("<f4")
    assert np.isfinite(v).all() and v.any()
    response, error = call(stub.Search, pb.SearchRequest(collection=COLLECTION, vector=v.tobytes(), k=2))
    if error is None:
        assert response.hits[0].id == "p1" and abs(response.hits[0].score - 1.0) < 1e-3, response
    else:
        assert code_of(error) == SC.INVALID_ARGUMENT


def test_training_on_a_device_the_server_lacks_is_a_clear_error(stub, stored):
    _, error = call(stub.Train, pb.TrainRequest(collection=COLLECTION, head_id="gpu-head",
                                                params_json='{"device": "cuda:99"}'))
    assert code_of(error) in (SC.INVALID_ARGUMENT, SC.FAILED_PRECONDITION) and "cuda:99" in error.details()


def test_a_negative_training_seed_is_refused_naming_the_seed_field(stub, stored):
    _, error = call(stub.Train, pb.TrainRequest(collection=COLLECTION, head_id="seeded", seed=-5))
    assert code_of(error) == SC.INVALID_ARGUMENT and "seed" in error.details()
