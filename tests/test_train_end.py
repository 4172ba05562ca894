"""A Train run that has published every stage but never returns from `fit()` does not hold its trial forever.

Ray Train 2.60 has been seen to hang in `fit()` after a node was lost mid-run, with the run's work done and its
cores given back; a two-node study then waited for ever. `ensure_chain` goes on once every stage of the run is
in the store and the run has not ended within its grace period. Its own module: the hung run's worker keeps a
core until this module's Ray instance shuts down.
"""

from __future__ import annotations

import time

import pytest

from test_stages import chain_for  # tests/ is on sys.path
from trainables.data import DataConfig, build_data
from trainables.stages.chain import read_record
from trainables.stages.on_ray import Scaling, SegmentJob, ensure_chain
from trainables.stages.store import StageStore


@pytest.mark.ray
def test_a_run_that_never_ends_after_publishing_its_stages_does_not_hold_the_trial(ray_local, fmnist_root, tmp_path):
    data_cfg = DataConfig(root=fmnist_root, subset=400, val_size=100)
    chain = chain_for("baseline", build_data(data_cfg, 0).identity, 0)
    store = StageStore(str(tmp_path / "store"))
    job = SegmentJob(segment=(), store_uri=store.root, data=data_cfg, seed=0, scaling=Scaling(), hang_at_end=True)
    t0 = time.monotonic()
    told = []
    assert ensure_chain(chain, store, job, str(tmp_path / "train"), end_grace=5.0, on_left_behind=told.append) == [
        True, True]
    assert time.monotonic() - t0 < 300
    # Both stages are complete in the store, and the user is told, once, that the run was left behind.
    assert [read_record(store, p.key)["key"] for p in chain] == [p.key for p in chain]
    assert len(told) == 1 and "published all 2 of its stages but did not end within 5 s; going on without it" in told[0]
