"""The head calls of the service core: train (incl. zero-shot and few-shot), predict, learning curves, which
items to label next and which labels look wrong, listing and deleting heads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .. import filters
from ..errors import (InvalidArgumentError, ItemNotFoundError, ModelMismatchError, NotFoundError,
                      NotSupportedByModelError)
from ..results import CurvePoint
from .access import READ, WRITE, AccessChecks, head_in_scope
from .embedding import Call, Item, Outcome
from .models import LoadedModel


@dataclass
class PredictRow:
    """One item's predictions: per head, its top labels and their probabilities (empty when ``error``)."""

    id: str
    cached: bool
    error: Exception | None = None
    tops: dict[str, list[tuple[str, float]]] | None = None


@dataclass
class PredictResult:
    rows: list[PredictRow]
    head_ids: list[str]
    model_id: str


class HeadCalls(AccessChecks):
    """Mixed into :class:`~embedder.core.service.Service`, whose store, model pool and checks these use."""

    def train(self, collection: str, *, head: str = "", labels: Sequence[str] = (), ids: Sequence[str] = (),
              params: Mapping[str, Any] | None = None, test_size: float = 0.0, seed: int = 0, head_id: str = "",
              adapt_to: str = "", adapt_method: str = "", where: filters.Where = None,
              class_prompts: Mapping[str, Sequence[str]] | None = None, model: str = "",
              call: Call = Call()) -> Any:
        """Train and save a head on the labelled items of ``collection`` (a :class:`classifier.TrainResult`);
        ``labels``, ``ids`` or the metadata filter ``where`` narrow them.

        ``head="zero_shot"`` builds one from ``class_prompts`` alone (:meth:`_zero_shot`); ``head="few_shot"``
        starts from those and trains on the labelled items. Stops with DeadlineError, saving nothing, once
        ``call``'s deadline passes, it cancels or the service closes (checked while waiting for the training
        before it and between steps)."""
        from classifier import InsufficientDataError
        from classifier.heads import class_vectors

        if head == "zero_shot":
            return self._zero_shot(collection, class_prompts, model=model, params=params or {}, head_id=head_id,
                                   call=call)
        if class_prompts and head != "few_shot":
            raise InvalidArgumentError("class_prompts apply to heads zero_shot and few_shot; set head to one of them "
                                       "or leave class_prompts out")
        store = self._stateful()
        self._permit(call, WRITE, collection, adapt_to)
        if head_id:  # replacing a head trained on another collection is that collection's business
            self._permit_head(call, WRITE, head_id, replacing=True)
        found_ids, X, y = store.labelled(collection, labels=list(labels) or None, ids=list(ids) or None, where=where)
        f = filters.parse(where)
        if not found_ids:
            which = (f" with label(s) {', '.join(map(repr, labels))}" if labels else "") + (
                f" whose metadata passes {filters.describe(f)}" if f is not None else "")
            raise InsufficientDataError(
                f"collection {collection!r} has no labelled items{which}; add items with labels "
                "(Add with AddItem.label, or SetLabels) and train again")
        info = store.collection(collection)
        source: dict[str, Any] = {"collection": collection, "labels": list(labels), "ids": len(ids)}
        if f is not None:
            source["where"] = filters.describe(f)
        target = None
        if adapt_to:
            target_info = store.collection(adapt_to)
            if target_info.model_id != info.model_id:
                raise ModelMismatchError(
                    f"adapt_to collection {adapt_to!r} holds vectors of model {target_info.model_id}, but "
                    f"{collection!r} holds {info.model_id}; adapt between collections of one model",
                    expected_model_id=info.model_id, other_model_id=target_info.model_id)
            _, target = store.vectors(adapt_to)
            source["adapt_to"] = adapt_to
        if head == "few_shot":
            with self.models.lease_bound(info.model_id, f"collection {collection!r}") as bound:
                prompts = self._prompt_vectors(class_prompts, bound, "few_shot", call)
            params = {**(params or {}), "prior": dict(zip(prompts, class_vectors(prompts, list(prompts))))}
        return self.heads.train(X, y, model_id=info.model_id, kind=head or "logreg", params=params or {},
                                test_size=test_size or 0.2, seed=seed, head_id=head_id or None, source=source,
                                adapt_to=target, adapt_method=adapt_method or "coral",
                                should_stop=self._should_stop(call))

    def _zero_shot(self, collection: str, class_prompts: Mapping[str, Sequence[str]] | None, *, model: str,
                   params: Mapping[str, Any], head_id: str, call: Call) -> Any:
        """A zero-shot head: the class prompts' text vectors (with a text-image model: the collection's, else
        ``model``'s), averaged per label; saved like a trained head, no labelled image needed."""
        from classifier.heads import ZeroShotHead

        self._stateful()
        self._permit(call, WRITE, collection)
        if head_id:
            self._permit_head(call, WRITE, head_id, replacing=True)
        with (self._collection_model(collection, model) if collection else self.models.lease(model)) as bound:
            vectors = self._prompt_vectors(class_prompts, bound, "zero_shot", call)
        head = ZeroShotHead.from_text(vectors, model_id=bound.model_id, **params)
        source = {"collection": collection, "class_prompts": _prompt_texts(class_prompts)}
        return self.heads.add(head, head_id=head_id or None, source=source)

    def _prompt_vectors(self, class_prompts: Mapping[str, Sequence[str]] | None, bound: LoadedModel, kind: str,
                        call: Call) -> dict[str, np.ndarray]:
        """Per label, its prompts' text vectors ``(n, dim)`` from ``bound``'s text tower (through the cache)."""
        prompts = _prompt_texts(class_prompts)
        if not bound.info.get("text"):
            raise NotSupportedByModelError(
                f"a {kind} head needs a text-image model, but model {bound.name!r} embeds images only; serve a CLIP "
                "or SigLIP folder with a transformers model card (--model-card) and use a collection of that model")
        flat = [(label, text) for label, texts in prompts.items() for text in texts]
        self.check_count(len(flat))
        outcomes = self.finish(self._start([Item(text=text) for _, text in flat], bound, call)).outcomes
        failed = next((o.error for o in outcomes if o.error is not None), None)
        if failed is not None:
            raise failed
        vectors: dict[str, list[np.ndarray]] = {}
        for (label, _), o in zip(flat, outcomes):
            vectors.setdefault(label, []).append(o.vector)
        return {label: np.stack(v) for label, v in vectors.items()}

    def predict(self, head_ids: Sequence[str], *, items: Sequence[Item] = (), ids: Sequence[str] = (),
                collection: str = "", top_k: int = 1, call: Call = Call()) -> PredictResult:
        """Apply heads (of one backbone) to images (``items``) and stored items (``ids`` of ``collection``):
        one embedding or cache hit per item, every head applied to it."""
        store = self._stateful()
        self._permit(call, READ, collection)
        self.check_count(len(items) + len(ids))
        head_ids = list(head_ids)
        if not head_ids or not all(head_ids):
            raise InvalidArgumentError("name the head(s) to apply: a head id in `head_id`, or `head_ids` with no "
                                       "empty entry")
        if len(set(head_ids)) != len(head_ids):
            raise InvalidArgumentError("a head id appears more than once in head_ids; name each head once")
        for h in head_ids:
            self._permit_head(call, READ, h)
        heads = [self.heads.get(h) for h in head_ids]  # NOT_FOUND before any embedding
        model_id = heads[0].model_id_
        other = next((h for h, head in zip(head_ids, heads) if head.model_id_ != model_id), None)
        if other is not None:
            raise ModelMismatchError(
                f"heads {head_ids[0]!r} and {other!r} take vectors of different models; one Predict embeds "
                "once, so ask for heads of one backbone together", expected_model_id=model_id,
                other_model_id=self.heads.get(other).model_id_)
        if ids and not collection:
            raise InvalidArgumentError("predicting stored items needs `collection`, the collection that holds "
                                       "the ids")
        rows: list[Outcome] = []
        if items:
            with self.models.lease_bound(model_id, f"head {head_ids[0]!r}") as bound:
                rows = self.finish(self._start(items, bound, call)).outcomes
        if ids:
            stored_model = store.collection(collection).model_id
            if stored_model != model_id:
                raise ModelMismatchError(
                    f"collection {collection!r} holds vectors of model {stored_model}, but head {head_ids[0]!r} "
                    f"takes vectors of model {model_id}", expected_model_id=model_id, other_model_id=stored_model)
            for item_id, stored in zip(ids, store.get(collection, list(ids))):
                out = Outcome(item_id, cached=True)
                if stored is None:
                    out.error = ItemNotFoundError(f"no item {item_id!r} in collection {collection!r}")
                else:
                    out.vector = stored.vector
                rows.append(out)
        good = [o for o in rows if o.error is None]
        tops = [self.heads.predict(h, np.stack([o.vector for o in good]), model_id=model_id, top_k=top_k)
                for h in head_ids] if good else []
        result, row = [], 0
        for o in rows:
            if o.error is not None:
                result.append(PredictRow(o.id, o.cached, error=o.error))
                continue
            result.append(PredictRow(o.id, o.cached, tops={
                h: [(str(lab), float(p)) for lab, p in zip(top.labels[row], top.probabilities[row])]
                for h, top in zip(head_ids, tops)}))
            row += 1
        return PredictResult(result, head_ids, model_id)

    def learning_curve(self, collection: str, *, head: str = "", labels: Sequence[str] = (),
                       params: Mapping[str, Any] | None = None, per_class: Sequence[int] = (), repeats: int = 0,
                       test_size: float = 0.0, seed: int = 0, call: Call = Call()) -> list[CurvePoint]:
        """Hold-out accuracy at growing labels per class; stops with DeadlineError once ``call``'s deadline passes,
        it cancels or the service closes (checked before every fit, so SIGTERM is not held up by a long curve)."""
        store = self._stateful()
        self._permit(call, WRITE, collection)  # trains (no head is saved, but it costs like training)
        _, X, y = store.labelled(collection, labels=list(labels) or None)
        return self.heads.learning_curve(X, y, kind=head or "logreg", params=params or {},
                                         per_class=list(per_class) or None, repeats=repeats or 5,
                                         test_size=test_size or 0.2, seed=seed,
                                         should_stop=self._should_stop(call))

    def suggest(self, collection: str, *, n: int = 0, strategy: str = "", head_id: str = "",
                ids: Sequence[str] = (), seed: int = 0, where: filters.Where = None,
                call: Call = Call()) -> Any:
        """The ``n`` (default 20) unlabelled items of ``collection`` (or of its ``ids``, or those whose metadata
        passes ``where``; the head still learns from every labelled item) most worth labelling next,
        each with its score and reason (a :class:`classifier.active.SuggestResult`); see
        :mod:`classifier.active` for the strategies. Reads stored vectors only: no backbone pass."""
        from classifier import active

        store = self._stateful()
        self._permit(call, WRITE, collection)  # may train a head (not saved), which costs like training
        self.check_count(len(ids))
        info = store.collection(collection)  # NotFoundError before any work
        labelled_ids, X_labelled, y_labelled = store.labelled(collection)
        candidates, X = self._unlabelled(store, collection, ids, set(labelled_ids), where)
        if head_id:
            self._permit_head(call, READ, head_id)
        head = self.heads.get(head_id) if head_id else None
        with self.heads.turn(self._should_stop(call), "suggestion"):  # it may train a head: not alongside others
            return active.suggest(candidates, X, X_labelled, y_labelled,
                                  n=active.DEFAULT_SUGGEST if n == 0 else n, strategy=strategy or "auto", head=head,
                                  model_id=info.model_id, seed=seed, should_stop=self._should_stop(call))

    def label_issues(self, collection: str, *, limit: int = 0, labels: Sequence[str] = (), folds: int = 0,
                     near_duplicate: float = 0.0, seed: int = 0, where: filters.Where = None,
                     call: Call = Call()) -> Any:
        """Labelled items of ``collection`` (only ``labels``' classes, and items passing ``where``, when given) whose
        label looks wrong, by confident learning on out-of-fold probabilities, and identical or near-identical items
        with different labels (a :class:`classifier.active.LabelIssuesResult`). Reads stored vectors only: no
        backbone pass."""
        from classifier import active

        store = self._stateful()
        self._permit(call, WRITE, collection)  # trains one head per fold
        ids, X, y = store.labelled(collection, labels=list(labels) or None, where=where)
        sha256s = [s.sha256 if s is not None else None for s in store.get(collection, ids)] if ids else []
        with self.heads.turn(self._should_stop(call), "label check"):  # one head per fold: in turn with trainings
            return active.find_label_issues(ids, X, y, sha256s, limit=limit or active.DEFAULT_ISSUES,
                                            folds=folds or active.DEFAULT_FOLDS,
                                            near_duplicate=near_duplicate or active.DEFAULT_NEAR_DUPLICATE,
                                            seed=seed, should_stop=self._should_stop(call))

    def list_heads(self, call: Call = Call()) -> list[Any]:
        """The saved heads; a key with an allow-list sees those trained on its collections."""
        self._stateful()
        self._permit(call, READ)
        allowed = self._allowed(call)
        return [h for h in self.heads.list() if allowed is None or head_in_scope(h.source, allowed)]

    def delete_head(self, head_id: str, *, call: Call = Call()) -> None:
        self._stateful()
        self._permit_head(call, WRITE, head_id)
        self.heads.delete(head_id)

    @staticmethod
    def _unlabelled(store: Any, collection: str, ids: Sequence[str], labelled: set[str],
                    where: filters.Where) -> tuple[list[str], np.ndarray]:
        """The unlabelled items of ``collection`` (only those of ``ids``, or passing ``where``, when given): ids and
        vectors."""
        if ids and filters.parse(where) is not None:
            raise InvalidArgumentError("choose the items by ids or by where, not both")
        if not ids:
            all_ids, X = store.vectors(collection, where=where)
            keep = [i for i, item_id in enumerate(all_ids) if item_id not in labelled]
            return [all_ids[i] for i in keep], X[keep]
        found = store.get(collection, list(ids))
        missing = [i for i, s in zip(ids, found) if s is None]
        if missing:
            raise NotFoundError(f"{len(missing)} of the ids are not in collection {collection!r} (first "
                                f"{missing[0]!r}); name items of that collection")
        chosen = [s for s in found if s is not None and s.label is None]
        dim = store.collection(collection).dim
        return [s.id for s in chosen], (np.stack([s.vector for s in chosen]) if chosen else np.zeros((0, dim)))



def _prompt_texts(class_prompts: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Checked class prompts, ``{label}`` in a prompt replaced by the label."""
    if not class_prompts:
        raise InvalidArgumentError("zero_shot and few_shot heads need class_prompts, {label: [prompt, ...]}, e.g. "
                                   "{\"cat\": [\"a photo of a {label}\"], \"dog\": [\"a photo of a {label}\"]}")
    out = {}
    for label, prompts in class_prompts.items():
        if not isinstance(label, str) or not label.strip():
            raise InvalidArgumentError("a label of class_prompts is empty; name each class")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InvalidArgumentError(f"label {label[:100]!r} has no prompts, or an empty one; give texts that "
                                       "describe it, e.g. [\"a photo of a {label}\"]")
        out[label] = [t.replace("{label}", label) for t in texts]
    return out


