"""Feature recipes and backbone ensembles: models derived by name from registered backbones.

A recipe or an ensemble is part of a model's definition: its canonical name and a fingerprint of its members'
model ids and options are in its model id, so its vectors never mix with a plain backbone's in a cache, a
collection or a head. :func:`embedder.catalog.get_backbone` hands every name holding ``@`` or ``+`` to
:func:`parse`, the one parser of this grammar, and builds the model with :meth:`Recipe.spec`::

    model   := member ("+" member)*                 an ensemble: the members' vectors concatenated
    member  := backbone ["@" option ("," option)*]
    option  := "stages=" A ["-" B]                  also pool MBConv stages A..B (1-7) of the backbone
             | "flip"                               average with the horizontally mirrored image

e.g. ``mobilenet_v2@stages=5-7``, ``mobilenet_v2@flip``, ``mobilenet_v2+efficientnet_lite2@stages=6-7,flip``.
At most :data:`MAX_MEMBERS` members, each named once, and :data:`MAX_NAME_CHARS` characters; digits are ASCII.
None of ``@ + , =`` may appear in a backbone, card or fine-tuned name, nor ``:`` (model ids) in a recipe.

A member's vector: the global-average-pooled output of each chosen stage and the backbone's own final vector,
each L2-normalised (so a 16-channel stage weighs as much as the 1280-d final vector before a head
standardises them), concatenated and divided by sqrt(parts) (unit norm); with ``flip``, the mean of that
vector for the image and for its mirror. An ensemble concatenates its members' vectors divided by
sqrt(members). Everything runs inside one torch module (``embedder.recipe_nets``), exported to ONNX and run
by the default runtime like any backbone. This module knows the grammar and the registry below it, never
torch: naming a recipe costs no import.

An ensemble decodes each image once, with the preprocessing of its member with the largest crop (the first
on a tie); each other member gets that crop resized to its own input size inside the graph (antialiased,
its own interpolation) and renormalised with its own mean/std. So such a member sees a slightly different
crop than it does alone (e.g. mobilenet_v2 inside ``mobilenet_v2+efficientnet_lite2`` sees efficientnet's
260/292 centre crop instead of its own 224/256): its slice is close to, not equal to, its standalone vector.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .backbones import BackboneSpec, Builder, list_backbones, registered_backbone
from .errors import InvalidArgumentError, UnknownModelError

# The MBConv stages of each architecture: (index of the stage's last block, counted from 1; its channels).
STAGES: dict[str, tuple[tuple[int, int], ...]] = {
    "mobilenet_v2": ((1, 16), (3, 24), (6, 32), (10, 64), (13, 96), (16, 160), (17, 320)),
    "efficientnet_lite0": ((1, 16), (3, 24), (5, 40), (8, 80), (11, 112), (15, 192), (16, 320)),
    "efficientnet_lite2": ((1, 16), (4, 24), (7, 48), (11, 88), (15, 120), (20, 208), (21, 352)),
}
_STAGES_OPTION = re.compile(r"stages=(\d{1,2})(?:-(\d{1,2}))?", re.ASCII)  # ASCII digits only, not "５" or "٥"
# Caps checked before anything is built: each member's graph costs seconds of CPU to build and export and
# megabytes of ONNX cache, and a member named twice adds compute but no information. Every valid name fits in
# 400: 4 members, each a name of at most 83 characters (a fine-tuned version: a backbone, ".", a 64-character
# suffix) and at most 16 of options ("@stages=A-B,flip"), and 3 "+".
MAX_MEMBERS = 4
MAX_NAME_CHARS = 400
FORMS = ("NAME@stages=A-B (MBConv stages A..B, 1-7, pooled beside the final vector), NAME@flip (mirror "
         f"averaging), NAME@stages=A-B,flip, and ensembles NAME+NAME[+...] of up to {MAX_MEMBERS} different such "
         "members, e.g. mobilenet_v2+efficientnet_lite2@stages=6-7,flip")
# What `embedder models` shows (measured in the README's bench_train recipes table).
EXAMPLES = ("mobilenet_v2@stages=5-7", "mobilenet_v2@stages=5-7,flip", "mobilenet_v2+efficientnet_lite2",
            "mobilenet_v2@stages=5-7+efficientnet_lite2@stages=5-7")


@dataclass(frozen=True)
class Member:
    """One backbone of a recipe model and its options."""

    spec: BackboneSpec
    stages: tuple[int, int] | None = None  # first and last stage pooled beside the final vector
    flip: bool = False

    @property
    def name(self) -> str:
        options = ([f"stages={self.stages[0]}" + (f"-{self.stages[1]}" if self.stages[1] != self.stages[0] else "")]
                   if self.stages else []) + (["flip"] if self.flip else [])
        return self.spec.name + ("@" + ",".join(options) if options else "")

    @property
    def stage_ends(self) -> list[tuple[int, int]]:
        """(last block, channels) of each pooled stage."""
        return [] if self.stages is None else list(STAGES[self.spec.name][self.stages[0] - 1:self.stages[1]])

    @property
    def dim(self) -> int:
        return self.spec.dim + sum(channels for _, channels in self.stage_ends)


def is_composite(name: str) -> bool:
    """Whether ``name`` (a name, not a model id) names a recipe or an ensemble."""
    return "@" in name or "+" in name


@dataclass(frozen=True)
class Recipe:
    """A parsed model name: its members, in order (a plain backbone is one member without options)."""

    members: tuple[Member, ...]

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.members)

    @property
    def lead(self) -> Member:
        """The member whose preprocessing decodes the images: the largest crop, the first on a tie."""
        return max(self.members, key=lambda m: m.spec.preprocessing.crop)  # max() keeps the first on a tie

    def spec(self, build: Builder) -> BackboneSpec:
        """This recipe's model: its own name, dim and model id, the lead's preprocessing; ``build`` makes its
        torch module (:func:`embedder.recipe_nets.build_recipe`, bound by :mod:`embedder.catalog`)."""
        members = self.members
        fingerprint = hashlib.sha256(" ".join(f"{m.name}={m.spec.model_id}" for m in members).encode()).hexdigest()
        kind = "ensemble" if len(members) > 1 else "recipe"
        return BackboneSpec(
            name=self.name,
            dim=sum(m.dim for m in members),
            preprocessing=self.lead.spec.preprocessing,
            # load_backbone checks this file before building; build loads (and checks) every member's own
            weights=self.lead.spec.weights,
            build=build,
            description=f"{kind}: {_describe(members)}",
            features_only=True,
            recipe=f"r{fingerprint[:10]}",
        )


def parse(name: str) -> Recipe:
    """Parse ``name`` (see the module docstring for the grammar).

    Raises :class:`InvalidArgumentError` naming the valid forms for a malformed name, an option a member
    does not support, a name beyond :data:`MAX_NAME_CHARS` or :data:`MAX_MEMBERS`, or a member named twice;
    :class:`UnknownModelError` for an unknown backbone.
    """
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgumentError(f"model name of {len(name)} characters ({name[:40]!r}...): a recipe or ensemble "
                                   f"name has at most {MAX_NAME_CHARS}; valid forms: {FORMS}")
    parts = name.split("+")
    if len(parts) > MAX_MEMBERS:
        raise InvalidArgumentError(f"model {name[:80]!r} has {len(parts)} members: an ensemble has at most "
                                   f"{MAX_MEMBERS}; valid forms: {FORMS}")
    members = tuple(_member(part, name) for part in parts)
    names = [m.name for m in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidArgumentError(f"model {name!r} names {', '.join(twice)} twice: a repeated member doubles the "
                                   f"compute and adds nothing; name each member once (valid forms: {FORMS})")
    return Recipe(members)


def _member(text: str, full: str) -> Member:
    backbone, _, options = text.partition("@")
    if not backbone:
        raise InvalidArgumentError(f"model {full!r} has an empty member; valid forms: {FORMS}")
    spec = registered_backbone(backbone)
    if spec is None:
        raise UnknownModelError(f"unknown model {backbone!r} in {full!r}; registered models: "
                                f"{', '.join(s.name for s in list_backbones())}; valid forms: {FORMS}")
    if spec.exporter is not None or spec.torchscript or spec.has_text:
        raise InvalidArgumentError(
            f"{spec.name!r} cannot be part of a recipe or ensemble: those are built from torch image backbones "
            "(the built-in ones, fine-tuned ones, timm/transformers image cards), not ONNX or TorchScript files "
            "or text-image models; serve it on its own")
    stages, flip = None, False
    for option in options.split(",") if "@" in text else []:
        match = _STAGES_OPTION.fullmatch(option)
        if option == "flip" and not flip:
            flip = True
        elif match and stages is None:
            first, last = int(match[1]), int(match[2] or match[1])
            if spec.name not in STAGES:
                raise InvalidArgumentError(f"stages= needs one of {', '.join(STAGES)}, not {spec.name!r}; "
                                           f"use {spec.name}@flip or an ensemble")
            if not 1 <= first <= last <= len(STAGES[spec.name]):
                raise InvalidArgumentError(f"stages={option[7:]} in {full!r}: need 1 <= A <= B <= "
                                           f"{len(STAGES[spec.name])} (stages A..B of {spec.name})")
            stages = (first, last)
        else:
            raise InvalidArgumentError(f"model {full!r}: unknown or repeated option {option!r}; valid forms: {FORMS}")
    return Member(spec, stages, flip)


def _describe(members: tuple[Member, ...]) -> str:
    parts = []
    for m in members:
        pooled = (f"stages {m.stages[0]}-{m.stages[1]} ({'+'.join(str(c) for _, c in m.stage_ends)}) + "
                  if m.stages else "")
        parts.append(f"{m.spec.name}: {pooled}final {m.spec.dim}" + (", mirror-averaged" if m.flip else ""))
    return "; ".join(parts) + ", each L2-normalised, concatenated"
