"""embedder.bulk: bulk-embed on a real local Ray (one instance for the module), real JPEGs, the real model."""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # the `scale` extra (also in `test`)

from conftest import CountingModel, cosine, small_jpegs
from embedder.bulk import MANIFEST, bulk_embed, import_parquet, read_inputs
from embedder.bulk.ray_pipeline import _dataset, _resources_plan, _units
from embedder.cli import main
from embedder.errors import ModelMismatchError
from embedder.config import Config
from embedder.core import Service
from embedder.inputs import content_hash
from embedder.store import Store

JUNK = b"this is not an image, just text with a .jpg name"
SHARD_SIZE, BATCH = 10, 8


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the whole module: bulk_embed uses an initialised Ray as it is."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tree(tmp_path_factory, photo_arrays):
    """24 small real JPEGs (quadrants of the six photos) in two folders, plus one junk file: (root, {id: bytes})."""
    arrays = []
    for a in photo_arrays.values():
        h, w = a.shape[0] // 2, a.shape[1] // 2
        arrays += [a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:]]
    jpegs = small_jpegs(arrays, size=96)
    root = tmp_path_factory.mktemp("bulk-src")
    files = {}
    for i, data in enumerate(jpegs):
        item_id = f"{'cats' if i % 2 else 'dogs'}/{i:02d}.jpg"
        (root / item_id).parent.mkdir(exist_ok=True)
        (root / item_id).write_bytes(data)
        files[item_id] = data
    (root / "junk.jpg").write_bytes(JUNK)
    return root, files


@pytest.fixture(scope="module")
def bulk_out(ray_local, tree, tmp_path_factory, cache_dir):
    root, _ = tree
    out = tmp_path_factory.mktemp("bulk-out")
    manifest = bulk_embed(root, out, shard_size=SHARD_SIZE, batch_size=BATCH, cache_dir=cache_dir, progress=False)
    return out, manifest


def _read(out):
    """All shard rows of a bulk-embed folder: {id: (vector, sha256, row dict)}."""
    rows = {}
    for f in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(f)
        vecs = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        for r, v in zip(t.to_pylist(), vecs):
            rows[r["id"]] = (v, r["sha256"], r)
    return rows


def test_folder_bulk_embed_matches_the_local_embedder(bulk_out, tree, embedder):
    out, manifest = bulk_out
    root, files = tree
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet",
                                                                  "part-00002.parquet"]
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["complete"] is True and manifest["model_id"] == embedder.model_id and manifest["dim"] == 1280
    run = manifest["settings"]  # what the Ray run was: its plan, and when the first result came back
    assert run["actors"] == 1 and run["device"] == "cpu" and 0 < run["first_result_s"] <= run["half_result_s"] <= run["ray_seconds"]
    c = manifest["counts"]
    assert (c["inputs"], c["embedded"], c["failed"], c["shards"], c["skipped_shards"], c["written_shards"]) == \
        (25, 24, 1, 3, 0, 3)
    # the junk file is listed with the very error the service's Embedder gives it
    assert manifest["failures"] == [{"id": "junk.jpg", "error": embedder.embed_batch([JUNK]).errors[0]}]
    assert "not a recognised image format" in manifest["failures"][0]["error"]

    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.field("vector").type == pa.list_(pa.float32(), 1280)  # fixed-size float32 list
    rows = _read(out)
    assert sorted(rows) == sorted(files)
    ids = sorted(files)
    local = embedder.embed([files[i] for i in ids])
    bulk = np.stack([rows[i][0] for i in ids])
    assert cosine(bulk, local).min() >= 0.9999
    for i in ids:
        _, sha, row = rows[i]
        assert sha == content_hash(files[i])
        assert row["model_id"] == embedder.model_id
        assert row["path"] == str((root / i).absolute())


def test_decode_runs_in_cpu_tasks_beside_the_actor_pool(ray_local, tree, embedder, cache_dir):
    """Ray Data fuses a task map into the next actor map unless told apart: then decoding would run in series
    with the model inside the actors. Two operators must run, and rows come back per input."""
    from embedder.config import Config

    config = Config.from_env(environ={}, cache_dir=cache_dir, runtime_threads=1)
    plan = _resources_plan({"CPU": 2.0}, None, config)
    assert (plan["actors"], plan["num_gpus"], plan["device"]) == (1, 0, "cpu") and plan["actor_cpus"] <= 1.0
    gpu = _resources_plan({"CPU": 16.0, "GPU": 2.0}, None, config)
    assert (gpu["actors"], gpu["num_gpus"], gpu["device"]) == (2, 1, "cuda")  # one GPU per actor
    inputs = read_inputs(tree[0])
    units = _units(inputs, [(0, 20, 25)], 3)  # the last five inputs (junk.jpg among them), two decode tasks
    ds = _dataset(ray, units, config, config, {**plan, "decode_memory": 2**29}, embedder.model_id, 3)
    rows = sorted(ds.take_all(), key=lambda r: r["pos"])
    stats = ds.stats()
    assert "MapBatches(_decode_units)->MapBatches(_EmbedActor)" not in stats
    assert "MapBatches(_decode_units)" in stats and "MapBatches(_EmbedActor)" in stats
    assert [r["pos"] for r in rows] == [0, 1, 2, 3, 4] and all(r["shard"] == 0 for r in rows)
    assert [bool(r["error"]) for r in rows] == [id_ == "junk.jpg" for id_ in inputs.ids[20:25]]
    assert all(np.asarray(r["vector"]).shape == (1280,) for r in rows)


def test_rerun_recomputes_only_the_missing_shard(bulk_out, tree, tmp_path, cache_dir):
    src, _ = bulk_out
    out = tmp_path / "out"
    shutil.copytree(src, out)  # copy2: mtimes kept
    before = _read(out)
    (out / "part-00001.parquet").unlink()
    untouched = {n: (out / n).stat().st_mtime_ns for n in ("part-00000.parquet", "part-00002.parquet")}

    manifest = bulk_embed(tree[0], out, shard_size=SHARD_SIZE, batch_size=BATCH, cache_dir=cache_dir, progress=False)
    c = manifest["counts"]
    assert (c["skipped_shards"], c["written_shards"], c["embedded"], c["failed"]) == (2, 1, 24, 1)
    assert manifest["complete"] and (out / "part-00001.parquet").is_file()
    assert {n: (out / n).stat().st_mtime_ns for n in untouched} == untouched  # not rewritten
    # the junk file's shard was skipped, and its failure still comes from that shard's own metadata
    assert [f["id"] for f in manifest["failures"]] == ["junk.jpg"]
    after = _read(out)
    assert sorted(after) == sorted(before)
    for i in after:
        assert after[i][1] == before[i][1] and cosine(after[i][0][None], before[i][0][None])[0] >= 0.9999

    # all complete: nothing to run, nothing written
    again = bulk_embed(tree[0], out, shard_size=SHARD_SIZE, batch_size=BATCH, cache_dir=cache_dir, progress=False)
    assert (again["counts"]["skipped_shards"], again["counts"]["written_shards"]) == (3, 0)
    # other vector settings must not mix into the same folder
    with pytest.raises(ValueError, match="another --out"):
        bulk_embed(tree[0], out, shard_size=SHARD_SIZE, normalize=False, cache_dir=cache_dir, progress=False)


def test_txt_list_and_parquet_bytes_give_the_same_vectors(bulk_out, tree, tmp_path, cache_dir):
    root, files = tree
    folder = _read(bulk_out[0])
    chosen = sorted(files)[:9]

    listing = tmp_path / "list" / "paths.txt"
    listing.parent.mkdir()
    lines = ["# images to embed", *[str(root / i) for i in chosen], "", str(root / "junk.jpg"),
             str(root / "missing.jpg")]
    listing.write_text("\n".join(lines) + "\n")
    txt_out = bulk_embed(listing, tmp_path / "txt-out", shard_size=4, batch_size=BATCH, cache_dir=cache_dir,
                         progress=False)
    assert txt_out["counts"] == {"inputs": 11, "embedded": 9, "failed": 2, "shards": 3, "complete_shards": 3,
                                 "skipped_shards": 0, "written_shards": 3}
    errors = {f["id"]: f["error"] for f in txt_out["failures"]}
    assert "not a recognised image format" in errors[str(root / "junk.jpg")]
    assert errors[str(root / "missing.jpg")].startswith("could not read file")
    txt = {i.removeprefix(str(root) + "/"): v for i, v in _read(tmp_path / "txt-out").items()}

    # two Parquet files with small row groups: shards cross row groups and files
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    ids = [*chosen, "junk", "null"]
    blobs = [files[i] for i in chosen] + [JUNK, None]
    labels = [i.split("/")[0] for i in chosen] + ["x", "y"]
    for part, sl in (("a.parquet", slice(0, 5)), ("b.parquet", slice(5, None))):
        pq.write_table(pa.table({"key": ids[sl], "img": pa.array(blobs[sl], pa.binary()), "cls": labels[sl]}),
                       pq_dir / part, row_group_size=3)
    pq_out = bulk_embed(pq_dir, tmp_path / "pq-out", shard_size=4, batch_size=2, bytes_column="img",
                        id_column="key", label_column="cls", cache_dir=cache_dir, progress=False)
    assert (pq_out["counts"]["inputs"], pq_out["counts"]["embedded"], pq_out["counts"]["failed"]) == (11, 9, 2)
    assert {f["id"] for f in pq_out["failures"]} == {"junk", "null"}
    parquet = _read(tmp_path / "pq-out")

    assert sorted(txt) == sorted(parquet) == chosen
    for i in chosen:
        assert txt[i][1] == parquet[i][1] == folder[i][1] == content_hash(files[i])
        v = np.stack([txt[i][0], parquet[i][0], folder[i][0]])
        assert cosine(v[:1].repeat(3, 0), v).min() >= 0.9999
        assert parquet[i][2]["label"] == i.split("/")[0] and parquet[i][2]["path"] is None


def test_import_parquet_fills_store_and_cache_without_a_model_pass(bulk_out, tree, embedder, tmp_path):
    out, manifest = bulk_out
    _, files = tree
    rows = _read(out)
    ids = sorted(rows)
    with Store(tmp_path / "data") as store:
        r = import_parquet(out, store, "photos", labels_from="folder")
        assert (r["added"], r["replaced"], r["items"], r["shards"]) == (24, 0, 24, 3)
        assert r["model_id"] == embedder.model_id
        info = store.collection("photos")
        assert info.model_id == embedder.model_id and info.count == 24 and info.labels == {"cats": 12, "dogs": 12}
        for item in store.get("photos", ids):
            assert np.array_equal(item.vector, rows[item.id][0])  # exact, as written
            assert item.sha256 == content_hash(files[item.id])
            assert item.label == item.id.split("/")[0]

        counting = CountingModel(embedder)  # the service's one cache-aside path, over this store
        service = Service(Config.from_env(environ={}, data_dir=tmp_path / "data"), store=store)
        service.start(counting)
        counting.decoded = 0  # not the warm-up
        batch = service.embed([files[i] for i in ids[:5]]).outcomes
        assert all(o.cached for o in batch) and counting.decoded == 0  # no backbone pass
        assert np.array_equal(np.stack([o.vector for o in batch]), np.stack([rows[i][0] for i in ids[:5]]))
        fresh, = service.embed([files[ids[0]] + b"\0"]).outcomes  # other bytes: a miss
        assert not fresh.cached and counting.decoded == 1
        service.models.close()

        again = import_parquet(out, store, "photos")  # idempotent
        assert (again["added"], again["replaced"]) == (0, 24)

        store.add("other", ["x"], np.ones((1, 1280), np.float32), model_id="someone-else:123")
        with pytest.raises(ModelMismatchError, match="someone-else:123.*" + re.escape(embedder.model_id)):
            import_parquet(out, store, "other")
        assert store.collection("other").count == 1  # refused before writing anything

    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    m = json.loads((partial / MANIFEST).read_text())
    (partial / MANIFEST).write_text(json.dumps({**m, "complete": False}))  # as a run that was interrupted
    with Store(tmp_path / "cache-only") as store:
        with pytest.raises(ValueError, match="did not finish.*rerun it to resume"):
            import_parquet(partial, store, "photos")
        assert store.list_collections() == []

    with Store(tmp_path / "cache-only") as store:  # no collection: the cache alone
        r = import_parquet(out, store, None)
        assert r["cached"] == 24 and store.list_collections() == []
        found = store.lookup(embedder.model_id, [rows[i][1] for i in ids])
        assert all(np.array_equal(v, rows[i][0]) for v, i in zip(found, ids))


def test_cli_bulk_embed_and_add_from_parquet(bulk_out, tree, tmp_path, capsys):
    out, _ = bulk_out
    # every shard is complete, so this reruns nothing (no Ray needed) but reports like a full run: exit 1, one failure
    assert main(["bulk-embed", str(tree[0]), "--out", str(out), "--shard-size", str(SHARD_SIZE), "-q"]) == 1
    captured = capsys.readouterr()
    assert "skipped junk.jpg: not a recognised image format" in captured.err
    assert "embedded 24 of 25 inputs (1 failed)" in captured.out and "3 shards (3 already complete)" in captured.out

    argv = ["add", "--from-parquet", str(out), "--collection", "pets", "--data-dir", str(tmp_path / "data"),
            "--label-from-folder", "-q"]
    assert main(argv) == 0
    assert "imported 24 vectors" in capsys.readouterr().out
    with Store(tmp_path / "data") as store:
        assert store.collection("pets").labels == {"cats": 12, "dogs": 12}
        assert main(argv) == 2  # a server holding the data dir: refused, saying what to do
        assert "stop it for the import" in capsys.readouterr().err
    assert main(["add", str(tree[0]), "--from-parquet", str(out), "--collection", "pets"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["add", "--collection", "pets"]) == 2
    assert "nothing to add" in capsys.readouterr().err


def test_cli_add_from_parquet_labels_from_the_shards(ray_local, bulk_out, tree, tmp_path, cache_dir, capsys):
    """`bulk-embed --label-column species` then `add --from-parquet --label-from-shards`: each item gets its own
    row's label (a null stays unlabelled); without the option none are stored and stderr says how to get them;
    shards without a label column are refused before anything is written."""
    _, files = tree
    chosen = sorted(files)[:6]
    species = ["tabby", "tabby", "mutt", None, "siamese", "mutt"]  # not the folder names: the column's own values
    pq.write_table(pa.table({"id": [f"img{n}" for n in range(6)], "image": pa.array([files[i] for i in chosen]),
                             "species": species}), tmp_path / "labelled.parquet")
    out = tmp_path / "labelled-out"
    manifest = bulk_embed(tmp_path / "labelled.parquet", out, shard_size=4, batch_size=BATCH, label_column="species",
                          cache_dir=cache_dir, progress=False)
    assert manifest["complete"] and manifest["counts"]["embedded"] == 6 and manifest["counts"]["shards"] == 2
    data = str(tmp_path / "data")
    argv = ["add", "--from-parquet", str(out), "--data-dir", data, "-q"]

    assert main([*argv, "--collection", "species", "--label-from-shards"]) == 0
    captured = capsys.readouterr()
    assert "imported 6 vectors" in captured.out and "added 6" in captured.out and captured.err == ""
    assert main([*argv, "--collection", "plain"]) == 0
    err = capsys.readouterr().err
    assert "bulk-embed --label-column species" in err and "--label-from-shards" in err
    assert main(["add", "--from-parquet", str(bulk_out[0]), "--data-dir", data, "--collection", "folders",
                 "--label-from-shards", "--index", "hnsw", "-q"]) == 2
    err = capsys.readouterr().err
    assert "have no 'label' column" in err and "--label-column" in err and "--label-from-folder" in err
    with Store(tmp_path / "data") as store:
        got = {s.id: s.label for s in store.get("species", [f"img{n}" for n in range(6)])}
        assert got == {f"img{n}": label for n, label in enumerate(species)}
        assert store.collection("species").labels == {"tabby": 2, "mutt": 2, "siamese": 1}
        assert store.collection("plain").labels == {} and store.collection("plain").unlabeled == 6
        assert "folders" not in [c.name for c in store.list_collections()]  # refused before writing anything


def test_read_inputs_orders_and_checks(tree, tmp_path):
    root, files = tree
    inputs = read_inputs(root)
    assert inputs.kind == "files" and inputs.ids == sorted([*files, "junk.jpg"])
    listing = tmp_path / "l.txt"
    listing.write_text("b.jpg\n# comment\n\na.jpg\nb.jpg\n")
    with pytest.raises(ValueError, match="'b.jpg' more than once"):
        read_inputs(listing)
    listing.write_text("b.jpg\na.jpg\n")
    inputs = read_inputs(listing)
    assert inputs.ids == ["b.jpg", "a.jpg"] and inputs.paths == [str(tmp_path / "b.jpg"), str(tmp_path / "a.jpg")]
    pq.write_table(pa.table({"id": ["a"], "text": ["not bytes"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="column 'image' is missing.*--bytes-column"):
        read_inputs(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="column 'text' is string"):
        read_inputs(tmp_path / "t.parquet", bytes_column="text")
    hf = pa.table({"image": pa.array([{"bytes": b"x", "path": "p"}],
                                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    pq.write_table(hf, tmp_path / "hf.parquet")
    inputs = read_inputs(tmp_path / "hf.parquet", id_column=None)  # Hugging Face image struct, FILE#ROW ids
    assert inputs.kind == "parquet" and inputs.ids == ["hf.parquet#0"]
    with pytest.raises(FileNotFoundError):
        read_inputs(tmp_path / "nope")


def test_import_embedder_does_not_import_ray():
    code = "import sys, embedder, embedder.bulk, embedder.cli; print('ray' in sys.modules, 'pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
