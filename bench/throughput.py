"""Train-step throughput of every model against the machine's peak, in fp32 and bf16, NCHW and NHWC.

For each of the 7 paper models (vgg_small at 28x28, batch 128): images/s of its joint
training step (all parameters, cross-entropy + every reconstruction level: bench/step_time.py's step) in each
precision x layout, and the achieved FLOP/s (forward + backward FLOPs of one step, counted by
torch.utils.flop_counter, over its time) as a fraction of the machine's peak in that precision, measured with a
matmul probe (the best of a few large square matmuls). All variants of one model are timed round-robin, so that
other load on the machine slows them alike.

Then a short accuracy check: the baseline trained in fp32 and in bf16 on a Fashion-MNIST subset for a few seeds;
bf16 passes when its mean validation error is within the fp32 seeds' noise (the larger of 2 standard errors of the
difference of means and the fp32 seeds' range).

    python bench/throughput.py             # ~10 min on 2 idle cores (bf16 is emulated, hence slow, on CPUs without it)
    python bench/throughput.py --smoke     # seconds: tiny VGG, few steps, a toy accuracy check

Last line: one JSON object; `models.<name>.bf16_speedup` (fp32 time / bf16 time, each in its faster layout) and
`models.<name>.peak_fraction` (achieved / peak FLOP/s in the precision and layout the platform picks here).
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

from step_time import interleaved_medians, make_step  # noqa: E402  (bench/ is on sys.path when run as a script)

from trainables.data import DataConfig, build_data  # noqa: E402
from trainables.models import PAPER_VARIANTS, create_model, model_config  # noqa: E402
from trainables.stages.chain import plan, read_record, run_chain_locally  # noqa: E402
from trainables.stages.loop import Runtime  # noqa: E402
from trainables.stages.precision import describe_device, resolve_channels_last, resolve_precision  # noqa: E402
from trainables.stages.procedure import LossConfig, OptimizerConfig, StageSettings, procedure  # noqa: E402
from trainables.stages.store import StageStore  # noqa: E402

VARIANTS = [(p, cl) for p in ("fp32", "bf16") for cl in (False, True)]


def label(precision: str, channels_last: bool) -> str:
    return f"{precision}-{'nhwc' if channels_last else 'nchw'}"


def peak_flops(precision: str, n: int, reps: int) -> float:
    """FLOP/s of the best of `reps` n x n matmuls in `precision` (bf16: bfloat16 operands, as autocast feeds them)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def sig(x: float, digits: int = 3) -> float:
    """`x` to `digits` significant figures: a small model's peak fraction (0.0004 in --smoke) must not print as 0."""
    return float(f"{x:.{digits}g}")


def step_flops(variant: str, encoder: str, batch: int) -> int:
    """Forward + backward FLOPs of one joint training step (the optimizer's elementwise work is not counted)."""
    model = create_model(dict(variant=variant, encoder=encoder, in_channels=1, image_size=28))
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    step = make_step(model, x, y)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def throughput(encoder: str, batch: int, reps: int, peaks: dict, default: str, warmup: int = 2) -> dict:
    out = {}
    for variant in PAPER_VARIANTS:
        torch.manual_seed(0)
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        steps = {}
        for precision, cl in VARIANTS:
            model = create_model(dict(variant=variant, encoder=encoder, in_channels=1, image_size=28))
            steps[label(precision, cl)] = make_step(model, x, y, precision, cl)
        seconds = interleaved_medians(steps, reps, warmup)
        flops = step_flops(variant, encoder, batch)
        best = {p: min((s, name) for name, s in seconds.items() if name.startswith(p)) for p in ("fp32", "bf16")}
        row = {"images_per_s": {k: round(batch / s, 1) for k, s in seconds.items()},
               "achieved_gflops": {k: sig(flops / s / 1e9) for k, s in seconds.items()},
               "step_gflop": sig(flops / 1e9),
               "bf16_speedup": sig(best["fp32"][0] / best["bf16"][0]),
               "nhwc_speedup": {p: sig(seconds[label(p, False)] / seconds[label(p, True)]) for p in ("fp32", "bf16")},
               "peak_fraction": sig(flops / seconds[default] / peaks[default.split("-")[0]])}
        out[variant] = row
        print(f"  {variant:16s} " + "  ".join(f"{k} {v:7.1f} img/s" for k, v in row["images_per_s"].items())
              + f"  bf16 x{row['bf16_speedup']:.2f}  peak fraction ({default}) {row['peak_fraction']:.3g}", flush=True)
    return out


def accuracy_check(subset: int, val_size: int, epochs: int, seeds: list[int], encoder: str, channels_last: bool) -> dict:
    """The baseline's validation error after `epochs` in fp32 and in bf16, per seed (the platform's own loop)."""
    cfg = model_config(dict(variant="baseline", encoder=encoder, in_channels=1, image_size=28))
    settings = {kind: StageSettings(epochs=epochs if kind == "classifier" else 0, batch_size=128,
                                    optimizer=OptimizerConfig(name="adam", lr=1e-3))
                for kind in ("classifier", "finetune")}  # the baseline's procedure; fine-tuning 0 epochs: evaluate only
    errors = {"fp32": [], "bf16": []}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = StageStore(tmp)
        for seed in seeds:
            data = build_data(DataConfig(dataset="fashion_mnist", subset=subset, val_size=val_size), seed)
            for precision in ("fp32", "bf16"):
                chain = plan(procedure(cfg, settings, LossConfig()), data.identity, seed, precision)
                run_chain_locally(chain, store, data, Runtime(channels_last=channels_last), seed)
                errors[precision].append(read_record(store, chain[-1].key)["final"]["val_top1_err"])
    diff = statistics.mean(errors["bf16"]) - statistics.mean(errors["fp32"])
    n = len(seeds)
    sd = statistics.stdev(errors["fp32"] + errors["bf16"]) if n > 1 else 0.0
    noise = max(2 * sd * (2 / n) ** 0.5, max(errors["fp32"]) - min(errors["fp32"]))
    return {"val_top1_err": errors, "seeds": seeds, "epochs": epochs, "subset": subset, "val_size": val_size,
            "bf16_minus_fp32": round(diff, 3), "seed_noise": round(noise, 3), "within_noise": abs(diff) <= noise}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny VGG, few steps, toy accuracy check")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=8, help="timed steps per model and variant (round-robin)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the accuracy check")
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    encoder, matmul_n, acc = "vgg_small", 1024, dict(subset=3000, val_size=1000, epochs=2)
    if args.smoke:
        encoder, args.reps, args.batch_size, matmul_n = "vgg_tiny", 1, 8, 256
        args.seeds, acc = 2, dict(subset=200, val_size=50, epochs=1)
    torch.set_num_threads(args.threads)
    default = label(resolve_precision("auto", "cpu"), resolve_channels_last("auto", "cpu"))
    print(f"throughput: {encoder}@28, batch {args.batch_size}, {args.threads} threads, {describe_device('cpu')}; "
          f"the platform's default here: {default}", flush=True)
    peaks = {p: peak_flops(p, matmul_n, 5) for p in ("fp32", "bf16")}
    print(f"  matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    models = throughput(encoder, args.batch_size, args.reps, peaks, default, warmup=1 if args.smoke else 2)
    accuracy = None
    if not args.no_accuracy:
        accuracy = accuracy_check(seeds=list(range(args.seeds)), encoder=encoder,
                                  channels_last=resolve_channels_last("auto", "cpu"), **acc)
        print(f"  accuracy check ({accuracy['epochs']} epochs, {len(accuracy['seeds'])} seeds): fp32 "
              f"{accuracy['val_top1_err']['fp32']}, bf16 {accuracy['val_top1_err']['bf16']} -> difference "
              f"{accuracy['bf16_minus_fp32']:+.2f} points, seed noise {accuracy['seed_noise']:.2f}: "
              f"{'within' if accuracy['within_noise'] else 'OUTSIDE'} noise", flush=True)
    print(json.dumps({"bench": "throughput", "smoke": args.smoke,
                      "machine": f"{platform.machine()} {args.threads} threads, {describe_device('cpu')}",
                      "encoder": encoder, "batch_size": args.batch_size, "default": default,
                      "peak_gflops": {p: round(v / 1e9, 2) for p, v in peaks.items()},
                      "models": models, "accuracy": accuracy}))


if __name__ == "__main__":
    main()
