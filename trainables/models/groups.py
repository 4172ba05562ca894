"""Freezing and per-group learning rates over a model's named parameter groups (`model.param_groups()`).

Group names: `encoder`, `head`, and `decoder1..K` (VGG pathways) or `decoder` (skip autoencoder). A pattern
`decoder*` selects every decoder group.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from torch import nn


def select(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the groups matching any pattern; a pattern matching nothing is an error naming the groups."""
    names = list(model.param_groups())
    chosen: list[str] = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ValueError(f"parameter group pattern {pattern!r} matches none of {names}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def set_trainable(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Train exactly the matching groups; freeze every other parameter. Returns the trained group names."""
    trained = select(model, patterns)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = model.param_groups()
    for name in trained:
        for p in groups[name]:
            p.requires_grad_(True)
    return trained


def optimizer_groups(model: nn.Module, patterns: Iterable[str], lr: float, lrs: Mapping[str, float] | None = None) -> list[dict]:
    """torch.optim param groups for the matching groups; `lrs` maps a group pattern to its own learning rate."""
    groups = model.param_groups()
    out = []
    for name in select(model, patterns):
        group_lr = lr
        for pattern, value in (lrs or {}).items():
            if fnmatch.fnmatch(name, pattern):
                group_lr = value
        out.append({"params": groups[name], "lr": group_lr, "name": name})
    return out
