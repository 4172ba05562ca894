"""Searches reported as searches, and honest splits, on real studies run through the `study` CLI.

A micro Optuna search with ASHA (baseline, one learning rate per trial, run one trial at a time so ASHA's
decisions are reproducible): Optuna holds only the fine-tuning epochs' objective as intermediate values,
stopped trials are PRUNED in Optuna and tagged PRUNED in MLflow, and runs and trials link both ways. A
semi-supervised micro study (half the labels): its training error is the error on the labeled examples only.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from analysis import load_study, write_report
from study.spec import SpecError, parse_spec
from analysis.stats import best_configuration, configurations
from tests.test_study import cli, runs_of, write_spec
from trainables.data import DataConfig, build_data
from trainables.models import create_model
from trainables.stages.chain import MODEL_FILE, PREDICTIONS_FILE, read_record
from trainables.stages.evaluate import topk_errors
from trainables.stages.store import StageStore

TINY = {"data": {"subset": 300, "val_size": 100}, "model": {"encoder": "vgg_tiny"}}
GOOD_LR, BAD_LR = 1.0e-4, 0.1  # two learning rates far apart: their fine-tunings differ at epoch 1
SEARCH = {
    "name": "asha-search", "data": {**TINY["data"], "eval_on": "test"}, "model": TINY["model"],
    "models": ["baseline"], "seeds": [0],
    "stages": {"classifier": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}},
               "finetune": {"epochs": 3, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}}},
    "search": {"algorithm": "optuna", "num_samples": 4, "sampler_seed": 10,  # lr: 1e-4, 0.1, 1e-4 (reused), 0.1
               "space": {"stages.finetune.optimizer.lr": {"type": "choice", "values": [GOOD_LR, BAD_LR]}},
               "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
    # Pooled Train runs: a trial that ASHA stops has its pool job cancelled by the launcher's janitor.
    "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent": 1, "train_runs": "pooled"},
}  # fmt: skip
SEMI = {
    "name": "semi", **TINY, "models": ["baseline"], "seeds": [0],
    "data": {**TINY["data"], "labeled_fraction": 0.5},
    "stages": {"classifier": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}},
               "finetune": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}}},
}  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("search")
    for spec in (SEARCH, SEMI):
        cli("launch", str(write_spec(work, spec)), "--no-report", cwd=work)
    return work


def uri_of(work, name: str) -> str:
    return f"sqlite:///{work / 'runs' / name / 'mlflow.db'}"


@pytest.mark.ray
def test_optuna_holds_real_intermediate_values_pruned_states_and_mlflow_links(work):
    storage = f"sqlite:///{work / 'runs' / 'asha-search' / 'optuna.db'}"
    study = optuna.load_study(study_name="asha-search", storage=storage)
    states = [t.state for t in study.trials]
    # Two configurations, each sampled twice, run one at a time: whichever is worse at epoch 1 is stopped there
    # at least once (as the second trial, or as a replayed repeat of the first).
    assert len(states) == 4 and optuna.trial.TrialState.PRUNED in states, states
    client = MlflowClient(uri_of(work, "asha-search"))
    trial_runs = {r.info.run_id: r for r in runs_of(uri_of(work, "asha-search"), "asha-search", "trial")}
    for t in study.trials:
        # Intermediate values: at fine-tuning epochs only, each a real val error (a stopped stage computed again
        # resumes from the first attempt's last checkpoint, so its first value can come after epoch 1).
        steps = sorted(t.intermediate_values)
        assert steps and set(steps) <= {1, 2, 3}, t.intermediate_values
        assert all(v != 100.0 and 0 <= v < 100 for v in t.intermediate_values.values())
        # Linked both ways, and the same state on both sides.
        (run_id,) = t.user_attrs["mlflow_run_ids"].values()
        run = trial_runs[run_id]
        assert run.data.tags["optuna_trial_number"] == str(t.number)
        assert float(run.data.params["stages.finetune.optimizer.lr"]) == t.params["stages.finetune.optimizer.lr"]
        if t.state == optuna.trial.TrialState.PRUNED:
            assert run.data.tags["trial_state"] == "PRUNED" and run.info.status == "KILLED"
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE and run.data.tags["trial_state"] == "COMPLETE"
            assert steps == [1, 2, 3] and t.value == pytest.approx(run.data.metrics["val_top1_err"])
            # The last intermediate value is the objective measured after the last epoch.
            finetune = [s for s in runs_of(uri_of(work, "asha-search"), "asha-search", "stage")
                        if s.data.tags["mlflow.parentRunId"] == run_id and s.data.tags["stage"] == "finetune"]
            history = {m.step: m.value for m in client.get_metric_history(finetune[0].info.run_id, "val_top1_err")}
            assert t.intermediate_values == pytest.approx(history)


@pytest.mark.ray
def test_search_report_lists_configurations_and_optunas_figures(work, tmp_path):
    uri = uri_of(work, "asha-search")
    storage = f"sqlite:///{work / 'runs' / 'asha-search' / 'optuna.db'}"
    page = write_report(uri, "asha-search", tmp_path, optuna_storage=storage, log_to_mlflow=False).read_text()
    configs = pd.read_csv(tmp_path / "configurations.csv", dtype={"seeds": str})
    trials = load_study(uri, "asha-search", curves=False).trials
    # One row per distinct learning rate; the best is the good one; intervals only over seeds (one seed: none).
    assert sorted(configs["params.stages.finetune.optimizer.lr"]) == sorted(set(trials["params.stages.finetune.optimizer.lr"]))
    assert configs["val_top1_err_ci_low"].isna().all()  # the good one ran twice, but on one seed: no interval
    assert list(configs["n_trials"]) == [2, 2] and set(configs["seeds"].dropna()) == {"0"}
    best = best_configuration(configurations(trials))
    done = trials[trials["status"] == "FINISHED"]
    assert best["params.stages.finetune.optimizer.lr"] == done.loc[done["val_top1_err"].idxmin(),
                                                                   "params.stages.finetune.optimizer.lr"]
    assert "Best configuration" in page and "PED-ANOVA (Optuna&#x27;s default evaluator)" in page
    assert "fANOVA" not in page
    for name in ("verdicts.csv", "claims.csv", "table.csv"):
        assert (tmp_path / name).exists()


@pytest.mark.ray
def test_semi_supervised_training_error_counts_labeled_examples_only(work):
    uri = uri_of(work, "semi")
    (trial,) = runs_of(uri, "semi", "trial")
    store = StageStore(str(work / "runs" / "store"))
    key = trial.data.tags["stage_keys"].split(",")[-1]
    record = read_record(store, key)
    data = build_data(DataConfig(subset=300, val_size=100, labeled_fraction=0.5), seed=0)
    labeled = torch.nonzero(data.train.labels >= 0).squeeze(1)
    assert len(labeled) == 100 < len(data.train_eval) == 200
    model = create_model(record["stage"]["model"])
    model.load_state_dict(torch.load(os.path.join(store.get(key).path, MODEL_FILE), weights_only=True))
    on_labeled = topk_errors(model, torch.utils.data.Subset(data.train_eval, labeled.tolist()), "cpu")["top1_err"]
    on_all = topk_errors(model, data.train_eval, "cpu")["top1_err"]
    assert trial.data.metrics["train_top1_err"] == pytest.approx(on_labeled)
    assert on_labeled != pytest.approx(on_all)  # the unlabeled half would change it
    with np.load(os.path.join(store.get(key).path, PREDICTIONS_FILE)) as npz:
        assert npz["train_top1_wrong"].shape == (100,) and npz["val_top1_wrong"].shape == (100,)
        assert npz["train_top1_wrong"].dtype == np.uint8
    # The per-image outcomes reach MLflow as an artifact of the stage run.
    stage = [s for s in runs_of(uri, "semi", "stage") if s.data.tags["stage_key"] == key][0]
    names = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(stage.info.run_id, "eval")}
    assert names == {"eval/predictions.npz"}


@pytest.mark.ray
def test_a_search_selects_on_validation_and_tests_only_the_selected_configuration(work, tmp_path):
    """SEARCH has data.eval_on: test. Its trials (and Optuna) see the held-out split only; after the search the
    best configuration's runs, and no other, get the error of their network on the official test split."""
    uri = uri_of(work, "asha-search")
    store = StageStore(str(work / "runs" / "store"))
    held_out = build_data(DataConfig(subset=300, val_size=100, eval_on="val"), seed=0).val
    test = build_data(DataConfig(subset=300, val_size=100, eval_on="test"), seed=0).val
    assert len(held_out) == 100 and len(test) == 10000
    trials = load_study(uri, "asha-search", curves=False).trials
    done = trials[trials["status"] == "FINISHED"]
    best_lr = done.loc[done["val_top1_err"].idxmin(), "params.stages.finetune.optimizer.lr"]
    for run in runs_of(uri, "asha-search", "trial"):
        if run.info.status != "FINISHED":
            assert "test_top1_err" not in run.data.metrics
            continue
        model = create_model(read_record(store, run.data.tags["stage_keys"].split(",")[-1])["stage"]["model"])
        path = store.get(run.data.tags["stage_keys"].split(",")[-1]).path
        model.load_state_dict(torch.load(os.path.join(path, MODEL_FILE), weights_only=True))
        # What was selected on: the held-out split (not the test split).
        assert run.data.metrics["val_top1_err"] == pytest.approx(topk_errors(model, held_out, "cpu")["top1_err"])
        selected = float(run.data.params["stages.finetune.optimizer.lr"]) == float(best_lr)
        assert (run.data.tags.get("test_split") == "selected") == selected
        if selected:
            on_test = topk_errors(model, test, "cpu")
            assert run.data.metrics["test_top1_err"] == pytest.approx(on_test["top1_err"])
            assert run.data.metrics["test_top5_err"] == pytest.approx(on_test["top5_err"])
            names = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "eval")}
            assert names == {"eval/test_predictions.npz"}
        else:
            assert "test_top1_err" not in run.data.metrics
    page = write_report(uri, "asha-search", tmp_path, log_to_mlflow=False).read_text()
    assert "selected on the <b>held-out validation split</b>" in page and "Test top-1 (%)" in page
    table = pd.read_csv(tmp_path / "table.csv")
    chosen = done[done["params.stages.finetune.optimizer.lr"].astype(float) == float(best_lr)]
    assert chosen["test_top1_err"].notna().all()
    assert table.loc[0, "test_top1_err_mean"] == pytest.approx(chosen["test_top1_err"].mean())


def test_a_search_with_eval_on_test_needs_a_held_out_split():
    spec = {**SEARCH, "data": {**TINY["data"], "val_size": 0, "eval_on": "test"}}
    with pytest.raises(SpecError, match="data.val_size: 0 leaves a search nothing to select on"):
        parse_spec(spec)
    parse_spec({**SEMI, "data": {**SEMI["data"], "val_size": 0, "eval_on": "test"}})  # no search: nothing selected
