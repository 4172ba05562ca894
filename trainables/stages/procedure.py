"""Training procedures as data: a procedure is a chain of stages, each saying what trains and which losses apply.

The 7 models of Zhang et al. (2016) and the skip autoencoder of Dong et al. (2017) are all built from the same
five stage kinds; they differ only in the data of their stages, never in a copy of the training loop:

    classifier  train the classifier with cross-entropy (or only load pretrained weights: 0 epochs)
    layerwise   train every decoder block from random init, each fed by the encoder's own pool k; classifier frozen
    topdown     train the chained decoder (first / all), initialised from layerwise; classifier frozen
    finetune    train everything with cross-entropy + the weighted reconstruction losses of the model
    pretrain    denoising reconstruction pre-training of the skip autoencoder (encoder + decoder)

A stage's identity (its key in the stage store) is a hash of its `Stage` fields, its model config, its parent's
key, the data identity and the seed: identical stages of different trials are the same stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..models.decoders import level_name
from ..models.factory import ModelConfig, split_variant
from ..models.vgg import VGG_CONFIGS

KINDS = ("classifier", "layerwise", "topdown", "finetune", "pretrain")


AUTO = "auto"
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam
    lr: float | str = 0.01  # base learning rate, or "auto": chosen per decoder block by short probes (lr_probe.py)
    momentum: float = 0.9  # SGD momentum (ignored by adam)
    weight_decay: float = 0.0  # L2 penalty on every trained parameter
    group_lrs: tuple[tuple[str, float], ...] = ()  # (group pattern, lr) overrides, e.g. (("decoder1", 1e-3),)
    lr_grid: tuple[float, ...] = ()  # lr "auto": the rates probed (the paper: largest loss drop wins)
    probe_steps: int = 0  # lr "auto": optimizer steps of each probe (the paper: 2000 iterations)
    schedule: str = "constant"  # constant | cosine: every rate annealed per step from its base to 0 over the stage

    def __post_init__(self):
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.name!r}; known: sgd, adam")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.lr == AUTO:
            if not self.lr_grid or any(r <= 0 for r in self.lr_grid) or self.probe_steps < 1:
                raise ValueError("lr 'auto' needs lr_grid (rates > 0) and probe_steps >= 1")
        elif isinstance(self.lr, str) or self.lr <= 0:
            raise ValueError(f"learning rate must be > 0 or 'auto', got {self.lr!r}")


@dataclass(frozen=True)
class StageSettings:
    """What a user sets per stage kind (budget, optimizer); the procedure fills in the rest."""

    epochs: int = 1  # passes over the training split (0 = no training: only load and evaluate)
    batch_size: int = 128  # examples per step, summed over all workers
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass(frozen=True)
class Stage:
    kind: str  # one of KINDS
    model: ModelConfig  # the network this stage builds (its weights come from the parent stage)
    train: tuple[str, ...]  # parameter group patterns that train; everything else is frozen
    ce: bool  # cross-entropy term on
    weights: tuple[tuple[str, float], ...]  # (level, weight) of every reconstruction term; () = none
    form: str  # reconstruction loss form: euclidean (sum / 2B) | mse
    detach_targets: bool  # stop gradients into reconstruction targets
    noisy: bool  # corrupt inputs (denoising pre-training)
    settings: StageSettings
    # Target share of the total loss per level ((level, share), ...): the weights are then set at the stage's start
    # from the terms measured on its first `balance_batches` batches (balance.py); () = `weights` as given.
    balance: tuple[tuple[str, float], ...] = ()
    balance_batches: int = 0

    @property
    def levels(self) -> list[str]:
        return [lvl for lvl, _ in self.weights]

    def describe(self) -> dict:
        """Plain JSON-able description: what the stage key hashes and what MLflow records."""
        return asdict(self)


@dataclass(frozen=True)
class LossConfig:
    """The fine-tuning objective: cross-entropy + sum of weights[level] * reconstruction(level)."""

    weights: tuple[tuple[str, float], ...] = ()  # per-level weights; levels not given take the paper's default
    form: str = "euclidean"  # euclidean (the released code) | mse
    detach_targets: bool = False  # the paper lets gradients flow into both sides
    decoder_form: str = "mse"  # loss form while training decoders alone (layerwise, topdown stages)
    balance: str = "fixed"  # fixed: `weights` as given | auto: weights set from the first batches' magnitudes
    target_share: tuple[tuple[str, float], ...] | float = 0.1  # auto: share of the total loss per level (or one for all)
    balance_batches: int = 4  # auto: batches measured at the start of fine-tuning


def depth_of(model: ModelConfig) -> int:
    """Number of macro-layers of the model's encoder."""
    return len(model.blocks or VGG_CONFIGS[model.encoder].blocks)


def placement_levels(placement: str, depth: int) -> list[str]:
    """Levels with a reconstruction loss under a placement, top-down (mirrors DecodingPathway.levels)."""
    if placement == "first":
        return ["image"]
    return [level_name(k) for k in range(depth, 0, -1)]


def _weights(levels: list[str], loss: LossConfig) -> tuple[tuple[str, float], ...]:
    from ..losses import default_weights

    given = dict(loss.weights)
    defaults = default_weights(levels)
    return tuple((lvl, float(given.get(lvl, defaults[lvl]))) for lvl in levels)


def procedure(
    model: ModelConfig,
    settings: dict[str, StageSettings],
    loss: LossConfig = LossConfig(),
) -> list[Stage]:
    """The chain of stages that produces `model.variant`, root first.

    `settings` maps stage kinds to their budgets and optimizers; a kind the procedure needs but `settings` lacks is
    an error naming it.
    """
    decoder, placement = split_variant(model.variant)

    def get(kind: str) -> StageSettings:
        if kind not in settings:
            raise ValueError(f"model {model.variant!r} needs settings for stage {kind!r}; given: {sorted(settings)}")
        return settings[kind]

    def stage(kind, variant, train, ce, weights=(), form=loss.form, noisy=False):
        return Stage(kind, replace(model, variant=variant), tuple(train), ce, tuple(weights), form,
                     loss.detach_targets, noisy, get(kind))

    if decoder == "skip":
        # The classifier does not use the decoder: it does not train (DDP refuses parameters without gradients).
        finetune = stage("finetune", model.variant, ["encoder", "head"], True)
        if model.variant == "skipae-scratch":
            return [finetune]
        pretrain = stage("pretrain", model.variant, ["encoder", "decoder"], False, [("image", 1.0)],
                         form=loss.decoder_form, noisy=True)
        return [pretrain, finetune]

    depth = depth_of(model)
    levels = placement_levels(placement, depth) if decoder != "none" else []
    balance = _balance(levels, loss)
    # The classifier stage is shared by all 7 models: it never depends on the variant.
    chain = [stage("classifier", "baseline", ["*"], True)]
    if decoder == "none":
        return chain + [stage("finetune", "baseline", ["*"], True)]
    unit = lambda levels: [(lvl, 1.0) for lvl in levels]  # noqa: E731 (decoder-only stages: equal weights)
    chain.append(stage("layerwise", f"{decoder}-layerwise", ["decoder*"], False,
                       unit(placement_levels("layerwise", depth)), form=loss.decoder_form))
    if placement != "layerwise":
        chain.append(stage("topdown", model.variant, ["decoder*"], False,
                           unit(placement_levels(placement, depth)), form=loss.decoder_form))
    finetune = stage("finetune", model.variant, ["*"], True,
                     [(lvl, 0.0) for lvl in levels] if balance else _weights(levels, loss))
    chain.append(replace(finetune, balance=balance, balance_batches=loss.balance_batches if balance else 0))
    return chain


def _balance(levels: list[str], loss: LossConfig) -> tuple[tuple[str, float], ...]:
    """Target shares per level when the fine-tuning weights are balanced automatically; () for fixed weights."""
    if loss.balance == "fixed" or not levels:
        return ()
    if loss.balance != AUTO:
        raise ValueError(f"unknown loss balance {loss.balance!r}; known: fixed, auto")
    shares = dict(loss.target_share) if isinstance(loss.target_share, tuple) else dict.fromkeys(levels, loss.target_share)
    missing = [lvl for lvl in levels if lvl not in shares]
    if missing:
        raise ValueError(f"loss.target_share gives no share for level(s) {missing}")
    out = tuple((lvl, float(shares[lvl])) for lvl in levels)
    if any(s <= 0 for _, s in out) or sum(s for _, s in out) >= 1:
        raise ValueError(f"target shares must be > 0 and sum to < 1 (the rest is cross-entropy), got {dict(out)}")
    return out
