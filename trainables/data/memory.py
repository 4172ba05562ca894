"""Datasets held in memory as one uint8 tensor, normalised (and augmented) a whole batch at a time.

Used for Fashion-MNIST and CIFAR. `InMemoryImages.images` / `.labels` / `.mean` are public so a
training loop can batch them directly; `InMemoryImages.batch(indices)` is what `loader()` uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import DataBundle, DataConfig
from .errors import DataError
from .fingerprint import data_identity
from .splits import labeled_mask, seeded_generator, split_train_val

CROP_PADDING = 4


class InMemoryImages(Dataset):
    """images: uint8 N x C x H x W; labels: int64 N (-1 = unlabeled); mean: per-channel, in [0,1] units.

    Item i is (images[i]/255 - mean, labels[i]); with augment=True the image is first padded with
    CROP_PADDING black pixels, randomly cropped back to H x W and flipped left-right with p=0.5.
    Treat the tensors as read-only: bundles built from the same files share them.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], *, augment: bool = False
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"expected uint8 images N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise DataError(f"expected {len(images)} labels, got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        x, y = self.batch(torch.tensor([index]))
        return x[0], y[0]

    def batch(
        self, indices: torch.Tensor | Sequence[int], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x: float32 B x C x H x W, y: int64 B) for these indices; `generator` drives augmentation."""
        index = torch.as_tensor(indices, dtype=torch.long)
        # numpy, not torch: these mid-sized ops are memory-bound, and torch's intra-op threads make
        # them many times slower whenever the cores are shared (parallel trials, other tests).
        raw = np.take(self.images.numpy(), index.numpy(), axis=0)
        if self.augment:
            raw = random_crop_flip(raw, CROP_PADDING, generator)
        x = raw.astype(np.float32)
        np.divide(x, np.float32(255.0), out=x)
        np.subtract(x, self.mean.numpy().reshape(1, -1, 1, 1), out=x)
        return torch.from_numpy(x), self.labels[index]


def random_crop_flip(raw: np.ndarray, padding: int, generator: torch.Generator | None) -> np.ndarray:
    """Per-image random crop of the zero-padded uint8 batch back to its size, then a random left-right flip."""
    b, c, h, w = raw.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = np.zeros((b, c, hp, wp), dtype=raw.dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = raw
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator).numpy()
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator).numpy()
    flip = (torch.rand(b, generator=generator) < 0.5).numpy()
    rows = top[:, None] + np.arange(h)
    cols = left[:, None] + np.arange(w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    # One flat take over all planes is much faster than 4-way advanced indexing.
    within = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)
    planes = np.arange(b * c).reshape(b, c, 1) * (hp * wp)
    return np.take(padded.reshape(-1), within + planes).reshape(b, c, h, w)


def channel_mean(images: torch.Tensor, chunk: int = 4096) -> tuple[float, ...]:
    """Per-channel mean of uint8 N x C x H x W images in [0,1] units, summed exactly in int64."""
    n, c, h, w = images.shape
    if n == 0:
        raise DataError("cannot compute the channel mean of an empty training part")
    total = torch.zeros(c, dtype=torch.int64)
    for start in range(0, n, chunk):
        total += images[start : start + chunk].sum(dim=(0, 2, 3), dtype=torch.int64)
    return tuple(float(s) / (n * h * w * 255.0) for s in total.tolist())


def in_memory_bundle(
    *,
    cfg: DataConfig,
    seed: int,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    fingerprint: str,
) -> DataBundle:
    """Split the training files per (cfg, seed) and wrap everything as InMemoryImages."""
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{cfg.dataset}: training images are {tuple(train_images.shape[1:])} but test images are "
            f"{tuple(test_images.shape[1:])}"
        )
    generator = seeded_generator(seed)
    train_idx, val_idx = split_train_val(
        len(train_images), cfg.subset, cfg.val_size, generator, need_val=cfg.eval_on == "val"
    )
    images = train_images[train_idx]
    labels = train_labels[train_idx]
    keep = labeled_mask(labels, cfg.labeled_fraction, generator)
    mean = channel_mean(images)
    if cfg.eval_on == "val":
        val = InMemoryImages(train_images[val_idx], train_labels[val_idx], mean)
    else:
        val = InMemoryImages(test_images, test_labels, mean)
    return DataBundle(
        train=InMemoryImages(images, torch.where(keep, labels, -1), mean, augment=cfg.augment),
        val=val,
        train_eval=InMemoryImages(images, labels, mean),
        num_classes=num_classes,
        in_channels=images.shape[1],
        image_size=images.shape[2],
        mean=mean,
        identity=data_identity(
            cfg.dataset,
            fingerprint,
            seed,
            subset=cfg.subset,
            val_size=cfg.val_size,
            labeled_fraction=cfg.labeled_fraction,
            augment=cfg.augment,
            eval_on=cfg.eval_on,
        ),
        dense_val=None,
    )
