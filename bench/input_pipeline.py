"""Images/s of the ImageNet training input pipeline with 1 and 2 loader processes, and VGG16's train-step rate.

The pipeline is the platform's own (`trainables.data.folders` + `loader`): JPEG decode, resize (shorter side 256),
random crop 224, horizontal flip, to tensor, mean subtraction, batches of 32, each item decoded in a DataLoader
worker process. The JPEGs are written first (ImageNet-like: 500x375 and 375x500, quality 90). One loader process
keeps one core busy, so images/s with 1 process is the per-core rate; `scaling_1_to_2` is the rate with 2 processes
over the rate with 1 (2.0 = perfect; below that the cores are shared with other work or the main process is the
bottleneck). The VGG16 rate is a train step (forward, backward, SGD) at 224x224 on this CPU, for scale.

    python bench/input_pipeline.py            # 384 JPEGs per measurement, VGG16 batch 4
    python bench/input_pipeline.py --smoke    # seconds: 64 small JPEGs, vgg_tiny

Last line: one JSON object with img_per_s (per process count), scaling_1_to_2, img_per_s_per_core,
train_img_per_s and cores_per_gpu (cores one GPU needs at GPU_IMG_PER_S, see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from trainables.data import DataConfig, build_data, loader
from trainables.models import create_model

# VGG16 bf16 training images/s of one GPU (A100-class) used to size the decoding cores: see docs/BENCHMARKS.md.
GPU_IMG_PER_S = 1000.0


def write_jpegs(root: str, n: int, sizes: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split, "c0"), exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx + i) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
        img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, "train", "c0", f"{i}.JPEG"), quality=90)
    Image.fromarray(img).save(os.path.join(root, "val", "c0", "0.JPEG"), quality=90)


def images_per_second(dataset, workers: int, batch: int) -> float:
    batches = loader(dataset, batch, shuffle=True, seed=0, num_workers=workers)
    it = iter(batches)
    next(it)  # worker start-up and the first batch are not timed
    n, start = 0, time.perf_counter()
    for x, _ in it:
        n += len(x)
    return n / (time.perf_counter() - start)


def train_images_per_second(encoder: str, size: int, batch: int, steps: int) -> float:
    model = create_model(dict(variant="baseline", encoder=encoder, in_channels=3, num_classes=1000, image_size=size))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x, decode=False).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="few small JPEGs, tiny model")
    args = parser.parse_args()
    n, sizes = (64, [(300, 260), (260, 300)]) if args.smoke else (384, [(500, 375), (375, 500)])
    batch = 16 if args.smoke else 32
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, n + batch, sizes)  # + one batch: the untimed first one
        train = build_data(DataConfig(dataset="imagefolder", root=root), 0).train
        rates = {w: images_per_second(train, w, batch) for w in (1, 2)}
    torch.set_num_threads(1)
    encoder, size, tbatch, steps = ("vgg_tiny", 32, 4, 3) if args.smoke else ("vgg16", 224, 4, 3)
    train_rate = train_images_per_second(encoder, size, tbatch, steps)
    per_core = rates[1]
    print(json.dumps({
        "bench": "input_pipeline", "machine": f"{platform.machine()} {os.cpu_count()} cores, CPU",
        "smoke": args.smoke, "images": n, "batch": batch,
        "img_per_s": {str(w): round(r, 1) for w, r in rates.items()},
        "scaling_1_to_2": round(rates[2] / rates[1], 3),
        "img_per_s_per_core": round(per_core, 1),
        "train_model": f"{encoder}@{size}", "train_img_per_s_1_thread": round(train_rate, 2),
        "gpu_img_per_s": GPU_IMG_PER_S, "cores_per_gpu": round(GPU_IMG_PER_S / per_core, 1),
    }))


if __name__ == "__main__":
    main()
