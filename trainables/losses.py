"""Losses as pure functions: cross-entropy + a weighted sum of per-level reconstruction losses.

The released code of Zhang et al. (2016) uses Caffe's Euclidean loss: sum of squared differences / (2 * batch),
not divided by the number of elements; its per-level weights ("balancing factors") make the terms comparable in
magnitude for VGG16. Targets are not detached: gradients flow into both the decoder and the encoder side.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

# Weights of the released code for VGG16; levels it does not name (deeper encoders) default to the pool-level weight.
PAPER_VGG16_WEIGHTS: dict[str, float] = {"image": 1e-4, "pool1": 1e-12, "pool2": 1e-12, "pool3": 1e-12, "pool4": 1e-10}
FORMS = ("euclidean", "mse")
UNLABELED = -1  # label of an example without a label (semi-supervised): no cross-entropy term


def default_weights(levels: list[str]) -> dict[str, float]:
    """The paper's weight for each level (levels beyond pool4 get 1e-12, as the released code's pool levels)."""
    return {level: PAPER_VGG16_WEIGHTS.get(level, 1e-12) for level in levels}


def euclidean(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Caffe's EuclideanLoss: sum((pred - target)^2) / (2 * batch)."""
    return (pred - target).pow(2).sum() / (2 * pred.shape[0])


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element."""
    return (pred - target).pow(2).mean()


def reconstruction_terms(
    recons: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    form: str = "euclidean",
    detach_targets: bool = False,
) -> dict[str, torch.Tensor]:
    """Unweighted reconstruction loss per level."""
    if form not in FORMS:
        raise ValueError(f"unknown reconstruction loss form {form!r}; known: {', '.join(FORMS)}")
    fn = euclidean if form == "euclidean" else mse
    return {lvl: fn(recons[lvl], targets[lvl].detach() if detach_targets else targets[lvl]) for lvl in recons}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over labeled examples only (0 when a batch has none, never NaN)."""
    labeled = labels != UNLABELED
    if not bool(labeled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labeled], labels[labeled])


def total_loss(
    terms: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    ce: torch.Tensor | None = None,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """ce_weight * ce + sum over levels of weights[level] * terms[level].

    Every reconstruction term needs a weight: a level without one is an error, not a silent zero.
    """
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise ValueError(f"no loss weight for level(s) {missing}; weights given for {sorted(weights)}")
    total = sum(weights[lvl] * term for lvl, term in terms.items())
    if ce is not None:
        total = total + ce_weight * ce
    if not isinstance(total, torch.Tensor):
        raise ValueError("the loss has no terms: no cross-entropy and no reconstruction level")
    return total
