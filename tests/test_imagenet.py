"""The paper's ImageNet setting: inputs exactly as torchvision's VGG16 weights expect, and paper-imagenet.yaml end
to end (smoke) on a tiny ImageNet-format folder with a locally built vgg16 state dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import DataConfig, build_data
from trainables.models import create_model

# (width, height): landscape, portrait, square, odd sizes, one smaller than the 256 resize.
SIZES = [(320, 240), (240, 320), (256, 256), (500, 333), (333, 500), (200, 150)]


def write_jpegs(root: Path, split: str, classes: list[str], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, cls in enumerate(classes):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = SIZES[(c * per_class + i) % len(SIZES)]
            # Smooth gradients plus noise: realistic JPEG content, not a flat image.
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (c + 1) + yy) % 256, (yy * 2 + i * 40) % 256, (xx + yy * (i + 1)) % 256], -1)
            noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / split / cls / f"img{i}.JPEG", quality=90)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A tiny ImageNet-format tree (train/ and val/, 2 classes, JPEGs of several sizes) and a vgg16 .pth."""
    import torchvision

    root = tmp_path_factory.mktemp("ilsvrc")
    classes = ["n01440764", "n01443537"]
    write_jpegs(root, "train", classes, 6, seed=0)
    write_jpegs(root, "val", classes, 3, seed=1)
    torch.manual_seed(0)
    pth = root.parent / "vgg16-local.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), pth)
    return root, pth


def test_our_inputs_and_vgg16_give_torchvisions_logits(imagenet_like):
    import torchvision
    from torchvision.models import VGG16_Weights

    root, pth = imagenet_like
    data = build_data(DataConfig(dataset="imagefolder", root=str(root)), 0)
    ours = create_model(dict(variant="baseline", encoder="vgg16", in_channels=3, num_classes=1000, image_size=224,
                             pretrained=str(pth))).eval()
    theirs = torchvision.models.vgg16(weights=None)
    theirs.load_state_dict(torch.load(pth, weights_only=True))
    theirs.eval()
    preprocess = VGG16_Weights.IMAGENET1K_V1.transforms()
    paths = data.val.paths
    assert len({Image.open(p).size for p in paths}) >= 4  # several sizes, both orientations
    x_ours = torch.stack([data.val[i][0] for i in range(len(paths))])
    x_theirs = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        got = ours(x_ours, decode=False).logits
        want = theirs(x_theirs)
    assert got.shape == want.shape == (len(paths), 1000)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # The reconstruction target stays the paper's: pixel/255 - mean, not divided by the std.
    mean = torch.tensor(data.mean).view(3, 1, 1)
    std = torch.tensor(VGG16_Weights.IMAGENET1K_V1.transforms().std).view(3, 1, 1)
    torch.testing.assert_close(data.val[0][0], x_theirs[0] * std, rtol=1e-5, atol=1e-5)
    assert float((data.val[0][0] + mean).min()) >= -1e-6


@pytest.mark.ray
def test_paper_imagenet_spec_runs_in_smoke_mode_with_a_local_vgg16(imagenet_like, tmp_path):
    """Through the CLI: the pretrained VGG16 path (input std, 0-epoch classifier), lr auto decoder stages,
    balanced fine-tuning and dense evaluation, on JPEG folders; one model (swwae-all) has every stage kind."""
    import os
    import subprocess
    import sys

    import mlflow

    root, pth = imagenet_like
    spec = Path(__file__).parent.parent / "studies" / "paper-imagenet.yaml"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "study", "launch", str(spec), "--smoke", "--no-report",
                           "--set", f"data.root={root}", "--set", f"model.pretrained={pth}",
                           "--set", "models=[swwae-all]", "--set", "data.subset=8"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Results of paper-imagenet-smoke" in proc.stdout
    assert "classifier computed (not in the store)" in proc.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'paper-imagenet-smoke' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("paper-imagenet-smoke")
    stages = {r.data.tags["stage"]: r.data.metrics
              for r in client.search_runs([exp.experiment_id], "tags.role = 'stage'")}
    assert set(stages) == {"classifier", "layerwise", "topdown", "finetune"}
    assert "val_top1_err_dense" in stages["classifier"] and "val_top1_err_dense" in stages["finetune"]
    assert {"lr_decoder1", "lr_decoder5"} <= set(stages["layerwise"]) and "lr_decoder1" in stages["topdown"]
    for level in ("image", "pool1", "pool2", "pool3", "pool4"):
        assert stages["finetune"][f"loss_share_start_{level}"] == pytest.approx(0.1, rel=1e-3)
        assert f"loss_share_end_{level}" in stages["finetune"] and stages["finetune"][f"loss_weight_{level}"] > 0
