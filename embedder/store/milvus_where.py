"""Metadata filters as Milvus boolean expressions (as :mod:`.where` compiles them to SQLite), and the one way
caller text enters one: :func:`quote`."""
from __future__ import annotations

from typing import Any

from ..filters import And, Exists, Filter, In, Not, Or, kind


def quote(text: str) -> str:
    """``text`` as a Milvus string literal: backslash, quote and line breaks escaped (milvus-lite knows no ``\\u``
    escapes, so nothing else is), so no caller text can end the literal."""
    return '"' + (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
                  .replace("\t", "\\t")) + '"'


def to_milvus_expression(f: Filter) -> str:
    """The Milvus boolean expression of a filter tree, with :func:`embedder.filters.matches`'s meaning.

    Milvus alone differs from ``matches`` in three ways, each guarded: ``1 == true`` is true in Milvus (every
    comparison first checks the value's kind, recorded per item in the ``kinds`` JSON field); ``exists`` is false
    for a null value (``exists`` asks ``kinds``, which lists nulls); a comparison on a missing field is null, not
    false, so ``not`` of it dropped the item (the kind guard makes every comparison two-valued). ``in`` becomes
    an ``or`` of ``==`` (Milvus's ``in`` takes no JSON path). Field names are checked by the parser; values are
    quoted by :func:`quote`.
    """
    if isinstance(f, (And, Or)):
        return "(" + (" and " if isinstance(f, And) else " or ").join(to_milvus_expression(p) for p in f.parts) + ")"
    if isinstance(f, Not):
        return f"not {to_milvus_expression(f.part)}"
    if isinstance(f, Exists):
        return f"(exists kinds[{quote('.'.join(f.field))}])"
    if isinstance(f, In):
        return "(" + " or ".join(_compare(f.field, "==", v) for v in f.values) + ")"
    return _compare(f.field, f.op, f.value)


def _compare(field: tuple, op: str, value: Any) -> str:
    want = kind(value)
    if want == "bool" and op not in ("==", "!="):
        return "false"  # matches: booleans have no order
    path = quote(".".join(field))
    literal = ("true" if value else "false") if want == "bool" else quote(value) if want == "string" else repr(value)
    access = "metadata" + "".join(f"[{quote(part)}]" for part in field)
    return f"(exists kinds[{path}] and kinds[{path}] == {quote(want)} and {access} {op} {literal})"


def kinds_of(metadata: dict[str, Any]) -> dict[str, str]:
    """``{"exif.iso": "number", ...}``: the kind of every value a filter can name (nested objects by dotted path;
    keys holding a dot are left out: a filter's dots are nesting), nulls included."""
    found: dict[str, str] = {}
    stack: list[tuple[str, Any]] = [("", metadata)]
    while stack:
        prefix, obj = stack.pop()
        for key, value in obj.items():
            if "." in key:
                continue
            path = prefix + key
            found[path] = kind(value)
            if isinstance(value, dict):
                stack.append((path + ".", value))
    return found
