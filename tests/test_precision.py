"""Training precision: resolution from the hardware, its place in stage keys and records, and bf16 training."""

from __future__ import annotations

import pytest
import torch

from trainables.data import DataConfig, build_data
from trainables.models import model_config
from trainables.stages import precision as P
from trainables.stages.chain import plan, read_record, run_chain_locally
from trainables.stages.loop import Runtime
from trainables.stages.procedure import LossConfig, OptimizerConfig, StageSettings, procedure
from trainables.stages.store import StageStore


def test_explicit_precisions_are_kept_and_auto_follows_the_cpu_flags(monkeypatch):
    assert P.resolve_precision("fp32", "cpu") == "fp32" and P.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert P.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert P.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert P.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="expected one of auto, fp32, bf16"):
        P.resolve_precision("fp16", "cpu")


def test_this_machines_auto_precision_matches_its_flags():
    native = any(f in P.cpu_flags() for f in P.CPU_BF16_FLAGS)
    assert P.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert P.describe_device("cpu").startswith("cpu ")


def _chain(identity: str, precision: str):
    cfg = model_config(dict(variant="sae-first", encoder="vgg_tiny", in_channels=1, image_size=28))
    settings = {k: StageSettings(epochs=1, batch_size=64, optimizer=OptimizerConfig(lr=0.05))
                for k in ("classifier", "layerwise", "topdown", "finetune")}
    return plan(procedure(cfg, settings, LossConfig()), identity, 0, precision)[:2]


def test_precision_enters_every_stage_key():
    fp32, bf16 = _chain("d", "fp32"), _chain("d", "bf16")
    assert all(a.key != b.key for a, b in zip(fp32, bf16))
    assert [p.precision for p in bf16] == ["bf16", "bf16"]
    with pytest.raises(ValueError, match="not resolved"):
        _chain("d", "auto")


def test_a_bf16_chain_trains_in_bf16_and_records_it(tmp_path, fmnist_root):
    data = build_data(DataConfig(root=fmnist_root, subset=200, val_size=50), 0)
    chain = _chain(data.identity, "bf16")
    store = StageStore(str(tmp_path / "store"))
    # The runtime says fp32 and NHWC: the planned stage's precision wins, the layout is the runtime's.
    assert run_chain_locally(chain, store, data, Runtime(precision="fp32", channels_last=True), 0) == [True, True]
    for planned in chain:
        record = read_record(store, planned.key)
        assert record["precision"] == "bf16" and record["history"][0]["loss"] == record["history"][0]["loss"]


def test_autocast_is_off_for_fp32_and_bfloat16_for_bf16():
    with P.autocast("fp32", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with P.autocast("bf16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
