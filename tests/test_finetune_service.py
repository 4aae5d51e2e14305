"""FineTune over gRPC: a job on a labelled collection's kept images -> a registered backbone version."""
from __future__ import annotations

import json
import time

import grpc
import pytest
from conftest import running_server

from embedder import Embedder, backbones
from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc
from embedder.client import EmbedderClient, ServiceError
from embedder.jobs import JobRunner


@pytest.fixture
def served(embedder, digit_images, tmp_path, restore_registry):
    images, labels = digit_images
    with running_server(embedder, data_dir=tmp_path) as s, EmbedderClient(s.address, timeout=120) as client:
        client.add("digits", images[::2], [f"d{i}" for i in range(0, len(images), 2)], labels=labels[::2])
        yield s, client, tmp_path


def test_a_fine_tune_job_registers_a_new_backbone(served, digit_images):
    server, client, data_dir = served
    seen: list[dict] = []
    job = client.finetune("digits", "ft", params={"epochs": 3})  # a setting in params counts (it was dropped)
    assert job["state"] in ("queued", "running") and job["params"]["images"] == 45
    assert job["params"]["config"]["epochs"] == 3
    done = client.wait_job(job["job_id"], poll=0.2, timeout=300, on_progress=seen.append)
    assert done["state"] == "finished", done["error"]
    result = done["result"]
    assert result["name"] == "mobilenet_v2.ft" and result["parent"] == server.service.default.model_id
    assert result["trunk_passes"] == 45 and 0 < result["val_accuracy"] <= 1
    assert any(j["progress"].get("epoch") for j in seen)  # per-epoch progress was visible while it ran
    with Embedder(model=result["name"], device="cpu", runtime="torch", data_dir=data_dir) as tuned:
        assert tuned.model_id == result["model_id"] and tuned.embed(digit_images[0][:2]).shape == (2, 1280)
    with pytest.raises(ServiceError) as e:  # the name is taken now
        client.finetune("digits", "ft")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "already exists" in str(e.value)

    # the new version serves like any backbone on the same server: its own vectors, cache, collections, heads
    images, labels = digit_images
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        first = stub.Embed(pb.EmbedRequest(model="mobilenet_v2.ft", items=[pb.Item(image=images[1])]), timeout=300)
        again = stub.Embed(pb.EmbedRequest(model=result["model_id"], items=[pb.Item(image=images[1])]), timeout=60)
        parent = stub.Embed(pb.EmbedRequest(items=[pb.Item(image=images[1])]), timeout=60)
        assert first.model_id == again.model_id == result["model_id"] != parent.model_id
        assert not first.results[0].cached and again.results[0].cached  # its own cache entries
        assert first.results[0].vector != parent.results[0].vector
        models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        assert [m.name for m in models] == ["mobilenet_v2", "mobilenet_v2.ft"]
        stub.Add(pb.AddRequest(collection="tuned", model="mobilenet_v2.ft", items=[
            pb.AddItem(item=pb.Item(id=f"u{i}", image=images[i]), label=labels[i]) for i in range(1, 90, 2)]),
            timeout=300)
    stats = {c.name: c for c in client.stats()["collections"]}
    assert stats["tuned"].model_id == result["model_id"] and stats["digits"].model_id == server.service.default.model_id
    head = client.train("tuned", head_id="tuned-head")
    assert head["model_id"] == result["model_id"]
    prediction = client.predict("tuned-head", [images[0]])[0]
    assert prediction.error is None and prediction.label in ("0", "1", "7")
    assert client.search(images[3], collection="tuned", k=1)[0].id == "u3"


def test_bad_fine_tune_requests_fail_up_front(served, embedder):
    server, client, _ = served
    cases = [
        (dict(collection="nope", suffix="x"), grpc.StatusCode.NOT_FOUND),
        (dict(collection="digits", suffix="../x"), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(collection="digits", suffix="x", labels=["0"]), grpc.StatusCode.FAILED_PRECONDITION),
        (dict(collection="digits", suffix="x", params={"lr": "fast"}), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(collection="digits", suffix="x", params={"depth": 3}), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(collection="digits", suffix="x", params={"schedule": "linear"}), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(collection="digits", suffix="x", unfreeze=18), grpc.StatusCode.INVALID_ARGUMENT),  # mobilenet_v2: 17
        (dict(collection="digits", suffix="x", epochs=10**9), grpc.StatusCode.INVALID_ARGUMENT),  # bounded work
        (dict(collection="digits", suffix="x", params={"patience": 10**9}), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(collection="digits", suffix="x", epochs=3, params={"epochs": 2}), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for kwargs, code in cases:
        with pytest.raises(ServiceError) as e:
            client.finetune(**kwargs)
        assert e.value.code == code, (kwargs, e.value)
    arr = pb.Tensor(shape=[32, 32, 3], dtype=pb.DTYPE_UINT8, data=bytes(32 * 32 * 3))
    with grpc.insecure_channel(server.address) as ch:  # items added as tensors keep no image
        pb_grpc.EmbedderStub(ch).Add(pb.AddRequest(collection="tensors", items=[
            pb.AddItem(item=pb.Item(id=f"t{i}", tensor=arr), label=str(i % 2)) for i in range(4)]), timeout=60)
    with pytest.raises(ServiceError) as e:
        client.finetune("tensors", "x")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no kept image" in str(e.value)
    with pytest.raises(ServiceError) as e:
        client.get_job("nope")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_a_cancelled_job_registers_nothing(served):
    _, client, data_dir = served
    job = client.finetune("digits", "cancelled", epochs=50, params={"patience": 50})
    client.wait_job(job["job_id"], poll=0.1, timeout=300,
                    on_progress=lambda j: j["progress"].get("epoch") and client.cancel_job(j["job_id"]))
    done = client.get_job(job["job_id"])
    assert done["state"] == "cancelled" and done["result"] is None
    assert not (data_dir / "backbones" / "mobilenet_v2.cancelled").exists()


def test_a_job_interrupted_by_a_stop_reads_as_failed_after_a_restart(tmp_path):
    first = JobRunner(tmp_path)
    started = []
    job = first.submit("finetune", {"x": 1}, lambda j, cancel, report: started.append(1) or cancel.wait(30) or {})
    deadline = time.monotonic() + 10
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.get(job.job_id).state == "running"
    # a process that dies here leaves the file saying "running"; the next runner fixes that
    second = JobRunner(tmp_path)
    again = second.get(job.job_id)
    assert again.state == "failed" and "interrupted" in again.error
    assert json.loads((tmp_path / f"{job.job_id}.json").read_text())["state"] == "failed"
    first.close(timeout=10)


def test_adabn_adapts_the_backbone_to_a_collection_of_unlabelled_images(served, digit_images, embedder):
    import io

    from PIL import Image

    _, client, data_dir = served
    inverted = []
    for img in digit_images[0][::3]:
        buf = io.BytesIO()
        Image.eval(Image.open(io.BytesIO(img)).convert("RGB"), lambda v: 255 - v).save(buf, "JPEG")
        inverted.append(buf.getvalue())
    client.add("target", inverted, [f"t{i}" for i in range(len(inverted))])  # no labels needed
    done = client.wait_job(client.finetune("target", "inverted", method="adabn")["job_id"], poll=0.2, timeout=300)
    assert done["state"] == "finished", done["error"]
    assert done["result"]["images"] == len(inverted) and done["result"]["name"] == "mobilenet_v2.inverted"
    meta = json.loads((data_dir / "backbones" / "mobilenet_v2.inverted" / backbones.DERIVED_META).read_text())
    assert meta["how"].startswith("AdaBN")
    with Embedder(model="mobilenet_v2.inverted", device="cpu", runtime="torch", data_dir=data_dir) as adapted:
        a, b = adapted.embed(inverted[:4]), embedder.embed(inverted[:4])
    assert float((a * b).sum(1).mean()) < 0.99  # new statistics, new vectors
    with pytest.raises(ServiceError) as e:
        client.finetune("digits", "x", method="nonsense")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    client.add("tiny", inverted[:3], ["a", "b", "c"])
    with pytest.raises(ServiceError) as e:
        client.finetune("tiny", "x", method="adabn")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "at least 8" in str(e.value)


def test_adabn_on_a_recipe_collection_is_refused_up_front_as_a_fine_tune_is(embedder, digit_images, tmp_path,
                                                                            cache_dir):
    """AdaBN on a recipe collection was accepted (202, a job) and failed later; now 400 at once, like a fine-tune."""
    import requests
    from conftest import http_door

    images, labels = digit_images
    with running_server(embedder, data_dir=tmp_path, cache_dir=cache_dir) as server, http_door(server) as http, \
            EmbedderClient(server.address, timeout=300) as client:
        client.add("flipped", images[:16:2], [f"d{i}" for i in range(8)], labels=labels[:16:2],
                   model="mobilenet_v2@flip")
        for method, words in (("adabn", "AdaBN supports"), ("finetune", "fine-tuning supports")):
            answer = requests.post(f"{http.url}/v1/collections/flipped/finetune",
                                   json={"suffix": "x", "method": method}, timeout=60)
            assert answer.status_code == 400, answer.text  # no job (202) that fails later
            assert f"{words} mobilenet_v2, efficientnet_lite0, efficientnet_lite2, not 'mobilenet_v2@flip'" in \
                answer.text
