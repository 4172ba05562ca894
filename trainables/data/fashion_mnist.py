"""Fashion-MNIST from its four IDX files: where to find them and how to turn them into a DataBundle.

Default location, first one holding all four files wins: $FASHION_MNIST_DIR, then
/usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`), then
~/.cache/decoding-pathways/fashion-mnist, where torchvision downloads them as a last resort.
An explicit `root` is never downloaded into. In each directory the files may be plain or `.gz`,
directly in it or in torchvision's `FashionMNIST/raw/` layout.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from .config import DataBundle, DataConfig
from .errors import DataError
from .fingerprint import files_fingerprint
from .idx import read_idx
from .memory import in_memory_bundle

NAME = "fashion_mnist"
NUM_CLASSES = 10
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
ENV_VAR = "FASHION_MNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/decoding-pathways/fashion-mnist").expanduser()
HOW_TO_GET = (
    "install them with `apt-get install dataset-fashion-mnist` (into /usr/share/datasets/fashion-mnist), "
    "or download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist "
    f"into a directory and pass it as root or set ${ENV_VAR}"
)


def find_files(directory: Path) -> dict[str, Path] | None:
    """The four files in `directory` (plain preferred over .gz), or None if any is missing."""
    for base in (directory, directory / "FashionMNIST" / "raw"):
        found = {}
        for key, name in FILES.items():
            for candidate in (base / name, base / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FILES):
            return found
    return None


def locate(root: str | None) -> dict[str, Path]:
    if root is not None:
        files = find_files(Path(root))
        if files is None:
            raise DataError(
                f"{NAME}: no complete set of IDX files in {root} (looked for "
                f"{', '.join(f'{n}[.gz]' for n in FILES.values())}, also under FashionMNIST/raw/); {HOW_TO_GET}"
            )
        return files
    places = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    places += [SYSTEM_DIR, CACHE_DIR]
    for place in places:
        files = find_files(place)
        if files is not None:
            return files
    return download(places)


def download(places: list[Path]) -> dict[str, Path]:
    import torchvision
    from filelock import FileLock

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        # Parallel trials on one machine must not download into the same directory at once.
        with FileLock(str(CACHE_DIR / ".download.lock")):
            if (files := find_files(CACHE_DIR)) is not None:
                return files
            torchvision.datasets.FashionMNIST(str(CACHE_DIR), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(CACHE_DIR), train=False, download=True)
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise DataError(
            f"{NAME}: files not found in {', '.join(map(str, places))} and the download into {CACHE_DIR} "
            f"failed ({exc}); {HOW_TO_GET}"
        ) from exc
    files = find_files(CACHE_DIR)
    if files is None:
        raise DataError(f"{NAME}: torchvision's download into {CACHE_DIR} did not produce the IDX files; {HOW_TO_GET}")
    return files


@functools.lru_cache(maxsize=2)
def _load(files: tuple[tuple[str, Path], ...], stamp: tuple[tuple[int, int], ...]) -> dict[str, torch.Tensor]:
    # `stamp` (size, mtime) is part of the cache key so replaced files are read again.
    paths = dict(files)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for kind in ("train", "test"):
        images, labels = arrays[f"{kind}_images"], arrays[f"{kind}_labels"]
        image_path, label_path = paths[f"{kind}_images"], paths[f"{kind}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DataError(f"{image_path}: expected uint8 images N x H x W, got {images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise DataError(f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise DataError(f"{label_path}: label {labels.max()} outside 0..{NUM_CLASSES - 1}")
    tensors = {}
    for key, array in arrays.items():
        if key.endswith("images"):
            tensors[key] = torch.from_numpy(array.copy()).unsqueeze(1)  # copy: frombuffer arrays are read-only
        else:
            tensors[key] = torch.from_numpy(array.astype(np.int64))
    return tensors


def load(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """uint8 images N x 1 x H x W and int64 labels N for train and test, cached per process."""
    ordered = tuple(sorted(files.items()))
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for _, p in ordered)
    return _load(ordered, stamp)


def build(cfg: DataConfig, seed: int) -> DataBundle:
    files = locate(cfg.root)
    tensors = load(files)
    return in_memory_bundle(
        cfg=cfg,
        seed=seed,
        num_classes=NUM_CLASSES,
        fingerprint=files_fingerprint(files.values()),
        **tensors,
    )
