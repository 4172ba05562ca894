"""Pooled Train runs (`resources.train_runs: pooled`): long-lived Train runs that execute every trial's segments.

The dispatcher's bookkeeping is tested as the plain class it is; the pool itself on a real local Ray, against
the same stages computed in this process (bitwise), with a worker process killed mid-stage, a cancelled job, and
a job whose stage raises.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import pytest
import torch

from trainables.data import DataConfig, build_data
from trainables.stages.chain import MODEL_FILE, plan, read_record, run_chain_locally
from trainables.stages.loop import Runtime
from trainables.stages.on_ray import Scaling, SegmentJob, ensure_chain
from trainables.stages.precision import resolve_channels_last, torch_threads
from trainables.stages.pool import CANCELLED, STOP, Dispatcher, TrainPool, run_on_pool
from trainables.stages.procedure import LossConfig, OptimizerConfig, StageSettings, procedure
from trainables.stages.store import StageStore
from trainables.models import model_config

KINDS = ("classifier", "layerwise", "topdown", "finetune")


def chain_for(variant, identity, seed, epochs=1):
    settings = {k: StageSettings(epochs=epochs, batch_size=64, optimizer=OptimizerConfig(lr=0.05)) for k in KINDS}
    model = model_config(dict(variant=variant, encoder="vgg_tiny", in_channels=1, image_size=28))
    return plan(procedure(model, settings, LossConfig(weights=(("image", 1e-3),))), identity, seed)


# -- the dispatcher's bookkeeping ----------------------------------------------------------------------------

def test_slots_take_jobs_oldest_first_and_a_restarted_slot_gets_its_running_job_back():
    d = Dispatcher(slots=2)
    d.submit("a", "t1", "job-a", ())
    d.submit("b", "t2", "job-b", ())
    assert d.take(0, timeout=0)[0] == "a" and d.take(1, timeout=0)[0] == "b"
    assert d.take(0, timeout=0)[0] == "a"  # slot 0's run restarted after a worker loss: it resumes job a
    assert d.wait("a", timeout=0) is None
    d.finish(0, "a")
    assert d.wait("a", timeout=0) == "" and d.take(0, timeout=0) is None  # done; nothing else waits
    d.finish(1, "b", "Traceback: boom")
    assert d.wait("b", timeout=0) == "Traceback: boom"


def test_cancelling_a_trial_drops_its_waiting_jobs_and_flags_its_running_one():
    d = Dispatcher(slots=1)
    d.submit("run", "t1", "job", ())
    d.submit("wait", "t1", "job", ())
    d.submit("other", "t2", "job", ())
    assert d.take(0, timeout=0)[0] == "run"
    assert d.cancel("t1") == 2
    assert d.wait("wait", timeout=0) == CANCELLED  # never runs
    assert d.is_cancelled("run") and d.wait("run", timeout=0) is None  # stops after its current epoch
    assert not d.is_cancelled("other")
    d.finish(0, "run", CANCELLED)
    assert d.take(0, timeout=0)[0] == "other"
    assert d.cancel("t1") == 0  # nothing of t1 is left: a finished trial's cancel changes nothing


def test_a_failed_slot_fails_its_job_and_the_last_one_fails_every_waiting_job():
    d = Dispatcher(slots=2)
    for job in "abc":
        d.submit(job, "t", "job", ())
    d.take(0, timeout=0)
    d.retire(0, "slot 0 failed")
    assert d.wait("a", timeout=0) == "slot 0 failed" and d.wait("b", timeout=0) is None  # slot 1 will run b
    d.retire(1, "slot 1 failed")
    assert d.wait("b", timeout=0) == d.wait("c", timeout=0) == "slot 1 failed"
    d.submit("d", "t", "job", ())
    assert "no Train pool run is left" in d.wait("d", timeout=0)  # nothing waits forever
    d.stop()
    assert d.take(1, timeout=0) == STOP and d.is_cancelled("anything")  # an interrupted study stops its jobs


# -- the pool on a real local Ray ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_cfg(fmnist_root):
    return DataConfig(root=fmnist_root, subset=400, val_size=100)


@pytest.fixture(scope="module")
def pool(ray_local, tmp_path_factory):
    pool = TrainPool(1, Scaling(max_failures=1), str(tmp_path_factory.mktemp("pool-train")))
    yield pool
    pool.stop()
    assert all(not t.is_alive() for t in pool.threads)  # the pool's Train run ended when asked


class Channel:
    """A trial's report channel (what TrainReports gives a pool), read by the test."""

    def __init__(self):
        from ray.util.queue import Queue

        self.queue, self.token = Queue(), "trial-token"
        self.seen: list[dict] = []

    @property
    def channel(self):
        from study.train_reports import ReportChannel

        return ReportChannel(self.queue, self.token)

    def drain(self) -> list[dict]:
        while not self.queue.empty():
            token, metrics = self.queue.get()
            assert token == self.token
            self.seen.append(metrics)
        return self.seen


def in_background(fn):
    errors, thread = [], None

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def classifier_on_pool(pool, owner: str, data_cfg, seed: int, epochs: int, tmp_path):
    """A classifier stage of `epochs` handed to the pool from a background thread, as a trial does."""
    chain = chain_for("baseline", build_data(data_cfg, seed).identity, seed, epochs=epochs)[:1]
    store = StageStore(str(tmp_path / "pooled"))
    channel = Channel()
    job = SegmentJob(segment=tuple(chain), store_uri=store.root, data=data_cfg, seed=seed, scaling=Scaling())
    thread, errors = in_background(lambda: run_on_pool(pool.dispatcher, owner, channel.channel, job))
    return chain, store, channel, thread, errors


def wait_for(condition, channel: Channel, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        channel.drain()
        if condition(channel.seen):
            return channel.seen
        time.sleep(0.2)
    raise AssertionError(f"not seen within {timeout} s: {channel.seen}")


def in_process(chain, store, data_cfg, seed):
    """The same stages in this process, with the pool worker's one thread and layout (sums in the same order)."""
    with torch_threads(1):
        runtime = Runtime(channels_last=resolve_channels_last(Scaling().channels_last, torch.device("cpu")))
        run_chain_locally(chain, store, build_data(data_cfg, seed), runtime, seed)


def weights(store, key):
    return torch.load(os.path.join(store.get(key).path, MODEL_FILE), weights_only=True)


def same_weights(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_trials_chains_on_the_pool_equal_the_same_stages_run_in_process(pool, data_cfg, tmp_path):
    identity = build_data(data_cfg, 0).identity
    chains = [chain_for("swwae-all", identity, 0), chain_for("sae-all", identity, 0)]  # they share the classifier
    store = StageStore(str(tmp_path / "pooled"))
    channels = [Channel(), Channel()]
    job = SegmentJob(segment=(), store_uri=store.root, data=data_cfg, seed=0, scaling=Scaling())
    computed = {}

    def trial(i):
        launch = functools.partial(run_on_pool, pool.dispatcher, f"trial-{i}", channels[i].channel)
        computed[i] = ensure_chain(chains[i], store, job, str(tmp_path / "unused"), launch=launch)

    threads = [in_background(functools.partial(trial, i)) for i in (0, 1)]
    for thread, errors in threads:
        thread.join(300)
        assert not errors, errors
    # The classifier ran once, for one of them; the other took it from the store.
    assert sorted(map(tuple, computed.values())) == [(False, True, True, True), (True, True, True, True)]

    reference = StageStore(str(tmp_path / "in-process"))
    for chain in chains:
        in_process(chain, reference, data_cfg, 0)
    for chain in chains:
        for planned in chain:
            assert same_weights(weights(store, planned.key), weights(reference, planned.key)), planned.stage.kind
            assert read_record(store, planned.key)["final"] == read_record(reference, planned.key)["final"]
    # Every epoch and stage end reached its own trial's channel, from one long-lived worker process.
    for i, chain in enumerate(chains):
        seen = channels[i].drain()
        ran = [p.key for p, c in zip(chain, computed[i]) if c]
        assert [m["stage_key"] for m in seen if m["event"] == "stage_end"] == ran
        assert len({m["pid"] for m in seen}) == 1 and all(m["pool_job"] for m in seen)
    assert len({m["pid"] for c in channels for m in c.seen}) == 1  # one slot: the same process ran both trials


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_killed_pool_worker_resumes_its_job_from_the_last_checkpoint_to_identical_weights(pool, data_cfg, tmp_path):
    chain, store, channel, thread, errors = classifier_on_pool(pool, "trial", data_cfg, 1, 20, tmp_path)
    # Epoch 2 on the channel means epoch 2's Train report returned, which it only does once the controller has
    # taken epoch 1's (Train's result queue holds one): a checkpoint of this job is registered. With 20 epochs, each
    # report waiting for the controller's next poll, the job is far from its end when the kill lands.
    seen = wait_for(lambda s: any(m["event"] == "epoch" and m["epoch"] >= 2 for m in s), channel)
    killed = seen[-1]["pid"]
    os.kill(killed, signal.SIGKILL)
    thread.join(300)
    assert not errors, errors
    events = [(m["event"], m.get("epoch")) for m in channel.drain()]
    retries = [epoch for event, epoch in events if event == "stage_retry"]
    assert len(retries) == 1 and 1 <= retries[0] < 20  # resumed from a checkpoint of this job, not started over
    assert events[-2:] == [("epoch", 20), ("stage_end", None)]
    assert channel.seen[-1]["pid"] != killed
    reference = StageStore(str(tmp_path / "in-process"))
    in_process(chain, reference, data_cfg, 1)
    assert same_weights(weights(store, chain[0].key), weights(reference, chain[0].key))
    assert [h["epoch"] for h in read_record(store, chain[0].key)["history"]] == list(range(1, 21))


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_cancelled_job_stops_after_its_epoch_and_a_failing_one_fails_alone(pool, data_cfg, tmp_path):
    chain, store, channel, thread, errors = classifier_on_pool(pool, "stopped-trial", data_cfg, 2, 20, tmp_path)
    identity = build_data(data_cfg, 2).identity
    wait_for(lambda s: any(m["event"] == "epoch" for m in s), channel)
    import ray

    assert ray.get(pool.dispatcher.cancel.remote("stopped-trial")) == 1  # what the janitor does when Tune stops it
    thread.join(120)
    assert errors and CANCELLED in str(errors[0])
    assert max(m["epoch"] for m in channel.drain() if m["event"] == "epoch") < 20 and not store.has(chain[0].key)

    # A stage that raises fails its own job with the traceback; the slot goes on with the next job.
    failing = SegmentJob(segment=tuple(chain_for("baseline", identity, 2)[:1]), store_uri=store.root, data=data_cfg,
                         seed=2, scaling=Scaling(), fail_after_epoch=1, fail_marker=str(tmp_path / "failed"))
    with pytest.raises(RuntimeError, match="injected failure after epoch 1"):
        run_on_pool(pool.dispatcher, "t", Channel().channel, failing)
    fine = SegmentJob(segment=tuple(chain_for("baseline", identity, 3)[:1]), store_uri=store.root, data=data_cfg,
                      seed=3, scaling=Scaling())
    run_on_pool(pool.dispatcher, "t", Channel().channel, fine)
    assert store.has(fine.segment[0].key)
