"""A trained network as others use it: raw images in, class logits out (what an MLflow model of a study holds)."""

from __future__ import annotations

import torch


class Classifier(torch.nn.Module):
    """Images in [0, 1] (N x C x H x W) -> class logits: subtracts the training mean the network was trained with
    and runs the classifier path only (no decoding pathway)."""

    def __init__(self, network: torch.nn.Module, mean: list[float]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images - self.mean, decode=False).logits
