"""The model pool: the backbones a service embeds with, each behind its own batcher.

The default model loads at start; any other (a registered backbone, a fine-tuned version) loads on first use,
one load at a time. At ``max_models`` the least recently used model that no call is using is closed to make
room; when every model is in use the call gets :class:`TooManyModelsError`. Calls hold a model with
:meth:`ModelPool.lease` for as long as its batcher works for them, so a model is never closed under a call.

A store node (``role="store"``) has no local model: its one model is the embedding pool behind a
:class:`embedder.remote.RemoteBatcher`.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ..config import Config
from ..errors import (CollectionMismatchError, EmbedderError, TooManyModelsError, UnknownModelError,
                      WeightsNotFoundError)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    """One backbone the service embeds with: its pipeline, its batcher, its info; ``leases`` calls use it now."""

    embedder: Any
    batcher: Any  # embedder.batcher.Batcher or embedder.remote.RemoteBatcher: submit(...) -> futures
    info: dict[str, Any]
    owned: bool = True  # closed with the pool (False: the caller passed the embedder in and closes it)
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def model_id(self) -> str:
        return self.info["model_id"]

    @property
    def dim(self) -> int:
        return self.info["dim"]

    @property
    def name(self) -> str:
        return self.info["name"]

    def matches(self, name: str) -> bool:
        return name in (self.name, self.model_id)

    def close(self, timeout: float | None) -> None:
        self.batcher.close(timeout=timeout)
        if self.owned:
            self.embedder.close()


class ModelPool:
    """Load, lend and close the service's models.

    ``on_load(info)`` is told of every model loaded, ``on_death(reason)`` when a batcher's worker dies;
    ``batch_hooks`` go to every local batcher (``on_batch``, ``on_drop``).
    """

    def __init__(self, config: Config, *, on_load: Callable[[dict], None] | None = None,
                 on_death: Callable[[str], None] | None = None, batch_hooks: dict[str, Any] | None = None) -> None:
        self.config = config
        self._on_load = on_load
        self._on_death = on_death
        self._batch_hooks = batch_hooks or {}
        # asked once when a name is unknown, before giving up: e.g. fetch versions made on other replicas
        self.on_unknown: Callable[[], Any] | None = None
        self._models: list[LoadedModel] = []  # the default first
        self._lock = threading.Lock()  # guards _models and leases
        self._load_lock = threading.Lock()  # one load at a time; a second caller of the same model waits
        self._closed = False

    def start(self, embedder: Any = None) -> LoadedModel:
        """Load and warm up the default model (``embedder`` if given: the pool does not close it)."""
        cfg = self.config
        if cfg.role == "store":
            from ..remote import RemoteBatcher, RemoteEmbedder, pool_client

            batcher = RemoteBatcher(pool_client(cfg), on_death=self._on_death)
            try:
                model = LoadedModel(RemoteEmbedder(cfg, batcher), batcher, {})
            except BaseException:
                batcher.close(timeout=0)
                raise
            model.info.update(model.embedder.info())
            log.info("embedding through the pool at %s (%s)", cfg.embed_target, model.model_id)
        elif embedder is not None:
            model = self._warm(embedder, owned=False)
        else:
            model = self._load(cfg.model)
        self._add(model)
        return model

    @property
    def default(self) -> LoadedModel:
        if not self._models:
            raise RuntimeError("ModelPool.start() has not run")
        return self._models[0]

    @property
    def models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models)

    @property
    def queue_depth(self) -> int:
        return sum(m.batcher.queue_depth for m in self.models)

    @contextmanager
    def lease(self, name: str = "") -> Iterator[LoadedModel]:
        """The model ``name`` (a backbone name or model id; empty: the default), loaded on first use, held
        for the ``with`` block."""
        model = self.acquire(name)
        try:
            yield model
        finally:
            self.release(model)

    @contextmanager
    def lease_bound(self, model_id: str, what: str) -> Iterator[LoadedModel]:
        """Like :meth:`lease` for the model a collection or head is bound to: one this server cannot load is
        a :class:`CollectionMismatchError` naming ``what``."""
        try:
            model = self.acquire(model_id)
        except (UnknownModelError, WeightsNotFoundError) as e:
            raise CollectionMismatchError(f"{what} holds vectors of model {model_id}, which this server cannot "
                                          f"load ({e}); a fine-tuned version lives in the data dir of the server "
                                          "that made it (and, with a Milvus store, in Milvus): copy its folder "
                                          "under backbones/ there into this server's data dir") from None
        try:
            yield model
        finally:
            self.release(model)

    def acquire(self, name: str = "") -> LoadedModel:
        """Lease the model ``name`` until :meth:`release` (prefer :meth:`lease`; this is for a lease that
        crosses threads, like a stream's)."""
        found = self._find(name)
        if found is not None:
            return found
        with self._load_lock:
            found = self._find(name)
            if found is not None:
                return found
            if self.config.role == "store":
                raise UnknownModelError(f"this store node embeds only with its pool's model, not {name[:100]!r}; "
                                        "run replicas of that model and a store node for them")
            self._make_room()
            model = self._load(name)
            model.leases = 1
            self._add(model)
            log.info("loaded model %s on first use", model.model_id)
            return model

    def release(self, model: LoadedModel) -> None:
        """Give back a model from :meth:`acquire`."""
        with self._lock:
            model.leases -= 1
            model.last_used = time.monotonic()

    def close(self, timeout: float | None = None) -> None:
        """Close every batcher (waiting up to ``timeout`` for queued items) and every model the pool loaded."""
        with self._lock:
            self._closed, models = True, list(self._models)
        for model in models:
            model.close(timeout)

    # ------------------------------------------------------------------ internals

    def _find(self, name: str) -> LoadedModel | None:
        name = canonical(name)
        with self._lock:
            found = self._models[0] if not name and self._models else next(
                (m for m in self._models if m.matches(name)), None)
            if found is not None:
                found.leases += 1
            return found

    def _make_room(self) -> None:
        """Close the least recently used idle model (never the default) if the pool is full."""
        with self._lock:
            if len(self._models) < self.config.max_models:
                return
            idle = [m for m in self._models[1:] if m.leases == 0]
            if not idle:
                names = ", ".join(m.name for m in self._models)
                raise TooManyModelsError(
                    f"this server holds {len(self._models)} models ({names}), its limit (max_models), and every "
                    "one is in use; retry shortly, raise --max-models / EMBEDDER_MAX_MODELS, or ask another server")
            victim = min(idle, key=lambda m: m.last_used)
            self._models.remove(victim)
        log.info("closing model %s (least recently used) to load another", victim.model_id)
        victim.close(timeout=self.config.grace_seconds)

    def _add(self, model: LoadedModel) -> None:
        with self._lock:
            if self._closed:
                model.close(timeout=0)
                raise RuntimeError("the model pool is closed")
            self._models.append(model)
        if self._on_load is not None:
            self._on_load(model.info)

    def _load(self, name: str) -> LoadedModel:
        from ..pipeline import Embedder  # the ML stack loads with the first local model, not with the pool

        config = dataclasses.replace(self.config, model=name)
        try:
            embedder = Embedder(config=config)
        except UnknownModelError:
            if self.on_unknown is None:
                raise
            self.on_unknown()
            embedder = Embedder(config=config)
        try:
            return self._warm(embedder, owned=True)
        except BaseException:
            embedder.close()
            raise

    def _warm(self, embedder: Any, *, owned: bool) -> LoadedModel:
        """A batcher around ``embedder``, warmed up with one image through decode, batcher and model, and the
        model with every batch size it will run: no caller waits for a first-use compile."""
        from ..batcher import Batcher

        cfg = self.config
        batcher = Batcher(embedder, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms,
                          max_batch_pixels=cfg.max_batch_pixels, max_queue=cfg.max_queue,
                          on_death=self._on_death, **self._batch_hooks)
        try:
            info = embedder.info()
            crop = int(info["input_size"])
            start = time.monotonic()
            batcher.submit([np.full((crop, crop, 3), 128, np.uint8)])[0].result()
            embedder.warm_up()
            log.info("%s: warm-up forward took %.2fs", info["model_id"], time.monotonic() - start)
        except BaseException:
            batcher.close(timeout=0)
            raise
        return LoadedModel(embedder, batcher, info, owned=owned)


def canonical(name: str) -> str:
    """A recipe or ensemble name as the registry spells it (``@flip,stages=5-7`` is ``@stages=5-7,flip``), so one
    model asked for in two spellings is loaded once; other names, and malformed ones (the load says why), as given."""
    from ..recipes import is_composite, parse

    if not is_composite(name) or ":" in name:  # a model id has ':'; the registry resolves those itself
        return name
    try:
        return parse(name).name
    except EmbedderError:
        return name
