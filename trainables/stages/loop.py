"""One stage's training loop: straight code over batches, parameterised by a `Stage` (what trains, which losses).

No Ray and no MLflow here: the loop calls `on_epoch(epoch, metrics, state)` after every epoch, and the caller decides
whether that means a Ray Train report + checkpoint or nothing at all. Every epoch reseeds torch from
(seed, epoch), so a run resumed from the checkpoint of epoch e continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..data import DataBundle, loader
from ..losses import cross_entropy, reconstruction_terms, total_loss
from ..models import optimizer_groups, set_trainable
from .precision import autocast as precision_autocast
from .procedure import Stage


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class Runtime:
    """How to run, not what: none of this enters a stage's key, except the precision, which `run_stage` takes from
    the planned stage (whose key holds it)."""

    device: str = "cpu"  # cpu | cuda | cuda:N (from Ray Train's get_device() under Ray)
    precision: str = "fp32"  # resolved: fp32 | bf16 (autocast of the forward pass); run_stage sets the stage's own
    channels_last: bool = False  # NHWC memory format for convolutions (precision.resolve_channels_last)
    rank: int = 0  # this worker's rank among `world` data-parallel workers
    world: int = 1
    eval_batch_size: int = 512
    loader_workers: int = 0  # decoding processes for file-backed datasets (0 = in this process); no effect on results


def set_deterministic(on: bool) -> None:
    """torch's deterministic algorithms (and no cuDNN autotuning) for this process, or torch's defaults.

    On CUDA this makes a run repeatable bit for bit on the same GPU model, driver and library versions, at some
    speed cost; cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first use (done here). An operation without a
    deterministic implementation warns (warn_only) rather than failing the run. CPU runs are repeatable without it.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on and torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = on


def make_optimizer(model: nn.Module, stage: Stage) -> torch.optim.Optimizer:
    """The stage's optimizer; every group keeps its base rate as `initial_lr` (saved with the optimizer's state)."""
    opt = stage.settings.optimizer
    if not isinstance(opt.lr, float):
        raise ValueError(f"stage {stage.kind!r}: lr {opt.lr!r} must be resolved to rates first (lr_probe.resolve_lr)")
    groups = optimizer_groups(model, stage.train, opt.lr, dict(opt.group_lrs))
    if opt.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    else:
        optimizer = torch.optim.Adam(groups, lr=opt.lr, weight_decay=opt.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base rates for optimizer step `step` (0-based) of the stage's `total` steps.

    constant: 1. cosine: 0.5 (1 + cos(pi step / total)), from 1 at the first step towards 0 at the last (torch's
    CosineAnnealingLR with T_max = total and eta_min = 0, stepped per batch). A pure function of the step, so a
    stage resumed from an epoch's checkpoint continues the same curve.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def batch_losses(model: nn.Module, stage: Stage, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The stage's loss on one batch, and its terms (for logging)."""
    kwargs = {"head": stage.ce, "decode": bool(stage.weights)}
    if stage.noisy:
        kwargs["noisy"] = True
    out = model(x, **kwargs)
    terms = reconstruction_terms(out.recons, out.targets, stage.form, stage.detach_targets) if stage.weights else {}
    ce = cross_entropy(out.logits, y) if stage.ce else None
    loss = total_loss(terms, dict(stage.weights), ce)
    logged = {"loss": loss.detach()}
    if ce is not None:
        logged["loss_ce"] = ce.detach()
    logged.update({f"loss_rec_{lvl}": t.detach() for lvl, t in terms.items()})
    weights = dict(stage.weights)
    logged.update({f"loss_share_{lvl}": (weights[lvl] * t / loss).detach() for lvl, t in terms.items()})
    return loss, logged


def rank_indices(n: int, batch_size: int, world: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """This rank's examples of one epoch under data parallelism, in step order.

    One permutation of the n examples (the same on every rank), cut into n // batch_size global batches of exactly
    batch_size (the incomplete last one is dropped); rank r takes positions r, r + world, ... of each. Every rank
    gets the same number of steps (unequal counts would hang DDP's all-reduce) and the global batch is exact.
    """
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {world} data-parallel workers")
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"{n} training examples make no global batch of {batch_size}: lower batch_size")
    order = torch.randperm(n, generator=generator)[: steps * batch_size].view(steps, batch_size)
    return order[:, rank::world].reshape(-1)


def train_epoch(model, stage: Stage, data: DataBundle, optimizer, runtime: Runtime, seed: int, epoch: int) -> dict:
    torch.manual_seed(derive_seed(seed, stage.kind, "epoch", epoch))
    batch_size, device = stage.settings.batch_size, torch.device(runtime.device)
    common = dict(num_workers=runtime.loader_workers, pin_memory=device.type == "cuda")
    if runtime.world > 1:
        order = torch.Generator().manual_seed(derive_seed(seed, stage.kind, "order", epoch))
        mine = rank_indices(len(data.train), batch_size, runtime.world, runtime.rank, order)
        batches = loader(torch.utils.data.Subset(data.train, mine.tolist()), batch_size // runtime.world,
                         shuffle=False, seed=derive_seed(seed, stage.kind, "augment", epoch, runtime.rank), **common)
    else:
        batches = loader(data.train, batch_size, shuffle=True, seed=derive_seed(seed, stage.kind, "order", epoch, 0),
                         **common)
    autocast = precision_autocast(runtime.precision, device)
    model.train()
    schedule = stage.settings.optimizer.schedule
    steps = len(batches)  # the same every epoch
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for x, y in batches:
        if schedule != "constant":
            factor = lr_factor(schedule, (epoch - 1) * steps + n, steps * stage.settings.epochs)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss, logged = batch_losses(model, stage, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v.float()
        n += 1
    if n == 0:
        raise ValueError(f"stage {stage.kind!r}: the training split yielded no batch (is it empty?)")
    metrics = {k: float(v) / n for k, v in sums.items()}
    if not math.isfinite(metrics["loss"]):  # checked once per epoch: no per-step device sync
        raise FloatingPointError(
            f"stage {stage.kind!r} diverged: mean loss {metrics['loss']} in epoch {epoch} "
            f"(terms: {metrics}); lower the learning rate ({stage.settings.optimizer.lr}) or the loss weights")
    return metrics


def prepare(model: nn.Module, stage: Stage, runtime: Runtime) -> nn.Module:
    """Freeze what the stage does not train and move the model where it runs."""
    set_trainable(model, stage.train)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run_epochs(
    model: nn.Module,
    stage: Stage,
    data: DataBundle,
    runtime: Runtime,
    seed: int,
    *,
    optimizer: torch.optim.Optimizer,
    start_epoch: int = 0,
    on_epoch: Callable[[int, dict], None] = lambda epoch, metrics: None,
    evaluate_epoch: Callable[[], dict] = dict,
) -> None:
    """Train epochs start_epoch+1 .. stage.settings.epochs; call on_epoch after each with its metrics."""
    for epoch in range(start_epoch + 1, stage.settings.epochs + 1):
        metrics = train_epoch(model, stage, data, optimizer, runtime, seed, epoch)
        metrics.update(evaluate_epoch())
        on_epoch(epoch, metrics)
