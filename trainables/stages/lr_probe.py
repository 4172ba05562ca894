"""The paper's choice of decoder learning rates (`optimizer.lr: auto`): short probes, largest loss drop wins.

Zhang et al. (2016) picked each decoder layer's learning rate as the one giving the largest drop of reconstruction
loss in the first 2000 iterations. Here, for every rate of `optimizer.lr_grid`, a copy of the stage's starting model
trains `optimizer.probe_steps` steps with the stage's own optimizer, loss and data; the drop is measured on fixed
batches (the first `PROBE_BATCHES` of the stage's seeded order), before and after, relative to the loss before:
every decoder block trains at the probed rate, and block k keeps the rate with the largest drop at the level it
reconstructs (-first: the image, its only level). For layerwise stages this is exact: the blocks are independent
(each is fed the frozen encoder's own pool k), so one probe per rate measures every block on its own. For topdown
stages the blocks are chained and a level's drop also reflects the blocks above it: an approximation.
A rate whose probe diverges (non-finite loss) scores -inf; drops within 10% (TIE) of the largest are ties, won by the
smallest rate (a guard against edge-of-stability picks). Probes are seeded: every worker chooses the same rates
(and rank 0's choice is broadcast under DDP).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from ..data import DataBundle, loader
from ..models import level_name, set_trainable
from .procedure import AUTO, Stage

PROBE_BATCHES = 2  # fixed batches on which the loss is measured before and after a probe
TIE = 0.1  # drops within this fraction of the largest count as ties, won by the smallest rate


def _level_losses(model: nn.Module, stage: Stage, batches: list) -> dict[str, float]:
    from .loop import batch_losses

    sums: dict[str, float] = {}
    with torch.no_grad():
        for x, y in batches:
            _, logged = batch_losses(model, stage, x, y)
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
    return sums


def _drop(before: float, after: float) -> float:
    return (before - after) / before if math.isfinite(after) and before > 0 else -math.inf


def probe_drops(model: nn.Module, stage: Stage, data: DataBundle, device: str, seed: int, lr: float) -> dict[str, float]:
    """Relative drop of the total loss ("loss") and of every level ("loss_rec_<level>") after probe_steps at `lr`."""
    from .loop import derive_seed, make_optimizer

    opt = stage.settings.optimizer
    trial = replace(stage, settings=replace(stage.settings, optimizer=replace(opt, lr=float(lr), group_lrs=())))
    m = copy.deepcopy(model).to(device)
    set_trainable(m, stage.train)
    optimizer = make_optimizer(m, trial)
    batches = loader(data.train, stage.settings.batch_size, shuffle=True, seed=derive_seed(seed, stage.kind, "probe"))
    torch.manual_seed(derive_seed(seed, stage.kind, "probe", lr))
    it = iter(batches)
    fixed = []
    for _ in range(PROBE_BATCHES):
        x, y = next(it, (None, None))
        if x is None:
            break
        fixed.append((x.to(device), y.to(device)))
    m.train()
    before = _level_losses(m, trial, fixed)
    from .loop import batch_losses

    steps = 0
    while steps < opt.probe_steps:
        for x, y in batches:
            loss, _ = batch_losses(m, trial, x.to(device), y.to(device))
            # Layerwise blocks are independent: one diverging block (its own level non-finite) must not end the
            # probe of the others; a chained pathway diverges as a whole.
            if not torch.isfinite(loss) and stage.kind != "layerwise":
                return dict.fromkeys(before, -math.inf)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == opt.probe_steps:
                break
    after = _level_losses(m, trial, fixed)
    return {k: _drop(before[k], after[k]) for k in before}


def choose_rates(model: nn.Module, stage: Stage, data: DataBundle, device: str, seed: int) -> dict[str, float]:
    """The chosen rate per decoder group (`decoder1`, ...) of a stage with lr "auto"."""
    opt = stage.settings.optimizer
    drops = {lr: probe_drops(model, stage, data, device, seed, lr) for lr in opt.lr_grid}
    chosen = {}
    for k in range(1, len(model.pathway.blocks) + 1):
        level = level_name(k) if level_name(k) in stage.levels else "image"  # -first: every block by the image
        chosen[f"decoder{k}"] = best_rate({lr: drops[lr][f"loss_rec_{level}"] for lr in opt.lr_grid})
    return chosen


def best_rate(drops: dict[float, float]) -> float:
    """The rate with the largest drop; among rates within TIE of it, the smallest (the largest drop over a short
    probe often sits at the edge of stability, where a longer stage stalls or kills its ReLUs)."""
    best = max(drops.values())
    if not best > 0:
        return min(drops, key=lambda lr: (-drops[lr], lr))
    return min(lr for lr, d in drops.items() if d >= (1 - TIE) * best)


def resolve_lr(model: nn.Module, stage: Stage, data: DataBundle, device: str, seed: int) -> tuple[Stage, dict]:
    """The stage with lr "auto" replaced by the probed rates (as per-group rates), and {"lr_<group>": rate}."""
    opt = stage.settings.optimizer
    if opt.lr != AUTO:
        return stage, {}
    if stage.kind not in ("layerwise", "topdown"):
        raise ValueError(f"lr 'auto' is the paper's decoder-rate selection: stages layerwise and topdown, "
                         f"not {stage.kind!r}")
    chosen = choose_rates(model, stage, data, device, seed)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [chosen]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen = box[0]
    resolved = replace(opt, lr=max(chosen.values()), group_lrs=tuple(sorted(chosen.items())))
    return replace(stage, settings=replace(stage.settings, optimizer=resolved)), {f"lr_{g}": r for g, r in chosen.items()}
