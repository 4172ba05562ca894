"""`loader()`: a DataLoader that, for in-memory datasets, fetches and normalises whole batches at once.

For `InMemoryImages` (or a `torch.utils.data.Subset` of one) the sampler yields index tensors,
slices of one permutation per epoch, and the dataset's `batch()` builds each batch with one tensor
index instead of collating B items.
Shuffling and augmentation are both seeded from `seed`, also with worker processes (each worker
reseeds its augmentation generator from the seed DataLoader gives it). Other datasets get an
ordinary DataLoader with a seeded shuffle; their random transforms use torch's global RNG, which
DataLoader seeds in worker processes but not in the main one (num_workers=0).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .memory import InMemoryImages


class _IndexBatches(Sampler):
    """Yields index tensors of one batch each: slices of a seeded permutation (or of arange)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, generator: torch.Generator):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.generator = generator

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]


class _Batches(Dataset):
    """Maps a tensor of positions to one (x, y) batch of the underlying InMemoryImages."""

    def __init__(self, base: InMemoryImages, index_map: torch.Tensor | None, augment_seed: int):
        self.base = base
        self.index_map = index_map
        self.generator = torch.Generator().manual_seed(augment_seed)

    def __len__(self) -> int:
        return len(self.base) if self.index_map is None else len(self.index_map)

    def __getitem__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = positions
        if self.index_map is not None:
            index = self.index_map[index]
        return self.base.batch(index, self.generator)


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if isinstance(info.dataset, _Batches):
        info.dataset.generator.manual_seed(info.seed)


def _as_is(batch):
    return batch


def _in_memory(dataset: Dataset) -> tuple[InMemoryImages, torch.Tensor | None] | None:
    """The InMemoryImages under `dataset` (through nested Subsets) and the index map into it."""
    index_map = None
    while isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices, dtype=torch.long)
        index_map = indices if index_map is None else indices[index_map]
        dataset = dataset.dataset
    return (dataset, index_map) if isinstance(dataset, InMemoryImages) else None


def loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    *,
    drop_last: bool = False,
) -> DataLoader:
    """Batches (x: float32 B x C x H x W, y: int64 B); each epoch visits every index once."""
    innermost = dataset
    while isinstance(innermost, Subset):
        innermost = innermost.dataset
    if getattr(innermost, "variable_size", False) and batch_size != 1:
        raise ValueError("this dataset has images of different sizes (dense evaluation): use batch_size=1")
    generator = torch.Generator().manual_seed(seed)
    persistent = num_workers > 0
    found = _in_memory(dataset)
    if found is None:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=num_workers,
            drop_last=drop_last,
            persistent_workers=persistent,
        )
    base, index_map = found
    augment_seed = int(torch.randint(2**62, (1,), generator=generator))
    batches = _Batches(base, index_map, augment_seed)
    return DataLoader(
        batches,
        batch_size=None,
        sampler=_IndexBatches(len(batches), batch_size, shuffle, drop_last, generator),
        collate_fn=_as_is,
        num_workers=num_workers,
        worker_init_fn=_reseed_worker if num_workers > 0 else None,
        generator=generator,
        persistent_workers=persistent,
    )
