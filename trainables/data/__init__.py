"""Datasets for the training stages: Fashion-MNIST, CIFAR-10/100 and ImageNet-style folders.

`build_data(DataConfig(...), seed)` returns a `DataBundle` of train / val / train_eval datasets
whose inputs are pixel/255 minus the per-channel training mean (the model reconstructs exactly
these), with splits that depend only on the files, the config and the seed. `loader()` batches
them, fast for the in-memory datasets. No Ray, no MLflow here.
"""

from .config import DataBundle, DataConfig
from .errors import DataError
from .loading import decode_workers, loader
from .memory import InMemoryImages
from .registry import build_data, dataset_names

__all__ = ["DataBundle", "DataConfig", "DataError", "InMemoryImages", "build_data", "dataset_names", "decode_workers", "loader"]
