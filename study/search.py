"""Optuna behind Ray Tune, given only what is real: the objective per fine-tuning epoch, PRUNED for early stops.

Ray's `OptunaSearch` reports every Tune result to Optuna as an intermediate value at step = result count, and
tells Optuna COMPLETE with the last result's objective when ASHA stops a trial. Our trials report many events
(stage starts, epochs of every stage) that carry a placeholder objective because Tune requires the metric in every
result. So `EpochOptunaSearch` reports no intermediate values itself and tells Optuna PRUNED for a trial that
ended without its `trial_end` result; `OptunaEpochValues`, a Tune callback, gives Optuna the objective after each
fine-tuning epoch (step = epoch), from every result Tune sees — including the one on which the scheduler stops a
trial, which Tune hands to callbacks but not to the searcher. Each Optuna trial is marked with its Tune trial id,
so the MLflow writer can link runs and trials both ways (`link_trial`).
"""

from __future__ import annotations

from ray import tune  # [ray] the callback interface
from ray.tune.search.optuna import OptunaSearch  # [ray] the searcher this refines

RAY_TRIAL_ATTR = "ray_trial_id"  # Optuna user attribute: the Tune trial id
MLFLOW_RUNS_ATTR = "mlflow_run_ids"  # Optuna user attribute: {seed: MLflow trial run id}


class EpochOptunaSearch(OptunaSearch):
    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if trial is not None:
            trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Nothing: the intermediate values come from `OptunaEpochValues` (fine-tuning epochs only)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or (result and result.get("event") == "trial_end") or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        # Stopped by the scheduler before its last result: no final objective, so PRUNED, not COMPLETE.
        from optuna.trial import TrialState

        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)


class OptunaEpochValues(tune.Callback):
    """Optuna's intermediate values: the objective after each fine-tuning epoch of a trial (its first seed's, when
    it runs several), whether computed or replayed from a stored stage."""

    def __init__(self, storage_url: str, study_name: str, objective_metric: str):
        self.storage_url, self.study_name, self.objective_metric = storage_url, study_name, objective_metric
        self._storage = None
        self._optuna_ids: dict[str, int] = {}  # Tune trial id -> Optuna storage trial id
        self._reported: dict[str, set[int]] = {}

    def __getstate__(self):
        """Tune pickles its callbacks with the experiment state: keep only the configuration."""
        return {k: self.__dict__[k] for k in ("storage_url", "study_name", "objective_metric")}

    def __setstate__(self, state):
        self.__init__(**state)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("event") != "epoch" or result.get("stage") != "finetune" or self.objective_metric not in result:
            return
        step = int(result["finetune_epoch"])
        seen = self._reported.setdefault(trial.trial_id, set())
        optuna_id = self._optuna_id(trial.trial_id)
        if step in seen or optuna_id is None:
            return
        self._storage.set_trial_intermediate_value(optuna_id, step, float(result[self.objective_metric]))
        seen.add(step)

    def _optuna_id(self, ray_trial_id: str) -> int | None:
        if ray_trial_id not in self._optuna_ids:
            import optuna

            self._storage = self._storage or optuna.storages.get_storage(self.storage_url)
            study_id = self._storage.get_study_id_from_name(self.study_name)
            for t in self._storage.get_all_trials(study_id, deepcopy=False):
                if t.user_attrs.get(RAY_TRIAL_ATTR) == ray_trial_id:
                    self._optuna_ids[ray_trial_id] = t._trial_id
        return self._optuna_ids.get(ray_trial_id)


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
