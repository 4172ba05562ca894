"""What a study's MLflow records say right now: the trial table of `study status`, the results table at the end."""

from __future__ import annotations

import mlflow
import pandas as pd

from analysis import AnalysisError, load_study, paper_table
from analysis.report import format_table, to_markdown


def trial_status(tracking_uri: str, study: str) -> pd.DataFrame:
    """One row per trial run (any state): model, seed, searched parameters, stage reached, metrics, status."""
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise AnalysisError(f"no MLflow experiment {study!r} at {tracking_uri}: has the study been launched?")
    runs = client.search_runs([exp.experiment_id], "tags.role = 'trial'", max_results=5000)
    stages = client.search_runs([exp.experiment_id], "tags.role = 'stage'", max_results=50000)
    done: dict[str, dict[str, str]] = {}  # trial run -> finished stage key -> stage kind
    for s in stages:
        if s.info.status == "FINISHED":
            done.setdefault(s.data.tags.get("mlflow.parentRunId"), {})[s.data.tags.get("stage_key")] = s.data.tags.get("stage", "?")
    rows = []
    varying = _varying_params(runs)
    for r in runs:
        keys = [k for k in r.data.tags.get("stage_keys", "").split(",") if k]
        finished = [done[r.info.run_id][k] for k in keys if k in done.get(r.info.run_id, {})]  # in chain order
        row = {"trial": r.data.tags.get("trial_id"), "model": r.data.tags.get("model"),
               "seed": int(r.data.tags.get("seed", 0)), "status": r.info.status,
               "stage": f"{len(finished)}/{len(keys)} {finished[-1] if finished else ''}".strip()}
        row.update({p: r.data.params.get(p) for p in varying})
        for m in ("train_top1_err", "val_top1_err", "val_top5_err"):
            row[m] = r.data.metrics.get(m)
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["model", "seed", "trial"]).reset_index(drop=True) if not frame.empty else frame


def _varying_params(runs) -> list[str]:
    values: dict[str, set] = {}
    for r in runs:
        for k, v in r.data.params.items():
            values.setdefault(k, set()).add(v)
    return sorted(k for k, v in values.items() if len(v) > 1 and k not in ("model", "seed"))


def results_table(tracking_uri: str, study: str, baseline: str) -> str:
    """The paper's table for this study (mean [95% CI] over seeds, difference to the baseline), as text."""
    runs = load_study(tracking_uri, study, curves=False)
    if runs.trials.empty:
        return "(no finished trials)"
    return to_markdown(format_table(paper_table(runs.trials, baseline=baseline), baseline=baseline))
