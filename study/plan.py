"""From a validated spec to trials: the Tune search space, and each trial's resolved stage chain.

A trial's `config` (what Tune samples) holds only what varies: `model`, `seed` (ablations) and the search
parameters by path (`loss.weights.image`, `stages.finetune.optimizer.lr`, ...). `resolve()` applies those
overrides to the spec and returns everything a trial runs, so the trainable stays a function of its config.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.data import DataConfig
from trainables.models import ModelConfig, model_config
from trainables.stages.chain import PlannedStage, plan
from trainables.stages.on_ray import Scaling
from trainables.stages.procedure import LossConfig, OptimizerConfig, StageSettings, procedure

from .spec import DATASET_SHAPES, StudySpec, model_levels, resolved_model_dict


@dataclass(frozen=True)
class TrialPlan:
    model: ModelConfig
    settings: dict[str, StageSettings]
    loss: LossConfig
    params: dict  # flat, every resolved hyperparameter (what MLflow records as params)

    def chain(self, data_identity: str, seed: int, precision: str) -> list[PlannedStage]:
        return plan(procedure(self.model, self.settings, self.loss), data_identity, seed, precision)


def _lr(value) -> float | str:
    return value if value == "auto" else float(value)


def data_config(spec: StudySpec, eval_on: str | None = None) -> DataConfig:
    """The data of the study's trials. A search's trials always evaluate on the held-out validation split, the one
    it selects on, whatever `data.eval_on` says; with `eval_on: test` only the selected configurations meet the
    test split, after the search (`final_test.py`, which asks for `eval_on="test"`)."""
    d = spec.data
    if eval_on is None:
        eval_on = "val" if spec.search is not None else d.eval_on
    return DataConfig(dataset=d.dataset, root=d.root, subset=d.subset, val_size=d.val_size,
                      labeled_fraction=d.labeled_fraction, augment=d.augment, eval_on=eval_on,
                      **({"crop": d.crop} if d.crop is not None else {}))


def scaling(spec: StudySpec) -> Scaling:
    r = spec.resources
    return Scaling(num_workers=r.workers, cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
                   channels_last=r.channels_last, max_failures=r.max_failures,
                   deterministic=r.deterministic)


def resolve(spec: StudySpec, config: dict, shape: tuple[int, int, int] | None = None) -> TrialPlan:
    """The trial's model, stage settings and loss: the spec with `config`'s overrides applied."""
    variant = config["model"]
    channels, classes, size = shape or DATASET_SHAPES[spec.data.dataset]
    model = model_config(resolved_model_dict(spec.model, variant, channels, classes, size))
    stages = {kind: s.model_dump() for kind, s in spec.stages.items()}
    weights = dict(spec.loss.weights)
    for path, value in config.items():
        if path.startswith("loss.weights."):
            weights[path.removeprefix("loss.weights.")] = float(value)
        elif path.startswith("stages."):
            _, kind, rest = path.split(".", 2)
            target = stages[kind]
            *parents, leaf = rest.split(".")
            for p in parents:
                target = target[p]
            target[leaf] = value
    levels = set(model_levels(spec.model, variant))
    weights = {lvl: w for lvl, w in weights.items() if lvl in levels}  # a level the model lacks has no term
    settings = {
        kind: StageSettings(
            epochs=int(s["epochs"]), batch_size=int(s["batch_size"]),
            optimizer=OptimizerConfig(name=s["optimizer"]["name"], lr=_lr(s["optimizer"]["lr"]),
                                      momentum=float(s["optimizer"]["momentum"]),
                                      weight_decay=float(s["optimizer"]["weight_decay"]),
                                      group_lrs=tuple(sorted(s["optimizer"]["group_lrs"].items())),
                                      lr_grid=tuple(float(r) for r in s["optimizer"]["lr_grid"]),
                                      probe_steps=int(s["optimizer"]["probe_steps"]) if s["optimizer"]["lr"] == "auto" else 0,
                                      schedule=s["optimizer"]["schedule"]),
        )
        for kind, s in stages.items()
    }
    share = spec.loss.target_share
    loss = LossConfig(weights=tuple(sorted(weights.items())), form=spec.loss.form,
                      detach_targets=spec.loss.detach_targets, decoder_form=spec.loss.decoder_form,
                      balance=spec.loss.balance,
                      target_share=tuple(sorted(share.items())) if isinstance(share, dict) else float(share),
                      balance_batches=spec.loss.balance_batches)
    chain = procedure(model, settings, loss)
    params = {"model": variant, "encoder": model.encoder, "loss.form": loss.form,
              "loss.detach_targets": loss.detach_targets, "loss.balance": loss.balance}
    if chain[-1].balance:  # the weights are chosen at the start of fine-tuning (recorded as loss_weight_<level>)
        params.update({f"loss.target_share.{lvl}": s for lvl, s in chain[-1].balance})
    else:
        params.update({f"loss.weights.{lvl}": w for lvl, w in chain[-1].weights})
    for stage in chain:
        s = stage.settings
        params.update({f"stages.{stage.kind}.epochs": s.epochs, f"stages.{stage.kind}.batch_size": s.batch_size,
                       f"stages.{stage.kind}.optimizer.name": s.optimizer.name,
                       f"stages.{stage.kind}.optimizer.lr": s.optimizer.lr,
                       f"stages.{stage.kind}.optimizer.momentum": s.optimizer.momentum,
                       f"stages.{stage.kind}.optimizer.weight_decay": s.optimizer.weight_decay,
                       f"stages.{stage.kind}.optimizer.schedule": s.optimizer.schedule})
    return TrialPlan(model, settings, loss, params)


CELL = "cell"  # the grid key of an ablation's (model, seed) pairs


def grid_space(spec: StudySpec) -> dict:
    """Tune param_space of an ablation (no search, or a grid search): (model, seed) pairs x grid values.

    Tune varies the grid key that sorts first fastest. The pairs are one key (`cell`, first), listed seed fastest:
    trials that run at once then start from different seeds' classifiers, instead of every model of seed 0 waiting
    for the one that computes seed 0's classifier. `trial_config` flattens a trial's config again.
    """
    from ray import tune  # [ray] search-space objects

    space = dict(spec.search.space) if spec.search is not None else {}
    model_dist = space.pop("model", None)
    models = list(model_dist.values) if model_dist is not None else list(spec.models)
    grid = {CELL: tune.grid_search([{"model": m, "seed": s} for m in models for s in spec.seeds])}
    grid.update({path: tune.grid_search(list(dist.values)) for path, dist in space.items()})
    return grid


def trial_config(config: dict) -> dict:
    """A Tune trial's config with its (model, seed) cell flattened into it (a search's config passes unchanged)."""
    return {**{k: v for k, v in config.items() if k != CELL}, **(config.get(CELL) or {})}


class OptunaSpace:
    """A define-by-run Optuna space, conditional: per-level weights exist only for models having the level.

    A class (not a closure) because Tune pickles the searcher with the experiment state, for `study resume`.
    """

    def __init__(self, spec: StudySpec):
        self.spec = spec

    def __call__(self, trial) -> None:
        space = dict(self.spec.search.space)
        model_dist = space.pop("model", None)
        model = trial.suggest_categorical("model", list(model_dist.values if model_dist else self.spec.models))
        levels = set(model_levels(self.spec.model, model))
        for path, dist in space.items():
            if path.startswith("loss.weights.") and path.removeprefix("loss.weights.") not in levels:
                continue  # conditional: this model has no such level
            _suggest(trial, path, dist)


def _suggest(trial, path: str, dist) -> None:
    if dist.type == "uniform":
        trial.suggest_float(path, dist.low, dist.high)
    elif dist.type == "loguniform":
        trial.suggest_float(path, dist.low, dist.high, log=True)
    elif dist.type == "int":
        trial.suggest_int(path, int(dist.low), int(dist.high))
    else:
        trial.suggest_categorical(path, list(dist.values))
