"""Train workers' reports to Tune, reported by the trial's own thread: one producer into the Tune session.

A trial reports its own events (`stage_done`, `seed_end`, ...) with `tune.report` from its function thread, and
its Train runs' epochs must reach Tune too. Ray's `TuneReportCallback` hands those to the Tune session's *main*
thread, which then reports them itself; with two threads reporting into the session's one-slot result queue, a
Train report still queued when the trial thread reports leaves both threads blocked in `put` forever (Ray 2.60,
`train/_internal/session.py`: `_get_result_from_queues` calls `report` from the main thread). That happened at the
end of fine-tuning whenever the last epoch's report was still queued after `fit()` returned -- rarely on an idle
machine, often under load or after a node loss -- and the study never ended, with every stage stored
(tests/test_train_reports.py runs that pattern through this module, 20 times in a row).

Here the Train controller's callback only puts each report on a Ray queue, and the trial's thread takes them off and
reports them while it waits for the run (`ensure_chain`'s `poll`) and once more after it. The queue is an actor
pinned to the trial driver's node (it cannot land on a worker node that is lost) and lives as long as the driver
process, so trial drivers that Tune reuses do not start one per trial; every item carries its forwarder's token, so
a report of an earlier, abandoned run is never taken for the current one.
"""

from __future__ import annotations

import uuid

from ray.train import UserCallback  # [ray] the Train controller's report hook

_QUEUE = None  # this process's report queue (a Ray actor), created on first use


def _process_queue():
    global _QUEUE
    if _QUEUE is None:
        import ray  # [ray] the queue actor, on this node
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _QUEUE = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    return _QUEUE


class ReportChannel:
    """Where one trial's Train reports go: its driver's queue, each item marked with the trial's token. Pickled to
    whoever produces them (the Train controller's callback below, or a Train pool's rank 0)."""

    def __init__(self, queue, token: str):
        self.queue, self.token = queue, token

    def put(self, metrics: dict) -> None:
        self.queue.put((self.token, metrics))


class ForwardReports(UserCallback):
    """Runs in the Train controller: puts rank 0's metrics of every report on the trial's channel."""

    def __init__(self, channel: ReportChannel):
        self.channel = channel

    def after_report(self, run_context, metrics, checkpoint):
        self.channel.put(dict(metrics[0]))


class TrainReports:
    """One trial's channel: `callback` goes to its Train runs, `forward()` is called from the trial's thread."""

    def __init__(self):
        self.queue = _process_queue()
        self.token = uuid.uuid4().hex
        self.channel = ReportChannel(self.queue, self.token)  # a Train pool's rank 0 puts on it (stages/pool.py)
        self.callback = ForwardReports(self.channel)

    def forward(self) -> int:
        """Reports every queued Train report of this channel, in order; returns how many."""
        from ray import tune  # [ray] the trial's session
        from ray.util.queue import Empty

        n = 0
        while True:
            try:
                token, metrics = self.queue.get_nowait()
            except Empty:
                return n
            if token == self.token:
                tune.report(metrics)
                n += 1
