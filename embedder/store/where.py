"""A metadata filter (:mod:`embedder.filters`) compiled to a parameterised SQLite JSON1 condition on ``items``.

No caller text enters the SQL: field paths and values travel as parameters (``json_type(metadata, ?)`` with
``'$."exif"."iso"'``), and the only words spliced in are this module's constants, chosen by the tree's node
types and its operator (checked against :data:`embedder.filters.COMPARISONS`).

The condition agrees with :func:`embedder.filters.matches` row for row (tests/test_filters.py holds it to that
with random trees and metadata):

- each leaf first checks the JSON kind of the field with ``json_type`` (missing: NULL, made ''), so a missing
  field or another kind is false, and every leaf is 0 or 1, never NULL: ``NOT`` inverts whole clauses exactly;
- booleans are the JSON kinds 'true' and 'false' (``json_extract`` would turn them into 1 and 0);
- ``json_extract`` cuts a string at its first NUL character, so a string stored with one (``json.dumps`` writes
  it as ``\\u0000``) is read whole by :func:`json_string`, registered on the connection by
  :func:`embedder.store.sqlite.connect`. Text compares by UTF-8 bytes, which is code point order, as in Python.

One known difference: an integer in stored metadata beyond 64 bits is read by SQLite as the nearest double, so
it compares as that double (Python compares the exact integer).
"""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np

from ..filters import COMPARISONS, And, Compare, Exists, Filter, In, Not, Or, kind

SELECTION_CACHE_IDS = 4_000_000  # ids kept over all cached selections (32 MB)
_SQL_OP = dict(zip(COMPARISONS, ("=", "<>", "<", "<=", ">", ">=")))
_KINDS = {"number": "('integer', 'real')", "string": "('text')"}
_TYPE = "ifnull(json_type(metadata, ?), '')"  # '' for a missing field, so IN (...) is 0, not NULL
_NUMBER = "json_extract(metadata, ?)"
# the whole string even with a NUL in it; only metadata json.dumps wrote a \u0000 into pays for the Python call
_TEXT = "CASE WHEN instr(metadata, '\\u0000') THEN json_string(metadata -> ?) ELSE json_extract(metadata, ?) END"


def where_sql(f: Filter) -> tuple[str, list]:
    """``(condition, params)`` selecting the ``items`` rows whose ``metadata`` passes ``f``."""
    if isinstance(f, (And, Or)):
        parts = [where_sql(p) for p in f.parts]
        word = " AND " if isinstance(f, And) else " OR "
        return "(" + word.join(s for s, _ in parts) + ")", [v for _, params in parts for v in params]
    if isinstance(f, Not):
        sql, params = where_sql(f.part)
        return f"(NOT {sql})", params
    path = json_path(f.field)
    if isinstance(f, Exists):
        return "(json_type(metadata, ?) IS NOT NULL)", [path]
    if isinstance(f, In):
        return _in(path, f.values)
    if isinstance(f, Compare):
        return _compare(path, f.op, f.value)
    raise TypeError(f"not a filter node: {type(f).__name__}")


class Selections:
    """The ids a filter selected in a collection, kept while the collection's items stay as they were.

    Keyed by ``(cid, generation, condition)``: every add and delete moves the collection's generation on, so an
    entry never outlives the metadata it was computed from (labels are not in it: set_labels keeps the generation).
    A repeated filter then skips the metadata scan, ~1.3-1.8 ms per 1,000 items on a busy 2-core machine
    (benchmarks/bench_search.py --filters). The least recently used entries go once all hold more than ``max_ids`` ids. Not thread-safe: the
    store uses it under its SQLite mutex.
    """

    def __init__(self, max_ids: int = SELECTION_CACHE_IDS) -> None:
        self.max_ids = max_ids
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._ids = 0

    @staticmethod
    def key(cid: int, generation: int, condition: tuple[str, list]) -> tuple:
        return cid, generation, condition[0], json.dumps(condition[1])  # json keeps 1, 1.0 and true apart

    def get(self, key: tuple) -> np.ndarray | None:
        fids = self._entries.get(key)
        if fids is not None:
            self._entries.move_to_end(key)
        return fids

    def put(self, key: tuple, fids: np.ndarray) -> None:
        if len(fids) > self.max_ids:
            return
        fids.flags.writeable = False  # shared by every search that uses the entry
        self._entries[key] = fids
        self._ids += len(fids)
        while self._ids > self.max_ids:
            _, old = self._entries.popitem(last=False)
            self._ids -= len(old)


def json_path(field: tuple) -> str:
    """The JSON path of a dotted field; names are quoted (they may hold '-'), and the parser lets no quote in."""
    return "$" + "".join(f'."{name}"' for name in field)


def json_string(raw: str) -> str:
    """A stored JSON string (its raw text, quotes included) decoded whole."""
    return json.loads(raw)


def _compare(path: str, op: str, value: object) -> tuple[str, list]:
    sql_op = _SQL_OP[op]  # KeyError for anything but the six comparisons
    if kind(value) == "bool":
        if op not in ("==", "!="):
            return "0", []  # booleans have no order
        return f"({_TYPE} = ?)", [path, "true" if (value is True) == (op == "==") else "false"]
    return f"({_TYPE} IN {_KINDS[kind(value)]} AND {_value(kind(value))} {sql_op} ?)", \
        [path, *_value_params(kind(value), path), value]


def _in(path: str, values: tuple) -> tuple[str, list]:
    """``==`` against any of ``values``: one ``IN (...)`` per kind among them."""
    parts, params = [], []
    for k in ("number", "string"):
        same = [v for v in values if kind(v) == k]
        if same:
            parts.append(f"({_TYPE} IN {_KINDS[k]} AND {_value(k)} IN ({', '.join('?' * len(same))}))")
            params += [path, *_value_params(k, path), *same]
    flags = sorted({"true" if v else "false" for v in values if kind(v) == "bool"})
    if flags:
        parts.append(f"({_TYPE} IN ({', '.join('?' * len(flags))}))")
        params += [path, *flags]
    return "(" + " OR ".join(parts) + ")", params


def _value(k: str) -> str:
    return _NUMBER if k == "number" else _TEXT


def _value_params(k: str, path: str) -> list:
    return [path] if k == "number" else [path, path]
