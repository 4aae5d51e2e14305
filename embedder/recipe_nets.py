"""The torch graph of a recipe or ensemble (see :mod:`embedder.recipes` for what it computes and why).

One module maps the lead member's normalised images ``(N, 3, crop, crop)`` to the ``(N, dim)`` vector, so
:class:`~embedder.backbones.FrozenBackbone` wraps it, the ONNX export traces it and every runtime runs it
like a plain backbone. Resizing for a member with a smaller input is a fixed linear map (two MatMuls), which
the ONNX opset we export (17) carries exactly, unlike an antialiased Resize.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Preprocessing, load_backbone, split_layers
from .recipes import Member


class StagePool(nn.Module):
    """A backbone run block by block: the pooled, L2-normalised output of each tapped block, then of the
    whole network, concatenated and scaled to unit norm."""

    def __init__(self, stem: list[nn.Module], blocks: list[nn.Module], tail: list[nn.Module],
                 taps: list[int]) -> None:
        super().__init__()
        self.stem, self.blocks, self.tail = nn.Sequential(*stem), nn.ModuleList(blocks), nn.Sequential(*tail)
        self.taps = set(taps)  # 0-based indices of the blocks whose output is pooled
        self.scale = 1.0 / math.sqrt(len(taps) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        parts = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                parts.append(F.normalize(x.mean((2, 3)), dim=1))
        parts.append(F.normalize(self.tail(x).mean((2, 3)), dim=1))
        return torch.cat(parts, 1) * self.scale


class Final(nn.Module):
    """A backbone's own pooled vector, L2-normalised (a member without stages)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x).flatten(1), dim=1)


class MemberNet(nn.Module):
    """One member: the lead's normalised crop -> this member's input -> its vector (mirror-averaged on ``flip``)."""

    def __init__(self, body: nn.Module, lead: Preprocessing, own: Preprocessing, flip: bool) -> None:
        super().__init__()
        self.body, self.flip = body, flip
        self.renormalise = lead.mean != own.mean or lead.std != own.std
        if self.renormalise:  # lead-normalised -> own: x * (std_lead / std_own) + (mean_lead - mean_own) / std_own
            s_lead, s_own = torch.tensor(lead.std), torch.tensor(own.std)
            self.register_buffer("gain", (s_lead / s_own).view(1, 3, 1, 1))
            self.register_buffer("shift", ((torch.tensor(lead.mean) - torch.tensor(own.mean)) / s_own).view(1, 3, 1, 1))
        self.resize = own.crop != lead.crop
        if self.resize:
            self.register_buffer("rows", resize_matrix(lead.crop, own.crop, own.interpolation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            x = x * self.gain + self.shift
        if self.resize:  # rows @ x @ rows.T: the separable antialiased resize, height then width
            x = torch.matmul(torch.matmul(self.rows, x), self.rows.t())
        if not self.flip:
            return self.body(x)
        out = self.body(torch.cat([x, x.flip(3)]))
        return out.reshape(2, -1, out.shape[1]).mean(0)


class RecipeNet(nn.Module):
    """The members' vectors concatenated, scaled by 1 / sqrt(members)."""

    def __init__(self, members: list[MemberNet]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.scale = 1.0 / math.sqrt(len(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = [m(x) for m in self.members]
        return (torch.cat(out, 1) if len(out) > 1 else out[0]) * self.scale


def resize_matrix(size_in: int, size_out: int, interpolation: str) -> torch.Tensor:
    """``(size_out, size_in)`` matrix of torch's antialiased 1-D resize (``rows @ column`` resizes a column)."""
    eye = torch.eye(size_in).view(1, 1, size_in, size_in)
    rows = F.interpolate(eye, size=(size_out, size_in), mode=interpolation, antialias=True, align_corners=False)
    return rows[0, 0].contiguous()


def build_recipe(members: list[Member], lead: Preprocessing) -> nn.Module:
    """The module of a recipe or ensemble, from its members' verified weights."""
    nets = []
    for m in members:
        net = load_backbone(m.spec)
        if m.stages is None:
            body: nn.Module = Final(net)
        else:
            stem, blocks, tail = split_layers(net, m.spec.name)
            body = StagePool(stem, blocks, tail, [end - 1 for end, _ in m.stage_ends])
        nets.append(MemberNet(body, lead, m.spec.preprocessing, m.flip))
    return RecipeNet(nets).eval()
