"""Read one study from MLflow into plain DataFrames, following docs/RECORDS.md and nothing else.

This is the only module (with report.py's artifact upload) that talks to MLflow.
"""

from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from analysis.common import PARAM_PREFIX, STAGES, AnalysisError, model_sort_key

INVERT_ARTIFACT = "recon/invert.npz"
PREDICTIONS_ARTIFACT = "eval/predictions.npz"

TRIAL_COLUMNS = ["trial_id", "run_id", "model", "decoder", "placement", "seed", "status", "status_detail",
                 "trial_state", "optuna_trial_number", "stage_keys", "start_time", "end_time"]  # fmt: skip
STAGE_COLUMNS = ["trial_id", "run_id", "trial_run_id", "model", "decoder", "placement", "seed", "stage",
                 "stage_key", "reused", "status"]  # fmt: skip
CURVE_COLUMNS = ["trial_id", "run_id", "model", "seed", "stage", "metric", "step", "value"]

# Metrics RECORDS.md logs once at the end of a stage; everything else is fetched as a per-epoch history.
_FINAL_ONLY = re.compile(r"^(train_top[15]_err|val_top[15]_err_dense|rec_(err|rel)_.+|invert_err_pool\d+"
                         r"|loss_share_(start|end)_.+|loss_weight_.+|lr_decoder\d+)$")


class StudyRuns(NamedTuple):
    """Everything `load_study` read; frames are empty (with their columns) when nothing has run yet."""

    study: str
    tracking_uri: str
    experiment_id: str
    study_run_id: str | None  # the parent run (tag role=study); the latest one if the study was restarted
    trials: pd.DataFrame  # one row per trial: tags, `params.<name>` columns, final metrics
    stages: pd.DataFrame  # one row per trial x stage: tags, final metrics (rec_err_*, invert_err_*, ...)
    curves: pd.DataFrame  # one row per trial x stage x metric x epoch (step)
    study_params: dict | None = None  # params of the study run (e.g. eval_on, labeled_fraction); None if no study run

    def inversion(self, stage_run_id: str) -> dict[str, np.ndarray]:
        """The arrays of `recon/invert.npz` of a decoder stage run (see `load_inversion`)."""
        return load_inversion(self.tracking_uri, stage_run_id)

    def predictions(self, stage_run_ids) -> dict[str, dict[str, np.ndarray]]:
        """{stage run id: arrays of its `eval/predictions.npz`}, for the runs that have one (see docs/RECORDS.md)."""
        return load_predictions(self.tracking_uri, stage_run_ids)

    def trial_images(self, trials: pd.DataFrame | None = None) -> dict[tuple[str, object], dict[str, np.ndarray]]:
        """{(model, seed): per-image outcomes of the trial's final stage} for the finished trials (of `trials`, by
        default all of the study's; give one trial per model and seed) that logged them."""
        trials = self.trials if trials is None else trials
        done = trials[trials["status"] == "FINISHED"] if len(trials) else trials
        final = final_stage_runs(self.stages, done)
        arrays = self.predictions(final.values())
        return {key: arrays[rid] for key, rid in final.items() if rid in arrays}


def _search(client: MlflowClient, experiment_id: str, role: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.role = '{role}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _number(text):
    """MLflow stores params and tags as text; give numbers back as numbers."""
    if text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and re.fullmatch(r"[+-]?\d+", str(text).strip()) else value


def _bool(text) -> bool | None:
    if text is None:
        return None
    return str(text).strip().lower() in ("true", "1", "yes")


def _time(ms) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _trial_row(run: Run) -> dict:
    tags, params = run.data.tags, run.data.params
    row = {
        "trial_id": tags.get("trial_id", run.info.run_id),
        "run_id": run.info.run_id,
        "model": tags.get("model", params.get("model")),
        "decoder": tags.get("decoder"),
        "placement": tags.get("placement"),
        "seed": _number(tags.get("seed", params.get("seed"))),
        "status": run.info.status,
        "status_detail": tags.get("status_detail", ""),
        "trial_state": tags.get("trial_state", ""),
        "optuna_trial_number": _number(tags.get("optuna_trial_number")),
        "stage_keys": tags.get("stage_keys", ""),
        "start_time": _time(run.info.start_time),
        "end_time": _time(run.info.end_time),
    }
    row.update({PARAM_PREFIX + k: v for k, v in params.items()})
    row.update(run.data.metrics)
    return row


def _latest_per_trial(trials: pd.DataFrame) -> pd.DataFrame:
    """A restarted study can hold a trial twice: keep its latest FINISHED run, else its latest run."""
    if trials.empty or not trials["trial_id"].duplicated().any():
        return trials
    ranked = trials.assign(_done=trials["status"] == "FINISHED").sort_values(["_done", "start_time"], kind="stable")
    return ranked.drop_duplicates("trial_id", keep="last").drop(columns="_done").sort_index()


def _typed_params(frame: pd.DataFrame) -> pd.DataFrame:
    for col in [c for c in frame.columns if str(c).startswith(PARAM_PREFIX)]:
        numeric = pd.to_numeric(frame[col], errors="coerce")
        if numeric[frame[col].notna()].notna().all():
            frame[col] = numeric
    return frame


def _sorted(frame: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame.reset_index(drop=True)
    key = frame["model"].map(lambda m: model_sort_key(str(m))[0])
    return (
        frame.assign(_m=key, _s=frame["seed"].astype(str))
        .sort_values(["_m", "model", "_s", *extra], kind="stable")
        .drop(columns=["_m", "_s"])
        .reset_index(drop=True)
    )


def load_study(tracking_uri: str, study: str, *, curves: bool = True, max_workers: int = 8) -> StudyRuns:
    """Read the study `study` (one MLflow experiment of that name) from `tracking_uri`.

    `curves=False` skips the per-epoch histories (one request per stage run and metric).
    Raises AnalysisError naming the existing experiments when there is no such study.
    """
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None or experiment.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
        listing = ", ".join(repr(n) for n in names) if names else "none"
        raise AnalysisError(
            f"no study {study!r} in MLflow at {tracking_uri} (each study is an experiment named after it). "
            f"Existing experiments: {listing}. Check --study and --tracking-uri."
        )
    exp_id = experiment.experiment_id
    study_runs = _search(client, exp_id, "study")
    study_run_id = study_runs[-1].info.run_id if study_runs else None
    study_params = dict(study_runs[-1].data.params) if study_runs else None

    trial_runs = _search(client, exp_id, "trial")
    trials = pd.DataFrame([_trial_row(r) for r in trial_runs]) if trial_runs else pd.DataFrame(columns=TRIAL_COLUMNS)
    for col in ("start_time", "end_time"):
        trials[col] = pd.to_datetime(trials[col], utc=True)
    trials = _sorted(_typed_params(_latest_per_trial(trials)), ["trial_id"])
    by_run = {r["run_id"]: r for r in trials.to_dict("records")}

    stage_rows = []
    for run in _search(client, exp_id, "stage"):
        tags = run.data.tags
        trial = by_run.get(tags.get("mlflow.parentRunId"))
        if trial is None:  # a stage of a superseded (restarted) trial run, or an orphan
            continue
        stage_rows.append({
            "trial_id": trial["trial_id"],
            "run_id": run.info.run_id,
            "trial_run_id": trial["run_id"],
            "model": tags.get("model", trial["model"]),
            "decoder": trial["decoder"],
            "placement": trial["placement"],
            "seed": _number(tags.get("seed", trial["seed"])),
            "stage": tags.get("stage"),
            "stage_key": tags.get("stage_key"),
            "reused": _bool(tags.get("reused")),
            "status": run.info.status,
            **run.data.metrics,
        })  # fmt: skip
    stages = pd.DataFrame(stage_rows) if stage_rows else pd.DataFrame(columns=STAGE_COLUMNS)
    stages = _sorted(stages, ["stage"])

    curve_frame = _curves(client, stages, max_workers) if curves else pd.DataFrame(columns=CURVE_COLUMNS)
    return StudyRuns(study, tracking_uri, exp_id, study_run_id, trials, stages, curve_frame, study_params)


def _curves(client: MlflowClient, stages: pd.DataFrame, max_workers: int) -> pd.DataFrame:
    jobs = []
    for row in stages.to_dict("records"):
        keys = [k for k, v in row.items() if k not in STAGE_COLUMNS and isinstance(v, (int, float))]
        metric_keys = [k for k in keys if not _FINAL_ONLY.match(k) and pd.notna(row.get(k))]
        jobs += [(row, key) for key in metric_keys]

    def fetch(job):
        row, key = job
        return [
            (row["trial_id"], row["run_id"], row["model"], row["seed"], row["stage"], key, m.step, m.value)
            for m in client.get_metric_history(row["run_id"], key)
        ]

    if not jobs:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        records = [r for chunk in pool.map(fetch, jobs) for r in chunk]
    out = pd.DataFrame.from_records(records, columns=CURVE_COLUMNS)
    return out.sort_values(["run_id", "metric", "step"], kind="stable").reset_index(drop=True)


def final_stage_runs(stages: pd.DataFrame, trials: pd.DataFrame) -> dict[tuple[str, object], str]:
    """{(model, seed): run id of the last stage of that trial} (the stage whose metrics are the trial's)."""
    if stages.empty or trials.empty:
        return {}
    out = {}
    for trial in trials.itertuples():
        keys = [k for k in str(trial.stage_keys or "").split(",") if k]
        mine = stages[stages["trial_run_id"] == trial.run_id]
        if keys:
            last = mine[mine["stage_key"] == keys[-1]]
        else:  # no stage_keys tag: the stage that comes last in the procedure
            order = [STAGES.index(s) if s in STAGES else -1 for s in mine["stage"]]
            last = mine.iloc[[int(np.argmax(order))]] if order else mine
        if len(last):
            out[(trial.model, trial.seed)] = str(last["run_id"].iloc[0])
    return out


def load_predictions(tracking_uri: str, stage_run_ids, max_workers: int = 8) -> dict[str, dict[str, np.ndarray]]:
    """Download `eval/predictions.npz` of each stage run that has one; runs without it are left out."""
    client = MlflowClient(tracking_uri)

    def fetch(run_id: str):
        with tempfile.TemporaryDirectory(prefix="pred-") as tmp:
            try:
                local = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp)
            except Exception:  # a run recorded before per-image outcomes existed, or a failed stage
                return run_id, None
            with np.load(Path(local)) as npz:
                return run_id, {name: np.array(npz[name]) for name in npz.files}

    ids = list(dict.fromkeys(str(r) for r in stage_run_ids))
    if not ids:
        return {}
    with _no_progress_bar(), ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return {rid: arrays for rid, arrays in pool.map(fetch, ids) if arrays is not None}


def load_optuna_study(storage_url: str | None, study_name: str):
    """(the Optuna study, "") or (None, why not): the search's own records, for Optuna's figures."""
    if not storage_url:
        return None, "no Optuna storage (only Optuna searches have one: runs/<study>/optuna.db)"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=storage_url), ""
    except KeyError:
        return None, f"no Optuna study named {study_name!r} in {storage_url}"
    except Exception as exc:  # storage unreachable, bad URL, ...
        return None, f"cannot open Optuna storage {storage_url}: {exc}"


@contextmanager
def _no_progress_bar():
    """One small file: MLflow's download progress bar would only clutter the report's console output."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(name)
    os.environ[name] = "false" if old is None else old
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)


def load_inversion(tracking_uri: str, stage_run_id: str) -> dict[str, np.ndarray]:
    """Download `recon/invert.npz` of a decoder stage run: {"input": (N,C,H,W), "from_pool1": ..., ...}."""
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="invert-") as tmp, _no_progress_bar():
        try:
            local = client.download_artifacts(stage_run_id, INVERT_ARTIFACT, tmp)
        except Exception as exc:
            raise AnalysisError(
                f"stage run {stage_run_id} has no readable {INVERT_ARTIFACT} ({type(exc).__name__}: {exc}); "
                "only decoder stages (layerwise, topdown, finetune of sae/swwae models) write it."
            ) from exc
        with np.load(Path(local)) as npz:
            return {name: np.array(npz[name]) for name in npz.files}
