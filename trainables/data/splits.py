"""Deterministic index splits driven by one seeded generator.

Order of draws from `torch.Generator().manual_seed(seed)`: one permutation of all training-file
indices (its first `subset` entries are kept, of which the first `n_val` become validation), then
one permutation per class (ascending class id) to choose the labeled examples. Identical seed and
sizes therefore give identical splits in any process.
"""

from __future__ import annotations

import math

import torch

from .errors import DataError


def seeded_generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def val_count(val_size: int | float, n: int) -> int:
    """Number of validation examples out of n: a count as is, a fraction rounded half up."""
    if isinstance(val_size, float):
        return math.floor(val_size * n + 0.5)
    return int(val_size)


def subset_indices(n_total: int, subset: int | None, generator: torch.Generator) -> torch.Tensor:
    """The seeded permutation of range(n_total), cut to its first `subset` entries."""
    if subset is not None and subset > n_total:
        raise DataError(f"subset={subset} is larger than the {n_total} training examples available")
    perm = torch.randperm(n_total, generator=generator)
    return perm if subset is None else perm[:subset]


def split_train_val(
    n_total: int, subset: int | None, val_size: int | float, generator: torch.Generator, *, need_val: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices) into the training files, each sorted ascending."""
    pool = subset_indices(n_total, subset, generator)
    n_val = val_count(val_size, len(pool))
    if n_val >= len(pool):
        raise DataError(
            f"val_size={val_size!r} takes {n_val} of the {len(pool)} training examples"
            f"{f' (subset={subset})' if subset is not None else ''}, leaving none to train on; "
            "lower val_size or raise subset"
        )
    if need_val and n_val == 0:
        raise DataError(
            f"val_size={val_size!r} gives an empty validation split out of {len(pool)} examples; "
            "raise val_size or use eval_on='test'"
        )
    return pool[n_val:].sort().values, pool[:n_val].sort().values


def labeled_mask(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of the examples that keep their labels, stratified by class.

    Exactly round(fraction * n) examples are labeled (rounded half up). Each class gets
    floor(fraction * its count); the examples left over go one each to the classes with the
    largest remainders (ties: lower class id first), so class proportions are kept as closely
    as integer counts allow.
    """
    n = len(labels)
    mask = torch.zeros(n, dtype=torch.bool)
    if fraction >= 1.0:
        return mask.fill_(True)
    total = math.floor(fraction * n + 0.5)
    classes, counts = labels.unique(sorted=True, return_counts=True)
    quota = fraction * counts.double()
    take = quota.floor().long()
    leftover = total - int(take.sum())
    if leftover > 0:
        order = torch.argsort(-(quota - take), stable=True)
        take[order[:leftover]] += 1
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = (labels == cls).nonzero().squeeze(1)
        chosen = members[torch.randperm(len(members), generator=generator)[:k]]
        mask[chosen] = True
    return mask
