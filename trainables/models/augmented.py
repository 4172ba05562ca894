"""A classifier augmented with a decoding pathway: one module with one output type for all 7 paper models."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .decoders import DecodingPathway, level_name
from .vgg import VGG


class Output(NamedTuple):
    logits: torch.Tensor | None  # None when the caller did not ask for the head
    recons: dict[str, torch.Tensor]  # level -> reconstruction
    targets: dict[str, torch.Tensor]  # level -> what the reconstruction is compared with (same keys as recons)


class AugmentedClassifier(nn.Module):
    """A VGG encoder + head, plus an optional decoding pathway (None = the baseline)."""

    def __init__(self, encoder: VGG, pathway: DecodingPathway | None, variant: str):
        super().__init__()
        self.encoder = encoder
        self.pathway = pathway
        self.variant = variant

    @property
    def levels(self) -> list[str]:
        return self.pathway.levels if self.pathway is not None else []

    def forward(self, x: torch.Tensor, *, head: bool = True, decode: bool = True) -> Output:
        feats = self.encoder.forward_features(x)
        logits = self.encoder.forward_head(feats.pooled[-1]) if head else None
        if self.pathway is None or not decode:
            return Output(logits, {}, {})
        recons = self.pathway(feats)
        inputs = [x, *feats.pooled]  # inputs[k-1] is the input of macro-layer k
        targets = {level_name(k): inputs[k - 1] for k in range(1, len(inputs)) if level_name(k) in recons}
        return Output(logits, recons, targets)

    @torch.no_grad()
    def invert(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Image reconstructions from every encoder depth k (pool k decoded through blocks k..1)."""
        if self.pathway is None:
            return {}
        feats = self.encoder.forward_features(x)
        return {k: self.pathway.decode_from(feats, k) for k in range(1, self.encoder.num_macro_layers + 1)}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups the staged procedure trains, freezes and gives learning rates to."""
        groups = {
            "encoder": list(self.encoder.features.parameters()),
            "head": list(self.encoder.classifier.parameters()),
        }
        if self.pathway is not None:
            for k, block in enumerate(self.pathway.blocks, 1):
                groups[f"decoder{k}"] = list(block.parameters())
        return groups
