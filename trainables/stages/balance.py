"""Loss balance: each weighted reconstruction term's share of the total loss, and weights set to target shares.

The released code's weights (image 1e-4, pool levels 1e-12 / 1e-10) balance the terms for VGG16 on Caffe's 0-255
inputs only; on another input scale or encoder the same numbers can leave a level at a share of 1e-6, where it no
longer does anything. `loss.balance: auto` measures, at the start of fine-tuning, the mean cross-entropy `ce` and the
mean unweighted term `r_l` of every level on the stage's first `balance_batches` batches (its own seeded order, the
starting model, no update) and sets

    w_l = s_l * ce / ((1 - sum_j s_j) * r_l)

so that on those batches level l carries exactly its target share s_l of the total loss and cross-entropy the rest.
Measured on every worker alike (and rank 0's weights broadcast under DDP), so all workers train the same loss.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..data import DataBundle, loader
from .procedure import Stage


def mean_terms(model: nn.Module, stage: Stage, data: DataBundle, device: str, seed: int, batches: int) -> dict:
    """Mean of "loss_ce" and every "loss_rec_<level>" over the stage's first `batches` batches (no update)."""
    from .loop import batch_losses, derive_seed

    unit = replace(stage, weights=tuple((lvl, 1.0) for lvl, _ in stage.weights))
    torch.manual_seed(derive_seed(seed, stage.kind, "balance"))
    sums: dict[str, float] = {}
    n = 0
    model.train()
    with torch.no_grad():
        order = derive_seed(seed, stage.kind, "balance")
        for x, y in loader(data.train, stage.settings.batch_size, shuffle=True, seed=order):
            _, logged = batch_losses(model, unit, x.to(device), y.to(device))
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if n == batches:
                break
    return {k: v / n for k, v in sums.items() if k == "loss_ce" or k.startswith("loss_rec_")}


def shares(terms: dict, weights: dict[str, float]) -> dict[str, float]:
    """Each weighted reconstruction term's share of the total loss, given mean terms and weights."""
    weighted = {lvl: w * terms[f"loss_rec_{lvl}"] for lvl, w in weights.items()}
    total = terms.get("loss_ce", 0.0) + sum(weighted.values())
    return {lvl: v / total for lvl, v in weighted.items()}


def balanced(terms: dict, targets: dict[str, float]) -> dict[str, float]:
    """Weights giving each level its target share of the total loss (pure: terms and targets in, weights out)."""
    ce, rest = terms.get("loss_ce", 0.0), 1.0 - sum(targets.values())
    if not ce > 0:
        raise ValueError("loss.balance auto needs a cross-entropy term > 0 on the first batches (are they unlabeled?)")
    out = {}
    for lvl, share in targets.items():
        r = terms[f"loss_rec_{lvl}"]
        if not r > 0:
            raise ValueError(f"loss.balance auto: level {lvl!r} has reconstruction loss {r} on the first batches")
        out[lvl] = share * ce / (rest * r)
    return out


def start_of_finetuning(model: nn.Module, stage: Stage, data: DataBundle, device: str, seed: int) -> tuple[Stage, dict]:
    """The stage with its balanced weights (if it balances), and the start metrics: `loss_weight_<level>` and
    `loss_share_start_<level>` (each weighted term's share of the total loss on the first batches)."""
    if not stage.weights or not stage.ce:
        return stage, {}
    terms = mean_terms(model, stage, data, device, seed, stage.balance_batches or 4)
    weights = balanced(terms, dict(stage.balance)) if stage.balance else dict(stage.weights)
    if stage.balance and torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [weights]
        torch.distributed.broadcast_object_list(box, src=0)
        weights = box[0]
    stage = replace(stage, weights=tuple((lvl, float(weights[lvl])) for lvl, _ in stage.weights))
    start = {f"loss_weight_{lvl}": w for lvl, w in stage.weights}
    start.update({f"loss_share_start_{lvl}": s for lvl, s in shares(terms, dict(stage.weights)).items()})
    return stage, start
