"""Train-step time of each augmented model relative to the baseline, beside the ratio of their forward FLOPs.

A decoding pathway should cost what its arithmetic costs: if time/baseline_time exceeds flops/baseline_flops by
much, work is wasted somewhere (e.g. pooling computed twice, slow unpooling). Every model trains jointly
(all parameters, cross-entropy + every reconstruction level), as in the fine-tuning stage.

    python bench/step_time.py            # small VGG at 28x28 (batch 64) and VGG16 at 224x224 (batch 2)
    python bench/step_time.py --smoke    # seconds: tiny VGG, few steps

Last line: one JSON object with per-model ratios and worst_time_over_flops_ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, if not installed

from trainables.losses import cross_entropy, reconstruction_terms, total_loss  # noqa: E402
from trainables.models import PAPER_VARIANTS, create_model  # noqa: E402
from trainables.stages.precision import autocast, resolve_channels_last, resolve_precision  # noqa: E402


def forward_flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def make_step(model, x, y, precision: str = "fp32", channels_last: bool = False):
    """One joint training step (all parameters, cross-entropy + every reconstruction level) as a closure, in the
    given precision (bf16 = autocast of the forward pass, as the platform's loop) and memory layout."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with autocast(precision, x.device):
            out = model(x)
            terms = reconstruction_terms(out.recons, out.targets)
            loss = total_loss(terms, {k: 1e-4 for k in terms}, cross_entropy(out.logits, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def interleaved_medians(steps: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each step closure, timed round-robin (one step of each in turn) so that a noisy neighbour
    slows every candidate alike instead of whichever ran during the burst."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(encoder: str, in_channels: int, image_size: int, num_classes: int, batch: int, steps: int,
            precision: str = "fp32", channels_last: bool = False) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, in_channels, image_size, image_size)
    y = torch.randint(0, num_classes, (batch,))
    rows, closures = {}, {}
    for variant in PAPER_VARIANTS:
        model = create_model(dict(variant=variant, encoder=encoder, in_channels=in_channels,
                                  num_classes=num_classes, image_size=image_size))
        rows[variant] = {"flops": forward_flops(model, x)}
        closures[variant] = make_step(model, x, y, precision, channels_last)
    for variant, seconds in interleaved_medians(closures, steps).items():
        rows[variant]["seconds"] = seconds
    base = rows["baseline"]
    out = {}
    for variant, r in rows.items():
        if variant == "baseline":
            continue
        flops_ratio = r["flops"] / base["flops"]
        time_ratio = r["seconds"] / base["seconds"]
        out[variant] = {"time_ratio": round(time_ratio, 3), "flops_ratio": round(flops_ratio, 3),
                        "time_over_flops": round(time_ratio / flops_ratio, 3)}
    return {"baseline_step_seconds": round(base["seconds"], 5), "models": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--no-vgg16", action="store_true", help="skip the VGG16 224x224 measurement")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: what the platform resolves on this machine")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # What the platform trains in by default on this machine (resources.precision / channels_last: auto).
    run = {"precision": resolve_precision(args.precision, "cpu"), "channels_last": resolve_channels_last("auto", "cpu")}
    print(f"step_time: {run['precision']}, {'NHWC' if run['channels_last'] else 'NCHW'} (the platform's default here), "
          f"{torch.get_num_threads()} threads")
    setups = {}
    if args.smoke:
        setups["vgg_tiny@28"] = measure("vgg_tiny", 1, 28, 10, batch=16, steps=3, **run)
    else:
        setups["vgg_small@28"] = measure("vgg_small", 1, 28, 10, batch=64, steps=args.steps, **run)
        if not args.no_vgg16:
            setups["vgg16@224"] = measure("vgg16", 3, 224, 1000, batch=2, steps=max(3, args.steps // 3), **run)
    for name, result in setups.items():
        print(f"{name}: baseline step {result['baseline_step_seconds'] * 1000:.1f} ms")
        for variant, r in result["models"].items():
            print(f"  {variant:16s} time x{r['time_ratio']:.2f}  flops x{r['flops_ratio']:.2f}  time/flops {r['time_over_flops']:.2f}")
    worst = max(r["time_over_flops"] for s in setups.values() for r in s["models"].values())
    print(json.dumps({"bench": "step_time", "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU",
                      "precision": run["precision"], "channels_last": run["channels_last"], "setups": setups, "worst_time_over_flops_ratio": worst}))


if __name__ == "__main__":
    main()
