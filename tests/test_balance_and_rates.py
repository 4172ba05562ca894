"""Loss balance (loss.balance auto) and the paper's decoder learning-rate selection (optimizer.lr auto)."""

from __future__ import annotations

import pytest

from trainables.data import DataConfig, build_data
from trainables.models import model_config
from trainables.stages.balance import balanced, shares, start_of_finetuning
from trainables.stages.chain import build_model, plan, read_record, run_chain_locally
from trainables.stages.loop import Runtime
from trainables.stages.precision import torch_threads
from trainables.stages.procedure import LossConfig, OptimizerConfig, StageSettings, procedure
from trainables.stages.store import StageStore

# Every level of -all carries exactly its target share (0.1) at the start of fine-tuning and at least this share over
# its last epoch (the shares shrink as the decoders learn; the paper's weights give the pool levels < 1e-6).
SHARE_FLOOR = 1e-4
ZERO_OUTPUT_FACTOR = 0.5  # after a layerwise stage with lr auto, each block's error is below this x a zero output's
TOPDOWN_IMAGE_FACTOR = 0.8  # after the topdown stage, the image's error is below this x a zero output's


@pytest.fixture(scope="module")
def data(fmnist_root):
    return build_data(DataConfig(root=fmnist_root, subset=700, val_size=100), 0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not oversubscribe a shared machine)."""
    with torch_threads(1):
        yield


def test_balanced_weights_give_the_target_shares():
    terms = {"loss_ce": 2.0, "loss_rec_image": 50.0, "loss_rec_pool1": 4e6}
    w = balanced(terms, {"image": 0.1, "pool1": 0.2})
    got = shares(terms, w)
    assert got == pytest.approx({"image": 0.1, "pool1": 0.2})
    with pytest.raises(ValueError, match="level 'pool1' has reconstruction loss 0"):
        balanced({**terms, "loss_rec_pool1": 0.0}, {"image": 0.1, "pool1": 0.2})


def test_auto_balance_keeps_every_level_of_all_above_the_floor_on_vgg_small(data, tmp_path):
    model = model_config(dict(variant="swwae-all", encoder="vgg_small", in_channels=1, image_size=28))
    settings = {k: StageSettings(epochs=0 if k in ("layerwise", "topdown") else 1, batch_size=64,
                                 optimizer=OptimizerConfig(lr=0.02)) for k in ("classifier", "layerwise", "topdown")}
    settings["finetune"] = StageSettings(epochs=1, batch_size=64, optimizer=OptimizerConfig(lr=0.01))
    store = StageStore(str(tmp_path / "store"))
    auto = plan(procedure(model, settings, LossConfig(balance="auto", target_share=0.1)), data.identity, 0)
    paper = plan(procedure(model, settings, LossConfig()), data.identity, 0)  # the released code's weights
    assert auto[:3] == paper[:3] and auto[3].key != paper[3].key
    run_chain_locally(auto, store, data, Runtime(), 0)
    rec_auto = read_record(store, auto[3].key)
    _, paper_start = start_of_finetuning(build_model(paper[3], store, 0), paper[3].stage, data, "cpu", 0)
    levels = ["pool2", "pool1", "image"]
    for lvl in levels:
        assert rec_auto["final"][f"loss_share_start_{lvl}"] == pytest.approx(0.1, rel=1e-3)
        assert rec_auto["final"][f"loss_share_end_{lvl}"] > SHARE_FLOOR
        assert rec_auto["final"][f"loss_weight_{lvl}"] > 0
    # The chosen weights are the stage's config in its record (the key covers them: same parent, data and seed).
    assert dict(rec_auto["stage"]["weights"]) == {lvl: rec_auto["final"][f"loss_weight_{lvl}"] for lvl in levels}
    # The paper's weights on 0-1 inputs: the pool levels carry (almost) nothing.
    assert max(paper_start[f"loss_share_start_{lvl}"] for lvl in ("pool1", "pool2")) < 1e-6


@pytest.mark.parametrize("form, grid", [("mse", (0.03, 0.1, 0.3)), ("euclidean", (1e-4, 3e-4, 1e-3))])
def test_auto_rates_train_every_decoder_block_with_sgd(data, tmp_path, form, grid):
    model = model_config(dict(variant="swwae-all", encoder="vgg_tiny", blocks=((8, 8), (16, 16)),
                              in_channels=1, image_size=28))
    auto = OptimizerConfig(name="sgd", lr="auto", momentum=0.9, lr_grid=grid, probe_steps=60)
    # The paper trains decoders on a pretrained classifier: 4 epochs of Adam give features (a classifier left at
    # chance, loss ln 10, as SGD leaves this tiny one from some initialisations, lets the image block stall at any
    # rate).
    settings = {"classifier": StageSettings(epochs=4, batch_size=64, optimizer=OptimizerConfig(name="adam", lr=0.003)),
                "layerwise": StageSettings(epochs=4, batch_size=16, optimizer=auto),
                "topdown": StageSettings(epochs=4, batch_size=16, optimizer=auto),
                "finetune": StageSettings(epochs=1, batch_size=64)}
    chain = plan(procedure(model, settings, LossConfig(decoder_form=form)), data.identity, 0)[:3]
    store = StageStore(str(tmp_path / "store"))
    run_chain_locally(chain, store, data, Runtime(), 0)
    for planned in chain[1:]:
        record = read_record(store, planned.key)
        final = record["final"]
        # Layerwise (where the paper used the probes): every block well below a zero output. Topdown: the image
        # (the chained pathway's output) below TOPDOWN_IMAGE_FACTOR; its intermediate levels can degrade (docs).
        checked = planned.stage.levels if planned.stage.kind == "layerwise" else ["image"]
        factor = ZERO_OUTPUT_FACTOR if planned.stage.kind == "layerwise" else TOPDOWN_IMAGE_FACTOR
        for lvl in checked:
            assert final[f"rec_rel_{lvl}"] < factor, (planned.stage.kind, lvl, final)
        chosen = {k: v for k, v in final.items() if k.startswith("lr_decoder")}
        assert set(chosen) == {"lr_decoder1", "lr_decoder2"} and set(chosen.values()) <= set(grid)
        assert dict(record["stage"]["settings"]["optimizer"]["group_lrs"]) == {k[3:]: v for k, v in chosen.items()}


def test_spec_refuses_misused_auto_options():
    from study.spec import SpecError, parse_spec

    doc = {"name": "x", "models": ["sae-all"], "model": {"encoder": "vgg_tiny"},
           "loss": {"balance": "auto", "weights": {"image": 1e-3}, "target_share": 0.6},
           "stages": {k: {} for k in ("classifier", "layerwise", "topdown")}
           | {"finetune": {"optimizer": {"lr": "auto", "lr_grid": [0.1]}}}}
    with pytest.raises(SpecError) as err:
        parse_spec(doc)
    text = "\n".join(err.value.problems)
    assert "stages.finetune.optimizer.lr: 'auto' (the paper's decoder-rate probes) is for the layerwise and" in text
    assert "loss.weights: balance 'auto' sets the weights itself" in text
    assert "loss.target_share: the shares of model 'sae-all' sum to 1.2 >= 1" in text


def test_report_table_of_loss_shares():
    import pandas as pd

    from analysis.report import loss_balance_table

    stages = pd.DataFrame([
        {"model": "sae-all", "stage": "finetune", "loss_share_start_image": 0.1, "loss_share_end_image": 0.05,
         "loss_weight_image": 2.0},
        {"model": "sae-all", "stage": "finetune", "loss_share_start_image": 0.1, "loss_share_end_image": 0.03,
         "loss_weight_image": 4.0},
        {"model": "sae-all", "stage": "layerwise", "loss_share_start_image": None}])
    table = loss_balance_table(stages)
    assert table.to_dict("records") == [{"model": "sae-all", "level": "image", "n": 2, "share_start": 0.1,
                                         "share_end": pytest.approx(0.04), "weight": 3.0}]
    assert loss_balance_table(pd.DataFrame()).empty
