"""MLflow records of a study (docs/RECORDS.md), written by ONE writer: a Tune callback in the launcher process.

Trials never talk to MLflow: they report events (trial_start, epoch, stage_done, trial_end) to Tune, and this
callback turns them into runs. One writer means no lost run or metric under parallel trials, whatever the
tracking store (SQLite included). Stage results are read from the stage store, so a reused stage is recorded
exactly like a computed one (its per-epoch history comes from the store), tagged `reused=true`.

On `study resume` the callback finds the runs it wrote before (by tags) instead of duplicating them: a stage run
left unfinished by an interruption is continued, a finished trial or stage that Tune runs again is not logged
twice (one value per metric and step), and runs still RUNNING when the experiment ends (it was interrupted) are
marked KILLED.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from ray import tune  # [ray] the callback interface

from trainables.stages.chain import INVERT_FILE, PREDICTIONS_FILE, RECORD_FILE
from trainables.stages.store import StageStore

from .plan import trial_config
from .tracking import log_data_input, log_finetuned_model, standard_tags

FINAL_KEYS = ("train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err",
              "val_top1_err_dense", "val_top5_err_dense")


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


def invert_grid_png(arrays: dict[str, np.ndarray]) -> bytes:
    """A PNG grid: the input row, then one row per depth (each image min-max scaled on its own)."""
    from PIL import Image

    rows = [arrays["input"]] + [arrays[k] for k in sorted(k for k in arrays if k.startswith("from_pool"))]
    n, c, h, w = rows[0].shape
    canvas = np.zeros((len(rows) * (h + 2), n * (w + 2), 3), dtype=np.uint8)
    for r, row in enumerate(rows):
        for i in range(n):
            img = row[i]
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
            img = np.repeat(img, 3, axis=0) if c == 1 else img[:3]
            canvas[r * (h + 2):r * (h + 2) + h, i * (w + 2):i * (w + 2) + w] = (img.transpose(1, 2, 0) * 255).astype(np.uint8)
    scale = max(1, 96 // h)
    image = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class MlflowRecorder(tune.Callback):
    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str, store_uri: str,
                 study_params: dict, spec_text: str, note: str = "", data_settings: dict | None = None,
                 system_metrics: bool = False, optuna_storage: str | None = None):
        self.tracking_uri = tracking_uri
        self.note = note  # the spec's description: the study run's note (mlflow.note.content)
        self.data_settings = data_settings or {}  # what shaped the data: the source of each trial's dataset input
        self.system_metrics = system_metrics  # sample CPU/memory/disk/GPU of the launcher's node on the study run
        self._monitor = None
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.store_uri = store_uri
        self.study_params = study_params
        self.spec_text = spec_text
        self.optuna_storage = optuna_storage  # an Optuna search's storage: trial runs and Optuna trials link both ways
        self._trial_runs: dict[tuple[str, int], str] = {}
        self._stage_runs: dict[tuple[str, int, str], str] = {}
        self._current_seed: dict[str, int] = {}
        self._failed: set[str] = set()
        self._steps: dict[str, set[int]] = {}  # stage run -> epochs whose metrics it holds
        self.client = None

    # -- setup ---------------------------------------------------------------------------------------------
    def __getstate__(self):
        """Tune pickles its callbacks with the experiment state: keep only the configuration."""
        keep = ("tracking_uri", "experiment", "artifact_location", "store_uri", "study_params", "spec_text", "note",
                "data_settings", "system_metrics", "optuna_storage")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state):
        self.__init__(**{"optuna_storage": None, **state})

    def setup(self, **info):
        """Called by Tune when a run (or a resumed run) starts."""
        self.start()

    def start(self) -> str:
        """Create (or find) the experiment and the study run; returns the study run id."""
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the CLI prints its own progress
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self.store = StageStore(self.store_uri)
        self.context_tags = standard_tags()  # user, source, git commit: on the study run and every trial run
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_location,
                tags={"mlflow.experimentKind": "custom_model_development"})  # the UI opens on the runs table
        else:
            self.experiment_id = exp.experiment_id
        found = self._search("tags.role = 'study'")
        if found:
            self.study_run = found[0].info.run_id
            self.client.update_run(self.study_run, status="RUNNING")
        else:
            tags = {**self.context_tags, "role": "study"}
            if self.note:
                tags["mlflow.note.content"] = self.note
            run = self.client.create_run(self.experiment_id, run_name=self.experiment, tags=tags)
            self.study_run = run.info.run_id
            self.client.log_batch(self.study_run, params=[Param(k, str(v)[:6000]) for k, v in self.study_params.items()])
            self.client.log_text(self.study_run, self.spec_text, "spec.yaml")
        if self.system_metrics and self._monitor is None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.study_run, tracking_uri=self.tracking_uri,
                                                 resume_logging=bool(found))
            self._monitor.start()
        return self.study_run

    def on_experiment_end(self, trials, **info):
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.study_run, "FINISHED" if ok else "FAILED")

    def _search(self, filter_string: str):
        return self.client.search_runs([self.experiment_id], filter_string, max_results=1000)

    # -- runs ----------------------------------------------------------------------------------------------
    def _trial_run(self, trial_id: str, seed: int, event: dict | None = None) -> str:
        key = (trial_id, seed)
        if key in self._trial_runs:
            return self._trial_runs[key]
        found = self._search(f"tags.role = 'trial' and tags.trial_id = '{trial_id}' and tags.seed = '{seed}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            event = event or {}
            tags = {**self.context_tags, "role": "trial", "trial_id": trial_id, "seed": str(seed),
                    "model": event.get("model", ""), "decoder": event.get("decoder", ""), "placement": event.get("placement", ""),
                    "stage_keys": event.get("stage_keys", ""), "mlflow.parentRunId": self.study_run}
            run = self.client.create_run(self.experiment_id, run_name=f"{event.get('model', 'trial')}-s{seed}-{trial_id}",
                                         tags=tags)
            run_id = run.info.run_id
            params = json.loads(event.get("params_json", "{}"))
            params["seed"] = seed
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
            if event.get("data_identity"):
                log_data_input(self.client, run_id, event["data_identity"], self.data_settings)
            if self.optuna_storage:
                from .search import link_trial

                number = link_trial(self.optuna_storage, self.experiment, trial_id, seed, run_id)
                if number is not None:
                    self.client.set_tag(run_id, "optuna_trial_number", str(number))
        self._trial_runs[key] = run_id
        return run_id

    def _stage_run(self, trial_id: str, seed: int, stage_key: str, stage: str, reused: bool | None = None) -> str:
        key = (trial_id, seed, stage_key)
        if key in self._stage_runs:
            return self._stage_runs[key]
        parent = self._trial_run(trial_id, seed)
        for old in self._search(f"tags.role = 'stage' and tags.trial_id = '{trial_id}' and tags.seed = '{seed}' "
                                f"and tags.stage_key = '{stage_key}'"):
            if old.info.status != "FINISHED":  # interrupted before: this attempt continues it
                self.client.update_run(old.info.run_id, status="RUNNING")
            self._stage_runs[key] = old.info.run_id
            return old.info.run_id
        model = self.client.get_run(parent).data.tags.get("model", "")
        tags = {"role": "stage", "stage": stage, "stage_key": stage_key, "trial_id": trial_id, "seed": str(seed),
                "model": model, "mlflow.parentRunId": parent}
        if reused is not None:
            tags["reused"] = str(reused).lower()
        run = self.client.create_run(self.experiment_id, run_name=f"{stage}-{model}-s{seed}", tags=tags)
        self._stage_runs[key] = run.info.run_id
        return run.info.run_id

    # -- events --------------------------------------------------------------------------------------------
    def on_trial_result(self, iteration, trials, trial, result, **info):
        event = result.get("event")
        if event is None:
            return
        trial_id = trial.trial_id
        if event == "trial_start":
            self._current_seed[trial_id] = int(result["seed"])
            self._trial_run(trial_id, int(result["seed"]), result)
            return
        seed = int(result["seed"]) if "seed" in result else self._seed_of(trial)
        if event == "epoch" and result.get("replayed"):
            return  # a stored stage's curve, replayed for the scheduler: stage_done logs it from the store
        if event == "epoch":
            run_id = self._stage_run(trial_id, seed, result["stage_key"], result["stage"])
            step = int(result["epoch"])
            if step in self._logged_epochs(run_id):
                return  # logged by an attempt before an interruption
            now = int(time.time() * 1000)
            metrics = {k: v for k, v in numeric(result).items() if k.startswith(("loss", "val_"))}
            tags = [RunTag("node_id", result["node_id"])] if result.get("node_id") else []
            self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], tags=tags)
            self._steps[run_id].add(step)
        elif event == "stage_done":
            self._stage_done(trial_id, seed, result)
        elif event == "seed_end":
            run_id = self._trial_run(trial_id, seed)
            if self.client.get_run(run_id).info.status == "FINISHED":
                return  # the trial had finished before an interruption; Tune ran it again (all stages reused)
            now = int(time.time() * 1000)
            metrics = {k: v for k, v in numeric(result).items() if k in FINAL_KEYS}
            self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
            self.client.set_tag(run_id, "trial_state", "COMPLETE")
            final_key = self.client.get_run(run_id).data.tags["stage_keys"].split(",")[-1]
            log_finetuned_model(self.tracking_uri, run_id, self.store, final_key, json.loads(result["data_mean"]))
            self.client.set_terminated(run_id, "FINISHED")

    def _stage_done(self, trial_id: str, seed: int, result: dict) -> None:
        reused = bool(result["reused"])
        run_id = self._stage_run(trial_id, seed, result["stage_key"], result["stage"], reused)
        if self.client.get_run(run_id).info.status == "FINISHED":
            return  # recorded before an interruption
        self.client.set_tag(run_id, "reused", str(reused).lower())
        if result.get("why"):  # why a computed stage was computed: not in the store / corrupt / version changed
            self.client.set_tag(run_id, "why", result["why"])
        entry = self.store.get(result["stage_key"])
        with open(os.path.join(entry.path, RECORD_FILE)) as f:
            record = json.load(f)
        now = int(time.time() * 1000)
        metrics = []
        logged = self._logged_epochs(run_id)
        for row in record["history"]:  # epochs not logged live (a reused stage, or lost to an interruption)
            if int(row["epoch"]) not in logged:
                metrics += [Metric(k, v, now, int(row["epoch"])) for k, v in numeric(row).items() if k != "epoch"]
        last_row = record["history"][-1] if record["history"] else {"epoch": 0}
        if "train_top1_err" not in self.client.get_run(run_id).data.metrics:  # finals not logged before
            # at the last epoch's step, a metric the epoch already has (val_top1_err...) is not logged twice
            metrics += [Metric(k, v, now, int(last_row["epoch"])) for k, v in numeric(record["final"]).items()
                        if k not in last_row]
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(run_id, metrics=metrics[i:i + 900])
        config = {k: record[k] for k in ("key", "parent", "seed", "data_identity", "stage", "code_version", "workers",
                                         "precision") if k in record}
        self.client.log_dict(run_id, config, "config.json")
        invert = os.path.join(entry.path, INVERT_FILE)
        if os.path.exists(invert):
            with tempfile.TemporaryDirectory() as tmp:
                arrays = dict(np.load(invert))
                with open(os.path.join(tmp, "invert.png"), "wb") as f:
                    f.write(invert_grid_png(arrays))
                np.savez_compressed(os.path.join(tmp, "invert.npz"), **arrays)
                self.client.log_artifacts(run_id, tmp, "recon")
        predictions = os.path.join(entry.path, PREDICTIONS_FILE)
        if os.path.exists(predictions):  # per-image outcomes, for the analysis' image-level pairing
            self.client.log_artifact(run_id, predictions, "eval")
        self.client.set_terminated(run_id, "FINISHED")

    def _logged_epochs(self, run_id: str) -> set[int]:
        if run_id not in self._steps:
            self._steps[run_id] = {m.step for m in self.client.get_metric_history(run_id, "loss")}
        return self._steps[run_id]

    def on_experiment_end(self, trials, **info):
        """The experiment ends; runs still RUNNING were interrupted (Ctrl-C, SIGTERM): they are KILLED."""
        for run_id in [*self._trial_runs.values(), *self._stage_runs.values()]:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")

    def _seed_of(self, trial) -> int:
        """The seed a trial runs now: the last one it reported, else its config's."""
        if trial.trial_id in self._current_seed:
            return self._current_seed[trial.trial_id]
        return int(trial_config(trial.config).get("seed", 0))

    def on_trial_error(self, iteration, trials, trial, **info):
        model = trial_config(trial.config).get("model", "")
        run_id = self._trial_run(trial.trial_id, self._seed_of(trial), {"model": model})
        error = ""
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                error = f.read()[-4000:]
        self.client.set_tag(run_id, "status_detail", error or "trial failed")
        self.client.set_tag(run_id, "trial_state", "FAIL")
        self.client.set_terminated(run_id, "FAILED")
        for (tid, s, _), stage_run in self._stage_runs.items():
            if tid == trial.trial_id and self.client.get_run(stage_run).info.status == "RUNNING":
                self.client.set_terminated(stage_run, "FAILED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A trial that ends without its seed_end event was stopped early by the scheduler.
        for (tid, seed), run_id in self._trial_runs.items():
            if tid == trial.trial_id and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_tag(run_id, "status_detail", "stopped early by the scheduler (ASHA)")
                self.client.set_tag(run_id, "trial_state", "PRUNED")  # as Optuna records it
                self.client.set_terminated(run_id, "KILLED")
        for (tid, _, _), stage_run in self._stage_runs.items():
            if tid == trial.trial_id and self.client.get_run(stage_run).info.status == "RUNNING":
                self.client.set_terminated(stage_run, "KILLED")


def retire_runs(tracking_uri: str, experiment: str) -> int:
    """Before a fresh Tune run of a study that has records (an earlier attempt whose Tune state was lost at
    start-up): its trial and stage runs are ended (KILLED if they were running) and deleted, since every trial
    runs again, with its stages from the store. Returns how many runs were retired."""
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    runs = [r for role in ("stage", "trial")
            for r in client.search_runs([exp.experiment_id], f"tags.role = '{role}'", max_results=50000)]
    for r in runs:
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, "KILLED")
        client.delete_run(r.info.run_id)
    return len(runs)
