"""Saving and loading heads: exact round trips, no pickle, refusal of edited files and of other models."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
from test_heads import NAMES, embed_digits, single_torch_thread  # noqa: F401 (autouse)

from embedder.errors import ModelMismatchError
from classifier import (FORMAT_VERSION, LABEL_HEADS, HeadError, HeadFormatError, HeadNotFoundError,
                        delete_head, list_heads, load_head, make_head, read_head_info, save_head)
from classifier.persist import manifest_sha256
from embedder import __version__

MODEL = "mobilenet_v2:test"


def rewrite_meta(path, edit, *, reseal: bool) -> None:
    """Edit a saved head's head.json; ``reseal`` recomputes its manifest checksum, as a deliberate forger would."""
    meta = json.loads((path / "head.json").read_text())
    edit(meta)
    if reseal:
        meta["manifest_sha256"] = manifest_sha256(meta)
    (path / "head.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def data(embedder):
    X, y = embed_digits(embedder)
    return X[::2], y[::2], X[1::2]  # 200 to train, 200 to predict


@pytest.fixture(scope="module")
def fitted(data):
    """One fitted head of each kind, with string labels."""
    X, y, _ = data
    return {kind: make_head(kind).fit(X, NAMES[y], model_id=MODEL) for kind in LABEL_HEADS}


@pytest.mark.parametrize("kind", list(LABEL_HEADS))
def test_round_trip_predicts_identically(tmp_path, data, fitted, kind):
    head = fitted[kind]
    path = save_head(head, tmp_path, head_id="h1", metrics={"accuracy": 0.9})
    loaded = load_head(path, expected_model_id=MODEL)
    _, _, X_new = data
    assert type(loaded) is type(head)
    np.testing.assert_array_equal(loaded.predict_proba(X_new), head.predict_proba(X_new))
    np.testing.assert_array_equal(loaded.predict(X_new), head.predict(X_new))
    np.testing.assert_array_equal(loaded.classes_, head.classes_)
    assert loaded.get_params() == head.get_params()
    assert loaded.model_id_ == MODEL and loaded.n_features_in_ == 1280


def test_integer_labels_stay_integers(tmp_path, data):
    X, y, X_new = data
    head = make_head("logreg").fit(X, y, model_id=MODEL)
    loaded = load_head(save_head(head, tmp_path, head_id="ints"))
    assert loaded.classes_.tolist() == list(range(10))
    assert isinstance(loaded.predict(X_new[:1])[0], np.integer)


def test_json_describes_the_head(tmp_path, fitted):
    path = save_head(fitted["logreg"], tmp_path, head_id="described", metrics={"accuracy": 0.9})
    meta = json.loads((path / "head.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["kind"] == "logreg" and meta["model_id"] == MODEL and meta["dim"] == 1280
    assert meta["classes"] == sorted(NAMES.tolist())
    assert meta["params"] == fitted["logreg"].get_params()
    assert meta["metrics"] == {"accuracy": 0.9}
    assert meta["library_version"] == __version__ and meta["created"].endswith("+00:00")
    assert meta["arrays"]["sha256"] == hashlib.sha256((path / "head.safetensors").read_bytes()).hexdigest()
    info = read_head_info(path)
    assert info.head_id == "described" and info.classes == meta["classes"]
    json.dumps(info.to_dict())


def test_loading_never_unpickles(tmp_path, fitted, monkeypatch):
    path = save_head(fitted["svm"], tmp_path, head_id="h")

    def refuse(*args, **kwargs):
        raise AssertionError("load_head must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_head(path)


class _Payload:
    """Unpickling this runs os.mkdir(marker): proof of code execution if it ever happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_in_place_of_the_arrays_is_refused(tmp_path, fitted):
    path = save_head(fitted["logreg"], tmp_path, head_id="h")
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(marker))
    (path / "head.safetensors").write_bytes(blob)
    with pytest.raises(HeadFormatError, match="does not match the checksum"):
        load_head(path)
    # even with the checksums edited to match, the safetensors parser refuses it
    rewrite_meta(path, lambda m: m["arrays"].update(sha256=hashlib.sha256(blob).hexdigest()), reseal=True)
    with pytest.raises(HeadFormatError, match="not a valid safetensors file"):
        load_head(path)
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(dim=512), "says dim 512"),
    (lambda m: m.update(classes=m["classes"][:-1]), "class_counts must hold one positive integer per class"),
    (lambda m: m.update(classes=m["classes"][:-1], class_counts=m["class_counts"][:-1]), "do not match"),
    (lambda m: m.update(kind="linear_svm"), "needs arrays"),
    (lambda m: m.update(kind="pickle"), "unknown head kind 'pickle'"),
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m["params"].update(C=-1), "C must be a number from 1e-12 to 1e.12"),
    (lambda m: m["params"].update(__class__="os.system"), "no option '__class__'"),
    (lambda m: m.pop("model_id"), "'model_id' is missing"),
    (lambda m: m.update(head_id="other"), "does not match its directory"),
])
def test_an_edited_json_is_refused(tmp_path, fitted, edit, message):
    """Each edit fails the manifest checksum; resealed (checksum recomputed), the check behind it refuses it."""
    path = save_head(fitted["logreg"], tmp_path, head_id="h")
    original = (path / "head.json").read_text()
    rewrite_meta(path, edit, reseal=False)
    with pytest.raises(HeadFormatError, match="does not match its manifest_sha256|format_version 99"):  # version first
        load_head(path)
    (path / "head.json").write_text(original)
    rewrite_meta(path, edit, reseal=True)
    with pytest.raises(HeadFormatError, match=message):
        load_head(path)


def test_a_reversed_class_list_is_data_loss_naming_no_path(tmp_path, fitted, caplog):
    """Found by the attack pass: swapping head.json's classes made a head predict swapped labels."""
    from embedder.errors import Category

    path = save_head(fitted["logreg"], tmp_path, head_id="h")
    rewrite_meta(path, lambda m: m["classes"].reverse(), reseal=False)
    with pytest.raises(HeadFormatError, match="saved head 'h': head.json does not match") as e:
        load_head(path)
    assert e.value.category == Category.DATA_LOSS and str(tmp_path) not in str(e.value)
    assert str(path) in caplog.text  # the operator finds the head in the log
    for corrupt in (lambda: (path / "head.json").write_text("{not json"),
                    lambda: (path / "head.safetensors").write_bytes(b"junk")):
        save_head(fitted["logreg"], tmp_path, head_id="h", overwrite=True)
        corrupt()
        with pytest.raises(HeadFormatError) as e:
            load_head(path)
        assert str(tmp_path) not in str(e.value)


def test_a_head_saved_before_manifest_checksums_still_loads(tmp_path, fitted, data, caplog):
    path = save_head(fitted["logreg"], tmp_path, head_id="old")
    rewrite_meta(path, lambda m: (m.pop("manifest_sha256"), m.update(format_version=1)), reseal=False)
    np.testing.assert_array_equal(load_head(path).predict_proba(data[2]), fitted["logreg"].predict_proba(data[2]))
    assert "predates manifest checksums" in caplog.text


def test_a_json_that_is_not_json_is_refused(tmp_path, fitted):
    path = save_head(fitted["logreg"], tmp_path, head_id="h")
    (path / "head.json").write_text("{not json")
    with pytest.raises(HeadFormatError, match="not valid JSON"):
        load_head(path)


def test_a_head_of_another_model_is_refused(tmp_path, fitted):
    path = save_head(fitted["logreg"], tmp_path, head_id="h")
    with pytest.raises(ModelMismatchError, match="trained on features of model 'mobilenet_v2:test'.*'resnet50:x'"):
        load_head(path, expected_model_id="resnet50:x")


def test_saving_needs_a_model_id_and_a_fit(tmp_path, data):
    X, y, _ = data
    with pytest.raises(HeadError, match="model_id=embedder.model_id"):
        save_head(make_head("logreg").fit(X, y), tmp_path)
    with pytest.raises(HeadError, match="unfitted"):
        save_head(make_head("logreg"), tmp_path)


def test_ids_overwrite_list_and_delete(tmp_path, fitted, data):
    _, _, X_new = data
    first = save_head(fitted["logreg"], tmp_path)
    assert first.name.startswith("logreg-")
    save_head(fitted["svm"], tmp_path, head_id="mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_head(fitted["linear_svm"], tmp_path, head_id="mine")
    save_head(fitted["linear_svm"], tmp_path, head_id="mine", overwrite=True)
    np.testing.assert_array_equal(load_head(tmp_path / "mine").predict_proba(X_new),
                                  fitted["linear_svm"].predict_proba(X_new))
    (tmp_path / ".tmp-crashed-write").mkdir()  # what an interrupted save leaves behind
    assert [(i.head_id, i.kind) for i in list_heads(tmp_path)] == [(first.name, "logreg"), ("mine", "linear_svm")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".tmp-crashed-write", first.name, "mine"])
    delete_head(tmp_path, "mine")
    assert [i.head_id for i in list_heads(tmp_path)] == [first.name]
    with pytest.raises(HeadNotFoundError, match="no head with id 'mine'"):
        delete_head(tmp_path, "mine")
    with pytest.raises(HeadNotFoundError):
        load_head(tmp_path / "mine")
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(HeadError, match="invalid head id"):
            save_head(fitted["logreg"], tmp_path, head_id=bad)


def test_recover_interrupted_undoes_or_finishes_what_a_crash_left(fitted, tmp_path):
    import shutil

    from classifier import recover_interrupted

    save_head(fitted["logreg"], tmp_path, head_id="kept-old")
    save_head(fitted["svm"], tmp_path, head_id="replaced")
    # a crash between the two renames of an overwrite: the old head is aside, the new one not yet in place
    (tmp_path / "kept-old").rename(tmp_path / ".old-kept-old-0badc0de")
    # a crash after the replacement landed, before the old copy was removed
    shutil.copytree(tmp_path / "replaced", tmp_path / ".old-replaced-12345678")
    (tmp_path / ".tmp-half-written-abcdef01").mkdir()
    (tmp_path / ".del-going-away-abcdef01").mkdir()
    actions = recover_interrupted(tmp_path)
    assert len(actions) == 4 and any("restored kept-old" in a for a in actions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept-old", "replaced"]
    assert load_head(tmp_path / "kept-old").kind == "logreg" and load_head(tmp_path / "replaced").kind == "svm"
    assert recover_interrupted(tmp_path) == []  # nothing left to do


def test_an_adapted_head_saves_its_adapter_and_predicts_identically_after_loading(data, tmp_path):
    from classifier import HeadRegistry

    X, y, X_new = data
    target = X_new[:, ::-1].copy()  # a stand-in "other domain": the same digits, features permuted
    registry = HeadRegistry(tmp_path)
    result = registry.train(X, NAMES[y], model_id=MODEL, adapt_to=target, adapt_method="coral", head_id="adapted")
    assert result.info.adaptation["method"] == "coral" and result.info.adaptation["n_target"] == len(target)
    in_memory = registry.get("adapted")
    loaded = load_head(tmp_path / "adapted")
    assert loaded.adapter_ is not None
    np.testing.assert_array_equal(loaded.predict_proba(target), in_memory.predict_proba(target))
    plain = make_head("logreg").fit(X, NAMES[y], model_id=MODEL)
    assert not np.allclose(plain.predict_proba(target), loaded.predict_proba(target))  # the adapter is applied
    # arrays of an adapter that head.json no longer mentions
    rewrite_meta(tmp_path / "adapted", lambda m: m.update(adaptation=None), reseal=True)
    with pytest.raises(HeadFormatError, match="adapter arrays"):
        load_head(tmp_path / "adapted")


def test_a_head_being_replaced_never_looks_missing(data, tmp_path, monkeypatch):
    """ListHeads racing Train(head_id=existing): the replaced head is listed throughout (found by the soak)."""
    import pathlib
    import threading
    import time

    from classifier import HeadRegistry

    rename = pathlib.Path.rename

    def slow_rename(self, target):  # widen the gap between moving the old head aside and the new one in
        out = rename(self, target)
        if pathlib.Path(target).name.startswith(".old-"):
            time.sleep(0.05)
        return out

    monkeypatch.setattr(pathlib.Path, "rename", slow_rename)
    X, y, _ = data
    registry = HeadRegistry(tmp_path)
    registry.train(X, NAMES[y], model_id=MODEL, head_id="stable")
    registry.train(X, NAMES[y], model_id=MODEL, head_id="replaced")
    stop, seen = threading.Event(), []

    def watch() -> None:
        while not stop.is_set():
            seen.append({i.head_id for i in registry.list()})

    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(8):
        registry.train(X[:60], NAMES[y[:60]], model_id=MODEL, head_id="replaced")
    stop.set()
    watcher.join()
    assert seen and all(ids == {"stable", "replaced"} for ids in seen)
