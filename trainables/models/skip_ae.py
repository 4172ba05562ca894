"""Convolutional denoising autoencoder with symmetric skip connections (Dong, Mao, Shen & Yang 2017).

The encoder is a stack of 3x3 convolutions (stride 2 every `downsample_every` layers, width doubling there); the
decoder mirrors it with transposed convolutions, and every `skip_every` layers the matching encoder activation is
added to the decoder's (the symmetric shortcut), followed by ReLU. Pre-training corrupts the input (Gaussian
noise or masking) and reconstructs the clean image; fine-tuning reuses the encoder under a classification head
(global average pooling + linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .augmented import Output

NOISES = ("gaussian", "mask", "none")


@dataclass(frozen=True)
class SkipAEConfig:
    depth: int = 4  # conv layers in the encoder (the decoder has as many)
    width: int = 32  # channels of the first conv; doubled at every downsampling
    downsample_every: int = 2  # a stride-2 conv every this many layers
    skip_every: int = 2  # a symmetric skip connection every this many layers (0 = none)
    noise: str = "gaussian"  # input corruption during pre-training: gaussian | mask | none
    noise_level: float = 0.1  # std of the Gaussian noise, or the fraction of pixels masked to zero


def corrupt(x: torch.Tensor, noise: str, level: float) -> torch.Tensor:
    """Corrupted copy of `x` for denoising pre-training."""
    if noise == "gaussian":
        return x + level * torch.randn_like(x)
    if noise == "mask":
        return x * (torch.rand_like(x) >= level).to(x.dtype)
    if noise == "none":
        return x
    raise ValueError(f"unknown noise {noise!r}; known: {', '.join(NOISES)}")


class SkipAutoencoder(nn.Module):
    def __init__(self, config: SkipAEConfig, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        if config.noise not in NOISES:
            raise ValueError(f"unknown noise {config.noise!r}; known: {', '.join(NOISES)}")
        if config.depth < 1:
            raise ValueError("skip autoencoder depth must be >= 1")
        self.config = config
        self.variant = "skipae"
        enc, dec, channels = [], [], in_channels
        self.strides: list[int] = []
        for i in range(config.depth):
            stride = 2 if (i + 1) % config.downsample_every == 0 else 1
            width = config.width * 2 ** self.strides.count(2)
            enc.append(nn.Conv2d(channels, width, 3, stride=stride, padding=1))
            dec.insert(0, nn.ConvTranspose2d(width, channels, 3, stride=stride, padding=1, output_padding=stride - 1))
            self.strides.append(stride)
            channels = width
        self.enc = nn.ModuleList(enc)
        self.dec = nn.ModuleList(dec)
        self.head = nn.Linear(channels, num_classes)
        self.image_size = image_size

    levels = ["image"]

    def decode(self, acts: list[torch.Tensor], sizes: list[torch.Size]) -> torch.Tensor:
        h = acts[-1]
        depth = len(self.dec)
        for i, deconv in enumerate(self.dec):
            layer = depth - i  # encoder layer this deconv undoes (1-based)
            h = deconv(h, output_size=sizes[layer - 1])
            mirror = layer - 1  # encoder activation of the same size (0 = the input: no skip there)
            if i < depth - 1:
                if self.config.skip_every and mirror % self.config.skip_every == 0:
                    h = h + acts[mirror - 1]
                h = F.relu(h)
        return h

    def forward(self, x: torch.Tensor, *, head: bool = True, decode: bool = True, noisy: bool = False) -> Output:
        clean = x
        if noisy:
            x = corrupt(x, self.config.noise, self.config.noise_level)
        sizes = [x.shape[-2:]]
        acts = []
        h = x
        for conv in self.enc:
            h = F.relu(conv(h))
            acts.append(h)
            sizes.append(h.shape[-2:])
        logits = self.head(acts[-1].mean(dim=(-2, -1))) if head else None
        if not decode:
            return Output(logits, {}, {})
        return Output(logits, {"image": self.decode(acts, sizes[:-1])}, {"image": clean})

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "encoder": list(self.enc.parameters()),
            "head": list(self.head.parameters()),
            "decoder": list(self.dec.parameters()),
        }
