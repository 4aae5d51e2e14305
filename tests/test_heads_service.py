"""Classifier heads over gRPC: Train on stored vectors (no backbone pass), Predict, ListHeads, DeleteHead.

Real digits from scikit-learn (0, 1 and 7), the real model, a real data dir; heads are real files on disk.
"""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from conftest import CountingModel, running_server

from classifier import make_head, save_head
from embedder._proto import embedder_pb2 as pb
from embedder._proto import embedder_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture(scope="module")
def counting(embedder):
    return CountingModel(embedder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("heads-data")


@pytest.fixture(scope="module")
def server(counting, data_dir):
    with running_server(counting, data_dir=data_dir) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbedderStub(channel)


@pytest.fixture(scope="module")
def digits(stub, digit_images):
    """The first 24 of each digit stored with labels in collection "digits"; the rest held out."""
    images, labels = digit_images
    train = [i for i in range(len(images)) if i % 30 < 24]
    items = [pb.AddItem(item=pb.Item(id=f"d{i}", image=images[i]), label=labels[i]) for i in train]
    assert stub.Add(pb.AddRequest(collection="digits", items=items), timeout=120).added == len(train)
    held_out = [i for i in range(len(images)) if i % 30 >= 24]
    return [images[i] for i in held_out], [labels[i] for i in held_out]


@pytest.fixture(scope="module")
def trained(stub, digits):
    return stub.Train(pb.TrainRequest(collection="digits", head="logreg", head_id="digits-logreg"), timeout=120)


def test_train_reports_the_head_its_hold_out_metrics_and_sample_count(trained, server):
    head = trained.head
    assert head.head_id == "digits-logreg" and head.kind == "logreg" and head.collection == "digits"
    assert list(head.classes) == ["0", "1", "7"] and list(head.class_counts) == [24, 24, 24]
    assert head.model_id == server.service.default.model_id and head.dim == 1280
    metrics = json.loads(head.metrics_json)
    assert metrics["method"] == "holdout" and metrics["n_evaluated"] == 15  # ceil(0.2 * 72)
    assert metrics["accuracy"] >= 0.8  # three well-separated digits; chance is 0.33
    assert trained.samples == 72 and 0 < trained.train_seconds <= trained.total_seconds


def test_training_and_retraining_run_no_backbone_pass(stub, counting, trained):
    decoded, embedded = counting.decoded, counting.embedded
    stub.SetLabels(pb.SetLabelsRequest(collection="digits", labels={f"d{i}": "one-or-seven" for i in
                                                                    [*range(30, 54), *range(60, 84)]}), timeout=30)
    again = stub.Train(pb.TrainRequest(collection="digits", head_id="relabelled"), timeout=120)
    assert list(again.head.classes) == ["0", "one-or-seven"]  # the new labels, from the stored vectors
    assert (counting.decoded, counting.embedded) == (decoded, embedded)
    stub.SetLabels(pb.SetLabelsRequest(collection="digits", labels={  # put the digits back
        **{f"d{i}": "1" for i in range(30, 54)}, **{f"d{i}": "7" for i in range(60, 84)}}), timeout=30)


def test_predict_images_and_stored_items(stub, trained, digits):
    images, labels = digits
    response = stub.Predict(pb.PredictRequest(head_id="digits-logreg", top_k=2, items=[
        pb.Item(id=f"q{i}", image=img) for i, img in enumerate(images)]), timeout=60)
    assert [p.id for p in response.predictions] == [f"q{i}" for i in range(len(images))]
    assert response.model_id == trained.head.model_id
    for p in response.predictions:
        assert p.status.code == OK and len(p.top) == 2
        assert p.top[0].probability >= p.top[1].probability and p.top[0].probability + p.top[1].probability <= 1.0001
        assert {t.label for t in p.top} <= {"0", "1", "7"}
    correct = sum(p.top[0].label == y for p, y in zip(response.predictions, labels))
    assert correct >= 0.8 * len(labels)
    stored = stub.Predict(pb.PredictRequest(head_id="digits-logreg", collection="digits", ids=["d0", "ghost"]),
                          timeout=60)
    assert stored.predictions[0].status.code == OK and len(stored.predictions[0].top) == 1
    assert stored.predictions[1].status.code == NOT_FOUND


def test_a_bad_image_fails_alone_in_predict(stub, trained, digits):
    response = stub.Predict(pb.PredictRequest(head_id="digits-logreg", items=[
        pb.Item(id="bad", image=b"junk"), pb.Item(id="good", image=digits[0][0])]), timeout=60)
    assert [p.status.code for p in response.predictions] == [grpc.StatusCode.INVALID_ARGUMENT.value[0], OK]


@pytest.mark.parametrize("request_, code, fix", [
    (pb.TrainRequest(collection="nope"), grpc.StatusCode.NOT_FOUND, "no collection"),
    (pb.TrainRequest(collection="digits", labels=["0"]), grpc.StatusCode.FAILED_PRECONDITION, "two classes"),
    (pb.TrainRequest(collection="digits", labels=["nine"]), grpc.StatusCode.FAILED_PRECONDITION, "no labelled"),
    (pb.TrainRequest(collection="digits", ids=["d0", "d1", "d30"]), grpc.StatusCode.FAILED_PRECONDITION,
     "at least 2 examples"),
    (pb.TrainRequest(collection="digits", head="forest"), grpc.StatusCode.INVALID_ARGUMENT, "unknown head"),
    (pb.TrainRequest(collection="digits", params_json='{"C": -1}'), grpc.StatusCode.INVALID_ARGUMENT, "C"),
    (pb.TrainRequest(collection="digits", params_json='{"C": 1e-45}'), grpc.StatusCode.INVALID_ARGUMENT, "C must"),
    (pb.TrainRequest(collection="digits", params_json='{"depth": 3}'), grpc.StatusCode.INVALID_ARGUMENT, "depth"),
    (pb.TrainRequest(collection="digits", params_json="[1]"), grpc.StatusCode.INVALID_ARGUMENT, "JSON object"),
    (pb.TrainRequest(collection="digits", head_id="../escape"), grpc.StatusCode.INVALID_ARGUMENT, "head id"),
])
def test_bad_trainings_get_the_right_status(stub, digits, request_, code, fix):
    with pytest.raises(grpc.RpcError) as e:
        stub.Train(request_, timeout=120)
    assert e.value.code() == code and fix in e.value.details()


@pytest.mark.parametrize("request_, code", [
    (pb.PredictRequest(head_id="ghost", items=[pb.Item(image=b"x")]), grpc.StatusCode.NOT_FOUND),
    (pb.PredictRequest(head_id="../../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.PredictRequest(head_id="digits-logreg", ids=["d0"]), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_predictions_get_the_right_status(stub, trained, request_, code):
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(request_, timeout=60)
    assert e.value.code() == code
    assert "/tmp" not in e.value.details()  # server paths never leak to callers


def test_a_head_of_another_backbone_is_failed_precondition(stub, data_dir, digits):
    rng = np.random.default_rng(0)
    head = make_head("logreg").fit(rng.standard_normal((20, 1280)), ["a", "b"] * 10,
                                   model_id="efficientnet_lite0:0123456789ab:pp2-x")
    save_head(head, data_dir / "heads", head_id="foreign")
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(pb.PredictRequest(head_id="foreign", items=[pb.Item(image=digits[0][0])]), timeout=60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "efficientnet_lite0" in e.value.details()


def test_list_and_delete_heads(stub, trained):
    stub.Train(pb.TrainRequest(collection="digits", head="linear_svm", head_id="to-delete"), timeout=120)
    listed = {h.head_id: h for h in stub.ListHeads(pb.ListHeadsRequest(), timeout=30).heads}
    assert {"digits-logreg", "to-delete"} <= set(listed) and listed["to-delete"].kind == "linear_svm"
    stub.DeleteHead(pb.DeleteHeadRequest(head_id="to-delete"), timeout=30)
    assert "to-delete" not in {h.head_id for h in stub.ListHeads(pb.ListHeadsRequest(), timeout=30).heads}
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(pb.PredictRequest(head_id="to-delete", collection="digits", ids=["d0"]), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteHead(pb.DeleteHeadRequest(head_id="to-delete"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_heads_survive_a_restart(embedder, digit_images, tmp_path):
    images, labels = digit_images
    items = [pb.AddItem(item=pb.Item(id=f"d{i}", image=img), label=lab) for i, (img, lab) in
             enumerate(zip(images, labels))]
    query = pb.PredictRequest(head_id="kept", top_k=3, items=[pb.Item(image=img) for img in images[::10]])
    with running_server(embedder, data_dir=tmp_path) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        stub.Add(pb.AddRequest(collection="digits", items=items), timeout=120)
        stub.Train(pb.TrainRequest(collection="digits", head="svm", head_id="kept"), timeout=120)
        before = stub.Predict(query, timeout=60)
    with running_server(embedder, data_dir=tmp_path) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.EmbedderStub(ch)
        assert [h.head_id for h in stub.ListHeads(pb.ListHeadsRequest(), timeout=30).heads] == ["kept"]
        assert stub.Predict(query, timeout=60) == before
        assert stub.Stats(pb.StatsRequest(), timeout=30).heads == 1


def test_train_adapted_to_another_domain_records_it_and_maps_target_images(stub, digits, digit_images):
    from PIL import Image
    import io

    images, labels = digit_images

    def inverted(jpeg: bytes) -> bytes:
        buf = io.BytesIO()
        Image.eval(Image.open(io.BytesIO(jpeg)).convert("RGB"), lambda v: 255 - v).save(buf, "JPEG")
        return buf.getvalue()

    target = [inverted(img) for img in images[1::3]]  # the "other camera": no labels
    stub.Add(pb.AddRequest(collection="digits-inverted", items=[
        pb.AddItem(item=pb.Item(id=f"t{i}", image=img)) for i, img in enumerate(target)]), timeout=120)
    adapted = stub.Train(pb.TrainRequest(collection="digits", head_id="adapted", adapt_to="digits-inverted",
                                         adapt_method="standardize"), timeout=120)
    info = json.loads(adapted.head.adaptation_json)
    assert info["method"] == "standardize" and info["adapt_to"] == "digits-inverted" and info["n_target"] == 30
    plain = stub.Train(pb.TrainRequest(collection="digits", head_id="plain"), timeout=120)
    assert plain.head.adaptation_json == ""
    query = [pb.Item(image=inverted(img)) for img in images[2::3]]
    answers = {h: stub.Predict(pb.PredictRequest(head_id=h, items=query), timeout=60) for h in ("adapted", "plain")}
    truth = labels[2::3]
    right = {h: sum(p.top[0].label == y for p, y in zip(r.predictions, truth)) for h, r in answers.items()}
    assert right["adapted"] > right["plain"], right  # the adapter really maps target vectors before the head
    with pytest.raises(grpc.RpcError) as e:
        stub.Train(pb.TrainRequest(collection="digits", adapt_to="nowhere"), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_predict_with_several_heads_embeds_each_image_once(server, counting, trained, digit_images):
    from embedder.client import EmbedderClient

    import io

    from PIL import Image

    images, labels = digit_images
    queries = []
    for i in (27, 58, 89):  # re-encoded: bytes no earlier test has sent, so each is a cache miss
        buf = io.BytesIO()
        Image.open(io.BytesIO(images[i])).save(buf, "PNG")
        queries.append(buf.getvalue())
    with EmbedderClient(server.address) as client:
        client.train("digits", "linear_svm", head_id="second")
        decoded, embedded = counting.decoded, counting.embedded
        both = client.predict(["digits-logreg", "second"], queries, top_k=2)
        assert (counting.decoded - decoded, counting.embedded - embedded) == (3, 3)  # once per image, not per head
        alone = client.predict("second", queries, top_k=2)
        for p, q in zip(both, alone):
            assert set(p.by_head) == {"digits-logreg", "second"} and p.by_head["second"][0] == q.labels
            assert p.labels == p.by_head["digits-logreg"][0]
        with pytest.raises(Exception, match="more than once"):
            client.predict(["second", "second"], queries)


def test_learning_curve_of_a_collection_says_whether_more_labels_pay_off(server, digits, tmp_path):
    from embedder import cli
    from embedder.client import EmbedderClient

    code = cli.main(["evaluate", "--collection", "digits", "--curve", "--per-class", "1", "2", "5", "10", "50",
                     "--repeats", "3", "--plot", str(tmp_path / "curve.png"), "--json", "--server", server.address])
    assert code == 0 and (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    with EmbedderClient(server.address) as client:
        points = client.learning_curve("digits", per_class=[2, 5, 10], repeats=3)
    assert [p.per_class for p in points] == [2, 5, 10]  # 1 is below the head's minimum; 50 above what 24 allow
    assert all(p.ci_low <= p.accuracy_mean <= p.ci_high and p.repeats == 3 for p in points)
    assert points[-1].accuracy_mean >= points[0].accuracy_mean - 0.05 and points[-1].accuracy_mean > 0.6
