"""CIFAR-10 and CIFAR-100 from the python-pickle archives (the layout torchvision extracts).

cifar10: <root>/cifar-10-batches-py/data_batch_1..5 and test_batch, labels under `labels`.
cifar100: <root>/cifar-100-python/train and test, labels under `fine_labels` (100 classes).
Each pickle holds `data`, uint8 N x 3072: the red plane (32 rows of 32), then green, then blue.
Default root: ~/.cache/decoding-pathways/. `root` may also be the extracted directory itself.
Nothing is downloaded.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataBundle, DataConfig
from .errors import DataError
from .fingerprint import files_fingerprint
from .memory import in_memory_bundle

DEFAULT_ROOT = Path("~/.cache/decoding-pathways").expanduser()
SIDE = 32


@dataclass(frozen=True)
class CifarLayout:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int
    archive_url: str


CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    label_key="labels",
    num_classes=10,
    archive_url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)
CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    label_key="fine_labels",
    num_classes=100,
    archive_url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)


def locate(layout: CifarLayout, root: str | None) -> tuple[list[Path], Path]:
    base = Path(root) if root is not None else DEFAULT_ROOT
    for directory in (base / layout.folder, base):
        train = [directory / name for name in layout.train_files]
        test = directory / layout.test_file
        if all(p.is_file() for p in train) and test.is_file():
            return train, test
    wanted = ", ".join((*layout.train_files, layout.test_file))
    raise DataError(
        f"{layout.name}: files not found in {base / layout.folder} (nor in {base}); expected {wanted}. "
        f"Download {layout.archive_url} and extract it into {base}, or run "
        f"torchvision.datasets.{'CIFAR10' if layout.num_classes == 10 else 'CIFAR100'}('{base}', download=True)"
    )


def read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3 x 32 x 32, int64 labels N) from one pickled batch."""
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # unpickling fails with many exception types on a damaged file
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if isinstance(entry, dict):
        # Pickles written by Python 3 from bytes-keyed dicts keep bytes keys even with latin1.
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if not isinstance(entry, dict) or "data" not in entry or layout.label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{path}: expected a dict with 'data' and '{layout.label_key}', found {keys}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise DataError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(f"{path}: labels outside 0..{layout.num_classes - 1}")
    return data.reshape(-1, 3, SIDE, SIDE), labels


@functools.lru_cache(maxsize=2)
def _load(layout: CifarLayout, train: tuple[Path, ...], test: Path, stamp: tuple) -> dict[str, torch.Tensor]:
    # `stamp` (sizes, mtimes) is part of the cache key so replaced files are read again.
    batches = [read_batch(path, layout) for path in train]
    test_images, test_labels = read_batch(test, layout)
    return {
        "train_images": torch.from_numpy(np.concatenate([b[0] for b in batches])),
        "train_labels": torch.from_numpy(np.concatenate([b[1] for b in batches])),
        "test_images": torch.from_numpy(np.ascontiguousarray(test_images)),
        "test_labels": torch.from_numpy(test_labels),
    }


def build_layout(layout: CifarLayout, cfg: DataConfig, seed: int) -> DataBundle:
    train, test = locate(layout, cfg.root)
    paths = (*train, test)
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    tensors = _load(layout, tuple(train), test, stamp)
    return in_memory_bundle(
        cfg=cfg, seed=seed, num_classes=layout.num_classes, fingerprint=files_fingerprint(paths), **tensors
    )


def build_cifar10(cfg: DataConfig, seed: int) -> DataBundle:
    return build_layout(CIFAR10, cfg, seed)


def build_cifar100(cfg: DataConfig, seed: int) -> DataBundle:
    return build_layout(CIFAR100, cfg, seed)
