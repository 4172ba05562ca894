"""The end-of-stage evaluation's per-image outcomes (predictions.npz): what the analysis pairs image by image."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.test_stages import chain_for
from trainables.data import DataConfig, build_data
from trainables.stages.chain import PREDICTIONS_FILE, read_record, run_chain_locally
from trainables.stages.loop import Runtime
from trainables.stages.store import StageStore


def test_every_stage_stores_per_image_outcomes_that_add_up_to_its_metrics(fmnist_root, tmp_path):
    data = build_data(DataConfig(root=fmnist_root, subset=400, val_size=100, labeled_fraction=0.5), 0)
    store = StageStore(str(tmp_path / "store"))
    chain = chain_for("swwae-first", data.identity, 0)[:2]  # classifier, then layerwise decoders (fixed classifier)
    run_chain_locally(chain, store, data, Runtime(), 0)
    for planned in chain:
        final = read_record(store, planned.key)["final"]
        with np.load(os.path.join(store.get(planned.key).path, PREDICTIONS_FILE)) as npz:
            arrays = {k: npz[k] for k in npz.files}
        assert arrays["val_top1_wrong"].dtype == np.uint8 and arrays["val_top1_wrong"].shape == (100,)
        assert arrays["train_top1_wrong"].shape == (150,)  # half of the 300 training examples are labeled
        for split in ("train", "val"):
            for k in ("top1", "top5"):
                assert 100 * arrays[f"{split}_{k}_wrong"].mean() == pytest.approx(final[f"{split}_{k}_err"])
        depths = sorted(k for k in arrays if k.startswith("invert_err_pool"))
        if planned.stage.kind == "layerwise":
            assert depths == ["invert_err_pool1", "invert_err_pool2"]
            for name in depths:
                assert arrays[name].dtype == np.float16 and arrays[name].shape == (100,)
                assert float(arrays[name].astype(float).mean()) == pytest.approx(final[name], rel=1e-2)
        else:
            assert depths == []
