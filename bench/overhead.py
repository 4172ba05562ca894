"""Platform overhead: one model's 4 stages through Ray Train + the stage store, against a plain PyTorch loop.

The workload: SWWAE-all on vgg_small, its 4 stages (classifier, layerwise, topdown, finetune) on a Fashion-MNIST
subset, sized so that the plain run takes about 3 minutes on a 2-core machine. It runs

(b) plain: in this (warm) process, no Ray, no store, no checkpoints: `build_model` / `prepare` / `make_optimizer` /
    `train_epoch`, the same per-epoch validation errors the platform records, and the same end-of-stage
    `final_metrics`; each child stage starts from its parent's weights kept in memory (build_model's seeding and
    loading, without the store). Timed from `build_data` (files read afresh) to the last stage's final metrics.
    It runs at niceness 15, the niceness Ray gives its worker processes, so that other load slows (a) and (b) alike.
    It computes with 2 threads (`torch_threads`), as (a)'s worker does, whatever torch's default on the machine.
(a) platform: `ensure_chain` on a fresh store and a fresh Train storage path, through Ray Train with ONE worker
    given both cores (`cpus_per_worker=2`; Ray sets the worker's threads from its CPUs, so it computes with the
    same 2 threads as (b)). Timed around the `ensure_chain` call (Train start-up, data loading in the worker,
    per-epoch report + checkpoint, store publishing, tear-down).

in that order ((b) first); `--repeats N` repeats the pair as b a a b b a ... to cancel drift from other load.
`ratio` = wall time (a) / wall time (b) (medians over repeats); goal <= 1.15. Both runs use the same seeds, so their
final metrics must agree: `same_results` checks it (the comparison is then known to be like for like).

Breakdown (measured, not fitted; see docs/BENCHMARKS.md):
- `ray_init_seconds`: `ray.init` (excluded from the ratio).
- a probe Train run with the platform's exact TorchTrainer settings (one worker, 2 CPUs, same RunConfig) whose
  train function only saves and reports a checkpoint of this model's size: Train start-up (fit() call -> train
  function running), per-epoch checkpoint cost (save + report + upload, not blocked), the cost of a report that
  follows another report (Ray Train V2 takes one report per controller poll, every 2 s by default), tear-down
  (train function returned -> fit() returned), and the worker's torch thread count;
- the platform run's own timeline from Ray Train's structured logs (best effort): fit() -> train function
  launched, and the worker's last report -> fit() returned;
- the stage store's costs, timed in this process: publishing an entry (write_entry + put: sha256 of every file)
  and opening a parent (get: sha256 verification + torch.load);
- the plain run's own split: data, training epochs, per-epoch validation, final metrics.
- `what_if_*` (`--what-if-poll S`; off by default, the platform sets 0.25 itself): the same platform run with Ray
  Train's controller poll interval RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=S (the env var is propagated by Ray Train to
  its controller; nothing else changes), to show how much of the overhead is report pacing.

Also (every mode): Ray Train's fixed cost per run, the platform's settings (on_ray.TRAIN_ENV) against Ray's
defaults, interleaved: start-up, tear-down, the controller's phases and the CPU seconds of every process a run
starts (`startup_ab`); and (full and smoke) the whole quickstart through the platform against the same stages in a
plain sequential loop (`study_overhead`: `study_ratio`).

    python bench/overhead.py --quick        # start-up and tear-down only (a few minutes on an idle machine)
    python bench/overhead.py --study-only   # the whole quickstart only, platform vs plain loop (study_ratio)
    python bench/overhead.py                # one model's 4 stages, probes, start-up A/B, the whole quickstart
    python bench/overhead.py --smoke        # tiny: vgg_tiny, 1 epoch per stage, the quickstart's smoke reduction
                                            # with its sae-all model only
    python bench/overhead.py --repeats 2    # b a a b: medians

The whole-study comparison also counts the CPU seconds of every process on the machine during each side
(`platform_cpu_by_process`, `plain_cpu_by_process`, `MachineCpu`): where the platform's extra time goes.

Last line: one JSON object (ratio, study_ratio, train_start_s, train_teardown_s, platform_seconds, plain_seconds,
ray_init_seconds, startup, study, breakdown, ...); --quick: train_start_s, train_teardown_s and startup only;
--study-only: study_ratio and study only.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, if not pip-installed

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch  # noqa: E402

from trainables.data import DataConfig, build_data, fashion_mnist  # noqa: E402
from trainables.models import create_model, model_config  # noqa: E402
from trainables.stages.chain import (DECODER_KINDS, MODEL_FILE, build_model, model_state, plan, read_record,  # noqa: E402
                                     run_chain_locally, write_entry)
from trainables.stages.evaluate import final_metrics, topk_errors  # noqa: E402
from trainables.stages.loop import Runtime, derive_seed, make_optimizer, prepare, train_epoch  # noqa: E402
from trainables.stages.precision import torch_threads  # noqa: E402
from trainables.stages.procedure import LossConfig, OptimizerConfig, StageSettings, procedure  # noqa: E402
from trainables.stages.store import StageStore  # noqa: E402

KINDS = ("classifier", "layerwise", "topdown", "finetune")
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL = 2.0  # Ray Train V2's default controller poll interval (ray/train/v2/_internal/constants.py)
SEED = 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the workload ---------------------------------------------------------------------------------------------------

def make_chain(args, identity: str):
    cfg = model_config(dict(variant="swwae-all", encoder=args.encoder, in_channels=1, image_size=28))
    budgets = dict(zip(KINDS, args.budgets))
    settings = {k: StageSettings(epochs=budgets[k], batch_size=args.batch_size, optimizer=OptimizerConfig(lr=0.01))
                for k in KINDS}
    return plan(procedure(cfg, settings, LossConfig()), identity, SEED)


def build_in_memory(planned, parent_state, seed: int):
    """build_model without the store: same seeding, parent weights from memory (chain.build_model's loading)."""
    if planned.parent is None:
        return build_model(planned, None, seed)  # the root never touches the store
    torch.manual_seed(derive_seed(seed, planned.key, "init"))
    model = create_model(planned.stage.model)
    model.load_state_dict(parent_state, strict=False)
    return model


def plain_run(chain, data_cfg: DataConfig) -> dict:
    """(b): the 4 stages in this process; returns wall seconds, its split and every stage's final metrics."""
    from trainables.stages.on_ray import Scaling
    from trainables.stages.precision import resolve_channels_last

    runtime = Runtime(channels_last=resolve_channels_last(Scaling().channels_last, "cpu"))  # the platform's layout
    split = {"data": 0.0, "build": 0.0, "train_epochs": 0.0, "epoch_val": 0.0, "final_metrics": 0.0}
    finals, outputs, per_stage, timings = {}, {}, {}, {}
    load_before = machine_load()
    t_start = time.perf_counter()
    t = time.perf_counter()
    fashion_mnist._load.cache_clear()  # read the files like a fresh process (the driver read them to plan)
    data = build_data(data_cfg, SEED)
    split["data"] = time.perf_counter() - t
    state = None
    for planned in chain:
        stage = planned.stage
        t_stage = t = time.perf_counter()
        model = prepare(build_in_memory(planned, state, SEED), stage, runtime)
        optimizer = make_optimizer(model, stage)
        split["build"] += time.perf_counter() - t
        history, epoch_seconds = [], []
        for epoch in range(1, stage.settings.epochs + 1):
            t = t_epoch = time.perf_counter()
            metrics = train_epoch(model, stage, data, optimizer, runtime, SEED, epoch)
            split["train_epochs"] += time.perf_counter() - t
            t = time.perf_counter()
            if stage.ce:  # what run_stage's evaluate_epoch records
                metrics.update({f"val_{k}": v for k, v in topk_errors(model, data.val, runtime.device).items()})
            split["epoch_val"] += time.perf_counter() - t
            epoch_seconds.append(time.perf_counter() - t_epoch)
            history.append({"epoch": epoch, **metrics})
        t = time.perf_counter()
        final, arrays = final_metrics(model, data, runtime.device, stage.kind in DECODER_KINDS and stage.weights != ())
        split["final_metrics"] += time.perf_counter() - t
        timings[stage.kind] = {"epochs": epoch_seconds, "final": time.perf_counter() - t}
        state = model_state(model)
        per_stage[stage.kind] = round(time.perf_counter() - t_stage, 2)
        finals[planned.key] = final
        outputs[planned.key] = (model, final, history, arrays)
    seconds = time.perf_counter() - t_start
    return {"seconds": seconds, "split": split, "per_stage": per_stage, "timings": timings, "finals": finals,
            "outputs": outputs, "data": data, "load": [load_before, machine_load()]}


def platform_run(chain, data_cfg: DataConfig, workdir: str, tag: str, poll: float | None = None) -> dict:
    """(a): ensure_chain on a fresh store and a fresh Train storage path (a reused path would resume the old run)."""
    from trainables.stages.on_ray import Scaling, SegmentJob, ensure_chain, run_name

    store = StageStore(os.path.join(workdir, f"store-{tag}"))
    job = SegmentJob(segment=(), store_uri=store.root, data=data_cfg, seed=SEED,
                     scaling=Scaling(num_workers=1, cpus_per_worker=PAIR_CPUS))
    load_before = machine_load()
    with poll_interval(poll):
        t_call = time.time()
        t0 = time.perf_counter()
        computed = ensure_chain(chain, store, job, os.path.join(workdir, f"train-{tag}"))
        seconds = time.perf_counter() - t0
        t_return = time.time()
    assert computed == [True] * len(chain), computed
    finals = {p.key: read_record(store, p.key)["final"] for p in chain}
    epochs = sum(len(read_record(store, p.key)["history"]) for p in chain)
    timeline = ray_run_timeline(run_name(chain), t_call, t_return)
    return {"seconds": seconds, "finals": finals, "epochs": epochs, "timeline": timeline,
            "load": [load_before, machine_load()]}


RAY_WORKER_NICENESS = 15  # Ray starts its worker processes at this niceness (its worker_niceness setting)
PAIR_CPUS = 2  # (a)'s one worker is given 2 CPUs, so computes with 2 threads; (b) is set to the same, since
# torch's default follows the machine (physical cores, OMP_NUM_THREADS)



class niceness:
    """Run this process's threads at `value` (restored after): (b) at the niceness Ray gives (a)'s worker, so that
    other load on the machine slows both alike. Needs root to restore a lower value; a no-op if not permitted."""

    def __init__(self, value: int):
        self.value = value

    @staticmethod
    def _threads():
        return [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]

    def __enter__(self):
        self.old = {}
        for tid in self._threads():  # Linux keeps a niceness per thread
            try:
                self.old[tid] = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, self.value)
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        for tid in self._threads():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, self.old.get(tid, 0))
            except OSError:
                pass


class poll_interval:
    """Set Ray Train's controller poll interval for the Train runs started inside (None: leave Ray's default)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds

    def __enter__(self):
        self.old = os.environ.get(POLL_ENV)
        if self.seconds is not None:
            os.environ[POLL_ENV] = str(self.seconds)

    def __exit__(self, *exc):
        if self.seconds is not None:
            if self.old is None:
                os.environ.pop(POLL_ENV, None)
            else:
                os.environ[POLL_ENV] = self.old


def current_poll() -> float:
    """Ray Train's controller poll interval for runs started now (the platform sets it; else Ray's default)."""
    return float(os.environ.get(POLL_ENV, DEFAULT_POLL))


def machine_load() -> dict:
    """Other load on the machine: 1-min load average and the share of time some task waited for a CPU (PSI)."""
    out = {"loadavg1": round(os.getloadavg()[0], 2)}
    try:
        with open("/proc/pressure/cpu") as f:
            out["cpu_pressure_avg10"] = float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


def compute_speed(timeline: dict | None, plain_timings: dict) -> dict | None:
    """The same computations timed inside the platform's worker (between its reports) and in the plain run.

    Worker side: epoch e -> epoch e+1 report (train + val + one checkpoint) and last epoch -> stage_end report
    (final metrics + store publish); plain side: the same epochs (train + val) and final metrics. A ratio far from
    1 means the two runs did not get the same CPU (other load), not a platform cost.
    """
    if not timeline or not timeline.get("worker_intervals"):
        return None
    worker = plain = 0.0
    for kind, iv in timeline["worker_intervals"].items():
        p = plain_timings.get(kind)
        if p is None:
            continue
        n = len(iv["epochs"])
        worker += sum(iv["epochs"]) + iv.get("final", 0.0)
        plain += sum(p["epochs"][len(p["epochs"]) - n:]) + (p["final"] if "final" in iv else 0.0)
    return {"worker_seconds": round(worker, 1), "plain_seconds": round(plain, 1),
            "ratio": round(worker / plain, 3) if plain else None}


def same_results(plain: dict, platform_finals: dict) -> bool:
    """Every final metric the plain loop computes agrees (same seeds, order, threads and layout: they should, to
    float precision). The platform's records may hold more (e.g. the loss shares `run_stage` adds), never fewer."""
    for key, want in plain.items():
        got = platform_finals[key]
        if not set(want) <= set(got) or any(abs(got[k] - want[k]) > 1e-6 * max(1.0, abs(want[k])) for k in want):
            return False
    return True


# -- breakdown: Ray Train probe, Ray's own start-up log, store costs -------------------------------------------------

def probe_train_fn(config: dict) -> None:
    """A Train function doing what the platform's worker does besides training: its cold start (imports, data,
    first optimizer and step in a fresh process), then per epoch: save + report a checkpoint of this model's size."""
    t_enter = time.time()
    import ray.train

    import trainables.stages.on_ray  # noqa: F401  (what unpickling the platform's worker function imports)
    from trainables.data import build_data as _build_data
    from trainables.models import create_model as _create
    from trainables.models import model_config as _cfg

    t_imported = time.time()
    _build_data(config["data"], 0)
    t_data = time.time()
    model = _create(_cfg(dict(variant="swwae-all", encoder=config["encoder"], in_channels=1, image_size=28)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # first optimizer: lazy torch._dynamo import
    t_optimizer = time.time()
    out = model(torch.randn(config["batch_size"], 1, 28, 28))
    loss = out.logits.sum() + sum(r.sum() for r in out.recons.values())
    loss.backward()
    optimizer.step()  # fills the momentum buffers: a checkpoint of the platform's size
    t_step = time.time()
    out = model(torch.randn(config["batch_size"], 1, 28, 28))  # a warm step, to tell the first step's extra cost
    loss = out.logits.sum() + sum(r.sum() for r in out.recons.values())
    loss.backward()
    optimizer.step()
    t_ready = time.time()
    res = {"enter": t_enter, "imported": t_imported, "data": t_data, "optimizer": t_optimizer, "step": t_step,
           "ready": t_ready, "threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "save": [], "checkpoint_report": [],
           "report_after_report": [], "checkpoint_bytes": None}
    for i in range(config["checkpoints"]):
        time.sleep(config["spacing"])  # longer than a poll: the previous report has been taken, nothing blocks
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            state = {"epoch": i, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "history": []}
            torch.save({"stage_index": 0, "state": state}, os.path.join(d, "state.pt"))
            res["checkpoint_bytes"] = os.path.getsize(os.path.join(d, "state.pt"))
            t1 = time.perf_counter()
            ray.train.report({"event": "epoch", "epoch": i}, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"probe-e{i:04d}")
        t2 = time.perf_counter()
        res["save"].append(t1 - t0)
        res["checkpoint_report"].append(t2 - t0)
    for i in range(config["back_to_back"]):  # like the stage_end report right after an epoch's report
        t0 = time.perf_counter()
        ray.train.report({"event": "stage_end", "n": i})
        res["report_after_report"].append(time.perf_counter() - t0)
    res["end"] = time.time()
    with open(config["out"], "w") as f:
        json.dump(res, f)


def probe(args, data_cfg: DataConfig, workdir: str, tag: str, poll: float | None) -> dict:
    """A Train run configured exactly as on_ray.launch_segment configures its runs, with probe_train_fn."""
    from trainables.stages.on_ray import Scaling, make_trainer

    out = os.path.join(workdir, f"probe-{tag}.json")
    name = f"probe-{tag}-{os.getpid()}"
    config = {"encoder": args.encoder, "checkpoints": args.probe_checkpoints, "back_to_back": args.probe_reports,
              "spacing": (poll or current_poll()) + 0.5, "out": out, "data": data_cfg, "batch_size": args.batch_size}
    trainer = make_trainer(probe_train_fn, config, Scaling(num_workers=1, cpus_per_worker=2), name,
                           os.path.join(workdir, f"train-probe-{tag}"))
    with poll_interval(poll):
        t_call = time.time()
        trainer.fit()
        t_return = time.time()
    with open(out) as f:
        res = json.load(f)
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {
        "poll_interval": poll or current_poll(),
        "startup_seconds": round(res["enter"] - t_call, 2),  # fit() call -> train function running
        # the worker's cold start, which a warm plain process does not pay:
        "worker_imports_seconds": round(res["imported"] - res["enter"], 2),
        "worker_build_data_seconds": round(res["data"] - res["imported"], 2),
        "worker_first_optimizer_seconds": round(res["optimizer"] - res["data"], 2),
        "worker_first_step_extra_seconds": round((res["step"] - res["optimizer"]) - (res["ready"] - res["step"]), 2),
        "teardown_seconds": round(t_return - res["end"], 2),  # train function returned -> fit() returned
        "checkpoint_save_seconds": round(med(res["save"]), 4),
        "checkpoint_report_seconds": round(med(res["checkpoint_report"]), 4),  # save + report + upload, unblocked
        # a report put while the previous one is still queued waits for the next controller poll; from the 2nd
        # back-to-back report on, that is a whole poll interval (the 1st waits for a random part of one)
        "report_after_report_seconds": (round(med(res["report_after_report"][1:] or res["report_after_report"]), 3)
                                        if res["report_after_report"] else None),
        "checkpoint_mb": round(res["checkpoint_bytes"] / 2**20, 2),
        "worker_threads": res["threads"],
        "worker_omp_num_threads": res["omp_num_threads"],
        "timeline": ray_run_timeline(name, t_call, t_return),
    }


def startup_train_fn(config: dict) -> None:
    """The first and last line of a Train function, and when its worker process was started."""
    enter = time.time()
    import psutil

    with open(config["out"], "w") as f:
        json.dump({"enter": enter, "process_created": psutil.Process().create_time(), "end": time.time()}, f)


# Ray's own defaults of the settings in TRAIN_ENV: a run with these measures what the platform's settings buy.
RAY_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(DEFAULT_POLL), "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "1",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_METRICS_ENABLED": "1"}


class Sampler:
    """Calls `_sample()` every `period` seconds in a thread while the `with` block runs, once at entry
    (`first=True`) and once at exit."""

    period = 0.2

    def __init__(self):
        import threading

        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, first: bool = False):
        raise NotImplementedError

    def _loop(self):
        while not self.stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._sample(first=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._sample()


class ProcessCpu(Sampler):
    """CPU seconds of the Ray processes this run starts (children of this session's raylet, created during it):
    sampled every 0.2 s, since actors exit when the run ends. Unlike wall time, this hardly changes with other load
    on the machine, so it tells what a setting saves even on a busy machine."""

    def __init__(self):
        import psutil
        import ray

        super().__init__()
        self.raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
        self.start = time.time()
        self.cpu: dict[int, tuple[str, float]] = {}

    def _sample(self, first: bool = False):
        import psutil

        for child in self.raylet.children(recursive=True):
            try:
                with child.oneshot():
                    if child.create_time() < self.start - 0.5:
                        continue
                    t = child.cpu_times()
                    name = (child.cmdline() or ["?"])[0].removeprefix("ray::").split(".")[0].split(" ")[0]
                    self.cpu[child.pid] = (name, t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def by_process(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, seconds in self.cpu.values():
            out[name] = round(out.get(name, 0.0) + seconds, 2)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


RAY_WORKER_BOOT = ("setup_worker.py", "default_worker.py", "IDLE")  # a Ray worker's names before its actor's


class MachineCpu(Sampler):
    """CPU seconds of every process on the machine during a span, by process name (Ray workers by their actor or
    task name; this process as `launcher`): sampled every 0.5 s, so processes that start and end inside the span
    count too. Says where a whole study's CPU goes: training, Ray Train's per-run processes, the launcher (Tune's
    driver loop and the MLflow writer), Ray's daemons."""

    period = 0.5

    def __init__(self):
        import ray  # noqa: F401 (its bundled psutil)

        super().__init__()
        self.cpu: dict[tuple[int, float], list] = {}  # (pid, create time) -> [name, cpu at first sight, cpu now]

    @staticmethod
    def _name(proc) -> str:
        if proc.pid == os.getpid():
            return "launcher"
        cmd = proc.cmdline() or [proc.name()]
        first = cmd[0]
        if first.startswith("ray::"):
            return first.removeprefix("ray::").split(".")[0].split(" ")[0]
        if os.path.basename(first).startswith("python"):  # a Python daemon: its script's (or module's) name
            return os.path.basename(next((c for c in cmd[1:] if not c.startswith("-")), first))
        return os.path.basename(first)

    def _sample(self, first: bool = False):
        import psutil

        for proc in psutil.process_iter():
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    t = proc.cpu_times()
                    used = t.user + t.system + (t.children_user + t.children_system if proc.pid == os.getpid() else 0)
                    if key not in self.cpu:
                        self.cpu[key] = [None, used if first else 0.0, used]
                    if self.cpu[key][0] in (None, *RAY_WORKER_BOOT):  # a Ray worker takes its actor's name late
                        self.cpu[key][0] = self._name(proc)
                    self.cpu[key][2] = used
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    def by_process(self, at_least: float = 0.5) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, start, now in self.cpu.values():
            out[name] = out.get(name, 0.0) + now - start
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= at_least}


def startup_probe(workdir: str, tag: str, env: dict[str, str], cpus: float) -> dict:
    """One Train run built like the platform's (make_trainer) whose train function does nothing: Ray Train's fixed
    cost. `env` overrides Ray Train settings for this run only (propagated by Ray Train to controller and workers).

    start_s: fit() called -> the train function's first line; teardown_s: its last line -> fit() returned;
    worker_process_s: fit() called -> the worker's process created (0 or less: an already running process);
    phases: the controller's own log of the worker group's start (Ray Train's structured logs)."""
    from trainables.stages.on_ray import Scaling, make_trainer

    out = os.path.join(workdir, f"startup-{tag}.json")
    name = f"startup-{tag}-{os.getpid()}"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        trainer = make_trainer(startup_train_fn, {"out": out}, Scaling(num_workers=1, cpus_per_worker=cpus), name,
                               os.path.join(workdir, "train-startup"))
        with ProcessCpu() as cpu:
            t_call = time.time()
            trainer.fit()
            t_return = time.time()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with open(out) as f:
        res = json.load(f)
    timeline = ray_run_timeline(name, t_call, t_return) or {}
    return {"start_s": round(res["enter"] - t_call, 2), "teardown_s": round(t_return - res["end"], 2),
            "worker_process_s": round(res["process_created"] - t_call, 2),
            "controller_first_log_s": timeline.get("controller_first_log"), "phases": timeline.get("phases", {}),
            "process_cpu_s": cpu.by_process(), "processes_started": len(cpu.cpu)}


def startup_ab(workdir: str, rounds: int, cpus: float, defaults: bool = True) -> dict:
    """Ray Train's fixed cost with the platform's settings (TRAIN_ENV) and with Ray's defaults, runs interleaved
    (A B B A ...) so that other load on the machine hits both alike; medians per variant (`defaults=False`: the
    platform's settings only)."""
    from trainables.stages.on_ray import TRAIN_ENV

    variants = {"platform": dict(TRAIN_ENV), "ray_defaults": dict(RAY_DEFAULTS)}
    if not defaults:
        del variants["ray_defaults"]
    runs: dict[str, list] = {v: [] for v in variants}
    for r in range(rounds):
        for v in [v for v in (("platform", "ray_defaults") if r % 2 == 0 else ("ray_defaults", "platform"))
                  if v in variants]:
            res = startup_probe(workdir, f"{v}-{r}", variants[v], cpus)
            runs[v].append(res)
            print(f"  start-up probe {v:13s} start {res['start_s']:6.2f} s  teardown {res['teardown_s']:5.2f} s  "
                  f"worker process {res['worker_process_s']:+6.2f} s  phases {res['phases']}  "
                  f"CPU s of the {res['processes_started']} processes it started {res['process_cpu_s']}", flush=True)
    summary = {}
    for v, rs in runs.items():
        phases = sorted({k for x in rs for k in x["phases"]})
        summary[v] = {
            "start_s": statistics.median(x["start_s"] for x in rs),
            "teardown_s": statistics.median(x["teardown_s"] for x in rs),
            "worker_process_s": statistics.median(x["worker_process_s"] for x in rs),
            "phases_s": {k: round(statistics.median(x["phases"][k] for x in rs if k in x["phases"]), 2)
                         for k in phases},
            "process_cpu_s": {k: round(statistics.median(x["process_cpu_s"].get(k, 0.0) for x in rs), 2)
                              for k in sorted({k for x in rs for k in x["process_cpu_s"]})},
            "processes_started": statistics.median(x["processes_started"] for x in rs),
            "runs": rs,
        }
    return summary


_PHASE = re.compile(r"\[Worker Group Initialization\] (.+?) in ([\d.]+)s")


def ray_run_timeline(run: str, t_call: float, t_return: float) -> dict | None:
    """One Train run's timeline from Ray Train's structured logs (controller + worker; best effort: None).

    fit_to_train_fn: fit() call -> the train function launched on the worker (Ray Train's start-up);
    last_report_to_return: the worker's last report -> fit() returned (the controller takes that report at its next
    poll, sees the worker finished at the poll after, shuts the worker group down).
    """
    try:
        import ray

        logs = ray._private.worker.global_worker.node.get_logs_dir_path()  # this driver's session, not another's
        records = []
        for pattern in ("ray-train-sys-controller-*.log", "ray-train-app-worker-*.log"):
            for path in glob.glob(os.path.join(logs, "train", pattern)):
                with open(path) as f:
                    for line in f:
                        try:
                            r = json.loads(line)
                        except ValueError:
                            continue
                        t = r.get("timestamp_ns", 0) / 1e9
                        if r.get("run_name") == run and t_call - 1 <= t <= t_return + 1:
                            records.append((t, r.get("component"), r.get("message", "")))
        if not records:
            return None
        records.sort()
        out = {"controller_first_log": round(records[0][0] - t_call, 2), "phases": {}}
        reports = [t for t, comp, msg in records if comp == "worker" and msg.startswith("Reporting training result")]
        for t, comp, msg in records:
            m = _PHASE.search(msg)
            if comp == "controller" and m:
                out["phases"][m.group(1).split(".")[0].replace(" ", "_").lower()] = float(m.group(2))
                if m.group(1).startswith("Train function launched"):
                    out["fit_to_train_fn"] = round(t - t_call, 2)
        if reports:
            out["reports"] = len(reports)
            out["last_report_to_return"] = round(t_return - reports[-1], 2)
        events = []
        for t, comp, msg in records:
            if comp == "worker" and msg.startswith("Reporting training result"):
                ev, st = re.search(r"'event': '(\w+)'", msg), re.search(r"'stage': '(\w+)'", msg)
                if ev and st:
                    events.append((t, ev.group(1), st.group(1)))
        intervals = {}
        for (t0, ev0, st0), (t1, ev1, st1) in zip(events, events[1:]):
            if st0 != st1 or ev0 != "epoch":
                continue
            iv = intervals.setdefault(st1, {"epochs": []})
            if ev1 == "epoch":
                iv["epochs"].append(round(t1 - t0, 2))
            elif ev1 == "stage_end":
                iv["final"] = round(t1 - t0, 2)
        out["worker_intervals"] = intervals
        return out
    except Exception:  # noqa: BLE001 (private Ray API / log format: informative only)
        return None


def store_costs(chain, outputs: dict, data, workdir: str) -> dict:
    """What the store adds per stage in (a) and not in (b): publish (write_entry + put) and open as a parent."""
    store = StageStore(os.path.join(workdir, "store-costs"))
    publish, open_parent = [], []
    for planned in chain:
        model, final, history, arrays = outputs[planned.key]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            write_entry(tmp, planned, model, final, history, arrays, SEED, data.identity, "")
            store.put(planned.key, tmp, meta={"kind": planned.stage.kind})
        publish.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        entry = store.get(planned.key)
        torch.load(os.path.join(entry.path, MODEL_FILE), map_location="cpu", weights_only=True)
        open_parent.append(time.perf_counter() - t0)
    return {"publish_seconds_total": round(sum(publish), 3), "open_parent_seconds_total": round(sum(open_parent[:-1]), 3)}


def plain_study(spec, store_dir: str, threads: int) -> tuple[float, str, Runtime]:
    """The study's stages as a plain sequential loop in this process: every trial's chain (same plans, keys and
    precision as the platform's), run where missing in one local store (exact reuse); returns wall seconds."""
    from study.launch import resolved_precision
    from study.plan import data_config, resolve
    from trainables.stages.precision import resolve_channels_last

    with torch_threads(threads):
        precision = resolved_precision(spec)
        runtime = Runtime(channels_last=resolve_channels_last(spec.resources.channels_last, "cpu"))
        store = StageStore(store_dir)
        t0 = time.perf_counter()
        with niceness(RAY_WORKER_NICENESS):
            for seed in spec.seeds:
                fashion_mnist._load.cache_clear()
                data = build_data(data_config(spec), seed)
                for model in spec.models:
                    trial = resolve(spec, {"model": model, "seed": seed},
                                    (data.in_channels, data.num_classes, data.image_size))
                    run_chain_locally(trial.chain(data.identity, seed, precision), store, data, runtime, seed)
        return time.perf_counter() - t0, precision, runtime


def study_overhead(spec_path: str, workdir: str, smoke: bool) -> dict:
    """A whole study through the platform (`study launch`: Tune trials, Train runs, stage store, MLflow records) and
    the same stages through a plain sequential loop in this process over the same objects: the same trial plans,
    stage keys and exact reuse (one local store), with as many torch threads as the platform runs trials x cores.
    Ray is already started (its start is not counted); the report is not written in either."""
    import mlflow  # noqa: F401  (imported before timing, as the launcher has it)

    import ray

    from study.launch import concurrency, launch
    from study.spec import load_spec

    overrides = ["models=[sae-all]"] if smoke else []  # smoke: one trial (every stage kind), to exercise the path
    spec = load_spec(spec_path, overrides, smoke=smoke)
    threads = concurrency(spec, ray.cluster_resources()) * max(1, int(spec.resources.cpus_per_worker))
    t0 = time.perf_counter()
    with MachineCpu() as platform_cpu:
        launch(spec_path, results_dir=os.path.join(workdir, "study-platform"), overrides=overrides, smoke=smoke)
    platform_s = time.perf_counter() - t0

    with MachineCpu() as plain_cpu:
        plain_s, precision, runtime = plain_study(spec, os.path.join(workdir, "study-plain-store"), threads)
    platform_by, plain_by = platform_cpu.by_process(), plain_cpu.by_process()
    return {"spec": spec.name, "trials": len(spec.models) * len(spec.seeds), "platform_seconds": round(platform_s, 1),
            "plain_seconds": round(plain_s, 1), "study_ratio": round(platform_s / plain_s, 3),
            "plain_threads": threads, "precision": precision, "channels_last": runtime.channels_last,
            "platform_cpu_s": round(sum(platform_by.values()), 1), "plain_cpu_s": round(sum(plain_by.values()), 1),
            "platform_cpu_by_process": platform_by, "plain_cpu_by_process": plain_by}


@contextlib.contextmanager
def launcher_session(args):
    """(work directory, seconds of ray.init): Ray started as the study launcher starts it; both gone afterwards."""
    import ray

    from study.launch import init_ray

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-overhead-")
    t0 = time.perf_counter()
    init_ray(None)
    try:
        yield workdir, time.perf_counter() - t0
    finally:
        ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def quick(args) -> None:
    """--quick: Ray Train's fixed cost per run only, Ray started as the study launcher starts it."""
    with launcher_session(args) as (workdir, ray_init):
        print(f"ray.init (as the launcher): {ray_init:.1f} s; {args.startup_rounds} A/B rounds, load {machine_load()}",
              flush=True)
        ab = startup_ab(workdir, args.startup_rounds, cpus=1)
    p, d = ab["platform"], ab["ray_defaults"]
    print(f"\nTrain start-up {p['start_s']:.2f} s (Ray's defaults {d['start_s']:.2f} s), tear-down {p['teardown_s']:.2f} s "
          f"(Ray's defaults {d['teardown_s']:.2f} s); goals <= 4 s and <= 1 s; load {machine_load()}")
    print(json.dumps({"bench": "overhead", "mode": "quick", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "train_start_s": p["start_s"], "train_teardown_s": p["teardown_s"],
                      "ray_init_seconds": round(ray_init, 2), "startup": ab, "load": machine_load()}))


def study_only(args) -> None:
    """--study-only: `study_overhead` of --study alone, Ray started as the study launcher starts it."""
    with launcher_session(args) as (workdir, _):
        study = study_overhead(args.study, workdir, args.smoke)
    print(f"\nplatform {study['platform_seconds']} s, plain {study['plain_seconds']} s -> study_ratio "
          f"{study['study_ratio']} (goal <= 1.3); load {machine_load()}")
    print(json.dumps({"bench": "overhead", "mode": "study-only", "smoke": args.smoke,
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "study_ratio": study["study_ratio"], "study": study, "load": machine_load()}))


# -- main -----------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny subset, 1 epoch per stage, short probe, no what-if, the platform's "
                        "start-up only, one study trial")
    parser.add_argument("--subset", type=int, default=6000, help="Fashion-MNIST training examples (before the val split)")
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--budgets", default="3,1,1,2", help="epochs of classifier,layerwise,topdown,finetune")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--encoder", default="vgg_small")
    parser.add_argument("--repeats", type=int, default=2, help="pairs (b, a), ordered b a a b b a ... (medians)")
    parser.add_argument("--what-if-poll", type=float, default=0,
                        help="also run (a) with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S set to this (0 = skip)")
    parser.add_argument("--probe-checkpoints", type=int, default=4)
    parser.add_argument("--probe-reports", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="stores and Train runs (default: a temp dir, removed)")
    parser.add_argument("--quick", action="store_true",
                        help="only Ray Train's start-up and tear-down (platform settings vs Ray's defaults): minutes")
    parser.add_argument("--study-only", action="store_true",
                        help="only the whole study (--study) through the platform and through a plain loop")
    parser.add_argument("--startup-rounds", type=int, default=3, help="A/B rounds of the start-up probe")
    parser.add_argument("--study", default=os.path.join(REPO, "studies", "quickstart.yaml"),
                        help="the study run through the platform and through a plain loop ('' = skip)")
    args = parser.parse_args()
    if args.quick:
        return quick(args)
    if args.study_only:
        return study_only(args)
    if args.smoke:
        args.subset, args.val_size, args.budgets, args.encoder = 400, 100, "1,1,1,1", "vgg_tiny"
        args.what_if_poll, args.probe_checkpoints, args.probe_reports, args.repeats = 0, 1, 1, 1
        args.startup_rounds = 1
    args.budgets = tuple(int(b) for b in args.budgets.split(","))

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-overhead-")
    os.makedirs(workdir, exist_ok=True)
    data_cfg = DataConfig(dataset="fashion_mnist", subset=args.subset, val_size=args.val_size)
    chain = make_chain(args, build_data(data_cfg, SEED).identity)
    epochs = sum(args.budgets)
    print(f"overhead: swwae-all / {args.encoder}, budgets {dict(zip(KINDS, args.budgets))}, batch {args.batch_size}, "
          f"Fashion-MNIST {args.subset - args.val_size}/{args.val_size}; torch threads here: {torch.get_num_threads()}",
          flush=True)
    # Warm this process like a long-lived training script: the lazy torch._dynamo import of the first optimizer.
    make_optimizer(create_model(chain[0].stage.model), chain[0].stage)

    import ray

    from study.launch import init_ray

    t0 = time.perf_counter()
    init_ray(None)  # as the study launcher starts Ray, with the platform's Ray Train settings (TRAIN_ENV)
    ray_init = time.perf_counter() - t0
    print(f"ray.init: {ray_init:.1f} s", flush=True)
    try:
        plains, platforms, agree = [], [], []
        order = []
        for r in range(args.repeats):
            order += ["b", "a"] if r % 2 == 0 else ["a", "b"]
        last_plain = None
        for n, which in enumerate(order):
            if which == "b":
                with niceness(RAY_WORKER_NICENESS), torch_threads(PAIR_CPUS):
                    last_plain = plain_run(chain, data_cfg)
                plains.append(last_plain)
                print(f"  (b) plain     {last_plain['seconds']:7.1f} s  "
                      f"{ {k: round(v, 1) for k, v in last_plain['split'].items()} }", flush=True)
            else:
                res = platform_run(chain, data_cfg, workdir, tag=f"a{n}")
                platforms.append(res)
                print(f"  (a) platform  {res['seconds']:7.1f} s  (ensure_chain, {res['epochs']} epochs recorded)",
                      flush=True)
        for res in platforms:
            agree.append(same_results(plains[0]["finals"], res["finals"]))

        plain_s = statistics.median(p["seconds"] for p in plains)
        platform_s = statistics.median(p["seconds"] for p in platforms)
        ratio = platform_s / plain_s
        split = {k: round(statistics.median(p["split"][k] for p in plains), 2) for k in plains[0]["split"]}

        print("probing Ray Train (same TorchTrainer settings, a train function that only checkpoints) ...", flush=True)
        probe_default = probe(args, data_cfg, workdir, "default", None)
        costs = store_costs(chain, last_plain["outputs"], last_plain["data"], workdir)

        what_if = None
        if args.what_if_poll:
            print(f"what-if: {POLL_ENV}={args.what_if_poll} (platform run, then probe) ...", flush=True)
            res = platform_run(chain, data_cfg, workdir, tag="whatif", poll=args.what_if_poll)
            agree.append(same_results(plains[0]["finals"], res["finals"]))
            probe_fast = probe(args, data_cfg, workdir, "whatif", args.what_if_poll)
            what_if = {"poll_interval": args.what_if_poll, "platform_seconds": round(res["seconds"], 1),
                       "ratio": round(res["seconds"] / plain_s, 3), "probe": probe_fast, "timeline": res["timeline"], "load": res["load"]}
            print(f"  (a') platform {res['seconds']:7.1f} s  -> ratio {what_if['ratio']:.3f}", flush=True)

        print(f"Ray Train start-up and tear-down, the platform's settings vs Ray's defaults ({args.startup_rounds} "
              "rounds) ...", flush=True)
        startup = startup_ab(workdir, args.startup_rounds, cpus=1, defaults=not args.smoke)
        study = None
        if args.study:
            print(f"whole study: {args.study}{' (smoke)' if args.smoke else ''} through the platform, then a plain "
                  "sequential loop ...", flush=True)
            study = study_overhead(args.study, workdir, args.smoke)
            print(f"  platform {study['platform_seconds']} s, plain {study['plain_seconds']} s -> study_ratio "
                  f"{study['study_ratio']}", flush=True)
    finally:
        ray.shutdown()

    # What the measured costs explain of (a) - (b).
    cold = round(sum(probe_default[k] for k in ("worker_imports_seconds", "worker_build_data_seconds",
                                                "worker_first_optimizer_seconds", "worker_first_step_extra_seconds")), 2)

    def explain(res: dict, probe_res: dict, plain_seconds: float) -> dict:
        """(a) - (b) split into measured costs; start-up and tear-down from the run's own log when available."""
        tl = res.get("timeline") or {}
        parts = {
            "train_startup": tl.get("fit_to_train_fn", probe_res["startup_seconds"]),
            "worker_cold_start": cold,
            "epoch_checkpoints": round(epochs * probe_res["checkpoint_report_seconds"], 2),
            "store_publish": costs["publish_seconds_total"],
            "store_open_parents": costs["open_parent_seconds_total"],
            "last_report_to_return": tl.get("last_report_to_return", probe_res["teardown_seconds"]),
        }
        overhead = res["seconds"] - plain_seconds
        return {"overhead_seconds": round(overhead, 1), "parts_seconds": parts,
                "parts_total_seconds": round(sum(parts.values()), 1),
                "residual_seconds": round(overhead - sum(parts.values()), 1),
                "source": "run log" if "fit_to_train_fn" in tl else "probe",
                "compute_speed_vs_plain": compute_speed(tl, plains[0]["timings"]), "load": res.get("load")}

    first = explain(platforms[0], probe_default, plain_s)
    per_run = [explain(r, probe_default, plain_s) for r in platforms]
    # Noise-robust: the plain time plus the platform's measured non-compute costs (median over platform runs).
    ratio_from_parts = (plain_s + statistics.median(e["parts_total_seconds"] for e in per_run)) / plain_s
    breakdown = {
        **first,
        "per_platform_run": per_run,
        "plain_load": [p["load"] for p in plains],
        "train_startup_seconds": first["parts_seconds"]["train_startup"],
        "last_report_to_return_seconds": first["parts_seconds"]["last_report_to_return"],
        "worker_cold_start_seconds": cold,
        "checkpoint_seconds_per_epoch": probe_default["checkpoint_report_seconds"],
        "checkpoint_save_seconds": probe_default["checkpoint_save_seconds"],
        "checkpoint_mb": probe_default["checkpoint_mb"],
        "report_after_report_seconds": probe_default["report_after_report_seconds"],
        "worker_threads": probe_default["worker_threads"],
        "ray_timeline": platforms[0]["timeline"],
        "probe": probe_default,
        "store": costs,
        "plain_split_seconds": split,
        "plain_per_stage_seconds": plains[0]["per_stage"],
    }
    if what_if:
        what_if["breakdown"] = explain({"seconds": what_if["platform_seconds"], "timeline": what_if["timeline"],
                                        "load": what_if["load"]}, what_if["probe"], plain_s)

    parts = first["parts_seconds"]
    print()
    print(f"plain (b) {plain_s:.1f} s, platform (a) {platform_s:.1f} s -> ratio {ratio:.3f} (goal <= 1.15); "
          f"ray.init {ray_init:.1f} s (excluded); same results: {all(agree)}")
    print(f"ratio from measured parts (plain + the platform's non-compute costs) {ratio_from_parts:.3f}; "
          f"compute inside the platform's worker vs plain, per run: "
          f"{[(e['compute_speed_vs_plain'] or {}).get('ratio') for e in per_run]} (far from 1 = unequal CPU share)")
    print(f"overhead of the first platform run {first['overhead_seconds']:.1f} s = Train start-up "
          f"{parts['train_startup']:.1f} + worker cold start {parts['worker_cold_start']:.1f} + {epochs} checkpoints "
          f"{parts['epoch_checkpoints']:.2f} + store publish {parts['store_publish']:.2f} + parent reads "
          f"{parts['store_open_parents']:.2f} + last report -> fit() returned {parts['last_report_to_return']:.1f} "
          f"+ residual {first['residual_seconds']:.1f} s  ({first['source']})")
    print(f"a report right after another waits {probe_default['report_after_report_seconds']} s (controller poll "
          f"{DEFAULT_POLL} s); worker threads {probe_default['worker_threads']}; Ray timeline {platforms[0]['timeline']}")
    if what_if:
        wb = what_if["breakdown"]["parts_seconds"]
        print(f"what-if {POLL_ENV}={what_if['poll_interval']}: platform {what_if['platform_seconds']} s -> ratio "
              f"{what_if['ratio']} (start-up {wb['train_startup']} s, last report -> return "
              f"{wb['last_report_to_return']} s, report after report {what_if['probe']['report_after_report_seconds']} s)")
    out = {
        "bench": "overhead",
        "smoke": args.smoke,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "workload": {"variant": "swwae-all", "encoder": args.encoder, "budgets": dict(zip(KINDS, args.budgets)),
                     "subset": args.subset, "val_size": args.val_size, "batch_size": args.batch_size},
        "ratio": round(ratio, 3),
        "ratio_from_parts": round(ratio_from_parts, 3),
        "platform_seconds": round(platform_s, 1),
        "plain_seconds": round(plain_s, 1),
        "ray_init_seconds": round(ray_init, 2),
        "repeats": {"order": order, "plain": [round(p["seconds"], 1) for p in plains],
                    "platform": [round(p["seconds"], 1) for p in platforms]},
        "same_results": all(agree),
        "study_ratio": study["study_ratio"] if study else None,
        "study": study,
        "train_start_s": startup["platform"]["start_s"],
        "train_teardown_s": startup["platform"]["teardown_s"],
        "startup": startup,
        "breakdown": breakdown,
        "what_if": what_if,
    }
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
