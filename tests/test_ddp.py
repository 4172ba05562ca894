"""Data parallelism: equal steps on every rank for any dataset size, an exact global batch, skip-AE under DDP."""

from __future__ import annotations

import pytest
import torch

from study.spec import SpecError, parse_spec
from trainables.data import DataConfig, build_data
from trainables.models import model_config
from trainables.stages.chain import plan, read_record
from trainables.stages.loop import rank_indices
from trainables.stages.on_ray import Scaling, SegmentJob, ensure_chain
from trainables.stages.procedure import OptimizerConfig, StageSettings, procedure
from trainables.stages.store import StageStore


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_gets_the_same_steps_and_the_global_batch_is_exact(world):
    batch = 4 * world
    for n in range(batch, 5 * batch + 3):  # includes the sizes whose strided shards gave ranks different step counts
        parts = [rank_indices(n, batch, world, r, torch.Generator().manual_seed(7)) for r in range(world)]
        assert {len(p) for p in parts} == {(n // batch) * batch // world}
        steps = torch.stack([p.view(-1, batch // world) for p in parts], 1).reshape(n // batch, batch)
        assert all(len(set(step.tolist())) == batch for step in steps)  # each global batch: batch distinct examples
        assert len(set(torch.cat(parts).tolist())) == (n // batch) * batch
    with pytest.raises(ValueError, match="not a multiple"):
        rank_indices(100, 10, 3, 0, torch.Generator())


def test_a_batch_size_not_divisible_by_the_workers_is_refused():
    doc = {"name": "x", "models": ["baseline"], "resources": {"workers": 3},
           "stages": {"classifier": {"batch_size": 64}, "finetune": {"batch_size": 63}}}
    with pytest.raises(SpecError) as err:
        parse_spec(doc)
    assert [p for p in err.value.problems if "batch_size" in p] == [
        "stages.classifier.batch_size: 64 is not a multiple of resources.workers=3 (the global batch is split evenly "
        "between the workers)"]


@pytest.mark.ray
def test_skip_autoencoder_fine_tunes_on_two_gloo_workers_with_a_size_that_used_to_hang(ray_local, fmnist_root, tmp_path):
    # 65 training examples, global batch 64: strided shards of 33 and 32 at 32 per rank gave 2 and 1 steps (a hang).
    cfg = DataConfig(root=fmnist_root, subset=85, val_size=20)
    data = build_data(cfg, 0)
    model = model_config(dict(variant="skipae", encoder="skipae", in_channels=1, image_size=28,
                              skip={"depth": 2, "width": 4}))
    st = {k: StageSettings(epochs=2, batch_size=64, optimizer=OptimizerConfig(lr=0.01)) for k in ("pretrain", "finetune")}
    chain = plan(procedure(model, st), data.identity, 0)
    store = StageStore(str(tmp_path / "store"))
    job = SegmentJob(segment=(), store_uri=store.root, data=cfg, seed=0, scaling=Scaling(num_workers=2))
    assert ensure_chain(chain, store, job, str(tmp_path / "train")) == [True, True]
    record = read_record(store, chain[1].key)
    assert record["workers"] == 2 and [h["epoch"] for h in record["history"]] == [1, 2]


def test_deterministic_switch_reaches_the_workers_and_torch():
    from study.plan import scaling
    from trainables.stages.loop import set_deterministic

    doc = {"name": "x", "models": ["baseline"], "resources": {"deterministic": True},
           "stages": {"classifier": {}, "finetune": {}}}
    assert scaling(parse_spec(doc)).deterministic is True
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
