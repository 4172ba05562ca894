"""A worker lost while Ray Train starts its worker group: what Ray Train 2.60 leaves undone, done here.

Ray Train restarts a run whose worker dies while it trains (`FailureConfig`). A worker that dies while its worker
group *starts* (its node lost a moment after the workers were placed, seen in the two-node test under load) meets
two gaps in Ray Train 2.60 (`train/v2/_internal/execution/worker_group/worker_group.py`, `_start_impl`):

- **The run's placement group stays.** Once the group's state is built, a failure later in the start (an
  `after_worker_group_start` callback, or launching the train function) skips the partial clean-up, and the
  controller never took the group, so no shutdown removes it either. Ray Train's own cleaner acts only when the
  controller dies, and needs the dashboard's State API. The group is not the trial's to remove: it belongs to
  the launcher's Ray job, so it lives until the study ends. Its bundles are rescheduled onto the nodes left and
  hold their cores: on a small cluster the next Train runs wait for those cores forever (the study hangs).
- **The run is not retried** when the train function's launch fails: that `ActorDiedError` reaches the controller
  outside the handling that makes start-up failures retryable, so `fit()` raises a `ControllerError` and the
  trial fails, however many `max_failures` are left.

So every platform Train run carries `ReleasePlacementGroups` (a Train callback: the trainer keeps such callbacks
of its `RunConfig` "so custom workarounds built on top of internal callbacks work"), which removes whatever
placement group of its controller is still there before each worker group starts and when the run ends; and
`fit_relaunching` launches a run that ended that way again under the same name, so it resumes from its last
checkpoint (at most `max_failures` times). `tests/test_node_loss.py` kills a worker at both points on a local
Ray and checks both; `tests/test_cluster.py` loses a whole node mid-study.
"""

from __future__ import annotations

import logging

import ray  # [ray] placement groups, the controller's identity
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback  # [ray] pinned 2.60

logger = logging.getLogger(__name__)


def placement_groups_of(actor_id: str) -> list:
    """The placement groups that the actor created and that are not removed (GCS's own table: the public
    `placement_group_table()` leaves out who created a group)."""
    from ray._private.state import state  # [ray] the GCS placement group table, with each group's creator
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if data.creator_actor_id.hex() == actor_id and data.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            groups.append(PlacementGroup(ray.PlacementGroupID(data.placement_group_id)))
    return groups


class ReleasePlacementGroups(ControllerCallback, WorkerGroupCallback):
    """Runs in a Train controller: before each worker group starts, and when the run ends, removes the controller's
    placement groups that are still there (its earlier worker groups are shut down by then, so these are left
    over from a start that failed)."""

    def __init__(self):
        self.controller = None  # the controller actor's id (hex), once it runs

    def after_controller_start(self, train_run_context):
        self.controller = ray.get_runtime_context().get_actor_id()

    def before_worker_group_start(self, worker_group_context):
        self.release()

    def after_controller_finish(self, result):
        self.release()

    def release(self) -> int:
        if self.controller is None:
            return 0
        removed = 0
        for group in placement_groups_of(self.controller):
            try:
                ray.util.remove_placement_group(group)
                removed += 1
            except Exception:  # noqa: BLE001 (removed meanwhile)
                pass
        if removed:
            logger.warning("removed %d placement group(s) left by a worker group that failed to start", removed)
        return removed


def lost_at_start(exc: BaseException) -> bool:
    """Whether `fit()` failed because an actor died under the controller (a worker lost while its group started)."""
    from ray.exceptions import RayActorError
    from ray.train import ControllerError

    return isinstance(exc, ControllerError) and isinstance(exc.controller_failure, RayActorError)


def fit_relaunching(make_trainer, relaunches: int):
    """`make_trainer().fit()`; a run that ended because a worker was lost while its group started is launched again
    (same name and storage: it resumes from its last checkpoint), at most `relaunches` times."""
    for attempt in range(relaunches + 1):
        try:
            return make_trainer().fit()
        except Exception as exc:
            if attempt == relaunches or not lost_at_start(exc):
                raise
            logger.warning("a Train worker was lost while its group started; launching the run again (%d of %d)",
                           attempt + 1, relaunches)
