"""EmbedderClient and `embedder embed --server` against real in-process servers on loopback."""
from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import running_server
from PIL import Image

from embedder.cli import main as cli_main
from embedder.client import EmbedderClient, ItemResult, RemoteBatchError, ServiceError
from embedder.results import BatchResult

MAX_MESSAGE = 2 * 1024 * 1024
MAX_ITEMS = 16


@pytest.fixture(scope="module")
def server(embedder):
    with running_server(embedder, max_message_bytes=MAX_MESSAGE, max_items=MAX_ITEMS) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with EmbedderClient(f"127.0.0.1:{server.port}", max_message_bytes=MAX_MESSAGE, max_items=MAX_ITEMS) as c:
        yield c


@pytest.fixture(scope="module")
def expected(embedder, photos):
    return embedder.embed(photos)


def requests_seen(server, method: str, code: str = "OK") -> float:
    return server.metrics.registry.get_sample_value("embedder_requests_total", {"door": "grpc", "method": method, "code": code}) or 0


def test_embed_matches_the_in_process_pipeline_for_every_input_kind(client, photos, photo_arrays, expected,
                                                                     embedder, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(photos[1])
    arr = photo_arrays["chelsea"]
    got = client.embed([photos[0], path, str(path), arr, Image.fromarray(arr), arr.astype(np.float32) / 255])
    assert got.dtype == np.float32 and got.shape == (6, embedder.dim)
    ref = embedder.embed([arr])[0]
    np.testing.assert_allclose(got[:3], expected[[0, 1, 1]], atol=1e-6)
    np.testing.assert_allclose(got[3:], np.stack([ref] * 3), atol=1e-6)


def test_one_image_where_a_list_belongs_is_a_clear_type_error(client, photos):
    for call in (client.embed, lambda x: client.add("c", x, ids=["a"]), lambda x: client.predict("h", x)):
        with pytest.raises(TypeError, match="pass a list of images"):
            call(photos[0])


def test_large_inputs_are_split_under_the_server_limits(client, server, photos, photo_arrays, expected):
    n = len(photos)
    order = [i % n for i in range(3 * MAX_ITEMS + 5)]  # more items than one request may carry
    streams_before = requests_seen(server, "EmbedStream")
    got = client.embed([photos[i] for i in order])
    np.testing.assert_allclose(got, expected[order], atol=1e-6)
    assert requests_seen(server, "EmbedStream") == streams_before + 1
    # ~1.5 MB each: only one fits in a 2 MiB message, so this needs one request per item
    big = [np.ascontiguousarray(np.resize(photo_arrays["coffee"], (700, 700, 3))) for _ in range(3)]
    assert client.embed(big).shape == (3, expected.shape[1])


def test_errors_raise_lists_the_bad_items_after_embedding_the_rest(client, photos):
    with pytest.raises(RemoteBatchError) as e:
        client.embed([photos[0], b"junk", photos[1], b""], ids=["a", "b", "c", "d"])
    assert sorted(e.value.errors) == [1, 3]
    assert "'b'" in str(e.value) and "'d'" in str(e.value) and 'errors="return"' in str(e.value)


def test_errors_return_gives_a_batch_result_like_the_local_api(client, photos, expected, tmp_path):
    result = client.embed([photos[0], b"junk", tmp_path / "missing.jpg", np.zeros((4, 4), np.int64), photos[2]],
                          errors="return")
    assert isinstance(result, BatchResult)
    assert result.ok.tolist() == [True, False, False, False, True]
    assert "not a recognised image format" in result.errors[1]
    assert "could not read file" in result.errors[2] and "int64" in result.errors[3]
    np.testing.assert_allclose(result.vectors[[0, 4]], expected[[0, 2]], atol=1e-6)
    assert not result.vectors[1:4].any()  # failed rows are zeros, as in Embedder.embed_batch


def test_embed_iter_streams_lazily_in_order_with_ids(client, photos, expected):
    n = len(photos)
    pulled = []

    def source():
        for k in range(20):
            pulled.append(k)
            yield (f"id{k}", photos[k % n] if k != 7 else b"broken")

    results = client.embed_iter(source(), chunk=3, window=2)
    first = next(results)
    assert first.id == "id0" and len(pulled) < 20  # read lazily, not all up front
    rest = [first, *results]
    assert [r.id for r in rest] == [f"id{k}" for k in range(20)]
    assert all(isinstance(r, ItemResult) for r in rest)
    assert [k for k, r in enumerate(rest) if not r.ok] == [7]
    got = np.stack([r.vector for k, r in enumerate(rest) if k != 7])
    np.testing.assert_allclose(got, expected[[k % n for k in range(20) if k != 7]], atol=1e-6)


def test_oversized_items_get_an_error_that_says_how_to_raise_the_limit(server, client, photos):
    big = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # 3 MiB
    result = client.embed([photos[0], big], errors="return")  # the client knows the limit: per-item error
    assert result.ok.tolist() == [True, False]
    assert "--max-message-bytes" in result.errors[1] and "max_message_bytes=" in result.errors[1]
    # A client set for a higher limit learns the server's lower one: the same per-item error, no failed call
    with EmbedderClient(f"127.0.0.1:{server.port}") as unaware:
        with pytest.raises(RemoteBatchError) as e:
            unaware.embed([big])
    assert "--max-message-bytes" in str(e.value) and "EMBEDDER_MAX_MESSAGE_BYTES" in str(e.value)


def test_list_models_matches_the_local_info(client, embedder):
    (info,) = client.list_models()
    assert info == embedder.info()
    assert client.server_limits()["max_items"] == MAX_ITEMS


def test_client_retries_while_the_server_warms_up(embedder, photos, expected):
    with running_server(embedder, load=False) as s:
        target = f"127.0.0.1:{s.port}"
        with EmbedderClient(target, retries=0) as impatient:
            with pytest.raises(ServiceError) as e:
                impatient.embed(photos[:1])
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "SERVING" in str(e.value)
        with EmbedderClient(target, retries=8, backoff=0.05, max_backoff=0.5) as patient, ThreadPoolExecutor(2) as pool:
            unary = pool.submit(patient.embed, photos[:2])
            stream = pool.submit(lambda: [r.vector for r in patient.embed_iter(photos[:3], chunk=1)])
            # each call first asks for the server's limits (ListModels), refused like an Embed while warming up
            while requests_seen(s, "ListModels", "UNAVAILABLE") < 2:
                threading.Event().wait(0.01)  # both were refused at least once...
            s.load()  # ...and succeed once the model is warm
            np.testing.assert_allclose(unary.result(timeout=60), expected[:2], atol=1e-6)
            np.testing.assert_allclose(np.stack(stream.result(timeout=60)), expected[:3], atol=1e-6)


def test_a_broken_stream_resumes_with_the_unanswered_requests(embedder, photos, expected):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    n = len(photos)
    with running_server(embedder, port=port) as first:
        with EmbedderClient(f"127.0.0.1:{port}", retries=10, backoff=0.05, max_backoff=0.5) as client:
            results = client.embed_iter([photos[k % n] for k in range(12)], chunk=2, window=2)
            head = [next(results), next(results)]
            first.stop(grace=0)  # the server goes away mid-stream...
            with running_server(embedder, port=port) as second:  # ...and comes back on the same port
                got = [*head, *results]
                assert requests_seen(second, "EmbedStream") == 1  # the rest came over a new stream
    assert [r.id for r in got] == [str(k) for k in range(12)]
    np.testing.assert_allclose(np.stack([r.vector for r in got]), expected[[k % n for k in range(12)]], atol=1e-6)


def test_token(embedder, photos):
    with running_server(embedder, token="s3cret") as s:
        target = f"127.0.0.1:{s.port}"
        with EmbedderClient(target, token="s3cret") as good:
            assert good.embed(photos[:1]).shape[0] == 1
        for token in (None, "wrong"):
            with EmbedderClient(target, token=token) as bad, pytest.raises(ServiceError) as e:
                bad.embed(photos[:1])
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "EMBEDDER_TOKEN" in str(e.value)


def self_signed(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_round_trip(embedder, photos, expected, tmp_path):
    cert, key = self_signed(tmp_path)
    with running_server(embedder, tls_cert=str(cert), tls_key=str(key)) as s:
        target = f"127.0.0.1:{s.port}"
        with EmbedderClient(target, tls_ca=cert) as secure:
            np.testing.assert_allclose(secure.embed(photos[:2]), expected[:2], atol=1e-6)
        other, _ = self_signed(tmp_path / "other")
        # a TLS mismatch cannot mend itself: it fails at once (no retries over seconds), says what to pass, exit 2
        for tls_ca, says in ((None, "speaks TLS: pass its CA certificate with --tls-ca"),
                             (other, "does not match the CA given as tls_ca (--tls-ca)")):
            started = time.monotonic()
            with EmbedderClient(target, tls_ca=tls_ca, timeout=5) as mismatched, pytest.raises(ServiceError) as e:
                mismatched.embed(photos[:1])
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and says in str(e.value)
            assert time.monotonic() - started < 1.5 and e.value.category.name == "FAILED_PRECONDITION"
    # the other way round: a TLS client and a plaintext server
    with running_server(embedder) as plain, EmbedderClient(f"127.0.0.1:{plain.port}", tls_ca=cert) as secure, \
            pytest.raises(ServiceError) as e:
        secure.embed(photos[:1])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "speaks plaintext" in str(e.value)
    with EmbedderClient("127.0.0.1:1") as nowhere:  # nothing listening: not TLS, so retried as before
        assert not nowhere._probe_tls()


def test_a_missing_tls_ca_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tls_ca .--tls-ca. .*nope.pem"):
        EmbedderClient("127.0.0.1:1", tls_ca=tmp_path / "nope.pem")


def test_cli_embed_with_server_writes_the_same_files(server, embedder, photos, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, data in enumerate(photos[:4]):
        (folder / f"p{i}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "v.npy"
    code = cli_main(["embed", str(folder), "--out", str(out), "--server", f"127.0.0.1:{server.port}", "-q"])
    assert code == 1  # one file was skipped, as locally
    meta = json.loads(out.with_suffix(".json").read_text())
    files = sorted(folder.glob("*.jpg"))
    good = [f for f in files if f.name != "broken.jpg"]
    assert meta["paths"] == [str(f) for f in good] and meta["count"] == 4
    assert meta["model_id"] == embedder.model_id and meta["server"] == f"127.0.0.1:{server.port}"
    assert [f["path"] for f in meta["failed"]] == [str(folder / "broken.jpg")]
    np.testing.assert_allclose(np.load(out), embedder.embed([f.read_bytes() for f in good]), atol=1e-6)
    assert "skipped" in capsys.readouterr().err


def test_clients_split_to_the_lower_limits_of_the_server(embedder, photos, expected, tmp_path, capsys):
    """A server started with --max-items 3 and a small --max-message-bytes: a client with its default settings
    learns them once (one ListModels) and splits embed, embed_iter and add to fit, as the CLI does."""
    n = len(photos)
    order = [i % n for i in range(15)]
    images = [photos[i] for i in order]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"p{i:02d}.jpg").write_bytes(data)
    with running_server(embedder, max_items=3, max_message_bytes=max(map(len, photos)) * 3) as s:
        target = f"127.0.0.1:{s.port}"
        with EmbedderClient(target) as client:
            np.testing.assert_allclose(client.embed(images), expected[order], atol=1e-6)
            np.testing.assert_allclose(np.stack([r.vector for r in client.embed_iter(images)]), expected[order],
                                       atol=1e-6)
            assert client.add("small", images, ids=[str(i) for i in range(15)]).added == 15
            assert requests_seen(s, "ListModels") == 1  # asked once per client
            assert requests_seen(s, "Add") >= 5
        code = cli_main(["add", str(folder), "--collection", "cli-small", "--server", target, "-q"])
        assert code == 0 and capsys.readouterr().out.startswith("added 15,")
        out = tmp_path / "v.npy"
        assert cli_main(["embed", str(folder), "--out", str(out), "--server", target, "-q"]) == 0
        np.testing.assert_allclose(np.load(out), expected[order], atol=1e-6)


def test_cli_embed_with_server_records_the_model_that_embedded(server, photos, tmp_path, capsys):
    """`embed --server --model X` asks the server to embed with X (loaded on first use) and records X, not the
    server's default, in the .json."""
    from embedder.catalog import get_backbone

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "p.jpg").write_bytes(photos[0])
    out = tmp_path / "v.npy"
    argv = ["embed", str(folder), "--out", str(out), "--server", f"127.0.0.1:{server.port}", "-q"]
    assert cli_main([*argv, "--model", "efficientnet_lite0"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model_id"] == get_backbone("efficientnet_lite0").model_id and meta["name"] == "efficientnet_lite0"
    assert np.load(out).shape == (1, meta["dim"]) and f"with {meta['model_id']}" in capsys.readouterr().out
