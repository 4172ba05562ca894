"""Pooled Train runs: one long-lived Ray Train run per concurrent slot executes the segments of every trial.

A per-trial Train run (`on_ray.launch_segment`) starts a controller, its workers and three helper actors: about
15 CPU-seconds before the first step on Ray 2.60 (docs/BENCHMARKS.md). That is noise for stages of minutes and
most of the cost for a study of small stages, such as the quickstart. With `resources.train_runs: pooled`, the
launcher starts one Train run per trial slot for the whole study instead (`TrainPool`), and trials hand their
segments to them through a dispatcher actor (`Dispatcher`) rather than launching runs of their own (`run_on_pool`).

What stays as in a per-trial run: the same `run_segment` trains the stages (same keys, same results); every
epoch is reported with a checkpoint, and a failed worker restarts from it (the pool run's `FailureConfig`): the
dispatcher hands the restarted run the job it was running, and the checkpoint resumes it if it is that job's.
Reports reach the trial's thread through its `TrainReports` channel (`ReportChannel`), put there by rank 0.

What differs:
- an exception raised by a stage fails that job at once (the trial errors) and the slot goes on with the next
  job; only a lost worker process is retried (per-trial runs retry both, `max_failures` times);
- the jobs of a trial that Tune stopped (ASHA) or that errored are cancelled, a waiting one at once, a running
  one between two epochs: the launcher's janitor calls `Dispatcher.cancel` with the trial's id when the trial ends;
- a launcher restart (`study resume`) starts new pool runs: a stage that was half-way restarts from its first epoch
  (what was published stays published).
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import traceback
import uuid
from dataclasses import dataclass

from .on_ray import Scaling, SegmentJob, make_trainer, report, run_segment, saved_state, worker_context

STOP = "stop"
TAKE_WAIT_S = 1.0  # how long a slot's `take` waits for a job before asking again
CANCELLED = "cancelled"


class JobCancelled(Exception):
    """Raised between two epochs of a job that was cancelled."""


class Dispatcher:
    """Jobs waiting for a slot, the job each slot runs, and each job's outcome (a threaded Ray actor)."""

    def __init__(self, slots: int):
        self.pending: collections.deque = collections.deque()  # (job_id, job, channel)
        self.running: dict[int, tuple] = {}  # slot -> (job_id, job, channel)
        self.outcome: dict[str, str] = {}  # job_id -> "" (done) or the error
        self.cancelled: set[str] = set()
        self.owner: dict[str, str] = {}  # job_id -> who submitted it (a Tune trial id)
        self.alive = set(range(slots))
        self.stopping = False
        self.cond = threading.Condition()

    def submit(self, job_id: str, owner: str, job: SegmentJob, channel) -> None:
        with self.cond:
            self.owner[job_id] = owner
            if not self.alive:
                self.outcome[job_id] = "no Train pool run is left to run it (every slot failed)"
            elif job_id not in self.outcome:
                self.pending.append((job_id, job, channel))
            self.cond.notify_all()

    def take(self, slot: int, timeout: float = TAKE_WAIT_S):
        """The slot's next job: the one it was running (a restarted run resumes it), else the oldest waiting;
        None if there is none yet, STOP when the pool is stopping."""
        with self.cond:
            if self.stopping:
                return STOP
            if slot in self.running:
                return self.running[slot]
            if not self.pending:
                self.cond.wait(timeout)
            if self.stopping:
                return STOP
            if not self.pending:
                return None
            self.running[slot] = self.pending.popleft()
            return self.running[slot]

    def finish(self, slot: int, job_id: str, error: str = "") -> None:
        with self.cond:
            if self.running.get(slot, (None,))[0] == job_id:
                del self.running[slot]
            self.outcome[job_id] = error
            self.cond.notify_all()

    def retire(self, slot: int, error: str) -> None:
        """A slot's run ended for good (failed beyond its retries): its job fails; with no slot left, all do."""
        with self.cond:
            self.alive.discard(slot)
            if slot in self.running:
                self.outcome[self.running.pop(slot)[0]] = error
            if not self.alive:
                while self.pending:
                    self.outcome[self.pending.popleft()[0]] = error
            self.cond.notify_all()

    def wait(self, job_id: str, timeout: float) -> str | None:
        """The job's outcome ("" when done, else the error), or None if it has not ended within `timeout`."""
        with self.cond:
            if job_id not in self.outcome:
                self.cond.wait(timeout)
            return self.outcome.get(job_id)

    def cancel(self, owner: str) -> int:
        """Cancel the owner's jobs that have not ended: a waiting one at once, a running one after its current
        epoch. Returns how many."""
        with self.cond:
            jobs = {item[0] for item in (*self.pending, *self.running.values()) if self.owner.get(item[0]) == owner}
            self.cancelled |= jobs
            for item in list(self.pending):
                if item[0] in jobs:
                    self.pending.remove(item)
                    self.outcome[item[0]] = CANCELLED
            self.cond.notify_all()
            return len(jobs)

    def is_cancelled(self, job_id: str) -> bool:
        with self.cond:
            return self.stopping or job_id in self.cancelled

    def stop(self) -> None:
        """The study ends (or was interrupted): running jobs stop after their current epoch, slots get STOP."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


@dataclass(frozen=True)
class SlotConfig:
    dispatcher: object  # the Dispatcher's actor handle
    slot: int
    scaling: Scaling


def _slot_worker(config: SlotConfig) -> None:
    """The train function of a pool run: take jobs from the dispatcher and run them until the pool stops."""
    import ray  # [ray] the dispatcher, and agreeing on the job across a worker group
    from ray.train.collective import broadcast_from_rank_zero

    wc = worker_context(config.scaling)
    dispatcher = config.dispatcher
    shared = (lambda value: broadcast_from_rank_zero(value)) if wc.world > 1 else (lambda value: value)
    saved = saved_state()  # after a worker failure: the checkpoint of the job the slot was running
    while True:
        item = shared(ray.get(dispatcher.take.remote(config.slot)) if wc.rank == 0 else None)
        if item is None:
            continue
        if item == STOP:
            return
        job_id, job, channel = item
        resume = saved if saved is not None and saved.get("job_id") == job_id else None
        saved = None

        def emit(metrics, payload=None, name=None, rank=0, job_id=job_id, channel=channel):
            # A run's checkpoint directories must differ: every job has its own epochs named alike.
            report(metrics, None if payload is None else {**payload, "job_id": job_id}, name and f"{job_id}-{name}",
                   rank)
            if rank == 0:
                channel.put(metrics)

        def between_epochs(job_id=job_id):
            if shared(ray.get(dispatcher.is_cancelled.remote(job_id)) if wc.rank == 0 else None):
                raise JobCancelled(job_id)

        try:
            run_segment(job, wc, saved=resume, tags={"pool_job": job_id, "pid": os.getpid()}, emit=emit,
                        between_epochs=between_epochs)
            error = ""
        except JobCancelled:
            error = CANCELLED
        except Exception:  # noqa: BLE001 (the job fails, the slot goes on; a lost process restarts the run instead)
            error = traceback.format_exc()
        if wc.rank == 0:
            ray.get(dispatcher.finish.remote(config.slot, job_id, error))


class TrainPool:
    """The launcher's side: a dispatcher and one Train run per slot, each `fit()` in a thread of this process."""

    def __init__(self, slots: int, scaling: Scaling, storage_path: str):
        import ray  # [ray] the dispatcher actor, on this node
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # Calls that wait: one `take` per slot and one `wait` per trial at once (at most one per slot).
        self.dispatcher = ray.remote(Dispatcher).options(num_cpus=0, max_concurrency=2 * slots + 16,
                                                         scheduling_strategy=here).remote(slots)
        run = uuid.uuid4().hex[:8]  # a new run per launch: never resumed from an earlier launch's checkpoints
        self.threads = []
        for slot in range(slots):
            new_trainer = functools.partial(make_trainer, _slot_worker, SlotConfig(self.dispatcher, slot, scaling),
                                            scaling, f"pool-{run}-{slot}", storage_path)
            thread = threading.Thread(target=self._fit, args=(new_trainer, slot, scaling.max_failures), daemon=True,
                                      name=f"train-pool-{slot}")
            thread.start()
            self.threads.append(thread)

    def _fit(self, new_trainer, slot: int, relaunches: int) -> None:
        import ray  # [ray] telling the dispatcher that the slot is gone

        from .node_loss import fit_relaunching

        try:
            fit_relaunching(new_trainer, relaunches)  # a relaunched run resumes its job, as after a worker failure
            error = "the Train pool run ended"
        except BaseException as exc:  # noqa: BLE001 (its jobs fail with the reason; trials report it)
            error = f"the Train pool run of slot {slot} failed: {exc}"
        try:
            ray.get(self.dispatcher.retire.remote(slot, error))
        except Exception:  # noqa: BLE001 (Ray is shutting down: nobody waits any more)
            pass

    def stop(self, timeout: float = 30.0) -> None:
        """End the slots' runs (a job still running, after an interrupt, stops after its current epoch) and wait."""
        import ray  # [ray]

        try:
            ray.get(self.dispatcher.stop.remote())
        except Exception:  # noqa: BLE001
            return
        for thread in self.threads:
            thread.join(timeout)


def run_on_pool(dispatcher, owner: str, channel, job: SegmentJob, poll_s: float = 1.0) -> None:
    """Run a segment on the pool and wait for it (the trial `owner`'s side); raises if it failed or was cancelled.
    `channel.put(metrics)` takes the job's reports (rank 0's): the trial's `study.train_reports.ReportChannel`."""
    import ray  # [ray]

    job_id = uuid.uuid4().hex
    ray.get(dispatcher.submit.remote(job_id, owner, job, channel))
    while (outcome := ray.get(dispatcher.wait.remote(job_id, poll_s))) is None:
        pass
    if outcome:
        raise RuntimeError(f"Train pool job {job_id} ({job.segment[0].stage.kind} to {job.segment[-1].stage.kind}) "
                           f"failed:\n{outcome}")
