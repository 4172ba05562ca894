"""ImageNet-style image folders: root/train/<class>/*, root/val/<class>/* (and optionally root/test/).

Paper protocol (Zhang, Lee & Lee 2016, following VGG): training images are resized so the shorter
side is RESIZE, randomly cropped to CROP and flipped left-right; evaluation images are resized the
same way and centre-cropped; `dense_val` keeps the whole resized image (sizes vary: batch size 1).
Inputs are pixel/255 minus ImageNet's channel mean, not divided by a std: the decoders reconstruct exactly this
(the paper's target), and a model for torchvision's weights divides by their std itself (`VGG.expect_input_std`),
so it sees what `VGG16_Weights.IMAGENET1K_V1.transforms()` gives (bilinear antialiased resize of the shorter side
to 256, centre crop 224). `DataConfig.crop` scales both sizes (resize = crop * 256 / 224) for cheap smoke runs.

Split semantics differ from the in-memory datasets, because ImageNet has no held-out split:
`subset` draws (seeded) from train/; `val_size` and `augment` are ignored (and left out of the
identity); eval_on="val" evaluates on val/, eval_on="test" on test/, which must then exist.
Class indices come from the sorted folder names of train/; val/ and test/ may hold a subset of them.
The identity fingerprints the file listing (relative paths and sizes), not the image contents.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .config import DataBundle, DataConfig
from .errors import DataError
from .fingerprint import data_identity, listing_fingerprint
from .splits import labeled_mask, seeded_generator, subset_indices

NAME = "imagefolder"
RESIZE = 256
CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


# torchvision is imported only when transforms are built: importing it takes seconds.
def resize_for(crop: int) -> int:
    return round(crop * RESIZE / CROP)


def train_transform(crop: int = CROP) -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize_for(crop)), T.RandomCrop(crop), T.RandomHorizontalFlip(), *_to_input()])


def eval_transform(crop: int = CROP) -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize_for(crop)), T.CenterCrop(crop), *_to_input()])


def dense_transform(crop: int = CROP) -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize_for(crop)), *_to_input()])


def _to_input() -> list[Callable]:
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, (1.0, 1.0, 1.0))]


class ImageFiles(Dataset):
    """Images read from disk on access: item i is (transform(RGB image at paths[i]), labels[i])."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, transform: Callable, *, variable_size: bool = False):
        self.paths = list(paths)
        self.labels = labels.to(torch.int64)
        self.transform = transform
        # Read by loader(): images of different sizes cannot be stacked into one batch.
        self.variable_size = variable_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from exc
        return self.transform(rgb), self.labels[index]


def list_classes(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def list_images(split_dir: Path, class_to_idx: dict[str, int]) -> tuple[list[str], list[int], list[tuple[str, int]]]:
    """(paths, labels, (path relative to the root's parent split, size) listing) under split_dir, sorted."""
    paths, labels, listing = [], [], []
    for cls in list_classes(split_dir):
        if cls not in class_to_idx:
            raise DataError(f"{split_dir / cls}: class folder not present in train/ (known classes come from train/)")
        class_dir = split_dir / cls
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMG_EXTENSIONS):
                    path = os.path.join(dirpath, filename)
                    paths.append(path)
                    labels.append(class_to_idx[cls])
                    listing.append((os.path.relpath(path, split_dir.parent), os.stat(path).st_size))
    return paths, labels, listing


def build(cfg: DataConfig, seed: int) -> DataBundle:
    if cfg.root is None:
        raise DataError(f"{NAME}: set DataConfig.root to a directory holding train/<class>/ and val/<class>/ images")
    root = Path(cfg.root)
    eval_split = cfg.eval_on  # "val" -> val/, "test" -> test/
    for split in ("train", eval_split):
        if not (root / split).is_dir():
            raise DataError(
                f"{NAME}: {root / split} is not a directory; expected an ImageNet-style tree "
                f"{root}/train/<class>/*.JPEG and {root}/{eval_split}/<class>/*.JPEG"
            )
    classes = list_classes(root / "train")
    if not classes:
        raise DataError(f"{NAME}: no class folders in {root / 'train'}")
    class_to_idx = {cls: i for i, cls in enumerate(classes)}
    train_paths, train_labels, train_listing = list_images(root / "train", class_to_idx)
    eval_paths, eval_labels, eval_listing = list_images(root / eval_split, class_to_idx)
    if not train_paths or not eval_paths:
        empty = root / ("train" if not train_paths else eval_split)
        raise DataError(f"{NAME}: no images ({', '.join(IMG_EXTENSIONS)}) under {empty}")

    generator = seeded_generator(seed)
    chosen = subset_indices(len(train_paths), cfg.subset, generator).sort().values
    paths = [train_paths[i] for i in chosen.tolist()]
    labels = torch.tensor(train_labels, dtype=torch.int64)[chosen]
    keep = labeled_mask(labels, cfg.labeled_fraction, generator)
    eval_y = torch.tensor(eval_labels, dtype=torch.int64)

    return DataBundle(
        train=ImageFiles(paths, torch.where(keep, labels, -1), train_transform(cfg.crop)),
        val=ImageFiles(eval_paths, eval_y, eval_transform(cfg.crop)),
        train_eval=ImageFiles(paths, labels, eval_transform(cfg.crop)),
        num_classes=len(classes),
        in_channels=3,
        image_size=cfg.crop,
        mean=IMAGENET_MEAN,
        identity=data_identity(
            NAME,
            listing_fingerprint(train_listing + eval_listing),
            seed,
            subset=cfg.subset,
            labeled_fraction=cfg.labeled_fraction,
            eval_on=cfg.eval_on,
            **({"crop": cfg.crop} if cfg.crop != CROP else {}),
        ),
        dense_val=ImageFiles(eval_paths, eval_y, dense_transform(cfg.crop), variable_size=True),
    )
