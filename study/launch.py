"""Launch or resume a study: validated spec -> Ray Tune trials (grid or Optuna) -> MLflow records -> results.

Ray is touched here and in `trial.py`; the spec, plan, records and analysis do not depend on how it is run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from .claims import ClusterClaims, registry_for
from .cluster import check_storage, cluster_capacity, trial_driver_resources
from .final_test import run_final_tests
from .janitor import PlacementGroupJanitor
from .paths import StudyPaths, is_uri, join
from .plan import OptunaSpace, grid_space
from .progress import Progress
from .records import MlflowRecorder
from .spec import StudySpec, load_spec, parse_spec, read_spec
from .trial import TrialContext, run_trial

TUNE_NAME = "tune"


def code_version() -> str:
    """The git commit of the code that runs (with '+dirty' for uncommitted changes), or the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return version("decoding-pathways-study")


def total_trials(spec: StudySpec) -> int:
    if spec.search is None:
        return len(spec.models) * len(spec.seeds)
    if spec.search.algorithm == "grid":
        return len(spec.models) * len(spec.seeds) * math.prod(len(d.values) for d in spec.search.space.values())
    return spec.search.num_samples


def concurrency(spec: StudySpec, resources: dict) -> int:
    """Trials at once: as many as the cluster's CPUs (and GPUs) fit, each trial's workers counted in full.

    `resources` is the cluster's capacity (`cluster.cluster_capacity()`: the autoscaler's maximum where there is
    one), so an autoscaling cluster scales out. The trial driver itself reserves no core (it only waits on its Train
    run), which is what avoids the Train-in-Tune deadlock where idle trial drivers hold the CPUs their own workers
    need.
    """
    if spec.resources.max_concurrent:
        return spec.resources.max_concurrent
    r = spec.resources
    fit = math.floor(resources.get("CPU", 1) / (r.workers * r.cpus_per_worker))
    if r.gpus_per_worker:
        fit = min(fit, math.floor(resources.get("GPU", 0) / (r.workers * r.gpus_per_worker)))
    return max(1, fit)


def init_ray(address: str | None) -> None:
    import ray  # [ray] cluster connection

    from trainables.stages.on_ray import TRAIN_ENV

    env = {k: os.environ.get(k, v) for k, v in TRAIN_ENV.items()}
    os.environ.update(env)
    # The CLI prints its own progress: no Tune status tables, no TensorBoard/CSV/JSON result files per trial.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's own messages (a worker killed...) without ANSI codes
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True, runtime_env={"env_vars": env})


def resolved_precision(spec: StudySpec) -> str:
    """The study's training precision, resolved once for the device its Train workers get (it enters stage keys).

    CPU workers: this machine's CPU (a cluster's CPU nodes are taken to be alike). GPU workers: asked of a GPU
    through a one-off Ray task with the workers' GPU share, since the launcher itself may have none.
    """
    from trainables.stages.precision import resolve_precision

    r = spec.resources
    if r.precision != "auto" or not r.gpus_per_worker:
        return resolve_precision(r.precision, "cpu")
    import ray  # [ray] a one-off task on a GPU

    probe = ray.remote(num_gpus=r.gpus_per_worker, num_cpus=0)(lambda: resolve_precision("auto", "cuda"))
    return ray.get(probe.remote())


def _callbacks(spec: StudySpec, paths: StudyPaths, spec_text: str, precision: str, pool=None) -> list:
    params = {"name": spec.name, "models": ",".join(spec.models), "seeds": ",".join(map(str, spec.seeds)),
              "dataset": spec.data.dataset, "subset": spec.data.subset, "eval_on": spec.data.eval_on,
              "labeled_fraction": spec.data.labeled_fraction, "encoder": spec.model.encoder,
              "search": spec.search.algorithm if spec.search else "none",
              "selection_split": "val" if spec.search else "none", "objective": spec.objective.metric,
              "store": paths.store_uri, "code_version": code_version(), "precision": precision}
    optuna = paths.optuna_storage if spec.search is not None and spec.search.algorithm == "optuna" else None
    recorder = MlflowRecorder(paths.tracking_uri, spec.name, paths.artifact_location, paths.store_uri, params, spec_text,
                              note=spec.description.strip(), data_settings=spec.data.model_dump(),
                              system_metrics=spec.system_metrics, optuna_storage=optuna)
    epochs = {kind: s.epochs for kind, s in spec.stages.items()}
    callbacks = [recorder, Progress(total_trials(spec), epochs), PlacementGroupJanitor(pool)]
    if optuna:
        from .search import OptunaEpochValues

        callbacks.append(OptunaEpochValues(optuna, spec.name, spec.objective.metric))
    return callbacks


def build_tuner(spec: StudySpec, paths: StudyPaths, spec_text: str, restore: bool, slots: int, pool=None):
    """The study's Tuner, running `slots` trials at once; `pool` is the Train pool's dispatcher when the spec asks
    for pooled Train runs."""
    import optuna
    from ray import tune  # [ray] the Tuner, its search algorithm and scheduler
    from ray.tune.schedulers import ASHAScheduler

    from .search import EpochOptunaSearch

    precision = resolved_precision(spec)
    ctx = TrialContext(spec=spec, store_uri=paths.store_uri, train_storage=paths.train_storage,
                       code_version=code_version(), precision=precision, claims=ClusterClaims(paths.store_uri),
                       pool=pool)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_driver_resources())
    if restore:  # Tune's tuner.pkl keeps no search space: give it again (a grid's; a searcher keeps its own)
        space = grid_space(spec) if spec.search is None or spec.search.algorithm == "grid" else None
        return tune.Tuner.restore(join(paths.tune_storage, TUNE_NAME), trainable=trainable, param_space=space,
                                  resume_unfinished=True,
                                  resume_errored=True)
    search_alg = scheduler = None
    num_samples = 1
    if spec.search is None or spec.search.algorithm == "grid":
        param_space = grid_space(spec)
    if spec.search is not None and spec.search.algorithm == "optuna":
        s = spec.search
        storage = optuna.storages.RDBStorage(paths.optuna_storage)
        sampler = optuna.samplers.TPESampler(seed=s.sampler_seed, constant_liar=True)
        search_alg = EpochOptunaSearch(space=OptunaSpace(spec), metric="objective", mode="min", sampler=sampler,
                                       study_name=spec.name, storage=storage)
        num_samples = s.num_samples
        param_space = {} if len(spec.seeds) > 1 else {"seed": spec.seeds[0]}
    elif spec.search is not None:
        num_samples = spec.search.num_samples
    if spec.search is not None and spec.search.scheduler is not None:
        sch = spec.search.scheduler
        max_t = max(spec.stages["finetune"].epochs, 1)
        scheduler = ASHAScheduler(time_attr="finetune_epoch", max_t=max_t, grace_period=min(sch.grace_period, max_t),
                                  reduction_factor=sch.reduction_factor,
                                  stop_last_trials=False)  # a trial that reaches max_t finishes (COMPLETE)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="objective", mode="min", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples,
                                    max_concurrent_trials=slots,
                                    # A trial's driver process (imports of torch, Ray Tune and the project: seconds
                                    # of CPU) is kept for the next trial instead of a new one per trial; not when
                                    # a scheduler stops trials: a stopped trial's Train run must end with its
                                    # process, not go on inside the next trial's.
                                    reuse_actors=scheduler is None),
        run_config=tune.RunConfig(name=TUNE_NAME, storage_path=paths.tune_storage, verbose=0,
                                  callbacks=_callbacks(spec, paths, spec_text, precision, pool),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def prepare_study_dir(spec: StudySpec, document: dict, paths: StudyPaths) -> str:
    """Create the study directory with the effective spec (overrides applied); refuse to overwrite a different
    study of the same name."""
    text = yaml.safe_dump(document, sort_keys=False)
    if paths.spec_file.exists():
        if yaml.safe_load(paths.spec_file.read_text()) != document:
            raise FileExistsError(
                f"a different study named {spec.name!r} exists in {paths.root}; rename the study, remove that "
                f"directory, or run `study resume {spec.name}` to continue it")
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.spec_file.write_text(text)
    return text


def can_restore(paths: StudyPaths) -> bool:
    """Whether an earlier launch left Tune state to continue from. A kill at start-up may leave none, or only
    `tuner.pkl` (written before the first `experiment_state-*.json`): then the study starts its Tune run afresh."""
    from ray import tune  # [ray] experiment state

    tune_dir = join(paths.tune_storage, TUNE_NAME)
    if not is_uri(tune_dir) and not any(Path(tune_dir).glob("experiment_state-*.json")):
        return False
    return tune.Tuner.can_restore(tune_dir)


class Interrupted(Exception):
    """The study was stopped by a signal; its state is saved and `study resume` continues it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class StopSignals:
    """SIGINT / SIGTERM while a study runs: the first asks Tune to stop (it saves its state, stops the trials, and
    the recorder marks their runs KILLED); a second one exits at once.

    Tune's own SIGINT handler is turned off (TUNE_DISABLE_SIGINT_HANDLER) so that both signals take this path;
    Tune is asked to stop through SIGUSR1, which it always handles while `fit()` runs.
    """

    def __init__(self):
        self.signum: int | None = None
        self.fitting = False

    def __enter__(self):
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            print("\nstudy: stopping at once; `study resume` continues from the last saved state", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\nstudy: {signal.Signals(signum).name} received: stopping the trials and saving the study's state "
              "(again to stop at once)", file=sys.stderr, flush=True)
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if self.fitting and callable(tune_handler):
            os.kill(os.getpid(), signal.SIGUSR1)  # [ray] Tune ends its loop, checkpoints and stops the trials
        else:
            raise Interrupted(signum)


def start_pool(spec: StudySpec, paths: StudyPaths, slots: int):
    """The study's Train pool (`resources.train_runs: pooled`): one Train run per trial slot; else None."""
    if spec.resources.train_runs != "pooled":
        return None
    from trainables.stages.pool import TrainPool

    from .plan import scaling

    return TrainPool(slots, scaling(spec), paths.train_storage)


def run(spec: StudySpec, paths: StudyPaths, spec_text: str, *, restore: bool, address: str | None = None):
    """Run (or resume) the study's Tune experiment; returns the ResultGrid, or raises Interrupted."""
    from .records import retire_runs

    with StopSignals() as stop, launcher_mark(paths):
        paths.ensure_tracking_store()
        init_ray(address)
        registry = registry_for(paths.store_uri)  # noqa: F841 (the store's cluster-wide claims, owned by this launcher)
        if not restore:  # a fresh Tune run re-runs every trial: records of an earlier, unrestorable attempt go
            retire_runs(paths.tracking_uri, spec.name)
        slots = concurrency(spec, cluster_capacity())  # trials at once (and Train pool runs, when pooled)
        pool = start_pool(spec, paths, slots)
        try:
            tuner = build_tuner(spec, paths, spec_text, restore, slots, pool.dispatcher if pool else None)
            stop.fitting = True
            results = tuner.fit()
            stop.fitting = False
        finally:
            if pool is not None:
                pool.stop()
        if not stop.signum:
            run_final_tests(spec, paths.tracking_uri, paths.store_uri)
        import mlflow

        client = mlflow.MlflowClient(paths.tracking_uri)
        exp = client.get_experiment_by_name(spec.name)
        status = "KILLED" if stop.signum else "FAILED" if results.errors else "FINISHED"
        if exp is not None:
            for r in client.search_runs([exp.experiment_id], "tags.role = 'study'"):
                client.set_terminated(r.info.run_id, status)
        if stop.signum:
            raise Interrupted(stop.signum)
    return results


LAUNCHER_FILE = "launcher.json"


@contextlib.contextmanager
def launcher_mark(paths: StudyPaths):
    """`<study>/launcher.json` (host, pid) while a launcher runs the study: `study status` tells a running trial
    from one left RUNNING by a launcher that died."""
    mark = paths.root / LAUNCHER_FILE
    mark.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        yield
    finally:
        mark.unlink(missing_ok=True)


def launcher_alive(paths: StudyPaths) -> bool | None:
    """True/False if this machine can tell whether the study's launcher runs; None if it runs elsewhere."""
    try:
        mark = json.loads((paths.root / LAUNCHER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if mark.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(mark["pid"]), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def launch(spec_path: str | Path, results_dir: str | None = None, address: str | None = None,
           overrides: list[str] = (), smoke: bool = False, storage: str | None = None,
           tracking_uri: str | None = None):
    document = read_spec(spec_path, overrides, smoke)
    spec = parse_spec(document, str(spec_path))
    paths = StudyPaths.of(spec.name, results_dir or spec.results_dir, spec.store, storage or spec.storage,
                          tracking_uri)
    init_ray(address)
    check_storage(paths)  # before anything is created
    text = prepare_study_dir(spec, document, paths)
    paths.save()
    return spec, paths, run(spec, paths, text, restore=can_restore(paths), address=address)


def resume(name: str, results_dir: str, address: str | None = None, tracking_uri: str | None = None):
    paths = StudyPaths.of(name, results_dir)
    if not paths.spec_file.exists():
        raise FileNotFoundError(f"no study {name!r} in {paths.root.parent} (no {paths.spec_file})")
    spec = load_spec(paths.spec_file)
    paths = StudyPaths.saved(spec.name, results_dir, spec.store, tracking_uri)
    init_ray(address)
    check_storage(paths)
    return spec, paths, run(spec, paths, paths.spec_file.read_text(), restore=can_restore(paths), address=address)
