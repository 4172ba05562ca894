"""The test split, touched once: a search with `data.eval_on: test` selects on the held-out validation split (every
trial evaluates on it, Optuna and ASHA see only it) and, once the search has run, evaluates the final
configurations — each model's best configuration, chosen exactly as the report chooses it
(`analysis.stats.best_per_model`) — on the test split.

Each selected trial run's final network is read from the stage store and evaluated in a Ray task with one Train
worker's resources, on the data of the trial's seed with `eval_on="test"` (the training split does not depend on
`eval_on`, so it is the network the trial trained). The launcher writes `test_top1_err`, `test_top5_err` and the
per-image outcomes (`eval/test_predictions.npz`) into that trial run and tags it `test_split=selected`. A run that
already has them is not evaluated again (a resumed study).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from .plan import data_config
from .spec import StudySpec

TEST_TAG = "test_split"  # value "selected": this trial run's configuration was selected and evaluated on test
TEST_PREDICTIONS = "test_predictions.npz"  # per-image outcomes on the test split, under the run's eval/


def needs_test(spec: StudySpec) -> bool:
    return spec.search is not None and spec.data.eval_on == "test"


def evaluate_on_test(store_uri: str, cfg, seed: int, stage_key: str, threads: int = 1
                     ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(test_top1_err / test_top5_err in percent, per-image `test_top1_wrong` / `test_top5_wrong`) of a stored
    stage's network on the test split of `cfg` (a DataConfig with eval_on="test") for `seed`."""
    import torch

    torch.set_num_threads(max(1, threads))

    from trainables.data import build_data
    from trainables.stages.chain import load_network
    from trainables.stages.evaluate import topk_wrong
    from trainables.stages.store import StageStore

    data = build_data(cfg, seed)  # .val is the test split (eval_on="test")
    network, _ = load_network(StageStore(store_uri), stage_key)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wrong1, wrong5 = topk_wrong(network.to(device), data.val, device)
    metrics = {"test_top1_err": 100.0 * float(wrong1.mean()), "test_top5_err": 100.0 * float(wrong5.mean())}
    return metrics, {"test_top1_wrong": wrong1, "test_top5_wrong": wrong5}


def selected_runs(tracking_uri: str, study: str):
    """The finished trial runs of each model's best configuration (selected on validation), not yet on test."""
    from analysis import load_study
    from analysis.common import finished
    from analysis.stats import best_per_model

    trials = load_study(tracking_uri, study, curves=False).trials
    chosen = best_per_model(finished(trials))
    if "test_top1_err" in chosen:
        chosen = chosen[chosen["test_top1_err"].isna()]
    return chosen


def run_final_tests(spec: StudySpec, tracking_uri: str, store_uri: str) -> int:
    """Evaluate the selected configurations on the test split and record it; returns the runs evaluated."""
    if not needs_test(spec):
        return 0
    import mlflow
    from mlflow.entities import Metric, RunTag
    import ray  # [ray] one task per selected trial run, with a Train worker's resources

    chosen = selected_runs(tracking_uri, spec.name)
    if chosen.empty:
        return 0
    print(f"study: evaluating the {len(chosen)} trial run(s) of each model's best configuration (selected on the "
          "validation split) on the test split", file=sys.stderr, flush=True)
    r = spec.resources  # (the cores of stopped trials are back: study/janitor.py)
    task = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(evaluate_on_test)
    cfg = data_config(spec, eval_on="test")
    threads = int(r.cpus_per_worker)
    pending = {row.run_id: task.remote(store_uri, cfg, int(row.seed), row.stage_keys.split(",")[-1], threads)
               for row in chosen.itertuples()}
    client = mlflow.MlflowClient(tracking_uri)
    for run_id, ref in pending.items():
        metrics, outcomes = ray.get(ref)
        with tempfile.TemporaryDirectory() as tmp:
            np.savez_compressed(os.path.join(tmp, TEST_PREDICTIONS), **outcomes)
            client.log_artifact(run_id, os.path.join(tmp, TEST_PREDICTIONS), "eval")
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],  # one write: all or none
                         tags=[RunTag(TEST_TAG, "selected")])
    return len(pending)
