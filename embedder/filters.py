"""Metadata filters: one syntax for every front door, parsed once into a small tree that each store backend
compiles to its own engine (parameterised SQL for SQLite, an expression for Milvus). Standard library only.

Text form (``--where``, ``where`` fields)::

    camera == "a" and year >= 2020
    tag in ["cat", "dog"] or not exists(reviewed)
    exif.iso < 800                      # dotted names reach into nested objects

JSON form (an object; keys are AND-ed)::

    {"camera": "a", "year": {">=": 2020}, "tag": {"in": ["cat", "dog"]}, "reviewed": {"exists": false}}

Meaning, written once in :func:`matches` (every backend must agree with it; the tests hold them to it):

- a comparison is true only when the field is present and of the same kind as the value (number, string or
  boolean; ``1 == true`` is false); a missing field or a kind mismatch makes it false, ``!=`` included;
- ``<``, ``<=``, ``>``, ``>=`` compare numbers with numbers and strings with strings (by code point);
- ``in [...]`` is ``==`` against any listed value; ``exists(f)`` is true when ``f`` is present, even as null;
- ``not`` inverts its whole clause (``not year >= 2020`` is true for an item without ``year``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

from .errors import InvalidArgumentError

MAX_FILTER_CHARS = 4096
MAX_FILTER_DEPTH = 16  # nested parentheses / not / and-or levels
MAX_IN_VALUES = 1024  # values in all the `in` lists of one filter together
MAX_FILTER_LEAVES = 256  # comparisons, `in`s and `exists` in one filter: each costs a pass over the rows
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")

Value = Union[str, int, float, bool]
Where = Union[str, Mapping[str, Any], None]  # what callers pass: text, a JSON object, or nothing
Field = tuple  # the dotted path: ("exif", "iso")


@dataclass(frozen=True)
class Compare:
    field: Field
    op: str  # one of COMPARISONS
    value: Value


@dataclass(frozen=True)
class In:
    field: Field
    values: tuple


@dataclass(frozen=True)
class Exists:
    field: Field


@dataclass(frozen=True)
class And:
    parts: tuple


@dataclass(frozen=True)
class Or:
    parts: tuple


@dataclass(frozen=True)
class Not:
    part: Any


Filter = Union[Compare, In, Exists, And, Or, Not]

_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_TOKEN = re.compile(rf"""\s*(?:
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],])
  | (?P<name>{_NAME}(?:\.{_NAME})*)
  | (?P<bad>\S)
)""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "exists", "true", "false"}


def parse(where: Where) -> Filter | None:
    """The filter tree of ``where`` (text or JSON object); None when it is empty. :class:`InvalidArgumentError`
    names the part that is wrong."""
    if where is None or (isinstance(where, str) and not where.strip()) or (isinstance(where, Mapping) and not where):
        return None
    if isinstance(where, Mapping):
        return _bounded(_from_json(where, 0))
    if not isinstance(where, str):
        raise InvalidArgumentError(f"where must be text or a JSON object, got {type(where).__name__}")
    if len(where) > MAX_FILTER_CHARS:
        raise InvalidArgumentError(f"where is {len(where)} characters; at most {MAX_FILTER_CHARS}")
    stripped = where.strip()
    if stripped.startswith("{"):  # the JSON form sent as text (CLI, query strings)
        try:
            obj = json.loads(stripped)
        except ValueError as e:
            raise InvalidArgumentError(f"where looks like JSON but does not parse: {e}") from None
        if not isinstance(obj, dict):
            raise InvalidArgumentError("where in JSON form must be an object")
        return parse(obj)
    return _bounded(_Parser(where).parse())


def _bounded(f: Filter) -> Filter:
    """``f`` if it is within the width caps (the JSON form has no length cap, and every leaf and value costs
    every row a check in the engine); InvalidArgumentError if not."""
    leaves, values = 0, 0
    stack = [f]
    while stack:
        node = stack.pop()
        if isinstance(node, (And, Or)):
            stack.extend(node.parts)
        elif isinstance(node, Not):
            stack.append(node.part)
        else:
            leaves += 1
            values += len(node.values) if isinstance(node, In) else 0
    if leaves > MAX_FILTER_LEAVES or values > MAX_IN_VALUES:
        raise InvalidArgumentError(f"where has {leaves} conditions and {values} `in` values; at most "
                                   f"{MAX_FILTER_LEAVES} and {MAX_IN_VALUES}: select by a field the items share "
                                   "(add one to their metadata) instead of listing them")
    return f


def matches(f: Filter | None, metadata: Mapping[str, Any]) -> bool:
    """Whether an item's metadata passes ``f``: the reference meaning every backend compiles to."""
    if f is None:
        return True
    if isinstance(f, And):
        return all(matches(p, metadata) for p in f.parts)
    if isinstance(f, Or):
        return any(matches(p, metadata) for p in f.parts)
    if isinstance(f, Not):
        return not matches(f.part, metadata)
    present, value = _lookup(metadata, f.field)
    if isinstance(f, Exists):
        return present
    if not present:
        return False
    if isinstance(f, In):
        return any(_compare(value, "==", v) for v in f.values)
    return _compare(value, f.op, f.value)


def kind(value: Any) -> str:
    """"bool", "number", "string" or "other": the kinds comparisons keep apart."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def describe(f: Filter) -> str:
    """``f`` in the text form (for logs and messages)."""
    if isinstance(f, (And, Or)):
        word = " and " if isinstance(f, And) else " or "
        return "(" + word.join(describe(p) for p in f.parts) + ")"
    if isinstance(f, Not):
        return f"not {describe(f.part)}"
    name = ".".join(f.field)
    if isinstance(f, Exists):
        return f"exists({name})"
    if isinstance(f, In):
        return f"{name} in [{', '.join(json.dumps(v) for v in f.values)}]"
    return f"{name} {f.op} {json.dumps(f.value)}"


def _lookup(metadata: Mapping[str, Any], field: Field) -> tuple[bool, Any]:
    value: Any = metadata
    for key in field:
        if not isinstance(value, Mapping) or key not in value:
            return False, None
        value = value[key]
    return True, value


def _compare(have: Any, op: str, want: Value) -> bool:
    if kind(have) != kind(want):
        return False
    if op in ("==", "!="):
        return (have == want) == (op == "==")
    if kind(want) == "bool":
        return False
    return {"<": have < want, "<=": have <= want, ">": have > want, ">=": have >= want}[op]


def _check_value(value: Any, where: str) -> Value:
    if kind(value) not in ("bool", "number", "string"):
        raise InvalidArgumentError(f"where: {where}: a value must be a string, a number or true/false, "
                                   f"got {json.dumps(value)[:40]}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgumentError(f"where: {where}: {value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        # what SQLite and Milvus hold as an integer; write a bigger bound as a float (1e20)
        raise InvalidArgumentError(f"where: {where}: {value} is outside the 64-bit integer range; "
                                   "write it as a float (e.g. 1e20)")
    return value


def _field(name: str, where: str) -> Field:
    if not re.fullmatch(rf"{_NAME}(?:\.{_NAME})*", name) or len(name) > 256:
        raise InvalidArgumentError(f"where: {where}: {name[:40]!r} is not a field name (letters, digits, _ and -, "
                                   "dots between nested names)")
    return tuple(name.split("."))


def _from_json(obj: Mapping[str, Any], depth: int) -> Filter:
    if depth > MAX_FILTER_DEPTH:
        raise InvalidArgumentError(f"where nests deeper than {MAX_FILTER_DEPTH} levels")
    parts: list[Filter] = []
    for name, cond in obj.items():
        if name in ("$and", "$or"):
            if not isinstance(cond, list) or not cond or not all(isinstance(c, Mapping) for c in cond):
                raise InvalidArgumentError(f"where: {name} takes a non-empty list of objects")
            subs = tuple(_from_json(c, depth + 1) for c in cond)
            parts.append(And(subs) if name == "$and" else Or(subs))
            continue
        if name == "$not":
            if not isinstance(cond, Mapping) or not cond:
                raise InvalidArgumentError("where: $not takes an object")
            parts.append(Not(_from_json(cond, depth + 1)))
            continue
        field = _field(name, repr(name))
        if not isinstance(cond, Mapping):  # {"camera": "a"} is equality
            parts.append(Compare(field, "==", _check_value(cond, name)))
            continue
        if not cond:
            raise InvalidArgumentError(f"where: {name}: an empty condition object")
        for op, value in cond.items():
            if op in COMPARISONS:
                parts.append(Compare(field, op, _check_value(value, f"{name} {op}")))
            elif op == "in":
                parts.append(In(field, _in_values(value, name)))
            elif op == "exists":
                if not isinstance(value, bool):
                    raise InvalidArgumentError(f"where: {name}: exists takes true or false")
                parts.append(Exists(field) if value else Not(Exists(field)))
            else:
                raise InvalidArgumentError(f"where: {name}: unknown operator {str(op)[:20]!r}; use one of "
                                           f"{', '.join(COMPARISONS)}, in, exists")
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def _in_values(values: Any, name: str) -> tuple:
    if not isinstance(values, list) or not values:
        raise InvalidArgumentError(f"where: {name} in: takes a non-empty list of values")
    if len(values) > MAX_IN_VALUES:
        raise InvalidArgumentError(f"where: {name} in: {len(values)} values; at most {MAX_IN_VALUES}")
    return tuple(_check_value(v, f"{name} in") for v in values)


class _Parser:
    """Recursive descent over: or_expr := and_expr ("or" and_expr)*; and_expr := unary ("and" unary)*;
    unary := "not" unary | "(" or_expr ")" | "exists" "(" name ")" | name op value | name "in" "[" values "]"."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        for m in _TOKEN.finditer(text):
            kind_ = m.lastgroup
            if kind_ is None:
                break
            value, at = m.group(kind_), m.start(kind_)
            if kind_ == "bad":
                self._fail(at, f"unexpected {value!r}")
            if kind_ == "name" and value.lower() in _KEYWORDS:
                kind_ = value.lower()
            self.tokens.append((kind_, value, at))
        self.pos = 0
        self.depth = 0

    def parse(self) -> Filter:
        f = self._or()
        if self.pos < len(self.tokens):
            self._fail(self.tokens[self.pos][2], f"unexpected {self.tokens[self.pos][1]!r}")
        return f

    def _fail(self, at: int, what: str) -> None:
        raise InvalidArgumentError(f"where: {what} at character {at + 1}: {self.text[max(0, at - 20):at + 20]!r}")

    def _peek(self) -> tuple[str, str, int]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "end of the filter", len(self.text))

    def _take(self, *kinds: str) -> tuple[str, str, int]:
        tok = self._peek()
        if tok[0] not in kinds:
            wanted = " or ".join("a field name" if k == "name" else k for k in kinds)
            self._fail(tok[2], f"expected {wanted}, found {tok[1]!r}")
        self.pos += 1
        return tok

    def _nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_FILTER_DEPTH:
            self._fail(self._peek()[2], f"nesting deeper than {MAX_FILTER_DEPTH} levels")

    def _or(self) -> Filter:
        parts = [self._and()]
        while self._peek()[0] == "or":
            self.pos += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def _and(self) -> Filter:
        parts = [self._unary()]
        while self._peek()[0] == "and":
            self.pos += 1
            parts.append(self._unary())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def _unary(self) -> Filter:
        tok = self._peek()
        if tok[0] == "not":
            self.pos += 1
            self._nested()
            f: Filter = Not(self._unary())
            self.depth -= 1
            return f
        if tok[1] == "(":
            self.pos += 1
            self._nested()
            f = self._or()
            self.depth -= 1
            self._take("punct") if self._peek()[1] == ")" else self._fail(self._peek()[2], "expected ')'")
            return f
        if tok[0] == "exists":
            self.pos += 1
            if self._peek()[1] != "(":
                self._fail(self._peek()[2], "expected '(' after exists")
            self.pos += 1
            name = self._take("name")
            if self._peek()[1] != ")":
                self._fail(self._peek()[2], "expected ')' after the field name")
            self.pos += 1
            return Exists(_field(name[1], f"exists({name[1]})"))
        name = self._take("name")
        field = _field(name[1], name[1])
        tok = self._peek()
        if tok[0] == "op":
            self.pos += 1
            return Compare(field, tok[1], self._value(f"{name[1]} {tok[1]}"))
        if tok[0] == "in":
            self.pos += 1
            if self._peek()[1] != "[":
                self._fail(self._peek()[2], f"expected '[' after {name[1]} in")
            self.pos += 1
            values = [self._value(f"{name[1]} in")]
            while self._peek()[1] == ",":
                self.pos += 1
                values.append(self._value(f"{name[1]} in"))
            if self._peek()[1] != "]":
                self._fail(self._peek()[2], "expected ']' or ','")
            self.pos += 1
            return In(field, _in_values(values, name[1]))
        self._fail(tok[2], f"expected a comparison ({', '.join(COMPARISONS)}) or 'in' after {name[1]!r}, "
                           f"found {tok[1]!r}")
        raise AssertionError  # _fail raised

    def _value(self, where: str) -> Value:
        kind_, text, at = self._peek()
        self.pos += 1
        if kind_ == "string":
            body = text[1:-1]
            if text[0] == "'":  # single quotes: same escapes as JSON, the quote itself escaped
                body = body.replace("\\'", "'").replace('"', '\\"')
            try:
                return json.loads(f'"{body}"')
            except ValueError:
                self._fail(at, f"{where}: a string with a bad escape")
        if kind_ == "number":
            value = float(text) if any(c in text for c in ".eE") else int(text)
            return _check_value(value, where)
        if kind_ in ("true", "false"):
            return kind_ == "true"
        self._fail(at, f"{where}: expected a value (a quoted string, a number, true or false), found {text!r}")
        raise AssertionError
