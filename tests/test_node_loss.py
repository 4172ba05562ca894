"""A Train worker lost while its worker group starts (`trainables/stages/node_loss.py`), on a real local Ray.

A Train callback kills the run's worker once, at the two points where Ray Train 2.60 leaves work undone: just
before the train function is launched (the run fails with a `ControllerError` instead of restarting) and inside
the start-up callbacks (the run restarts, but the failed start's placement group stays and holds its cores).
Without the platform's handling, Ray Train shows both gaps; with it (`make_trainer` + `fit_relaunching`, what every
platform Train run uses), the run completes and no placement group is left.
"""

from __future__ import annotations

import pytest

from trainables.stages.node_loss import fit_relaunching, lost_at_start
from trainables.stages.on_ray import Scaling, make_trainer

EPOCHS = 3


def killer(marker: str, where: str):
    """A Train callback that kills the run's worker once (the first start while `marker` does not exist) and waits
    until it is dead; `where="launch"` lets the start go on to launch the train function on the dead worker,
    `where="callbacks"` fails the start-up callbacks with the worker's death. (Made here so Ray pickles it by
    value.)"""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class KillWorkerOnce(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            import os

            import ray
            from ray.exceptions import RayActorError

            if os.path.exists(marker):
                return
            open(marker, "w").close()
            actor = worker_group.get_workers()[0].actor
            ray.kill(actor, no_restart=True)
            try:
                while True:
                    ray.get(actor.__ray_ready__.remote(), timeout=30)
            except RayActorError:
                if where == "callbacks":
                    raise

    return KillWorkerOnce()


def counting():
    """A train function reporting epochs 1..EPOCHS, each with a checkpoint (made here so Ray pickles it by value)."""

    def train_fn(config):
        import tempfile

        import ray.train

        for epoch in range(1, EPOCHS + 1):
            with tempfile.TemporaryDirectory() as d:
                ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(d))

    return train_fn


def live_placement_groups() -> list[str]:
    from ray.util.placement_group import placement_group_table

    return [pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"]


@pytest.fixture
def no_groups_left(ray_local):
    """Each test starts with no placement group and removes what it leaves (the control leaves one on purpose)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    assert live_placement_groups() == []
    yield
    for pg in live_placement_groups():
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg)))


@pytest.mark.ray
def test_without_the_platform_ray_train_fails_the_run_and_keeps_its_cores(no_groups_left, tmp_path):
    # The control: what node_loss.py is for. If a Ray upgrade makes this test fail, the workaround can go.
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(counting(), scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(name="control", storage_path=str(tmp_path / "train"),
                                                          failure_config=ray.train.FailureConfig(max_failures=2),
                                                          callbacks=[killer(str(tmp_path / "killed"), "launch")]))
    with pytest.raises(ray.train.ControllerError) as failed:
        trainer.fit()
    assert lost_at_start(failed.value)  # not retried, although max_failures=2 were left
    assert len(live_placement_groups()) == 1  # the failed start's group: its core stays reserved


@pytest.mark.ray
@pytest.mark.parametrize("where", ["launch", "callbacks"])
def test_a_worker_lost_while_its_group_starts_the_run_completes_and_leaves_no_cores_held(no_groups_left, tmp_path,
                                                                                       where):
    marker = tmp_path / "killed"
    scaling = Scaling(num_workers=1, cpus_per_worker=1, max_failures=2)
    result = fit_relaunching(lambda: make_trainer(counting(), {}, scaling, f"lost-{where}", str(tmp_path / "train"),
                                                  callbacks=[killer(str(marker), where)]),
                             scaling.max_failures)
    assert marker.exists()  # the worker was killed
    assert result.metrics["epoch"] == EPOCHS
    assert live_placement_groups() == []
