"""The head kinds by name: :data:`HEADS` (:data:`LABEL_HEADS` of them fit on labels alone), :func:`make_head` and
:func:`head_params`."""
from __future__ import annotations

from typing import Any

from .base import Head
from .logreg import LogRegHead
from .svm import LinearSVMHead, SVMHead
from .validation import HeadError
from .zero_shot import FewShotHead, ZeroShotHead

HEADS: dict[str, type[Head]] = {h.kind: h for h in (LogRegHead, LinearSVMHead, SVMHead, ZeroShotHead, FewShotHead)}
# The kinds fitted on labelled vectors alone; zero_shot is built from text, few_shot needs a text prior as well.
LABEL_HEADS = ("logreg", "linear_svm", "svm")


def make_head(kind: str, **params: Any) -> Head:
    """A new, unfitted head of ``kind`` (``logreg``, ``linear_svm``, ``svm``, ``zero_shot``, ``few_shot``) with
    ``params``."""
    return _kind(kind)._create(**params)


def head_params(kind: str) -> dict[str, Any]:
    """The options of head ``kind`` and their defaults."""
    return _kind(kind)._options()


def _kind(kind: str) -> type[Head]:
    cls = HEADS.get(kind)
    if cls is None:
        raise HeadError(f"unknown head kind {kind!r}; choose one of {', '.join(HEADS)}")
    return cls
