"""Hypothesis strategies: small random conv nets (residual, concat, split, depthwise, grouped,
flatten -> Linear) as plain specs, and the module that runs a spec (fx-traceable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

from shrink.testing import randomize_


@dataclass(frozen=True)
class Block:
    kind: str  # conv | res | cat | split | dw | group
    width: int = 0
    width2: int = 0
    groups: int = 1
    bn: bool = False
    bias: bool = False


@dataclass(frozen=True)
class Spec:
    in_ch: int
    size: int
    blocks: tuple[Block, ...]
    head: str  # pool | flatten
    out: int


class RandomNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.kinds = tuple(b.kind for b in spec.blocks)
        self.head_kind = spec.head
        self.layers = nn.ModuleList()
        c = spec.in_ch
        for b in spec.blocks:
            layer, c = _block(b, c)
            self.layers.append(layer)
        feat = c if spec.head == "pool" else c * spec.size * spec.size
        self.head = nn.Linear(feat, spec.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            if kind == "res":
                x = x + layer(x)
            elif kind == "cat":
                x = torch.cat([layer[0](x), layer[1](x)], dim=1)
            elif kind == "split":
                a, b = torch.chunk(x, 2, dim=1)
                x = torch.cat([layer[0](a), layer[1](b)], dim=1)
            else:
                x = layer(x)
        if self.head_kind == "pool":
            x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
        else:
            x = torch.flatten(x, 1)
        return self.head(x)


def _cbr(cin: int, cout: int, b: Block, groups: int = 1) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=b.bias)]
    if b.bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _block(b: Block, c: int) -> tuple[nn.Module, int]:
    if b.kind == "conv":
        return _cbr(c, b.width, b), b.width
    if b.kind == "res":
        return _cbr(c, c, b), c
    if b.kind == "cat":
        return nn.ModuleList([_cbr(c, b.width, b), _cbr(c, b.width2, b)]), b.width + b.width2
    if b.kind == "split":
        return nn.ModuleList([_cbr(c // 2, b.width, b), _cbr(c - c // 2, b.width2, b)]), \
            b.width + b.width2
    if b.kind == "dw":
        return _cbr(c, c, b, groups=c), c
    if b.kind == "group":
        return _cbr(c, b.width, b, groups=b.groups), b.width
    raise ValueError(b.kind)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    c = draw(st.integers(1, 4))
    in_ch = c
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        kinds = ["conv", "res", "cat", "dw"] + (["split"] if c % 2 == 0 else []) + (
            ["group"] if c % 2 == 0 and c >= 4 else [])
        kind = draw(st.sampled_from(kinds))
        bn, bias = draw(st.booleans()), draw(st.booleans())
        w, w2 = draw(st.integers(2, 8)), draw(st.integers(2, 8))
        if kind == "group":
            w = 2 * draw(st.integers(1, 4))
            blocks.append(Block(kind, w, groups=2, bn=bn, bias=bias))
            c = w
        elif kind in ("cat", "split"):
            blocks.append(Block(kind, w, w2, bn=bn, bias=bias))
            c = w + w2
        elif kind == "conv":
            blocks.append(Block(kind, w, bn=bn, bias=bias))
            c = w
        else:
            blocks.append(Block(kind, bn=bn, bias=bias))
    return Spec(in_ch, draw(st.sampled_from([4, 6])), tuple(blocks),
                draw(st.sampled_from(["pool", "flatten"])), draw(st.integers(1, 4)))


def build(spec: Spec, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    model = randomize_(RandomNet(spec), seed).eval()
    x = torch.randn(2, spec.in_ch, spec.size, spec.size,
                    generator=torch.Generator().manual_seed(seed))
    return model, x
