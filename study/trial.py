"""The Tune trainable: a function of the trial's config that drives Ray Train stages and only reports.

For each seed it resolves the trial's stage chain, makes every stage present in the stage store (computing only
what is missing, under Ray Train), and reports events that the launcher turns into MLflow runs and progress lines:
trial_start, epoch (from the Train workers, forwarded by this thread: study/train_reports.py), stage_done,
seed_end, and a last result with the objective.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np

from trainables.data import build_data
from trainables.models.factory import split_variant
from trainables.stages.chain import read_record, why_recomputed
from trainables.stages.on_ray import SegmentJob, ensure_chain
from trainables.stages.pool import run_on_pool
from trainables.stages.store import StageStore

from .plan import data_config, resolve, scaling, trial_config
from .spec import StudySpec
from .train_reports import TrainReports


@dataclass(frozen=True)
class TrialContext:
    spec: StudySpec
    store_uri: str
    train_storage: str
    code_version: str
    precision: str  # resolved once for the study (launch.resolved_precision): fp32 | bf16
    claims: object = None  # the store's cluster-wide claims (study/claims.py); None: the store's lock files
    pool: object = None  # the Train pool's dispatcher (resources.train_runs: pooled); None: a Train run per segment


def run_trial(config: dict, ctx: TrialContext) -> None:
    from ray import tune  # [ray] reporting to Tune

    spec = ctx.spec
    config = trial_config(config)
    metric = spec.objective.metric
    store = StageStore(ctx.store_uri, claims=ctx.claims)
    seeds = [int(config["seed"])] if "seed" in config else list(spec.seeds)
    finals = []
    for seed in seeds:
        data = build_data(data_config(spec), seed)
        plan = resolve(spec, config, (data.in_channels, data.num_classes, data.image_size))
        chain = plan.chain(data.identity, seed, ctx.precision)
        decoder, placement = split_variant(plan.model.variant)
        idle = {"finetune_epoch": 0, "objective": 100.0, "seed": seed}
        tune.report({"event": "trial_start", "model": plan.model.variant, "decoder": decoder, "placement": placement,
                     "stage_keys": ",".join(p.key for p in chain), "params_json": json.dumps({**plan.params, "precision": ctx.precision}),
                     "data_identity": data.identity, **idle})
        job = SegmentJob(segment=(), store_uri=ctx.store_uri, data=data_config(spec), seed=seed,
                         scaling=scaling(spec), code_version=ctx.code_version, objective_metric=metric)
        reasons = why_recomputed(store, chain, data.identity, seed)
        reports = TrainReports()  # the Train workers' epochs, reported from this thread (see train_reports.py)
        launch = None if ctx.pool is None else functools.partial(run_on_pool, ctx.pool, tune.get_context().get_trial_id(),
                                                                    reports.channel)
        computed = ensure_chain(chain, store, job, ctx.train_storage, callbacks=[reports.callback],
                                poll=reports.forward, launch=launch)
        for planned, was_computed in zip(chain, computed):
            tune.report({"event": "stage_done", "stage": planned.stage.kind, "stage_key": planned.key,
                         "reused": not was_computed, "why": reasons.get(planned.key, "") if was_computed else "",
                         **idle})
        record = read_record(store, chain[-1].key)
        if not computed[-1] and chain[-1].stage.kind == "finetune":
            # A fine-tuning taken from the store ran no epochs here: replay its curve, so that the scheduler and
            # Optuna see the same per-epoch objective a computed one reports (MLflow gets it from stage_done).
            for row in record["history"]:
                if metric in row:
                    tune.report({"event": "epoch", "replayed": True, "stage": "finetune", "stage_key": chain[-1].key,
                                 "epoch": row["epoch"], "finetune_epoch": row["epoch"], "objective": row[metric],
                                 metric: row[metric], "seed": seed})
        final = record["final"]
        finals.append(final)
        tune.report({"event": "seed_end", **final, "data_mean": json.dumps(list(data.mean)), **idle})
    mean = {k: float(np.mean([f[k] for f in finals])) for k in finals[0] if all(k in f for f in finals)}
    tune.report({"event": "trial_end", **mean, "objective": mean[metric], "finetune_epoch": plan.settings["finetune"].epochs,
                 "seed": seeds[-1]})
