"""Evaluation at the end of a stage: top-1/top-5 error (percent), reconstruction error per level, invertibility,
and the per-image outcomes behind them (`predictions.npz`), which the analysis pairs image by image.

"Training error" is the paper's: the classifier in eval mode, no augmentation, on the training split with its
true labels (`DataBundle.train_eval`), counting only the examples whose labels training used (all of them unless
`labeled_fraction < 1`). Reconstruction errors are mean squared error per element, so levels of different sizes
compare.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from ..data import DataBundle, decode_workers, loader

# Images of the validation split whose invertibility error is kept per image (and averaged into invert_err_pool<k>).
INVERT_LIMIT = 1000


class StageEvaluation(NamedTuple):
    metrics: dict[str, float]  # the stage's final metrics (record.json "final")
    arrays: dict[str, np.ndarray]  # example reconstructions for the grid (decoder stages), else {}
    predictions: dict[str, np.ndarray]  # per-image outcomes, the arrays of predictions.npz


def _batches(dataset, batch_size: int, limit: int | None = None):
    n = 0
    # File-backed data decodes in parallel, sized to this process's threads (a Ray worker's cores).
    workers = decode_workers(dataset, torch.get_num_threads())
    for x, y in loader(dataset, batch_size, shuffle=False, seed=0, num_workers=workers):
        if limit is not None and n >= limit:
            return
        yield x[: None if limit is None else limit - n], y[: None if limit is None else limit - n]
        n += len(x)


def labeled_train(data: DataBundle):
    """The training examples whose labels training used, with their true labels: what "training error" counts."""
    labels = getattr(data.train, "labels", None)
    if labels is None or bool((labels >= 0).all()):
        return data.train_eval
    return Subset(data.train_eval, torch.nonzero(labels >= 0).squeeze(1).tolist())


@torch.no_grad()
def topk_wrong(model: nn.Module, dataset, device, batch_size: int = 512, dense: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per image, in dataset order: (top-1 wrong, top-5 wrong) as uint8 0/1 arrays (k capped at the classes)."""
    model.eval()
    wrong1, wrong5 = [], []
    for x, y in _batches(dataset, 1 if dense else batch_size):
        x, y = x.to(device), y.to(device)
        logits = model.encoder.dense_logits(x) if dense else model(x, decode=False).logits
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        wrong1.append((top[:, 0] != y).to(torch.uint8).cpu())
        wrong5.append((top != y[:, None]).all(dim=1).to(torch.uint8).cpu())
    if not wrong1:
        raise ValueError("cannot measure errors on an empty split")
    return torch.cat(wrong1).numpy(), torch.cat(wrong5).numpy()


def _errors(wrong1: np.ndarray, wrong5: np.ndarray) -> dict[str, float]:
    return {"top1_err": 100.0 * float(wrong1.mean()), "top5_err": 100.0 * float(wrong5.mean())}


def topk_errors(model: nn.Module, dataset, device, batch_size: int = 512, dense: bool = False) -> dict[str, float]:
    """Top-1 and top-5 error in percent (top-k with k capped at the number of classes)."""
    return _errors(*topk_wrong(model, dataset, device, batch_size, dense))


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
def invertibility(model: nn.Module, dataset, device, n_images: int = 8, limit: int = INVERT_LIMIT
                  ) -> tuple[dict, dict, dict]:
    """Image-space error when decoding from each encoder depth: its mean, example reconstructions, and per image.

    Returns ({"invert_err_pool<k>": mse}, {"input": array, "from_pool<k>": array}, {"invert_err_pool<k>": per-image
    mse}) — the example arrays hold the first `n_images` validation images and their reconstructions from every
    depth; the per-image arrays cover the first `limit` validation images, in order.
    """
    if getattr(model, "pathway", None) is None:
        return {}, {}, {}
    model.eval()
    per_image: dict[int, list[torch.Tensor]] = {}
    arrays: dict[str, np.ndarray] = {}
    for x, _ in _batches(dataset, 256, limit):
        x = x.to(device)
        recons = model.invert(x)
        for k, rec in recons.items():
            per_image.setdefault(k, []).append(((rec - x) ** 2).flatten(1).mean(dim=1).float().cpu())
        if not arrays:
            arrays["input"] = x[:n_images].float().cpu().numpy()
            arrays.update({f"from_pool{k}": rec[:n_images].float().cpu().numpy() for k, rec in recons.items()})
    errors = {f"invert_err_pool{k}": torch.cat(v).numpy() for k, v in per_image.items()}
    return {k: float(v.mean()) for k, v in errors.items()}, arrays, errors


def evaluate_stage(model: nn.Module, data: DataBundle, device, decoder_stage: bool, batch_size: int = 512
                   ) -> StageEvaluation:
    """Everything recorded at the end of a stage.

    `predictions` (saved as predictions.npz, compact): `train_top1_wrong`, `train_top5_wrong` (uint8, one per
    labeled training example), `val_top1_wrong`, `val_top5_wrong` (uint8, one per validation image, in the
    split's order, the same images for every model of a seed) and, for decoder stages, `invert_err_pool<k>`
    (float16, one per validation image among the first INVERT_LIMIT).
    """
    metrics: dict[str, float] = {}
    predictions: dict[str, np.ndarray] = {}
    for split, dataset in (("train", labeled_train(data)), ("val", data.val)):
        wrong1, wrong5 = topk_wrong(model, dataset, device, batch_size)
        predictions.update({f"{split}_top1_wrong": wrong1, f"{split}_top5_wrong": wrong5})
        metrics.update({f"{split}_{k}": v for k, v in _errors(wrong1, wrong5).items()})
    if data.dense_val is not None:
        metrics.update({f"val_{k}_dense": v for k, v in topk_errors(model, data.dense_val, device, dense=True).items()})
    metrics.update(reconstruction_errors(model, data.val, device))
    arrays = {}
    if decoder_stage:
        inv, arrays, per_image = invertibility(model, data.val, device)
        metrics.update(inv)
        predictions.update({k: v.astype(np.float16) for k, v in per_image.items()})
    return StageEvaluation(metrics, arrays, predictions)


def final_metrics(model: nn.Module, data: DataBundle, device, decoder_stage: bool, batch_size: int = 512) -> tuple[dict, dict]:
    """The final metrics and the invertibility arrays (empty for non-decoder stages): `evaluate_stage` without
    the per-image outcomes."""
    return evaluate_stage(model, data, device, decoder_stage, batch_size)[:2]
