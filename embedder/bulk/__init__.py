"""Bulk embedding on Ray Data: a folder tree, a list of paths or a Parquet dataset -> Parquet shards + a manifest.

    embedder bulk-embed photos/ --out vectors/                           # starts a local Ray on this machine
    embedder bulk-embed paths.txt --out vectors/ --ray-address ray://head:10001
    embedder bulk-embed images.parquet --out vectors/ --bytes-column image --id-column id
    embedder add --from-parquet vectors/ --collection pets --data-dir embedder-data   # no backbone pass

The same code as the service, no second pipeline: CPU tasks read each input and decode + preprocess it with
the backbone's own :class:`embedder.preprocess.Preprocessor` and its :meth:`~embedder.preprocess.Preprocessor.prepare`
(same errors, same pixels), and an actor pool runs :meth:`Embedder.embed_arrays` (one
:class:`~embedder.Embedder` per actor; one GPU per actor when the cluster has GPUs, CPU actors otherwise).

**Output** (``--out DIR``): ``part-00000.parquet``, ... with one row per embedded input: ``id``, ``path``
(file inputs; null for Parquet inputs), ``sha256`` of the encoded bytes, ``model_id``, ``vector``
(``fixed_size_list<float32>[dim]``) and ``label`` when ``--label-column`` was given; and ``manifest.json``:
model id, dim, counts, the shard list, every input that failed with its error, the settings and the time.

**Shards** are deterministic: inputs in a fixed order (a folder: sorted paths; a list: its order; Parquet:
files sorted by name, rows in order) cut into ``shard_size`` runs. Each shard is written atomically (temp
file, fsync, rename) by the driver once all its rows are back, and carries its own metadata (Parquet
key-value ``embedder.bulk``: its inputs' count and digest, the model fingerprint, its failures). A rerun
skips every shard whose file is complete for the same inputs and model, so an interrupted job resumes
where it stopped; a shard whose inputs changed is recomputed. Resumption keys on ids (paths), not on file
contents: a file edited in place under the same name is not re-embedded.

**Clusters**: with ``--ray-address`` the job is submitted to that cluster. Every node needs this package and
the backbone's weights installed (the same versions), and file inputs must be paths every node can read
(a shared filesystem); Parquet inputs likewise. Without it, a private local Ray instance is started
(``address="local"``: never another user's cluster on the same machine) and shut down at the end.

Ray is imported inside the functions that need it: ``import embedder`` never pulls it in, and without it
installed ``bulk-embed`` says ``pip install 'embedder[scale]'``. The pipeline (torch) is imported only where
inputs are decoded or the model runs, so ``embedder bulk-embed --help`` and ``add --from-parquet`` stay light.

Modules of one job each: ``listing.py`` (the inputs, in order), ``shards.py`` (the output folder's format),
``ray_pipeline.py`` (decode tasks, embedding actors, the driver loop), ``job.py`` (:func:`bulk_embed`),
``parquet_import.py`` (:func:`import_parquet`).
"""
from __future__ import annotations

from .job import bulk_embed
from .listing import Inputs, read_inputs
from .parquet_import import import_parquet
from .ray_pipeline import ScaleNotInstalledError
from .shards import MANIFEST

__all__ = ["MANIFEST", "Inputs", "ScaleNotInstalledError", "bulk_embed", "import_parquet", "read_inputs"]
