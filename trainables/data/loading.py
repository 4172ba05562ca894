"""`loader()`: a DataLoader that, for in-memory datasets, fetches and normalises whole batches at once.

For `InMemoryImages` (or a `torch.utils.data.Subset` of one) the sampler yields index tensors,
slices of one permutation per epoch, and the dataset's `batch()` builds each batch with one tensor
index instead of collating B items.
Shuffling and augmentation are both seeded from `seed`, also with worker processes (each worker
reseeds its augmentation generator from the seed DataLoader gives it).

Other (file-backed) datasets get a DataLoader with a seeded shuffle whose items are decoded in
`num_workers` processes, `prefetch_factor` batches ahead each, into pinned memory when asked (for
CUDA copies with non_blocking=True). Their random transforms draw from torch's RNG re-seeded for every
item from (seed, index): the images of an epoch do not depend on the number of worker processes nor on
which process decodes which item, and the caller's RNG is left untouched.
"""

from __future__ import annotations

import math
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


class _SeededItems(Dataset):
    """Item i of `base`, its random transforms drawn from torch's RNG seeded from (seed, i) (caller's RNG kept)."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + int(index)) % 2**63)
            return self.base[index]


def _in_memory(dataset: Dataset) -> tuple[InMemoryImages, torch.Tensor | None] | None:
    """The InMemoryImages under `dataset` (through nested Subsets) and the index map into it."""
    index_map = None
    while isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices, dtype=torch.long)
        index_map = indices if index_map is None else indices[index_map]
        dataset = dataset.dataset
    return (dataset, index_map) if isinstance(dataset, InMemoryImages) else None


def decode_workers(dataset: Dataset, cpus: float) -> int:
    """Loader processes for `dataset` on a worker with `cpus` cores: a file-backed dataset decodes in cpus - 1
    processes (one core stays with the training process); an in-memory one needs none."""
    return 0 if _in_memory(dataset) is not None else max(0, math.floor(cpus) - 1)


def loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
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
        item_seed = int(torch.randint(2**62, (1,), generator=generator))
        return DataLoader(
            _SeededItems(dataset, item_seed),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=num_workers,
            drop_last=drop_last,
            persistent_workers=persistent,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
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
        pin_memory=pin_memory,
    )
