"""Who may make a call: one place for every door.

A call's :class:`~embedder.keys.Principal` (its API key) needs the call's role (:data:`READ`/:data:`WRITE`/
:data:`ADMIN`, see :mod:`embedder.keys`) and may name only the collections on its allow-list; a head or a job
belongs to the collection it was trained or run on. No principal (the library, a server without keys): all.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import EmbedderError, PermissionDeniedError
from ..jobs import unknown_job
from .embedding import Call

READ, WRITE, ADMIN = "read", "write", "admin"


class AccessChecks:
    """The permission checks of :class:`~embedder.core.service.Service` (it has ``heads`` and ``jobs``)."""

    heads: Any
    jobs: Any

    @staticmethod
    def _permit(call: Call, role: str, *collections: str | None) -> None:
        """Refuse a caller whose key lacks ``role`` or may not name one of ``collections`` (None/"": none named).
        Checked before the collection is looked up, so a refusal does not tell whether it exists."""
        p = call.principal
        if p is None:
            return
        if not p.has(role):
            raise PermissionDeniedError(f"API key {p.key_id} has role {p.role!r}; this call needs {role!r}: use a key "
                                        f"with that role (`embedder keys add --role {role}`, by an operator)")
        denied = next((c for c in collections if c and not p.may_see(c)), None)
        if denied is not None:
            raise PermissionDeniedError(f"API key {p.key_id} may not use collection {denied!r} (not on its "
                                        "allow-list); use a key allowed that collection")

    def _permit_head(self, call: Call, role: str, head_id: str, *, replacing: bool = False) -> None:
        """:meth:`_permit` for a saved head: a key with an allow-list may use only heads of its collections
        (:func:`head_in_scope`). One it may not use is answered as an unknown head would be, so the key learns
        neither the collections behind it nor, except when asking to replace it, that it exists."""
        self._permit(call, role)
        allowed = self._allowed(call)
        if allowed is not None:
            try:
                source = self.heads.info(head_id).source
            except EmbedderError:
                return  # no such head (or a bad id): the call itself says so
            if not head_in_scope(source, allowed):
                if replacing:
                    raise PermissionDeniedError(f"head id {head_id!r} is taken by a head this key may not use; "
                                                "choose another id")
                from classifier.registry import unknown_head

                raise unknown_head(head_id)

    def _permit_job(self, call: Call, role: str, job_id: str) -> None:
        """:meth:`_permit` for a job: a key with an allow-list may see jobs on its collections only. Another is
        answered as an unknown job would be, so the key learns neither that it exists nor its collection."""
        self._permit(call, role)
        allowed = self._allowed(call)
        if allowed is not None:
            try:
                collection = self.jobs.get(job_id).params.get("collection")
            except EmbedderError:
                return  # no such job: the call itself says so
            if collection not in allowed:
                raise unknown_job(job_id)

    @staticmethod
    def _allowed(call: Call) -> frozenset[str] | None:
        """The collections the caller may see; None: every one."""
        return None if call.principal is None else call.principal.collections


def head_in_scope(source: Mapping[str, Any] | None, allowed: frozenset[str]) -> bool:
    """Whether every collection a head was made from (trained on, adapted to) is in ``allowed``."""
    source = source or {}
    made_from = [str(source.get("collection") or ""), str(source.get("adapt_to") or "")]
    return bool(made_from[0]) and all(c in allowed for c in made_from if c)
