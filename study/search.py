"""Optuna behind Ray Tune, given only what is real: the objective per fine-tuning epoch, PRUNED for early stops.

Ray's `OptunaSearch` reports every Tune result to Optuna as an intermediate value at step = result count, and
tells Optuna COMPLETE with the last result's objective when ASHA stops a trial. Our trials report many events
(stage starts, epochs of every stage) that carry a placeholder objective because Tune requires the metric in every
result; so this subclass reports only fine-tuning epochs (step = fine-tuning epoch, the objective measured then)
and tells Optuna PRUNED for a trial that ended without its `trial_end` result. It also marks each Optuna trial
with its Tune trial id, so the MLflow writer can link runs and trials both ways (`link_trial`).
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch  # [ray] the searcher this refines

RAY_TRIAL_ATTR = "ray_trial_id"  # Optuna user attribute: the Tune trial id
MLFLOW_RUNS_ATTR = "mlflow_run_ids"  # Optuna user attribute: {seed: MLflow trial run id}


class EpochOptunaSearch(OptunaSearch):
    def __init__(self, *args, objective_metric: str = "val_top1_err", **kwargs):
        super().__init__(*args, **kwargs)
        self.objective_metric = objective_metric  # the metric `objective` stands for; must be in the result
        self._reported: dict[str, set[int]] = {}

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if trial is not None:
            trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict | None) -> None:
        """An intermediate value only for a fine-tuning epoch that measured the objective (first seed's epochs)."""
        if not result or result.get("event") != "epoch" or result.get("stage") != "finetune":
            return
        if self.objective_metric not in result:
            return
        step = int(result["finetune_epoch"])
        seen = self.__dict__.setdefault("_reported", {}).setdefault(trial_id, set())
        if step in seen:  # a later seed's epoch: Optuna keeps one value per step
            return
        seen.add(step)
        self._ot_trials[trial_id].report(float(result[self.metric]), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or (result and result.get("event") == "trial_end") or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        # Stopped by the scheduler before its last result: no final objective, so PRUNED (with the value that
        # decided it, which Tune hands to the searcher here instead of as a result), not COMPLETE.
        from optuna.trial import TrialState

        self._report(trial_id, result)
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def link_trial(storage_url: str, study_name: str, ray_trial_id: str, seed: int, run_id: str) -> int | None:
    """Record MLflow run `run_id` (of `seed`) on the Optuna trial of Tune trial `ray_trial_id`; its number, or None."""
    import optuna

    storage = optuna.storages.get_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        if trial.user_attrs.get(RAY_TRIAL_ATTR) == ray_trial_id:
            runs = {**trial.user_attrs.get(MLFLOW_RUNS_ATTR, {}), str(seed): run_id}
            storage.set_trial_user_attr(trial._trial_id, MLFLOW_RUNS_ATTR, runs)
            return trial.number
    return None
