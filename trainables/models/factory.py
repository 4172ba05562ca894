"""One way to build any model of the study from a plain config: `create_model(config)`.

Variants: `baseline`, `{sae,swwae}-{first,all,layerwise}` (Zhang et al. 2016), `skipae` (Dong et al. 2017
denoising autoencoder with symmetric skips, pre-trained then fine-tuned) and `skipae-scratch` (the same network
trained as a classifier only, no pre-training).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import nn

from .augmented import AugmentedClassifier
from .decoders import DECODERS, PLACEMENTS, DecodingPathway
from .skip_ae import SkipAEConfig, SkipAutoencoder
from .vgg import TORCHVISION_IMAGENET_STD, VGG_CONFIGS, load_pretrained_vgg16, vgg

PAPER_VARIANTS = ("baseline",) + tuple(f"{d}-{p}" for d in DECODERS for p in PLACEMENTS)
SKIP_VARIANTS = ("skipae", "skipae-scratch")
VARIANTS = PAPER_VARIANTS + SKIP_VARIANTS
ENCODERS = tuple(VGG_CONFIGS) + ("skipae",)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines a freshly built model (its weights then come from stages)."""

    variant: str = "baseline"  # one of VARIANTS
    encoder: str = "vgg_small"  # a VGG configuration name, or "skipae" for the skip autoencoder variants
    in_channels: int = 1  # image channels (1 for Fashion-MNIST, 3 for CIFAR / ImageNet)
    num_classes: int = 10
    image_size: int = 28  # H == W of the network input, in pixels
    blocks: tuple[tuple[int, ...], ...] | None = None  # VGG override: conv widths per macro-layer
    fc: tuple[int, ...] | None = None  # VGG override: hidden widths of the head
    dropout: float | None = None  # VGG override: dropout in the head
    unpool_offset: tuple[int, int] = (1, 1)  # SAE fixed switch position in each 2x2 window (released code: (1, 1))
    pretrained: str | None = None  # vgg16 only: torchvision weights name (e.g. IMAGENET1K_V1) or a local .pth path
    skip: dict = field(default_factory=dict)  # SkipAEConfig fields for the skipae variants


def split_variant(variant: str) -> tuple[str, str]:
    """'swwae-all' -> ('swwae', 'all'); 'baseline' -> ('none', 'none'); 'skipae*' -> ('skip', 'none')."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "baseline":
        return "none", "none"
    if variant in SKIP_VARIANTS:
        return "skip", "none"
    decoder, placement = variant.split("-")
    return decoder, placement


def model_config(raw: dict) -> ModelConfig:
    """Validate a plain dict into a ModelConfig; None values keep defaults, unknown keys are refused."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(known)}")
    values = {k: v for k, v in raw.items() if v is not None}
    for key in ("blocks",):
        if key in values:
            values[key] = tuple(tuple(int(c) for c in b) for b in values[key])
    for key in ("fc", "unpool_offset"):
        if key in values:
            values[key] = tuple(int(c) for c in values[key])
    return ModelConfig(**values)


def create_model(config: ModelConfig | dict) -> nn.Module:
    """Build the model a config names; impossible combinations raise ValueError saying why."""
    cfg = config if isinstance(config, ModelConfig) else model_config(config)
    decoder, placement = split_variant(cfg.variant)
    if decoder == "skip":
        if cfg.encoder != "skipae":
            raise ValueError(f"model {cfg.variant!r} needs encoder 'skipae' (an all-convolutional encoder), got {cfg.encoder!r}")
        return SkipAutoencoder(SkipAEConfig(**cfg.skip), cfg.in_channels, cfg.num_classes, cfg.image_size)
    if cfg.encoder == "skipae":
        raise ValueError(
            f"model {cfg.variant!r} needs a VGG encoder with max pooling (its decoders unpool); "
            f"'skipae' has none. Use one of {', '.join(VGG_CONFIGS)}"
        )
    if cfg.encoder not in VGG_CONFIGS:
        raise ValueError(f"unknown encoder {cfg.encoder!r}; known: {', '.join(ENCODERS)}")
    encoder = vgg(
        cfg.encoder, cfg.in_channels, cfg.num_classes, cfg.image_size, blocks=cfg.blocks, fc=cfg.fc, dropout=cfg.dropout
    )
    if cfg.pretrained:
        if cfg.encoder != "vgg16":
            raise ValueError(f"pretrained weights exist for encoder 'vgg16' only, not {cfg.encoder!r}")
        load_pretrained_vgg16(encoder, cfg.pretrained)
        encoder.expect_input_std(TORCHVISION_IMAGENET_STD)  # the weights' own input scale (targets stay unscaled)
    pathway = None
    if decoder != "none":
        pathway = DecodingPathway(encoder.block_convs, decoder, placement, cfg.unpool_offset)
    return AugmentedClassifier(encoder, pathway, cfg.variant)
