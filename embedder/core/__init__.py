"""The service core: plain Python under every front door (no transport in here).

- :mod:`.embedding`: the one cache-aside path of images (hash, cache, batcher, cache).
- :mod:`.models`: the model pool (load on first use, limit, eviction, leases).
- :mod:`.service`: every API call as a method of :class:`Service` (the head calls from :mod:`.heads`).
- :mod:`.access`: who may make a call (roles, collection allow-lists).
"""
from .embedding import Call, Item, Outcome
from .models import LoadedModel, ModelPool
from .service import AddItem, Service, open_data_dir

__all__ = ["AddItem", "Call", "Item", "LoadedModel", "ModelPool", "Outcome", "Service", "open_data_dir"]
