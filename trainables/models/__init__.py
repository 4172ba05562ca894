"""Models of the study: VGG encoders, decoding pathways, the skip autoencoder, and one factory for all of them."""

from .augmented import AugmentedClassifier, Output
from .decoders import DecodingPathway, fixed_switches, level_name, unpool
from .factory import PAPER_VARIANTS, VARIANTS, ModelConfig, create_model, model_config, split_variant
from .groups import set_trainable, optimizer_groups
from .skip_ae import SkipAutoencoder, corrupt
from .vgg import VGG, VGG_CONFIGS, load_torchvision_state, vgg

__all__ = [
    "AugmentedClassifier", "DecodingPathway", "ModelConfig", "Output", "PAPER_VARIANTS", "SkipAutoencoder", "VARIANTS",
    "VGG", "VGG_CONFIGS", "corrupt", "create_model", "fixed_switches", "level_name", "load_torchvision_state",
    "model_config", "optimizer_groups", "set_trainable", "split_variant", "unpool", "vgg",
]
