"""Give back the cores of a trial that Tune stopped: remove its Train runs' placement groups when the trial ends.

Ray Train V2 reserves each run's workers in a placement group that outlives the run's controller when the
controller is killed rather than finishing (ASHA stopping a trial, Ctrl-C). Train's own `PlacementGroupCleaner`
would remove it, but it asks the Ray dashboard's State API whether the controller is alive, and this platform
installs Ray without the dashboard (`ray[train,tune]`): the question fails, the cleaner never removes the group,
and its CPUs stay reserved for the rest of the Ray session, until later trials cannot start at all.

So every report of a Train worker carries its placement group's id (`trainables/stages/on_ray.py`), and this Tune
callback in the launcher removes the trial's groups when Tune has finished with the trial (complete, stopped or
failed). A group that its run already removed is skipped. In a study with a Train pool
(`resources.train_runs: pooled`) the runs are the pool's and outlive trials: the janitor cancels the ended trial's
pool jobs instead (a stopped trial's fine-tuning would otherwise hold a slot to its end).
"""

from __future__ import annotations

from ray import tune  # [ray] the callback interface


class PlacementGroupJanitor(tune.Callback):
    def __init__(self, pool=None):
        self.groups: dict[str, set[str]] = {}  # trial id -> placement group ids (hex) its Train runs reported
        self.pool = pool  # a Train pool's dispatcher (trainables/stages/pool.py), if the study has one

    def on_trial_result(self, iteration, trials, trial, result, **info):
        group = result.get("placement_group")
        if group:
            self.groups.setdefault(trial.trial_id, set()).add(group)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.release(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.release(trial.trial_id)

    def release(self, trial_id: str) -> int:
        """Remove the trial's placement groups that still exist, and cancel its Train pool jobs that still run (a
        finished job is left as it is); returns how many groups were removed."""
        import ray  # [ray] placement groups
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, placement_group_table

        if self.pool is not None:
            self.pool.cancel.remote(trial_id)
        removed = 0
        for group in self.groups.pop(trial_id, ()):
            pg = PlacementGroup(PlacementGroupID.from_hex(group))
            try:
                if placement_group_table(pg).get("state", "REMOVED") == "REMOVED":
                    continue
                ray.util.remove_placement_group(pg)
                removed += 1
            except Exception:  # noqa: BLE001 (removed meanwhile by its run: nothing left to give back)
                pass
        return removed
