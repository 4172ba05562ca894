"""Dataset builders by name, and `build_data`, the one entry point the training stages call."""

from __future__ import annotations

from collections.abc import Callable

from . import cifar, fashion_mnist, folders
from .config import DataBundle, DataConfig
from .errors import DataError

Builder = Callable[[DataConfig, int], DataBundle]

_BUILDERS: dict[str, Builder] = {
    "fashion_mnist": fashion_mnist.build,
    "cifar10": cifar.build_cifar10,
    "cifar100": cifar.build_cifar100,
    "imagefolder": folders.build,
}


def dataset_names() -> list[str]:
    return sorted(_BUILDERS)


def build_data(cfg: DataConfig, seed: int) -> DataBundle:
    """The datasets for `cfg`; the splits depend only on the files, `cfg` and `seed`."""
    try:
        builder = _BUILDERS[cfg.dataset]
    except KeyError:
        raise DataError(f"unknown dataset {cfg.dataset!r}; known datasets: {', '.join(dataset_names())}") from None
    return builder(cfg, seed)
