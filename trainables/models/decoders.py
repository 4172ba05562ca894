"""Decoding pathways that mirror a VGG encoder, macro-layer by macro-layer (Zhang, Lee & Lee 2016).

Decoder block k undoes encoder macro-layer k: unpool, then one 3x3 convolution per encoder conv in reverse order,
each producing the input channel count of the conv it mirrors. Its output reconstructs the input of macro-layer k:
the image for k = 1, pool(k-1) otherwise. ReLU follows every decoder conv except the very last one (to image
channels), which is linear.

Unpooling is one operation with two sources of switches:
- SAE: fixed switches, each pooled value placed at one offset of its 2x2 window (released code: (1, 1));
- SWWAE: the encoder's own argmax switches ("where"); they are integers, so no gradient flows into them.

Placements decide what feeds each block and where losses sit:
- first: blocks chained top-down from poolK to the image; one loss, on the image;
- all: the same chain; a loss at every block's output;
- layerwise: block k fed by the encoder's own pool k; a loss at every block's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vgg import Features

DECODERS = ("sae", "swwae")
PLACEMENTS = ("first", "all", "layerwise")


def level_name(k: int) -> str:
    """Name of the activation that decoder block k reconstructs: 'image' for k = 1, else 'pool{k-1}'."""
    return "image" if k == 1 else f"pool{k - 1}"


def fixed_switches(pooled: torch.Tensor, size: torch.Size, offset: tuple[int, int]) -> torch.Tensor:
    """Flat indices (as max_pool2d returns them) that put every pooled value at `offset` of its 2x2 window."""
    h, w = pooled.shape[-2:]
    dy, dx = offset
    rows = torch.arange(h, device=pooled.device) * 2 + dy
    cols = torch.arange(w, device=pooled.device) * 2 + dx
    flat = rows[:, None] * size[-1] + cols[None, :]
    return flat.expand_as(pooled)


def unpool(pooled: torch.Tensor, switches: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Place each pooled value at its switch position in a zero map of spatial `size` (odd sizes included)."""
    return F.max_unpool2d(pooled, switches, kernel_size=2, stride=2, output_size=size)


class DecoderBlock(nn.Module):
    """Unpool, then the mirrored convolutions of one encoder macro-layer."""

    def __init__(self, encoder_convs: list[tuple[int, int]], linear_output: bool):
        super().__init__()
        layers: list[nn.Module] = []
        mirrored = [(out, inp) for inp, out in reversed(encoder_convs)]
        for i, (cin, cout) in enumerate(mirrored):
            layers.append(nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1))
            if not (linear_output and i == len(mirrored) - 1):
                layers.append(nn.ReLU(inplace=True))
        self.convs = nn.Sequential(*layers)
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, switches: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.convs(unpool(x, switches, size))


class DecodingPathway(nn.Module):
    """All decoder blocks for one encoder, with one kind of unpooling and one placement of the losses."""

    def __init__(
        self,
        block_convs: list[list[tuple[int, int]]],
        decoder: str,
        placement: str,
        unpool_offset: tuple[int, int] = (1, 1),
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; known: {', '.join(DECODERS)}")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; known: {', '.join(PLACEMENTS)}")
        if tuple(unpool_offset) not in {(0, 0), (0, 1), (1, 0), (1, 1)}:
            raise ValueError(f"unpool_offset must be a cell of the 2x2 window, got {unpool_offset}")
        self.decoder = decoder
        self.placement = placement
        self.unpool_offset = tuple(unpool_offset)
        # blocks[k-1] is decoder block k; only block 1 ends with a linear conv (to image channels).
        self.blocks = nn.ModuleList(DecoderBlock(convs, linear_output=(k == 1)) for k, convs in enumerate(block_convs, 1))

    @property
    def levels(self) -> list[str]:
        """Levels that carry a reconstruction loss under this placement, top-down."""
        if self.placement == "first":
            return ["image"]
        return [level_name(k) for k in range(len(self.blocks), 0, -1)]

    def _switches(self, feats: Features, k: int, x: torch.Tensor) -> torch.Tensor:
        if self.decoder == "swwae":
            return feats.switches[k - 1]
        return fixed_switches(x, feats.sizes[k - 1], self.unpool_offset)

    def block(self, k: int, x: torch.Tensor, feats: Features) -> torch.Tensor:
        return self.blocks[k - 1](x, self._switches(feats, k, x), feats.sizes[k - 1])

    def decode_from(self, feats: Features, depth: int) -> torch.Tensor:
        """Image reconstructed from the encoder's own pool `depth` through blocks depth..1 (invertibility)."""
        h = feats.pooled[depth - 1]
        for k in range(depth, 0, -1):
            h = self.block(k, h, feats)
        return h

    def forward(self, feats: Features) -> dict[str, torch.Tensor]:
        """Reconstructions keyed by level, for exactly the levels this placement puts a loss on."""
        depth = len(self.blocks)
        if self.placement == "layerwise":
            return {level_name(k): self.block(k, feats.pooled[k - 1], feats) for k in range(depth, 0, -1)}
        out: dict[str, torch.Tensor] = {}
        h = feats.pooled[-1]
        for k in range(depth, 0, -1):
            h = self.block(k, h, feats)
            out[level_name(k)] = h
        return out if self.placement == "all" else {"image": out["image"]}
