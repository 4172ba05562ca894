"""What a training stage asks for (`DataConfig`) and what it gets back (`DataBundle`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.utils.data

from .errors import DataError

EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class DataConfig:
    """Which data to train and evaluate on.

    dataset: registry name (see `dataset_names()`).
    root: directory holding the files; None = the dataset's default location.
    subset: use only this many training examples (taken before the validation split), None = all.
    val_size: validation examples held out of the training files, as a count (int >= 0) or a
        fraction (float in [0, 1)). The hold-out is taken whatever `eval_on` says, so the training
        part does not depend on `eval_on`; use val_size=0 to train on all training files with
        eval_on="test". Ignored by `imagefolder`, whose validation split is the `val/` folder.
    labeled_fraction: fraction in [0, 1] of the training part that keeps its labels (the rest get -1).
    augment: random crop (pad 4, black padding) + horizontal flip on the training part.
        Ignored by `imagefolder`, which always uses the paper's training transform.
    eval_on: "val" = the held-out split of the training files (the `val/` folder for imagefolder);
        "test" = the official test split (the `test/` folder for imagefolder).
    crop: imagefolder only: the network's input side in pixels (the paper: 224); images are first resized so
        their shorter side is crop * 256 / 224 (256 for 224). Smaller values make smoke runs cheap.
    """

    dataset: str = "fashion_mnist"
    root: str | None = None
    subset: int | None = None
    val_size: int | float = 0.1
    labeled_fraction: float = 1.0
    augment: bool = False
    eval_on: str = "val"
    crop: int = 224

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise DataError(f"DataConfig.dataset must be a non-empty string, got {self.dataset!r}")
        if self.root is not None:
            if not isinstance(self.root, (str, os.PathLike)):
                raise DataError(f"DataConfig.root must be a path or None, got {self.root!r}")
            object.__setattr__(self, "root", os.fspath(self.root))
        if self.subset is not None and (not _is_int(self.subset) or self.subset < 1):
            raise DataError(f"DataConfig.subset must be a positive integer or None, got {self.subset!r}")
        if _is_int(self.val_size):
            if self.val_size < 0:
                raise DataError(f"DataConfig.val_size must be >= 0, got {self.val_size!r}")
        elif isinstance(self.val_size, float):
            if not 0.0 <= self.val_size < 1.0:
                raise DataError(
                    f"DataConfig.val_size as a fraction must be in [0, 1), got {self.val_size!r} "
                    "(pass an int for a count)"
                )
        else:
            raise DataError(f"DataConfig.val_size must be an int count or a float fraction, got {self.val_size!r}")
        if isinstance(self.labeled_fraction, bool) or not isinstance(self.labeled_fraction, (int, float)):
            raise DataError(f"DataConfig.labeled_fraction must be a number in [0, 1], got {self.labeled_fraction!r}")
        if not 0.0 <= self.labeled_fraction <= 1.0:
            raise DataError(f"DataConfig.labeled_fraction must be in [0, 1], got {self.labeled_fraction!r}")
        object.__setattr__(self, "labeled_fraction", float(self.labeled_fraction))
        if not isinstance(self.augment, bool):
            raise DataError(f"DataConfig.augment must be a bool, got {self.augment!r}")
        if not _is_int(self.crop) or self.crop < 32:
            raise DataError(f"DataConfig.crop must be an integer >= 32, got {self.crop!r}")
        if self.eval_on not in EVAL_SPLITS:
            raise DataError(f"DataConfig.eval_on must be one of {EVAL_SPLITS}, got {self.eval_on!r}")


@dataclass(frozen=True)
class DataBundle:
    """The datasets of one (config, seed), plus what a model needs to know about them.

    Items of every dataset are (x, y): x a float32 tensor C x H x W equal to pixel/255 - mean[c],
    y an int64 scalar tensor (-1 marks an unlabeled training example; val/train_eval are all labeled).
    `dense_val` (imagefolder only) has variable image sizes: load it with batch size 1.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    train_eval: torch.utils.data.Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    identity: str
    dense_val: torch.utils.data.Dataset | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
