"""Train reports reach Tune through the trial's own thread, in order, with the trial reporting in between.

With Ray's `TuneReportCallback`, a Train report still queued when the trial thread called `tune.report` left the
trial hung forever (both of the Tune session's threads blocked on its one-slot result queue); this is the pattern
every trial runs at the end of each Train run. Here it runs 20 times in a row, with the reports put from another
process as the Train controller does.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_train_reports_and_the_trials_own_reports_reach_tune_in_order_without_hanging(ray_local, tmp_path):
    from ray import tune

    # Defined here so that Ray pickles it by value (the test module is not importable in Ray's workers).
    def _trial(config):
        import ray
        from ray import tune

        from study.train_reports import TrainReports

        @ray.remote(num_cpus=0)
        def controller(callback, i):  # what the Train controller does with the callback, in its own process
            callback.after_report(run_context=None, metrics=[{"event": "epoch", "i": i}, {"rank": 1}], checkpoint=None)

        stale = TrainReports()  # an earlier run of the same driver process: its late reports must be dropped
        reports = TrainReports()
        same_queue = reports.queue.actor._actor_id == stale.queue.actor._actor_id
        for i in range(20):
            ray.get([controller.remote(reports.callback, i), controller.remote(stale.callback, 100 + i)])
            tune.report({"event": "stage_done", "i": i, "same_queue": same_queue})  # a Train report is still queued
            assert reports.forward() == 1
        tune.report({"event": "trial_end", "i": 20, "same_queue": same_queue})

    grid = tune.Tuner(_trial, run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    assert not grid.errors
    rows = grid[0].metrics_dataframe
    seen = list(zip(rows["event"], rows["i"]))
    expected = [pair for i in range(20) for pair in (("stage_done", i), ("epoch", i))] + [("trial_end", 20)]
    assert seen == expected  # rank 0's metrics only, none of the stale run's, none lost, none twice
    assert rows["same_queue"].dropna().all()  # one queue actor per driver process, not one per trial or run
