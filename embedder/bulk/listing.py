"""The inputs of a bulk job, listed in a fixed order: a folder tree, a text file of paths, or Parquet rows."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..inputs import IMAGE_SUFFIXES, image_files

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class Inputs:
    """What :func:`read_inputs` found: one id per input, in shard order, and how to load each.

    ``kind`` "files": ``paths[i]`` is the absolute path of input i. ``kind`` "parquet": input i is row
    ``i - file_offsets[f]`` of ``files[f]`` (its column ``bytes_column``).
    """

    kind: str  # "files" | "parquet"
    src: str
    ids: list[str]
    paths: list[str] | None = None
    labels: list[str | None] | None = None  # Parquet --label-column
    files: list[str] = field(default_factory=list)
    file_offsets: list[int] = field(default_factory=list)  # global index of each file's first row (+ the total)
    bytes_column: str | None = None

    def __len__(self) -> int:
        return len(self.ids)


def read_inputs(src: str | os.PathLike, *, bytes_column: str = "image", id_column: str | None = "id",
                label_column: str | None = None) -> Inputs:
    """The inputs ``src`` names, in a deterministic order.

    - a folder: its image files (``preprocess.image_files``), recursively, sorted; ids are paths relative to it
      (as ``embedder add`` names them), so a rerun on the same tree finds the same shards;
    - a ``.parquet`` file, or a folder of ``*.parquet`` files (and no images; sorted, recursively): one input per
      row, the encoded image in ``bytes_column`` (binary, or a struct with a binary ``bytes`` field as Hugging
      Face ``datasets`` writes images), its id in ``id_column`` (``None``/``""``: ``FILE#ROW``), optionally a
      label in ``label_column``;
    - any other file: a list of image paths, one per line, in that order (blank lines and ``#`` comments
      skipped); relative paths are relative to the list's folder; ids are the lines as written.

    Ids must be unique (a ValueError names the first repeat). Nothing is decoded here.
    """
    root = Path(src).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {root}")
    if root.is_dir():
        images = image_files(root)
        if images:
            ids = [f.relative_to(root).as_posix() for f in images]
            return Inputs("files", str(root), ids, paths=[str(f.absolute()) for f in images])
        tables = sorted(f for f in root.rglob("*.parquet") if f.is_file() and not f.name.startswith("."))
        if not tables:
            raise FileNotFoundError(f"no image files (or .parquet files) found under {root}")
        return _read_parquet_inputs(root, tables, bytes_column, id_column, label_column)
    if root.suffix.lower() == ".parquet":
        return _read_parquet_inputs(root.parent, [root], bytes_column, id_column, label_column)
    if root.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"{root} is one image; pass a folder, a text file listing image paths, or Parquet "
                         "(or use `embedder embed` for a few files)")
    ids, paths = [], []
    try:
        lines = root.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{root} is not a UTF-8 text file of image paths (one per line), a folder, "
                         "or a .parquet file") from None
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        ids.append(entry)
        paths.append(str((p if p.is_absolute() else root.parent / p).absolute()))
    if not ids:
        raise FileNotFoundError(f"{root} lists no image paths")
    _check_unique(ids, f"{root} lists")
    return Inputs("files", str(root), ids, paths=paths)


def _check_unique(ids: Sequence[str], where: str) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"{where} {dup!r} more than once; every input needs a unique id")


def _binary_column_type(t: "pa.DataType") -> str | None:
    """"binary" or "struct" when the column holds encoded images, else None."""
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        if idx >= 0 and (pa.types.is_binary(t.field(idx).type) or pa.types.is_large_binary(t.field(idx).type)):
            return "struct"
    return None


def _read_parquet_inputs(root: Path, tables: list[Path], bytes_column: str, id_column: str | None,
                         label_column: str | None) -> Inputs:
    import pyarrow.parquet as pq

    ids: list[str] = []
    labels: list[str | None] | None = [] if label_column else None
    offsets = [0]
    for f in tables:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        names = schema.names
        if bytes_column not in names or _binary_column_type(schema.field(bytes_column).type) is None:
            got = f"is {schema.field(bytes_column).type}" if bytes_column in names else "is missing"
            raise ValueError(f"{f}: column {bytes_column!r} {got}; it must hold the encoded image bytes (binary, or "
                             f"a struct with a binary 'bytes' field). Columns: {', '.join(names)}; pick one with "
                             "--bytes-column")
        wanted = [c for c in (id_column, label_column) if c]
        for c in wanted:
            if c not in names:
                what = "--id-column ('' for FILE#ROW ids)" if c == id_column else "--label-column"
                raise ValueError(f"{f}: no column {c!r} (columns: {', '.join(names)}); pick one with {what}")
        n = pf.metadata.num_rows
        table = pf.read(columns=wanted) if wanted else None
        name = f.relative_to(root).as_posix()
        if id_column:
            file_ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()]
            if None in file_ids:
                raise ValueError(f"{f}: column {id_column!r} has a null in row {file_ids.index(None)}; "
                                 "every row needs an id")
            ids += file_ids
        else:
            ids += [f"{name}#{r}" for r in range(n)]
        if label_column:
            labels += [None if v is None else str(v) for v in table.column(label_column).to_pylist()]
        offsets.append(offsets[-1] + n)
    if not ids:
        raise FileNotFoundError(f"{', '.join(map(str, tables))} holds no rows")
    _check_unique(ids, f"{root}: column {id_column!r} holds" if id_column else str(root))
    return Inputs("parquet", str(root), ids, labels=labels, files=[str(f.absolute()) for f in tables],
                  file_offsets=offsets, bytes_column=bytes_column)
