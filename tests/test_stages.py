"""The staged procedure: procedures as data, the stage tree's keys, and runs on Ray Train with the stage store."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from trainables.data import DataConfig, build_data
from trainables.models import PAPER_VARIANTS, create_model, model_config
from trainables.stages.chain import MODEL_FILE, RECORD_FILE, plan, read_record, run_chain_locally
from trainables.stages.loop import Runtime, lr_factor, make_optimizer, prepare, train_epoch
from trainables.stages.on_ray import Scaling, SegmentJob, ensure_chain
from trainables.stages.procedure import LossConfig, OptimizerConfig, StageSettings, procedure
from trainables.stages.store import StageStore

KINDS = ("classifier", "layerwise", "topdown", "finetune")


def settings(epochs=1, schedule="constant", **kw):
    return {k: StageSettings(epochs=epochs, batch_size=64, optimizer=OptimizerConfig(lr=0.05, schedule=schedule), **kw)
            for k in KINDS}


def tiny(variant):
    return model_config(dict(variant=variant, encoder="vgg_tiny", in_channels=1, image_size=28))


def chain_for(variant, identity, seed, epochs=1, schedule="constant"):
    return plan(procedure(tiny(variant), settings(epochs, schedule), LossConfig(weights=(("image", 1e-3),))),
                identity, seed)


@pytest.fixture(scope="module")
def data_cfg(fmnist_root):
    return DataConfig(root=fmnist_root, subset=400, val_size=100)


def test_procedures_have_the_papers_stages():
    kinds = {v: [s.kind for s in procedure(tiny(v), settings())] for v in PAPER_VARIANTS}
    assert kinds["baseline"] == ["classifier", "finetune"]
    assert kinds["swwae-all"] == kinds["sae-first"] == list(KINDS)
    assert kinds["sae-layerwise"] == ["classifier", "layerwise", "finetune"]
    stages = procedure(tiny("swwae-all"), settings())
    assert [s.train for s in stages] == [("*",), ("decoder*",), ("decoder*",), ("*",)]
    assert [s.ce for s in stages] == [True, False, False, True]
    assert stages[1].model.variant == "swwae-layerwise" and stages[2].model.variant == "swwae-all"
    assert dict(stages[3].weights) == {"image": 1e-4, "pool1": 1e-12}  # the paper's defaults
    first = procedure(tiny("sae-first"), settings())
    assert first[2].levels == ["image"] and first[3].levels == ["image"]


def test_skip_autoencoder_procedures():
    cfg = model_config(dict(variant="skipae", encoder="skipae", in_channels=1, image_size=28))
    st = {"pretrain": StageSettings(), "finetune": StageSettings()}
    pre, fine = procedure(cfg, st)
    assert (pre.kind, pre.noisy, pre.ce, pre.levels) == ("pretrain", True, False, ["image"])
    assert (fine.kind, fine.ce, fine.weights) == ("finetune", True, ())
    assert [s.kind for s in procedure(replace(cfg, variant="skipae-scratch"), st)] == ["finetune"]
    with pytest.raises(ValueError, match="needs settings for stage 'pretrain'"):
        procedure(cfg, {"finetune": StageSettings()})


def test_stage_tree_of_the_paper_study_has_exactly_the_shared_stages():
    seeds = [0, 1, 2]
    keys = {k: set() for k in KINDS}
    for seed in seeds:
        for variant in PAPER_VARIANTS:
            for p in chain_for(variant, "data-x", seed):
                keys[p.stage.kind].add(p.key)
    assert {k: len(v) for k, v in keys.items()} == {"classifier": 3, "layerwise": 6, "topdown": 12, "finetune": 21}


def test_keys_change_with_anything_that_determines_the_output():
    base = chain_for("swwae-all", "data-x", 0)
    assert chain_for("swwae-all", "data-x", 0) == base
    assert chain_for("swwae-all", "data-y", 0)[0].key != base[0].key
    assert chain_for("swwae-all", "data-x", 1)[0].key != base[0].key
    longer = chain_for("swwae-all", "data-x", 0, epochs=2)
    assert all(a.key != b.key for a, b in zip(base, longer))
    annealed = chain_for("swwae-all", "data-x", 0, schedule="cosine")
    assert all(a.key != b.key for a, b in zip(base, annealed))
    # A change in the fine-tuning loss weights changes only the fine-tuning stage.
    other = plan(procedure(tiny("swwae-all"), settings(), LossConfig(weights=(("image", 1e-2),))), "data-x", 0)
    assert [a.key == b.key for a, b in zip(base, other)] == [True, True, True, False]


def test_cosine_schedule_anneals_every_group_from_its_base_rate_towards_zero_per_step(data_cfg):
    assert [lr_factor("cosine", s, 4) for s in range(4)] == pytest.approx([1, (1 + math.sqrt(0.5)) / 2, 0.5,
                                                                           (1 - math.sqrt(0.5)) / 2])
    assert lr_factor("constant", 3, 4) == 1
    data = build_data(data_cfg, 0)  # 300 training examples: 4 full batches of 64 and one of 44 per epoch
    stage = next(s for s in procedure(tiny("swwae-all"), settings(2, "cosine"), LossConfig(weights=(("image", 1e-3),)))
                 if s.kind == "finetune")
    stage = replace(stage, settings=replace(stage.settings, optimizer=replace(
        stage.settings.optimizer, group_lrs=(("decoder*", 0.01),))))
    model = prepare(create_model(stage.model), stage, Runtime())
    optimizer = make_optimizer(model, stage)
    bases = [g["lr"] for g in optimizer.param_groups]
    assert set(bases) == {0.01, 0.05}  # the decoder blocks' own rate and the classifier's
    seen = []
    step = optimizer.step

    def recording_step(*a, **kw):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return step(*a, **kw)

    optimizer.step = recording_step
    for epoch in (1, 2):
        train_epoch(model, stage, data, optimizer, Runtime(), 0, epoch)
    total = 2 * math.ceil(300 / 64)
    assert len(seen) == total
    for i, rates in enumerate(seen):
        assert rates == pytest.approx([b * 0.5 * (1 + math.cos(math.pi * i / total)) for b in bases])
    assert max(seen[-1]) < 0.05 * 0.03  # the last step runs at under 3% of the base rate


@pytest.mark.ray
def test_swwae_all_runs_on_ray_train_then_sae_all_reuses_the_classifier(ray_local, data_cfg, tmp_path):
    store = StageStore(str(tmp_path / "store"))
    job = SegmentJob(segment=(), store_uri=store.root, data=data_cfg, seed=0, scaling=Scaling())
    identity = build_data(data_cfg, 0).identity
    swwae = chain_for("swwae-all", identity, 0)
    assert ensure_chain(swwae, store, job, str(tmp_path / "train")) == [True] * 4
    record = read_record(store, swwae[-1].key)
    final = record["final"]
    for name in ("train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err", "rec_err_image",
                 "rec_err_pool1", "invert_err_pool1", "invert_err_pool2"):
        assert name in final, name
    assert 0 <= final["val_top1_err"] <= 100 and [h["epoch"] for h in record["history"]] == [1]
    assert {"loss", "loss_ce", "loss_rec_image", "loss_rec_pool1", "val_top1_err"} <= set(record["history"][0])
    assert os.path.exists(os.path.join(store.get(swwae[1].key).path, "invert.npz"))

    sae = chain_for("sae-all", identity, 0)
    assert sae[0].key == swwae[0].key
    assert ensure_chain(sae, store, job, str(tmp_path / "train")) == [False, True, True, True]
    assert len(store.keys()) == 7
    # Nothing is run twice: a third call computes nothing.
    assert ensure_chain(sae, store, job, str(tmp_path / "train")) == [False] * 4


@pytest.mark.ray
def test_interrupted_stage_resumes_from_its_checkpoint_to_identical_weights(ray_local, data_cfg, tmp_path):
    identity = build_data(data_cfg, 0).identity
    # The classifier stage, 3 epochs, with a cosine schedule: the resumed epochs continue the same rate curve.
    chain = chain_for("baseline", identity, 0, epochs=3, schedule="cosine")[:1]

    def run(name, **faults):
        store = StageStore(str(tmp_path / name))
        job = SegmentJob(segment=(), store_uri=store.root, data=data_cfg, seed=0,
                         scaling=Scaling(max_failures=1), **faults)
        ensure_chain(chain, store, job, str(tmp_path / f"train-{name}"))
        record = read_record(store, chain[0].key)
        weights = torch.load(os.path.join(store.get(chain[0].key).path, MODEL_FILE), weights_only=True)
        return record, weights

    marker = tmp_path / "failed-once"
    interrupted, w1 = run("interrupted", fail_after_epoch=1, fail_marker=str(marker))
    assert marker.exists()  # the failure really happened
    clean, w2 = run("clean")
    assert [h["epoch"] for h in interrupted["history"]] == [1, 2, 3]
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.ray
def test_two_gloo_workers_train_a_stage_with_ddp(ray_local, data_cfg, tmp_path):
    identity = build_data(data_cfg, 0).identity
    chain = chain_for("baseline", identity, 0, epochs=3)[:1]
    store = StageStore(str(tmp_path / "store"))
    job = SegmentJob(segment=(), store_uri=store.root, data=data_cfg, seed=0, scaling=Scaling(num_workers=2))
    assert ensure_chain(chain, store, job, str(tmp_path / "train")) == [True]
    record = read_record(store, chain[0].key)
    assert record["workers"] == 2
    losses = [h["loss"] for h in record["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_corrupted_entry_is_detected_and_recomputed_never_loaded(data_cfg, tmp_path):
    data = build_data(data_cfg, 0)
    store = StageStore(str(tmp_path / "store"))
    chain = chain_for("swwae-first", data.identity, 0)[:2]
    assert run_chain_locally(chain, store, data, Runtime(), 0) == [True, True]
    weights = os.path.join(store.get(chain[1].key).path, MODEL_FILE)
    good = torch.load(weights, weights_only=True)
    with open(os.path.join(store.root, chain[1].key, MODEL_FILE), "r+b") as f:
        f.truncate(100)
    # The deepest entry is corrupt: it is discarded and recomputed from its (intact) parent, not loaded.
    assert run_chain_locally(chain, store, data, Runtime(), 0) == [False, True]
    again = torch.load(os.path.join(store.get(chain[1].key).path, MODEL_FILE), weights_only=True)
    assert all(torch.equal(good[k], again[k]) for k in good)  # same seed, same result
    assert read_record(store, chain[1].key)["key"] == chain[1].key


def test_a_diverging_stage_fails_naming_the_stage_and_publishes_nothing(data_cfg, tmp_path):
    data = build_data(data_cfg, 0)
    store = StageStore(str(tmp_path / "store"))
    st = {k: StageSettings(epochs=2, batch_size=64, optimizer=OptimizerConfig(name="sgd", lr=1e8)) for k in KINDS}
    chain = plan(procedure(tiny("baseline"), st), data.identity, 0)[:1]
    with pytest.raises(FloatingPointError, match="stage 'classifier' diverged.*lower the learning rate"):
        run_chain_locally(chain, store, data, Runtime(), 0)
    assert store.keys() == []
