"""Ray Train at the edge: run the missing stages of a chain as one TorchTrainer run per contiguous segment.

Ray is touched in four places, each marked `# [ray]`: the worker's context (rank, device), its report +
checkpoint after every epoch, its checkpoint on restart, and the trainer launch. Everything else is the plain
PyTorch of `chain.py`. `run_segment` is also what a pooled Train run executes for each job (`pool.py`).

Guarantees:
- a stage whose key is stored is never run again; a stage being computed by another process is waited for
  (store claims, taken root first so chains that share a prefix cannot deadlock);
- every epoch ends with a checkpoint; a failed worker restarts from it (`FailureConfig`, and `node_loss.py` for a
  worker lost while its group starts), and a restarted launcher resumes the same Train run (deterministic run
  name under the same storage path);
- each stage is published to the store on its own as soon as it ends, so a segment that fails later keeps it.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch

from ..data import DataConfig, build_data, decode_workers
from .chain import PlannedStage, missing_from, run_stage
from .loop import Runtime, set_deterministic
from .precision import resolve_channels_last
from .store import StageStore

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Scaling:
    """Resources of one Train run: the cores a worker gets are the threads it uses."""

    num_workers: int = 1  # data-parallel workers (DDP when > 1)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0 trains on CUDA
    channels_last: bool | str = "auto"  # NHWC convolutions: True | False | "auto" (resolved on the worker's device)
    max_failures: int = 2  # worker failures a run recovers from (from its last checkpoint)
    deterministic: bool = False  # torch deterministic algorithms (see loop.set_deterministic)


@dataclass(frozen=True)
class SegmentJob:
    """Everything a worker needs; pickled by Ray."""

    segment: tuple[PlannedStage, ...]
    store_uri: str
    data: DataConfig
    seed: int
    scaling: Scaling
    code_version: str = ""
    objective_metric: str = "val_top1_err"  # reported as `objective` during fine-tuning (for Tune's scheduler)
    fail_after_epoch: int | None = None  # tests: raise once after this epoch of the first stage (fault injection)
    fail_marker: str | None = None  # file created at the injected failure so it happens only once


@dataclass(frozen=True)
class WorkerContext:
    """What a Train worker process computes with, set up once per process (`worker_context`)."""

    rank: int
    world: int
    device: torch.device
    node_id: str  # where the stage ran (a tag of its MLflow run)


def worker_context(scaling: Scaling) -> WorkerContext:
    import ray  # [ray] worker context
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    # The cores this worker was given are the threads it computes with (Ray's OMP_NUM_THREADS comes too late
    # once torch has started its thread pool).
    torch.set_num_threads(max(1, math.floor(scaling.cpus_per_worker)))
    device = ray.train.torch.get_device() if scaling.gpus_per_worker > 0 else torch.device("cpu")
    set_deterministic(scaling.deterministic)
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), device, ray.get_runtime_context().get_node_id())


def report(metrics: dict, payload: dict | None = None, name: str | None = None, rank: int = 0) -> None:
    """One Train report; with `payload`, rank 0 also saves it as the run's checkpoint (`STATE_FILE`)."""
    import ray.train  # [ray] report + checkpoint

    if payload is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            torch.save(payload, os.path.join(d, STATE_FILE))
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def saved_state() -> dict | None:
    """The run's last checkpoint payload (after a worker failure or a launcher restart), or None."""
    import ray.train  # [ray] checkpoint on restart

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)


def run_segment(job: SegmentJob, wc: WorkerContext, *, saved: dict | None = None, tags: dict | None = None,
                emit=report, between_epochs=lambda: None) -> None:
    """Train the job's stages on this worker, reporting each epoch with a checkpoint and each stage's end.

    `saved` is a checkpoint payload of this job ({"stage_index", "state", ...}) to resume from; `tags` go into
    every report; `emit(metrics, payload, name, rank)` reports (Train's report, and a pool's forwarding);
    `between_epochs()` runs after each epoch's report (a pool stops a cancelled job there).
    """
    import ray.train.torch  # [ray] DDP wrapping

    tags = tags or {}
    store = StageStore(job.store_uri)
    data = build_data(job.data, job.seed)
    # The precision is the planned stage's own (it is part of its key); the layout is resolved here, on the device.
    runtime = Runtime(device=str(wc.device), channels_last=resolve_channels_last(job.scaling.channels_last, wc.device),
                      rank=wc.rank, world=wc.world,
                      loader_workers=decode_workers(data.train, job.scaling.cpus_per_worker))
    first, resume = 0, None
    if saved is not None:
        first, resume = saved["stage_index"], saved["state"]
        planned = job.segment[first]
        emit({"event": "stage_retry", "stage": planned.stage.kind, "stage_key": planned.key, "epoch": resume["epoch"],
              **tags, **_asha_fields(planned, 0, {}, job.objective_metric)}, rank=wc.rank)

    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if wc.world > 1 else (lambda m: m)
    for index in range(first, len(job.segment)):
        planned = job.segment[index]

        def on_epoch(epoch, metrics, state, index=index, planned=planned):
            emit({"event": "epoch", "stage": planned.stage.kind, "stage_key": planned.key, "epoch": epoch,
                  "node_id": wc.node_id, **tags, **metrics,
                  **_asha_fields(planned, epoch, metrics, job.objective_metric)},
                 {"stage_index": index, "state": state() if wc.rank == 0 else None},
                 f"{index:02d}-{planned.stage.kind}-e{epoch:04d}", wc.rank)
            if (job.fail_after_epoch == epoch and index == 0 and job.fail_marker
                    and not os.path.exists(job.fail_marker)):
                open(job.fail_marker, "w").close()
                raise RuntimeError(f"injected failure after epoch {epoch}")
            between_epochs()

        final = run_stage(planned, store, data, runtime, job.seed, resume=resume if index == first else None,
                          on_epoch=on_epoch, wrap=wrap, publish=wc.rank == 0, code_version=job.code_version)
        emit({"event": "stage_end", "stage": planned.stage.kind, "stage_key": planned.key, **tags, **final,
              **_asha_fields(planned, planned.stage.settings.epochs, final, job.objective_metric)}, rank=wc.rank)


def _worker(job: SegmentJob) -> None:
    """The train function of a per-trial Train run: one segment, resumed from the run's checkpoint."""
    import ray.util  # [ray] the run's placement group

    wc = worker_context(job.scaling)
    # The run's placement group, in every report: the launcher removes it if Tune stops the trial (study/janitor.py).
    group = ray.util.get_current_placement_group()
    run_segment(job, wc, saved=saved_state(), tags={"placement_group": group.id.hex() if group is not None else ""})


def _asha_fields(planned: PlannedStage, epoch: int, metrics: dict, objective: str) -> dict:
    """Tune scheduling fields present in every report: the objective and the fine-tuning epoch (0 before it)."""
    finetune = planned.stage.kind == "finetune"
    return {"finetune_epoch": epoch if finetune else 0,
            "objective": metrics.get(objective, 100.0) if finetune else 100.0}


def run_name(segment: list[PlannedStage]) -> str:
    digest = hashlib.sha256(",".join(p.key for p in segment).encode()).hexdigest()[:16]
    return f"{segment[0].stage.kind}-to-{segment[-1].stage.kind}-{digest}"


# Ray Train V2 settings of every Train run: environment variables that Ray Train documents and propagates from the
# driver to its controller and workers. `study.launch.init_ray` sets them (a value already in the environment wins);
# bench/overhead.py measures what they buy (docs/BENCHMARKS.md).
TRAIN_ENV = {
    # The controller polls its workers every 2 s by default and a report waits for a poll: seconds per epoch on
    # small stages, and up to 2 s between the train function's end and fit() returning.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",  # no periodic reconciliation of the run-state actor
    # Spot-preemption observability: one actor process more per run. Set it to 1 on clusters of spot nodes.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",  # no Prometheus metrics callbacks on the controller and workers
}


def make_trainer(train_fn, config, scaling: Scaling, name: str, storage_path: str, callbacks: list | None = None):
    """The TorchTrainer of every platform Train run (benchmarks build theirs here too, to measure the same thing).
    Every run carries `node_loss.ReleasePlacementGroups`: a worker group that fails to start leaves no cores held."""
    import ray.train  # [ray] the trainer launch
    from ray.train.torch import TorchTrainer

    from .node_loss import ReleasePlacementGroups

    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_fn,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[ReleasePlacementGroups(), *(callbacks or [])],
        ),
    )


def launch_segment(job: SegmentJob, storage_path: str, callbacks: list | None = None) -> None:
    """One TorchTrainer run over a segment of stages; raises if it fails beyond `max_failures`. A run that Ray Train
    ends because a worker was lost while its group started is launched again, resuming (`node_loss.py`)."""
    from .node_loss import fit_relaunching

    fit_relaunching(lambda: make_trainer(_worker, job, job.scaling, run_name(list(job.segment)), storage_path,
                                         callbacks), job.scaling.max_failures)


POLL_S = 1.0  # ensure_chain: how often a waiting trial releases published claims and forwards reports


def ensure_chain(
    chain: list[PlannedStage],
    store: StageStore,
    job_template: SegmentJob,
    storage_path: str,
    callbacks: list | None = None,
    claim_timeout: float | None = None,
    poll=None,
    launch=None,
) -> list[bool]:
    """Make every stage of `chain` present in the store; returns, per stage, whether this call computed it.

    Claims on all missing stages are taken root first; after they are held the store is checked again (another
    trial may have finished them meanwhile), and only what is still missing runs, as one Train run. A claim is
    released as soon as its stage is published, so trials waiting only for a shared prefix go on early.

    `poll`, if given, is called in this thread while a Train run goes (every `POLL_S`) and once after it ends,
    whether it succeeded or not: the trial forwards its runs' reports to Tune there (study/train_reports.py).
    `launch(job)` runs a segment and returns when it has ended (raising if it failed): by default a Train run of
    its own (`launch_segment`); a pooled study hands it to its Train pool (`pool.run_on_pool`).
    """
    launch = launch or (lambda job: launch_segment(job, storage_path, callbacks))
    computed = [False] * len(chain)
    while (start := missing_from(store, chain)) < len(chain):
        with ExitStack() as held:
            claims = []
            for planned in chain[start:]:
                stack = ExitStack()
                stack.enter_context(store.claim(planned.key, timeout=claim_timeout))
                held.callback(stack.close)
                claims.append((planned.key, stack))
            start = missing_from(store, chain)
            if start == len(chain):
                continue
            segment = chain[start:]
            job = replace(job_template, segment=tuple(segment))
            done = threading.Event()
            errors: list[BaseException] = []

            def fit():
                try:
                    launch(job)
                except BaseException as exc:  # noqa: BLE001 (re-raised in the calling thread)
                    errors.append(exc)
                finally:
                    done.set()

            thread = threading.Thread(target=fit, daemon=True)
            thread.start()
            while not done.wait(POLL_S):
                for key, stack in claims:
                    if store.has(key):
                        stack.close()  # published: waiters for this stage may go on
                if poll is not None:
                    poll()
            thread.join()
            if poll is not None:
                poll()  # the run's last reports (the controller has put them all before fit() returns)
            if errors:
                raise errors[0]
            for i in range(start, len(chain)):
                computed[i] = True
    return computed
