"""Every model a name can ask for: a registered backbone (by name or model id), a fine-tuned or adapted
version saved in a data dir, or a recipe or ensemble of those (:mod:`embedder.recipes`).

The lookup callers use. It sits above the registry (:mod:`embedder.backbones`), the recipe grammar and the
recipe graph (:mod:`embedder.recipe_nets`), so those import nothing back; torch is imported only when a
recipe's module is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .backbones import BackboneSpec, Builder, list_backbones, load_derived, registered_backbone
from .errors import UnknownModelError
from .recipes import FORMS, Recipe, is_composite, parse

if TYPE_CHECKING:
    from torch import nn


def get_backbone(name: str) -> BackboneSpec:
    """Look a model up by name or by its full model id; a recipe or ensemble name (``@``, ``+``) is composed
    from its registered members. Raises :class:`UnknownModelError` naming what is registered."""
    spec = registered_backbone(name)
    base = name.partition(":")[0]
    if spec is None and is_composite(base):
        recipe = parse(base)
        spec = recipe.spec(_recipe_builder(recipe))
        if ":" in name and spec.model_id != name:
            spec = None  # a model id of another version of this recipe or of its members
    if spec is None:
        raise UnknownModelError(
            f"unknown model {name!r}; registered models: {', '.join(s.name for s in list_backbones())}, and "
            f"recipes or ensembles of them: {FORMS}. Serve your own model with a model card (--model-card, see "
            "embedder.cards) or embedder.register_local()."
        )
    return spec


def find_backbone(name: str, data_dir: str | Path) -> BackboneSpec:
    """:func:`get_backbone`, registering the fine-tuned or adapted versions saved in ``data_dir`` on first use."""
    try:
        return get_backbone(name)
    except UnknownModelError:
        load_derived(Path(data_dir) / "backbones")
        return get_backbone(name)


def _recipe_builder(recipe: Recipe) -> Builder:
    def build(_: Path) -> nn.Module:  # the lead's weights path, checked by load_backbone; each member loads its own
        from .recipe_nets import build_recipe

        return build_recipe(list(recipe.members), recipe.lead.spec.preprocessing)

    return build
