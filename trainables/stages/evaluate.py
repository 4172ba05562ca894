"""Evaluation at the end of a stage: top-1/top-5 error (percent), reconstruction error per level, invertibility.

"Training error" is the paper's: the classifier in eval mode, no augmentation, on the training split with all its
true labels (`DataBundle.train_eval`). Reconstruction errors are mean squared error per element, so levels of
different sizes compare.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import DataBundle, decode_workers, loader


def _batches(dataset, batch_size: int, limit: int | None = None):
    n = 0
    # File-backed data decodes in parallel, sized to this process's threads (a Ray worker's cores).
    workers = decode_workers(dataset, torch.get_num_threads())
    for x, y in loader(dataset, batch_size, shuffle=False, seed=0, num_workers=workers):
        if limit is not None and n >= limit:
            return
        yield x[: None if limit is None else limit - n], y[: None if limit is None else limit - n]
        n += len(x)


@torch.no_grad()
def topk_errors(model: nn.Module, dataset, device, batch_size: int = 512, dense: bool = False) -> dict[str, float]:
    """Top-1 and top-5 error in percent (top-k with k capped at the number of classes)."""
    model.eval()
    wrong1 = wrong5 = total = 0
    for x, y in _batches(dataset, 1 if dense else batch_size):
        x, y = x.to(device), y.to(device)
        logits = model.encoder.dense_logits(x) if dense else model(x, decode=False).logits
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        wrong1 += int((top[:, 0] != y).sum())
        wrong5 += int((top != y[:, None]).all(dim=1).sum())
        total += len(y)
    if total == 0:
        raise ValueError("cannot measure errors on an empty split")
    return {"top1_err": 100.0 * wrong1 / total, "top5_err": 100.0 * wrong5 / total}


@torch.no_grad()
def reconstruction_errors(model: nn.Module, dataset, device, limit: int = 2048, batch_size: int = 256) -> dict[str, float]:
    """Mean squared error per element at every level the model reconstructs (`rec_err_<level>`), and the same
    relative to a zero output's, mean(target^2) (`rec_rel_<level>`: 1 = no better than predicting zeros)."""
    model.eval()
    sums: dict[str, float] = {}
    zeros: dict[str, float] = {}
    count = 0
    for x, _ in _batches(dataset, batch_size, limit):
        out = model(x.to(device), head=False)
        for lvl, rec in out.recons.items():
            sums[lvl] = sums.get(lvl, 0.0) + float(((rec - out.targets[lvl]) ** 2).mean()) * len(x)
            zeros[lvl] = zeros.get(lvl, 0.0) + float((out.targets[lvl] ** 2).mean()) * len(x)
        count += len(x)
    if not count:
        return {}
    return {**{f"rec_err_{lvl}": s / count for lvl, s in sums.items()},
            **{f"rec_rel_{lvl}": s / zeros[lvl] for lvl, s in sums.items() if zeros[lvl] > 0}}


@torch.no_grad()
def invertibility(model: nn.Module, dataset, device, n_images: int = 8, limit: int = 512) -> tuple[dict, dict]:
    """Image-space error when decoding from each encoder depth, and example reconstructions for a grid.

    Returns ({"invert_err_pool<k>": mse}, {"input": array, "from_pool<k>": array}) — the arrays hold the
    first `n_images` validation images and their reconstructions from every depth.
    """
    if getattr(model, "pathway", None) is None:
        return {}, {}
    model.eval()
    sums: dict[int, float] = {}
    count = 0
    arrays: dict[str, np.ndarray] = {}
    for x, _ in _batches(dataset, 256, limit):
        x = x.to(device)
        recons = model.invert(x)
        for k, rec in recons.items():
            sums[k] = sums.get(k, 0.0) + float(((rec - x) ** 2).mean()) * len(x)
        if not arrays:
            arrays["input"] = x[:n_images].float().cpu().numpy()
            arrays.update({f"from_pool{k}": rec[:n_images].float().cpu().numpy() for k, rec in recons.items()})
        count += len(x)
    return {f"invert_err_pool{k}": s / count for k, s in sums.items()}, arrays


def final_metrics(model: nn.Module, data: DataBundle, device, decoder_stage: bool, batch_size: int = 512) -> tuple[dict, dict]:
    """Everything recorded at the end of a stage, and the invertibility arrays (empty for non-decoder stages)."""
    metrics = {}
    for split, dataset in (("train", data.train_eval), ("val", data.val)):
        metrics.update({f"{split}_{k}": v for k, v in topk_errors(model, dataset, device, batch_size).items()})
    if data.dense_val is not None:
        metrics.update({f"val_{k}_dense": v for k, v in topk_errors(model, data.dense_val, device, dense=True).items()})
    metrics.update(reconstruction_errors(model, data.val, device))
    arrays = {}
    if decoder_stage:
        inv, arrays = invertibility(model, data.val, device)
        metrics.update(inv)
    return metrics, arrays
