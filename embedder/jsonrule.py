"""One rule for every JSON value callers store (metadata) or send as parameters, at the door and on the way out.

Standard library only: the service core, the store and every front door apply it. The depth cap sits far below
Python's recursion limit, so no JSON value the service accepted can raise RecursionError where it is later
parsed or written (a 982-deep value passed Add but broke every Search); the size cap bounds what one item can
cost, as stored and returned.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = 64 * 1024  # per field unless the caller passes its own (metadata: Config.max_metadata_bytes)
UNREADABLE = "_unreadable"  # the one key of what is returned in place of a stored value that cannot be sent


def parse_json_object(text: str, what: str, *, max_bytes: int | None = MAX_JSON_BYTES,
                      raise_with: str = "", stored: bool = False) -> dict[str, Any]:
    """A JSON object from a ``*_json`` field; empty means ``{}``. ValueError says what is wrong.

    Refused: more than ``max_bytes`` of UTF-8 as sent or as stored and returned (None: no size cap; ``raise_with``
    names the setting that raises it), nesting deeper than :data:`MAX_JSON_DEPTH`, integers outside 64 bits, and
    anything that could not be stored as JSON. ``stored``: a value read back from the store, held to the rule as
    it was when stored (no integer range).
    """
    if not text:
        return {}
    if max_bytes is not None:  # before parsing: 30 MB of text is refused without building it
        _check_size(len(text.encode("utf-8", "surrogatepass")), max_bytes, what, raise_with)
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # nested far beyond the cap
        raise _too_deep(what) from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise _not_storable(what, e) from None
    return check_json_object(value, what, max_bytes=max_bytes, raise_with=raise_with, stored=stored)


def check_json_object(value: Any, what: str, *, max_bytes: int | None = MAX_JSON_BYTES,
                      raise_with: str = "", stored: bool = False) -> dict[str, Any]:
    """``value`` (already parsed, e.g. from an HTTP body) if it is a JSON object within the rule; ValueError if not."""
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise _too_deep(what)
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object ({{...}}), got {type(value).__name__}")
    big = None if stored else _big_int(value)
    if big is not None:  # SQLite and Milvus keep 64 bits: a filter would compare a rounded copy
        raise ValueError(f"{what} holds the integer {big}, outside the 64-bit range the store keeps exactly; store "
                         "it as a string, or as a float if rounding is fine")
    try:  # what cannot be stored must fail here, per item: infinities (1e999) and lone surrogates
        stored = dump_json(value, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError) as e:  # UnicodeEncodeError is a ValueError; TypeError: not a JSON type
        raise _not_storable(what, e) from None
    if max_bytes is not None:  # as stored and returned it can be longer ([1e15] -> [1000000000000000.0])
        _check_size(len(stored), max_bytes, what, raise_with)
    return value


def load_stored_object(text: str, what: str) -> dict[str, Any]:
    """A stored JSON object read back (no size cap; it was capped when stored). Never raises: a value that does
    not parse within the rule (stored before the depth cap existed) comes back as ``{UNREADABLE: why}``."""
    try:
        return parse_json_object(text, what, max_bytes=None, stored=True)
    except ValueError as e:
        return {UNREADABLE: str(e)}


def dump_stored(value: Mapping[str, Any] | None, what: str) -> str:
    """:func:`dump_json` of a stored object on its way out; one nested beyond :data:`MAX_JSON_DEPTH` (stored before
    the cap) is sent as ``{UNREADABLE: why}``, so one item cannot fail a whole Get or Search."""
    if value is not None and _deeper_than(value, MAX_JSON_DEPTH):
        return dump_json({UNREADABLE: f"{what} is nested more than {MAX_JSON_DEPTH} levels deep and cannot be "
                                      "returned; store it again, flattened"})
    return dump_json(value)


def dump_json(value: Any, *, allow_nan: bool = True) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=allow_nan)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and dicts nest in ``value`` more than ``limit`` levels; iterative, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _big_int(value: Any) -> int | None:
    """The first integer in ``value`` outside the signed 64-bit range, if any (iterative, like the depth check)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, int) and not isinstance(node, bool) and not -2**63 <= node < 2**63:
            return node
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _check_size(size: int, max_bytes: int, what: str, raise_with: str) -> None:
    if size > max_bytes:
        raise ValueError(f"{what} is {size:,} bytes, above the limit of {max_bytes:,}; keep large data elsewhere "
                         "and store a reference to it"
                         + (f", or raise the limit with {raise_with}" if raise_with else ""))


def _too_deep(what: str) -> ValueError:
    return ValueError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep; flatten it (objects and lists "
                      f"inside each other at most {MAX_JSON_DEPTH} times)")


def _not_storable(what: str, e: Exception) -> ValueError:
    return ValueError(f"{what} is not storable JSON ({type(e).__name__}: {str(e)[:200]}); send a JSON object of "
                      "strings, finite numbers, booleans, null, lists and objects")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
