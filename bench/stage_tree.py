"""Stage-tree reuse: epochs the platform really trains for the paper's 7-model study, against running every pipeline alone.

The 7 models of Zhang et al. (2016) share stages: one classifier per seed, two layer-wise decoder stages (SAE, SWWAE),
four top-down stages, seven fine-tunings. With budgets 30 / 5 / 5 / 10 epochs (classifier / layerwise / topdown /
finetune), running each model's pipeline on its own costs 330 epochs per seed; exact reuse trains 130 (ratio 0.394).
This benchmark runs the study FOR REAL at tiny size (vgg_tiny, a Fashion-MNIST subset) through the platform path --
`ensure_chain` on a local Ray Train, one Train run per missing segment, a fresh stage store -- and counts the epochs
actually executed:

- from the store (the figure reported as `ratio`): sum of len(record["history"]) over every entry;
- from what `ensure_chain` says it computed (a stage computed twice would show here, not in the store);
- from the Train runs' own per-epoch reports (a controller-side callback; counts restarts and repeats too).

Then a 20-trial loss-weight search over SWWAE-all (20 fine-tuning weight pairs, seed 0) in a second fresh store:
exact reuse trains 30+5+5+20*10 = 240 of 20*50 = 1000 epochs (`search_ratio` 0.24).
Also checks the store's entries per stage kind: S classifiers, 2S layerwise, 4S topdown, 7S finetune (S seeds).

    python bench/stage_tree.py            # 3 seeds x 7 models + 20-trial search, all through Ray Train (~37 min here)
    python bench/stage_tree.py --smoke    # seconds: 1 seed, 2 models, budgets 2/1/1/1, no search, IN-PROCESS
                                          # (run_chain_locally, no Ray): checks the counting, not the Ray path
    python bench/stage_tree.py --runner local   # the full study in-process (fast; same keys, same counting)

Per Train run wall time is fitted as  a + b * reports  over all Train runs (a: start-up + tear-down of one run,
b: cost of one report, which Ray Train V2 paces at its controller's poll interval), so the cost of the Ray path
at this tiny size is explained, not just measured.

Last line: one JSON object (ratio, search_ratio, executed_epochs, standalone_epochs, entries_per_kind, seconds, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, if not pip-installed

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from trainables.data import DataConfig, build_data  # noqa: E402
from trainables.models import PAPER_VARIANTS, model_config  # noqa: E402
from trainables.stages.chain import plan, read_record, run_chain_locally  # noqa: E402
from trainables.stages.loop import Runtime  # noqa: E402
from trainables.stages.procedure import LossConfig, OptimizerConfig, StageSettings, procedure  # noqa: E402
from trainables.stages.store import StageStore  # noqa: E402

KINDS = ("classifier", "layerwise", "topdown", "finetune")
# Search grid over the SWWAE-all fine-tuning weights of vgg_tiny's two levels (image, pool1): 4 x 5 = 20 trials.
IMAGE_WEIGHTS = (1e-5, 1e-4, 1e-3, 1e-2)
POOL1_WEIGHTS = (1e-13, 1e-12, 1e-11, 1e-10, 1e-9)


def make_settings(budgets: dict[str, int], batch_size: int, lr: float) -> dict[str, StageSettings]:
    return {k: StageSettings(epochs=budgets[k], batch_size=batch_size, optimizer=OptimizerConfig(lr=lr)) for k in KINDS}


def chain_for(variant: str, settings, loss: LossConfig, identity: str, seed: int):
    cfg = model_config(dict(variant=variant, encoder="vgg_tiny", in_channels=1, image_size=28))
    return plan(procedure(cfg, settings, loss), identity, seed)


def standalone_epochs(chain) -> int:
    return sum(p.stage.settings.epochs for p in chain)


def store_counts(store: StageStore) -> tuple[int, dict[str, int]]:
    """(epochs recorded in every entry's history, entries per stage kind)."""
    epochs, kinds = 0, Counter()
    for key in store.keys():
        record = read_record(store, key)
        epochs += len(record["history"])
        kinds[record["stage"]["kind"]] += 1
    return epochs, {k: kinds.get(k, 0) for k in KINDS}


def make_report_log():
    """A Ray Train callback (runs on the Train controller) appending every report to a JSON-lines file."""
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            with open(self.path, "a") as f:
                f.write(json.dumps({"t": time.time(), "event": m.get("event"), "stage": m.get("stage"),
                                    "stage_key": m.get("stage_key"), "epoch": m.get("epoch")}) + "\n")

    return ReportLog


class Runner:
    """Runs chains through the platform (ensure_chain on Ray Train) or in-process (run_chain_locally)."""

    def __init__(self, kind: str, workdir: str, data_cfg: DataConfig, cpus_per_worker: float):
        self.kind, self.workdir, self.data_cfg = kind, workdir, data_cfg
        self.cpus_per_worker = cpus_per_worker
        self.calls: list[dict] = []  # one per chain: wall seconds, stages / epochs computed, reports
        self.report_path = os.path.join(workdir, "reports.jsonl")
        self.ray_init_seconds = None
        self._data = {}
        if kind == "ray":
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            self.ray_init_seconds = time.perf_counter() - t0
            self.callbacks = [make_report_log()(self.report_path)]

    def data(self, seed: int):
        if seed not in self._data:
            self._data[seed] = build_data(self.data_cfg, seed)
        return self._data[seed]

    def ensure(self, chain, store: StageStore, seed: int) -> list[bool]:
        t0 = time.perf_counter()
        if self.kind == "ray":
            from trainables.stages.on_ray import Scaling, SegmentJob, ensure_chain

            job = SegmentJob(segment=(), store_uri=store.root, data=self.data_cfg, seed=seed,
                             scaling=Scaling(num_workers=1, cpus_per_worker=self.cpus_per_worker))
            computed = ensure_chain(chain, store, job, os.path.join(self.workdir, "train"), callbacks=self.callbacks)
        else:
            computed = run_chain_locally(chain, store, self.data(seed), Runtime(), seed)
        stages = [p for p, c in zip(chain, computed) if c]
        self.calls.append({"seconds": time.perf_counter() - t0, "stages": len(stages),
                           "epochs": sum(p.stage.settings.epochs for p in stages),
                           # one report per epoch and one at the end of every stage (trainables/stages/on_ray.py)
                           "reports": sum(p.stage.settings.epochs + 1 for p in stages)})
        return computed

    def reported_epochs(self) -> int | None:
        """Epoch reports the Train controllers received (None in-process)."""
        if self.kind != "ray":
            return None
        if not os.path.exists(self.report_path):
            return 0
        with open(self.report_path) as f:
            return sum(1 for line in f if json.loads(line)["event"] == "epoch")

    def close(self):
        if self.kind == "ray":
            import ray

            ray.shutdown()


def fit_run_costs(calls: list[dict]) -> dict | None:
    """Least squares  seconds = a + b * reports  over the calls that launched a Train run."""
    runs = [c for c in calls if c["stages"] > 0]
    if len(runs) < 3 or len({c["reports"] for c in runs}) < 2:
        return None
    n = len(runs)
    mx = sum(c["reports"] for c in runs) / n
    my = sum(c["seconds"] for c in runs) / n
    sxx = sum((c["reports"] - mx) ** 2 for c in runs)
    b = sum((c["reports"] - mx) * (c["seconds"] - my) for c in runs) / sxx
    a = my - b * mx
    return {"train_runs": n, "seconds_per_run_fixed": round(a, 2), "seconds_per_report": round(b, 3),
            "mean_seconds_per_run": round(my, 2), "mean_reports_per_run": round(mx, 1)}


def exact(distinct: dict) -> tuple[int, dict[str, int]]:
    """Epochs and entries per kind of perfect reuse: every distinct stage key trained once."""
    kinds = Counter(kind for kind, _ in distinct.values())
    return sum(e for _, e in distinct.values()), {k: kinds.get(k, 0) for k in KINDS}


def run_study(runner: Runner, store: StageStore, variants, seeds, settings, loss) -> dict:
    standalone = computed_epochs = 0
    distinct = {}
    for seed in seeds:
        identity = runner.data(seed).identity
        for variant in variants:
            chain = chain_for(variant, settings, loss, identity, seed)
            distinct.update({p.key: (p.stage.kind, p.stage.settings.epochs) for p in chain})
            computed = runner.ensure(chain, store, seed)
            standalone += standalone_epochs(chain)
            computed_epochs += sum(p.stage.settings.epochs for p, c in zip(chain, computed) if c)
            print(f"  seed {seed} {variant:16s} computed {''.join('x' if c else '.' for c in computed)}"
                  f"  ({runner.calls[-1]['seconds']:.1f} s)", flush=True)
    executed, kinds = store_counts(store)
    exact_epochs, exact_kinds = exact(distinct)
    return {"executed_epochs": executed, "computed_epochs": computed_epochs, "standalone_epochs": standalone,
            "ratio": executed / standalone, "entries_per_kind": kinds, "exact_epochs": exact_epochs,
            "exact_entries_per_kind": exact_kinds}


def run_search(runner: Runner, store: StageStore, settings, trials: int) -> dict:
    identity = runner.data(0).identity
    grid = [(i, p) for i in IMAGE_WEIGHTS for p in POOL1_WEIGHTS][:trials]
    standalone = computed_epochs = 0
    distinct = {}
    for n, (w_image, w_pool1) in enumerate(grid):
        chain = chain_for("swwae-all", settings, LossConfig(weights=(("image", w_image), ("pool1", w_pool1))), identity, 0)
        distinct.update({p.key: (p.stage.kind, p.stage.settings.epochs) for p in chain})
        computed = runner.ensure(chain, store, 0)
        standalone += standalone_epochs(chain)
        computed_epochs += sum(p.stage.settings.epochs for p, c in zip(chain, computed) if c)
        print(f"  trial {n:2d} image={w_image:g} pool1={w_pool1:g} computed "
              f"{''.join('x' if c else '.' for c in computed)}  ({runner.calls[-1]['seconds']:.1f} s)", flush=True)
    executed, kinds = store_counts(store)
    exact_epochs, exact_kinds = exact(distinct)
    return {"executed_epochs": executed, "computed_epochs": computed_epochs, "standalone_epochs": standalone,
            "ratio": executed / standalone, "entries_per_kind": kinds, "trials": len(grid),
            "exact_epochs": exact_epochs, "exact_entries_per_kind": exact_kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="1 seed, baseline + swwae-all, budgets 2/1/1/1, no search, in-process (no Ray)")
    parser.add_argument("--runner", choices=("ray", "local"), default=None,
                        help="ray: ensure_chain on local Ray Train (default); local: run_chain_locally (default with --smoke)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", default="30,5,5,10", help="epochs of classifier,layerwise,topdown,finetune")
    parser.add_argument("--trials", type=int, default=20, help="loss-weight search trials (0 = no search)")
    parser.add_argument("--subset", type=int, default=256, help="Fashion-MNIST training examples (before the val split)")
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--workdir", default=None, help="stores and Train runs go here (default: a temp dir, removed)")
    args = parser.parse_args()

    variants, seeds, trials = PAPER_VARIANTS, list(range(args.seeds)), args.trials
    budgets = dict(zip(KINDS, (int(b) for b in args.budgets.split(","))))
    runner_kind = args.runner or "ray"
    if args.smoke:
        variants, seeds, trials = ("baseline", "swwae-all"), [0], 0
        budgets = dict(zip(KINDS, (2, 1, 1, 1)))
        runner_kind = args.runner or "local"
    settings = make_settings(budgets, args.batch_size, lr=0.05)
    loss = LossConfig()  # the paper's default fine-tuning weights

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-stage-tree-")
    os.makedirs(workdir, exist_ok=True)
    data_cfg = DataConfig(dataset="fashion_mnist", subset=args.subset, val_size=args.val_size)
    t_start = time.perf_counter()
    runner = Runner(runner_kind, workdir, data_cfg, args.cpus_per_worker)
    how = ("ensure_chain on local Ray Train (one Train run per missing segment)" if runner_kind == "ray"
           else "IN-PROCESS run_chain_locally (no Ray: checks reuse and counting, not the Ray path)")
    print(f"stage tree: {len(variants)} models x {len(seeds)} seed(s), budgets {budgets}, vgg_tiny, "
          f"Fashion-MNIST {args.subset - args.val_size}/{args.val_size}, via {how}", flush=True)
    try:
        t0 = time.perf_counter()
        study = run_study(runner, StageStore(os.path.join(workdir, "study-store")), variants, seeds, settings, loss)
        study["seconds"] = time.perf_counter() - t0
        study_reported = runner.reported_epochs()
        search = None
        if trials:
            print(f"search: {trials} SWWAE-all fine-tuning weight pairs, seed 0, fresh store", flush=True)
            t0 = time.perf_counter()
            search = run_search(runner, StageStore(os.path.join(workdir, "search-store")), settings, trials)
            search["seconds"] = time.perf_counter() - t0
        reported = runner.reported_epochs()
    finally:
        runner.close()
    seconds = time.perf_counter() - t_start

    S = len(seeds)
    full_study = set(variants) == set(PAPER_VARIANTS)
    # The paper's tree: S classifiers, 2S layerwise (SAE, SWWAE), 4S topdown, 7S finetune; otherwise distinct keys.
    expected_kinds = ({"classifier": S, "layerwise": 2 * S, "topdown": 4 * S, "finetune": 7 * S} if full_study
                      else study["exact_entries_per_kind"])
    checks = {
        "entries_per_kind_ok": study["entries_per_kind"] == expected_kinds == study["exact_entries_per_kind"],
        "store_equals_computed": study["executed_epochs"] == study["computed_epochs"],
        "exact_reuse": study["executed_epochs"] == study["exact_epochs"],
    }
    if runner_kind == "ray":
        checks["reports_equal_store"] = study_reported == study["executed_epochs"] and (
            search is None or reported - study_reported == search["executed_epochs"])
    if search:
        checks["search_entries_ok"] = search["entries_per_kind"] == {"classifier": 1, "layerwise": 1, "topdown": 1,
                                                                      "finetune": search["trials"]}
        checks["search_store_equals_computed"] = search["executed_epochs"] == search["computed_epochs"]
        checks["search_exact_reuse"] = search["executed_epochs"] == search["exact_epochs"]
    run_costs = fit_run_costs(runner.calls) if runner_kind == "ray" else None

    print()
    print(f"study:  executed {study['executed_epochs']} of {study['standalone_epochs']} standalone epochs "
          f"-> ratio {study['ratio']:.3f} (exact reuse {study['exact_epochs'] / study['standalone_epochs']:.3f}; goal <= 0.40)")
    print(f"        entries per kind {study['entries_per_kind']} (expected {expected_kinds}); {study['seconds']:.0f} s")
    if search:
        print(f"search: executed {search['executed_epochs']} of {search['standalone_epochs']} -> search_ratio "
              f"{search['ratio']:.3f} (exact reuse {search['exact_epochs'] / search['standalone_epochs']:.3f}); entries {search['entries_per_kind']}; {search['seconds']:.0f} s")
    if run_costs:
        print(f"Ray Train: {run_costs['train_runs']} runs; wall per run ~ {run_costs['seconds_per_run_fixed']:.1f} s "
              f"+ {run_costs['seconds_per_report']:.2f} s per report (reports = epochs + stages); "
              f"ray.init {runner.ray_init_seconds:.1f} s")
    print(f"checks: {checks}")
    print(f"total {seconds:.0f} s")
    out = {
        "bench": "stage_tree",
        "runner": runner_kind,
        "smoke": args.smoke,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "models": list(variants), "seeds": S, "budgets": budgets,
        "data": {"subset": args.subset, "val_size": args.val_size, "batch_size": args.batch_size},
        "ratio": round(study["ratio"], 4),
        "search_ratio": round(search["ratio"], 4) if search else None,
        "executed_epochs": study["executed_epochs"],
        "standalone_epochs": study["standalone_epochs"],
        "computed_epochs": study["computed_epochs"],
        "reported_epochs": study_reported,
        "exact_reuse_epochs": study["exact_epochs"],
        "exact_reuse_ratio": round(study["exact_epochs"] / study["standalone_epochs"], 4),
        "entries_per_kind": study["entries_per_kind"],
        "expected_entries_per_kind": expected_kinds,
        "search": ({k: search[k] for k in ("executed_epochs", "standalone_epochs", "computed_epochs",
                                           "exact_epochs", "entries_per_kind", "trials")} | {"seconds": round(search["seconds"], 1)}
                   if search else None),
        "checks": checks,
        "train_run_costs": run_costs,
        "ray_init_seconds": round(runner.ray_init_seconds, 2) if runner.ray_init_seconds is not None else None,
        "study_seconds": round(study["seconds"], 1),
        "seconds": round(seconds, 1),
    }
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
