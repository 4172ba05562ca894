"""What a study's records say right now: the trial table of `study status`, the results table at the end.

The table tells the truth after a crash: a run MLflow still calls RUNNING while no launcher runs the study is
shown INTERRUPTED, trials not started yet are PENDING rows, and the stage reached comes from the stage store (a
stage published just before a kill counts, even if its MLflow run was not closed).
"""

from __future__ import annotations

import math

import mlflow
import pandas as pd

from analysis import AnalysisError, load_study, paper_table, verdicts
from analysis.common import finished
from analysis.report import format_table, to_markdown
from analysis.stats import best_per_model

from .spec import StudySpec


class RecordsError(RuntimeError):
    """The study's MLflow records cannot be read."""


def _read(what: str, tracking_uri: str, fn):
    try:
        return fn()
    except AnalysisError:
        raise
    except Exception as exc:  # noqa: BLE001 (MLflow and its database drivers raise many types)
        first = next((line for line in str(exc).strip().splitlines() if line.strip()), type(exc).__name__)
        raise RecordsError(f"cannot read {what} at {tracking_uri}: {first[:300]}; if the file is damaged, move it "
                           "away and run `study resume` (finished stages come back from the store)") from exc


def trial_status(tracking_uri: str, study: str, spec: StudySpec | None = None, store_uri: str | None = None,
                 launcher_running: bool | None = None) -> pd.DataFrame:
    """One row per trial run (any state) and, given the spec, one PENDING row per trial not started yet.

    `launcher_running`: False when no launcher runs the study (runs still RUNNING were interrupted), None if
    unknown. `store_uri`: where stage progress is read (else from the MLflow stage runs).
    """
    client = _read("the MLflow records", tracking_uri, lambda: mlflow.MlflowClient(tracking_uri))
    exp = _read("the MLflow records", tracking_uri, lambda: client.get_experiment_by_name(study))
    if exp is None:
        raise AnalysisError(f"no MLflow experiment {study!r} at {tracking_uri}: has the study been launched?")
    runs = _read("the trial runs", tracking_uri,
                 lambda: client.search_runs([exp.experiment_id], "tags.role = 'trial'", max_results=5000))
    stages = _read("the stage runs", tracking_uri,
                   lambda: client.search_runs([exp.experiment_id], "tags.role = 'stage'", max_results=50000))
    done: dict[str, set[str]] = {}  # trial run -> finished stage keys
    for s in stages:
        if s.info.status == "FINISHED":
            done.setdefault(s.data.tags.get("mlflow.parentRunId"), set()).add(s.data.tags.get("stage_key"))
    store = None
    if store_uri:
        from trainables.stages.store import StageStore

        store = StageStore(store_uri)
    rows = []
    varying = _varying_params(runs)
    for r in runs:
        keys = [k for k in r.data.tags.get("stage_keys", "").split(",") if k]
        finished = [k for k in keys if k in done.get(r.info.run_id, set()) or (store is not None and store.has(k))]
        last = finished[-1].rsplit("-", 1)[0] if finished else ""  # a key is <kind>-<digest>
        row = {"trial": r.data.tags.get("trial_id"), "model": r.data.tags.get("model"),
               "seed": int(r.data.tags.get("seed", 0)), "status": _status(r, launcher_running),
               "stage": f"{len(finished)}/{len(keys)} {last}".strip()}
        row.update({p: r.data.params.get(p) for p in varying})
        for m in ("train_top1_err", "val_top1_err", "val_top5_err"):
            row[m] = r.data.metrics.get(m)
        rows.append(row)
    if spec is not None:
        rows += _pending(spec, runs)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["trial"] = frame["trial"].fillna("")
    return frame.sort_values(["model", "seed", "trial"]).reset_index(drop=True)


def _status(run, launcher_running: bool | None) -> str:
    status = run.info.status
    if status == "RUNNING" and launcher_running is False:
        return "INTERRUPTED"  # no launcher runs the study: left RUNNING by a crash
    if status == "KILLED":
        return "EARLY-STOPPED" if "scheduler" in run.data.tags.get("status_detail", "") else "INTERRUPTED"
    return status


def _pending(spec: StudySpec, runs) -> list[dict]:
    """Trials of the plan that have no run yet: per (model, seed) for grids, as a count for a search."""
    if spec.search is not None and spec.search.algorithm != "grid":
        started = len({r.data.tags.get("trial_id") for r in runs})
        return [{"trial": "", "model": "(search)", "seed": s, "status": "PENDING", "stage": ""}
                for _ in range(max(spec.search.num_samples - started, 0)) for s in spec.seeds]
    repeats = 1
    if spec.search is not None:
        repeats = spec.search.num_samples * math.prod(len(d.values) for d in spec.search.space.values())
    have: dict[tuple[str, int], int] = {}
    for r in runs:
        key = (r.data.tags.get("model"), int(r.data.tags.get("seed", 0)))
        have[key] = have.get(key, 0) + 1
    return [{"trial": "", "model": m, "seed": s, "status": "PENDING", "stage": ""}
            for m in spec.models for s in spec.seeds for _ in range(max(repeats - have.get((m, s), 0), 0))]


def _varying_params(runs) -> list[str]:
    values: dict[str, set] = {}
    for r in runs:
        for k, v in r.data.params.items():
            values.setdefault(k, set()).add(v)
    return sorted(k for k, v in values.items() if len(v) > 1 and k not in ("model", "seed"))


def verdict_lines(tracking_uri: str, study: str, baseline: str) -> str:
    """The analysis' verdicts (docs/STATISTICS.md: paired by seed and by image), one sentence per comparison; in a
    search, between each model's best configuration."""
    runs = load_study(tracking_uri, study, curves=False)
    trials = best_per_model(finished(runs.trials)) if not runs.trials.empty else runs.trials
    table = verdicts(trials, baseline=baseline, images=runs.trial_images(trials)) if not trials.empty else None
    if table is None or table.empty:
        return "(no comparisons)"
    return "\n".join(f"- {r.sentence}" for r in table.itertuples())


def results_table(tracking_uri: str, study: str, baseline: str) -> str:
    """The paper's table for this study (mean [95% CI] over seeds, difference to the baseline), as text; in a
    search, each model's best configuration (the report lists them all)."""
    runs = _read("the MLflow records", tracking_uri, lambda: load_study(tracking_uri, study, curves=False))
    if runs.trials.empty:
        return "(no finished trials)"
    done = finished(runs.trials)
    trials = best_per_model(done)
    note = "\n(a search: each model's best configuration by val top-1 error)" if len(trials) < len(done) else ""
    return to_markdown(format_table(paper_table(trials, baseline=baseline), baseline=baseline)) + note
