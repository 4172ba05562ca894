"""VGG encoders built from a configuration, with macro-layers as first-class citizens.

A macro-layer is a run of 3x3 conv + ReLU followed by 2x2/stride-2 max pooling. The model keeps torchvision's
module layout (`features` as one flat Sequential, `avgpool`, `classifier`), so a torchvision `vgg16` state dict
loads into `VGG("vgg16")` unchanged, while `forward_features` exposes every pooled activation and its pooling
switches (argmax indices) for the decoding pathways.

Inputs are pixel/255 minus the channel mean (what the decoders reconstruct, as in the paper). torchvision's ImageNet
weights also divide by a channel std: a model built for them (`expect_input_std`) divides its input by that std
before the first convolution, so it sees exactly what `VGG16_Weights.IMAGENET1K_V1.transforms()` would give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VGGConfig:
    """Shape of a VGG encoder + classifier head."""

    blocks: tuple[tuple[int, ...], ...]  # output channels of each conv, grouped by macro-layer (one pool after each)
    fc: tuple[int, ...]  # hidden widths of the fully connected head (the final layer to num_classes is added)
    avgpool: int | None = None  # adaptive average pool size before the head (torchvision VGG: 7); None = flatten as is
    dropout: float = 0.5  # dropout after each hidden fc layer (torchvision VGG: 0.5)


# The std torchvision's ImageNet weights were trained with: their input is (pixel/255 - mean) / std.
TORCHVISION_IMAGENET_STD = (0.229, 0.224, 0.225)

VGG_CONFIGS: dict[str, VGGConfig] = {
    # Model D of Simonyan & Zisserman; torchvision's vgg16 layout, index for index.
    "vgg16": VGGConfig(
        blocks=((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
        fc=(4096, 4096),
        avgpool=7,
    ),
    # For 28x28 / 32x32 inputs: 28 -> 14 -> 7 -> 3 (32 -> 16 -> 8 -> 4).
    "vgg_small": VGGConfig(blocks=((32, 32), (64, 64), (128, 128)), fc=(256,), dropout=0.5),
    # Test-sized: two macro-layers, a handful of channels.
    "vgg_tiny": VGGConfig(blocks=((8,), (16,)), fc=(32,), dropout=0.0),
}


class Features(NamedTuple):
    """What the encoder hands the decoding pathways."""

    pooled: list[torch.Tensor]  # pool1..poolK, the output of each macro-layer
    switches: list[torch.Tensor]  # argmax indices of each max pooling (for SWWAE unpooling)
    sizes: list[torch.Size]  # spatial size before each pooling (to undo floor division on odd sizes)


class VGG(nn.Module):
    """A VGG classifier whose macro-layers, pooled activations and switches are visible to its callers."""

    def __init__(self, config: VGGConfig, in_channels: int = 3, num_classes: int = 1000, image_size: int = 224):
        super().__init__()
        self.config = config
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        layers: list[nn.Module] = []
        self.block_convs: list[list[tuple[int, int]]] = []  # (in, out) channels of each conv, per macro-layer
        self._pool_index: list[int] = []  # position of each macro-layer's pooling in `features`
        channels, size = in_channels, image_size
        for widths in config.blocks:
            convs = []
            for width in widths:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                convs.append((channels, width))
                channels = width
            self._pool_index.append(len(layers))
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True))
            self.block_convs.append(convs)
            size //= 2
            if size < 1:
                raise ValueError(
                    f"image_size={image_size} is too small for {len(config.blocks)} macro-layers of 2x2 pooling"
                )
        self.features = nn.Sequential(*layers)
        self.top_channels = channels
        self.top_size = config.avgpool or size
        self.avgpool = nn.AdaptiveAvgPool2d(config.avgpool) if config.avgpool else nn.Identity()
        self.classifier = self._make_head(num_classes)
        # 1/std per input channel (None: inputs used as given); not in the state dict, so torchvision's loads as is.
        self.register_buffer("input_scale", None, persistent=False)

    def expect_input_std(self, std: tuple[float, ...]) -> None:
        """Divide inputs by `std` per channel before the first convolution (weights trained on std-scaled inputs)."""
        if len(std) != self.in_channels:
            raise ValueError(f"input std has {len(std)} channels, the model {self.in_channels}")
        scale = 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.input_scale = scale.to(next(self.parameters()).device)

    def _make_head(self, num_classes: int) -> nn.Sequential:
        head: list[nn.Module] = []
        width = self.top_channels * self.top_size * self.top_size
        for hidden in self.config.fc:
            head += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(self.config.dropout)]
            width = hidden
        head.append(nn.Linear(width, num_classes))
        return nn.Sequential(*head)

    @property
    def num_macro_layers(self) -> int:
        return len(self.block_convs)

    def macro_layer(self, k: int) -> nn.Sequential:
        """Modules of macro-layer k (1-based), pooling included."""
        start = 0 if k == 1 else self._pool_index[k - 2] + 1
        return self.features[start : self._pool_index[k - 1] + 1]

    def forward_features(self, x: torch.Tensor) -> Features:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        pooled, switches, sizes = [], [], []
        for k in range(1, self.num_macro_layers + 1):
            layers = self.macro_layer(k)
            for layer in layers[:-1]:
                x = layer(x)
            sizes.append(x.shape[-2:])
            x, idx = layers[-1](x)
            pooled.append(x)
            switches.append(idx)
        return Features(pooled, switches, sizes)

    def forward_head(self, top: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(top), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x).pooled[-1])

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` classes."""
        self.num_classes = num_classes
        self.classifier = self._make_head(num_classes).to(next(self.parameters()).device)

    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's "convolution" evaluation: the head applied as convolutions over the whole image.

        The first fully connected layer becomes a (top_size x top_size) convolution and the others 1x1 convolutions;
        class scores are averaged over every position of the resulting score map. At the training resolution this
        equals `forward` (in eval mode).
        """
        top = self.forward_features(x).pooled[-1]
        if isinstance(self.avgpool, nn.AdaptiveAvgPool2d) and top.shape[-1] < self.top_size:
            top = self.avgpool(top)  # smaller than one window: fall back to the pooled head
        h = top
        first = True
        for layer in self.classifier:
            if isinstance(layer, nn.Linear):
                side = self.top_size if first else 1
                weight = layer.weight.view(layer.out_features, -1, side, side)
                h = F.conv2d(h, weight, layer.bias)
                first = False
            elif isinstance(layer, nn.ReLU):
                h = F.relu(h)
            # Dropout is the identity at evaluation time.
        return h.mean(dim=(-2, -1))


def vgg(name: str, in_channels: int = 3, num_classes: int = 1000, image_size: int = 224, **overrides) -> VGG:
    """Build a registered VGG configuration; keyword overrides (blocks, fc, avgpool, dropout) that are None keep the default."""
    if name not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG configuration {name!r}; known: {', '.join(sorted(VGG_CONFIGS))}")
    base = VGG_CONFIGS[name]
    fields = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(fields) - set(VGGConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown VGG override(s) {sorted(unknown)}; allowed: blocks, fc, avgpool, dropout")
    if "blocks" in fields:
        fields["blocks"] = tuple(tuple(int(c) for c in b) for b in fields["blocks"])
    if "fc" in fields:
        fields["fc"] = tuple(int(c) for c in fields["fc"])
    config = VGGConfig(**{**base.__dict__, **fields})
    return VGG(config, in_channels=in_channels, num_classes=num_classes, image_size=image_size)


def load_torchvision_state(model: VGG, state: dict[str, torch.Tensor] | str) -> VGG:
    """Load a torchvision VGG state dict (a dict, or a path to a `.pth` file) into `model`.

    Keys and shapes must match exactly; a mismatch raises with the offending keys named, so that a wrong
    configuration is not silently half-loaded.
    """
    if isinstance(state, str):
        state = torch.load(state, map_location="cpu", weights_only=True)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            "state dict does not fit this VGG: "
            f"missing={missing[:5]} unexpected={unexpected[:5]} "
            f"shape mismatch={[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}"
        )
    model.load_state_dict(state)
    return model


def load_pretrained_vgg16(model: VGG, weights: str) -> VGG:
    """Initialise `model` (a `vgg16`) from torchvision weights: a local `.pth` path, or a torchvision weights enum
    name such as "IMAGENET1K_V1" (downloaded by torchvision into its cache on first use). A model for another number
    of classes than the weights' keeps its own (freshly initialised) last layer."""
    if weights.endswith((".pth", ".pt")):
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        from torchvision.models import VGG16_Weights

        try:
            enum = VGG16_Weights[weights]
        except KeyError:
            raise ValueError(
                f"unknown torchvision weights {weights!r}; use a .pth path or one of {[w.name for w in VGG16_Weights]}"
            ) from None
        state = enum.get_state_dict(progress=False)
    last = f"classifier.{len(model.classifier) - 1}"
    if model.num_classes != state[f"{last}.weight"].shape[0]:
        # Another number of classes than the weights': everything but the last layer (kept freshly initialised).
        own = model.state_dict()
        state = {**state, f"{last}.weight": own[f"{last}.weight"], f"{last}.bias": own[f"{last}.bias"]}
    return load_torchvision_state(model, state)
