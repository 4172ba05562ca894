"""Faults at random moments: does a study recover with exactly the results of an undisturbed run?

    python bench/chaos.py                 # 10 attempts on a micro study (3 models x 2 seeds, tiny VGG)
    python bench/chaos.py --smoke         # 1 attempt (a Train worker kill) on 1 model x 1 seed (what CI runs)

Each attempt launches the study through the `study` CLI in a fresh results directory (its own stage store, so
stages are computed, not reused), then, at a moment drawn from a seeded schedule over the measured length of an
undisturbed launch (start-up included), either
- SIGKILLs one Ray Train worker (the stage must go on from its last checkpoint, within the same launch), or
- SIGKILLs the launcher (as a crash or `kill -9` would), and runs `study resume` to completion.
Then it checks what a user relies on:
- every stage's weights (sha256 of model.pt), final metrics and per-epoch history equal those of an undisturbed
  single-process CPU run of the same chains (computed once, up front, with plain PyTorch);
- no stage published before the kill was computed again (its store entry is untouched);
- MLflow holds no run left RUNNING (deleted or not), no duplicated run, and one value per metric and step.
The last line printed is one JSON object: attempts, recovered_identical, stages_recomputed, orphan_runs, ...
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = {kind: {"epochs": 1 if kind != "finetune" else 2, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}}
          for kind in ("classifier", "layerwise", "topdown", "finetune")}


def micro_spec(smoke: bool) -> dict:
    # The smoke's one Train run (classifier + fine-tuning) fine-tunes 5 epochs: after its first checkpoint, the kill
    # has a few seconds to land in, even when this process is starved on a busy machine.
    stages = {**STAGES, "finetune": {**STAGES["finetune"], "epochs": 5}} if smoke else STAGES
    return {"name": "chaos", "models": ["baseline"] if smoke else ["baseline", "sae-all", "swwae-all"],
            "seeds": [0] if smoke else [0, 1], "data": {"subset": 200, "val_size": 50},
            "model": {"encoder": "vgg_tiny"}, "stages": stages,
            "loss": {} if smoke else {"weights": {"image": 0.001, "pool1": 0.0001}}}


# -- reference: the undisturbed CPU run ------------------------------------------------------------------------


def stage_fingerprint(entry) -> dict:
    record = json.loads(Path(entry.path, "record.json").read_text())
    return {"model": entry.manifest["files"]["model.pt"], "final": record["final"], "history": record["history"]}


def reference(spec_path: Path) -> dict[str, dict]:
    """Every stage of every trial, computed in this process with plain PyTorch on one thread (as a Train worker
    with one core computes): stage key -> fingerprint."""
    from study.launch import resolved_precision
    from study.plan import data_config, resolve
    from study.spec import load_spec
    from trainables.data import build_data
    from trainables.stages.chain import run_chain_locally
    from trainables.stages.loop import Runtime
    from trainables.stages.precision import resolve_channels_last, torch_threads
    from trainables.stages.store import StageStore

    spec = load_spec(spec_path)
    out = {}
    with torch_threads(1), tempfile.TemporaryDirectory() as d:  # a caller (a test) keeps its own thread count
        store = StageStore(d)
        for seed in spec.seeds:
            data = build_data(data_config(spec), seed)
            for model in spec.models:
                shape = (data.in_channels, data.num_classes, data.image_size)
                plan = resolve(spec, {"model": model, "seed": seed}, shape)
                chain = plan.chain(data.identity, seed, resolved_precision(spec))  # the launcher's precision
                # the layout the platform's workers resolve (channels-last changes float rounding order)
                layout = resolve_channels_last(spec.resources.channels_last, "cpu")
                run_chain_locally(chain, store, data, Runtime(device="cpu", channels_last=layout), seed)
                out.update({p.key: stage_fingerprint(store.get(p.key)) for p in chain})
    return out


# -- one attempt -----------------------------------------------------------------------------------------------


def cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", "study", *args], cwd=cwd, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of the processes of a session (the launcher and the Ray it started)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getsid(int(pid)) != sid:
                continue
            out[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
    return out


def manifests(store_dir: Path) -> dict[str, int]:
    """Published stages: key -> mtime of its manifest (a recomputed stage would be published anew)."""
    if not store_dir.exists():
        return {}
    return {p.parent.name: p.stat().st_mtime_ns for p in store_dir.glob("*/MANIFEST.json")}


def record_problems(tracking_uri: str, study: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], run_view_type=3, max_results=5000)  # active and deleted
    active = [r for r in runs if r.info.lifecycle_stage == "active"]
    ids = collections.Counter((r.data.tags.get("role"), r.data.tags.get("trial_id"), r.data.tags.get("seed"),
                               r.data.tags.get("stage_key")) for r in active)
    repeated = 0
    for r in active:
        for name in r.data.metrics:
            steps = collections.Counter(m.step for m in client.get_metric_history(r.info.run_id, name))
            repeated += sum(n - 1 for n in steps.values())
    trials = collections.Counter((r.data.tags.get("model"), r.data.tags.get("seed")) for r in active
                                 if r.data.tags.get("role") == "trial")
    return {"orphan_runs": sum(r.info.status == "RUNNING" for r in runs),
            "duplicated_runs": sum(n - 1 for n in ids.values()) + sum(n - 1 for n in trials.values()),
            "repeated_metric_values": repeated}


def registered_checkpoint(train_dir: Path) -> bool:
    """Whether a Train run's controller has registered a checkpoint (its checkpoint manager's snapshot lists one):
    a checkpoint directory alone is not enough, a worker killed before the controller took its report starts again."""
    for snapshot in train_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):
            continue
    return False


def attempt(work: Path, spec: dict, kind: str, at: float, ref: dict, timeout: float,
            after_checkpoint: bool = False) -> dict:
    """One launch with one kill (kind "worker" / "launcher"; "none": undisturbed). `after_checkpoint` (worker kills):
    kill only once a Train checkpoint exists, so that the stage must go on from it."""
    import yaml

    work.mkdir(parents=True)
    spec_path = work / "chaos.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    log = work / "cli.log"
    store_dir = work / "runs" / "store"
    start = time.time()
    proc = cli(["launch", str(spec_path), "--no-report"], work, log)
    killed, before, checkpointed = None, {}, False
    train_dir = work / "runs" / "chaos" / "ray" / "train"  # the Train runs' per-epoch checkpoints
    workers_seen: list[float] = []  # when Train workers were alive (seconds after start), looked at every 0.25 s
    last_look = 0.0
    while proc.poll() is None and time.time() - start < timeout:
        workers = []
        if kind != "launcher" and killed is None and time.time() - last_look >= 0.25:
            last_look = time.time()
            workers = [p for p, cmd in session_processes(proc.pid).items() if "RayTrainWorker" in cmd]
            if workers:
                workers_seen.append(round(last_look - start, 2))
        if kind == "launcher" and killed is None and time.time() - start >= at:
            before = manifests(store_dir)
            os.kill(proc.pid, signal.SIGKILL)
            killed = "launcher"
        elif kind == "worker" and killed is None and workers_seen and last_look - start - workers_seen[0] >= at:
            # `at` counts from the moment Train workers first appear: start-up times vary too much between
            # launches for a moment counted from the start to fall reliably inside a short Train run
            checkpointed = registered_checkpoint(train_dir)
            if workers and (checkpointed or not after_checkpoint):  # else: try again shortly
                before = manifests(store_dir)
                os.kill(workers[0], signal.SIGKILL)
                killed = "worker"
        time.sleep(0.05)
    code = proc.wait(timeout=max(timeout - (time.time() - start), 1))
    resumed = None
    if killed == "launcher":
        resumed = cli(["resume", "chaos", "--no-report"], work, log).wait(timeout=timeout)
    after = manifests(store_dir)
    from trainables.stages.store import StageStore

    store = StageStore(str(store_dir))
    mismatched = sorted(k for k in ref if k not in after or stage_fingerprint(store.get(k)) != ref[k])
    recomputed = sorted(k for k, t in before.items() if after.get(k) != t)
    out = {"kind": kind, "at_s": round(at, 1), "killed": killed, "launch_exit": code, "resume_exit": resumed,
           "identical": not mismatched and (resumed in (None, 0)) and code in (0, -9),
           "mismatched": mismatched, "published_before_kill": len(before), "recomputed": recomputed,
           "seconds": round(time.time() - start, 1),
           "workers_alive_s": [workers_seen[0], workers_seen[-1]] if workers_seen else None}
    out.update(record_problems(f"sqlite:///{work / 'runs' / 'chaos' / 'mlflow.db'}", "chaos"))
    if kind == "worker" and killed:
        # With a checkpoint to go on from, the CLI says so in a line of its own; before the first checkpoint the
        # stage simply starts again. (Checkpoints of a Train run that had already finished count too: with
        # several trials this is an upper bound on the retries expected.)
        out["retry_line"] = "retried from its checkpoint" in log.read_text()
        out["checkpointed_before_kill"] = checkpointed
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 attempt on 1 model x 1 seed: a Train worker killed once "
                   "its run has a checkpoint (launcher kills: the test suite's micro study)")
    p.add_argument("--attempts", type=int, help="kills (half worker, half launcher; default 10, smoke 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--workdir", help="keep the attempts here (default: a temporary directory)")
    args = p.parse_args()
    attempts = args.attempts or (1 if args.smoke else 10)
    spec = micro_spec(args.smoke)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        import yaml

        base.mkdir(parents=True, exist_ok=True)
        (base / "chaos.yaml").write_text(yaml.safe_dump(spec))
        t0 = time.time()
        ref = reference(base / "chaos.yaml")
        ref_seconds = time.time() - t0
        results = []
        if args.smoke:  # one Train worker killed as soon as its run has a checkpoint: the retry line must show
            res = attempt(base / "attempt-00", spec, "worker", 0.0, ref, timeout=1800, after_checkpoint=True)
            print(json.dumps(res), flush=True)
            results.append(res)
            attempts, clean, length = 0, {"identical": None}, 0.0
        else:  # the length of an undisturbed launch (start-up to exit) sets the range of kill moments
            t0 = time.time()
            clean = attempt(base / "undisturbed", spec, "none", float("inf"), ref, timeout=1800)
            length = time.time() - t0
            print(f"undisturbed launch: {length:.0f} s, identical to the reference: {clean['identical']}", flush=True)
        for i in range(attempts):
            kind = "worker" if i % 2 == 0 else "launcher"
            # launcher: from its first second on, start-up included; a moment past the end of this launch (the
            # machine's load varies) is a miss, counted as such
            # worker: after Train workers first appear, within 80% of the span they were alive in the undisturbed
            # launch (first seen to last seen)
            first, last = clean["workers_alive_s"] or (0.0, 0.0)
            at = rng.uniform(0.5, 0.85 * length) if kind == "launcher" else rng.uniform(0, 0.8 * (last - first))
            res = attempt(base / f"attempt-{i:02d}", spec, kind, at, ref, timeout=max(1800, 4 * length))
            print(json.dumps(res), flush=True)
            results.append(res)
    summary = {
        "attempts": len(results),
        "kills": collections.Counter(r["killed"] or "missed" for r in results),
        "recovered_identical": sum(r["identical"] for r in results),
        "stages_recomputed": sum(len(r["recomputed"]) for r in results),
        "orphan_runs": sum(r["orphan_runs"] for r in results),
        "duplicated_runs": sum(r["duplicated_runs"] for r in results),
        "repeated_metric_values": sum(r["repeated_metric_values"] for r in results),
        "retry_lines": sum(r.get("retry_line", False) for r in results),
        "worker_kills_after_a_checkpoint": sum(r.get("checkpointed_before_kill", False) for r in results),
        "undisturbed_identical": clean["identical"],  # None in smoke mode (no undisturbed launch)
        "undisturbed_launch_s": None if args.smoke else round(length, 1),
        "reference_s": round(ref_seconds, 1),
        "stages": len(ref),
        "seed": args.seed,
        "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
