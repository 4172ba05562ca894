"""The product's main path, as a user lives it: the `study` CLI on a local Ray, with real MLflow and Optuna stores.

One micro study (2 models x 2 seeds, tiny VGG, a Fashion-MNIST subset) is launched through the CLI, killed at
start-up, stopped with Ctrl-C, hit by a Train worker kill and a launcher SIGKILL, and resumed after each; the tests
then read what a user would find: the MLflow records, `study status`, the stage store, and the final weights,
which must equal an undisturbed run's. A micro Optuna search over the same store shows stage reuse across studies.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from trainables.stages.store import StageStore

STAGES = {
    "classifier": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}},
    "layerwise": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}},
    "topdown": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}},
    "finetune": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}},
}
MICRO = {
    "name": "micro",
    "models": ["baseline", "swwae-all"],
    "seeds": [0, 1],
    "data": {"subset": 300, "val_size": 100},
    "model": {"encoder": "vgg_tiny"},
    "stages": STAGES,
    "loss": {"weights": {"image": 0.001, "pool1": 0.0001}},
}
SEARCH = {
    "name": "micro-search",
    "models": ["swwae-all"],
    "seeds": [0],
    "data": MICRO["data"],
    "model": MICRO["model"],
    "stages": STAGES,
    "loss": MICRO["loss"],
    "search": {"algorithm": "optuna", "num_samples": 2, "sampler_seed": 0,
               "space": {"loss.weights.image": {"type": "loguniform", "low": 1e-5, "high": 1e-1}}},
}


def cli(*args, cwd, check=True, timeout=600, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "study", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"study {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_spec(directory: Path, spec: dict) -> Path:
    path = directory / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def runs_of(uri: str, experiment: str, role: str):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client.search_runs([exp.experiment_id], f"tags.role = '{role}'", max_results=1000)


def launch_bg(args, cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "study", *args], cwd=cwd, env=env, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 480, poll: float = 0.05):
    """Poll until `condition()` is truthy (returned), failing if the process ends first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if found := condition():
            return found
        time.sleep(poll)
    raise AssertionError(f"condition not met (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


def published(store_dir: Path, kind: str = "") -> list[str]:
    return sorted(p.parent.name for p in store_dir.glob(f"{kind}*/MANIFEST.json"))


def train_workers(sid: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == sid and b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro study through every kind of stop, each followed by `study resume`:
    1. the launcher SIGKILLed at start-up, as soon as Tune has written tuner.pkl (before any experiment state);
    2. Ctrl-C (SIGINT to the process group, as a terminal sends it) once a whole trial has finished;
    3. the launcher SIGKILLed once another fine-tuning is published, after a Train worker was SIGKILLed;
    then resumed to completion."""
    work = tmp_path_factory.mktemp("study")
    spec = write_spec(work, MICRO)
    log = work / "launch.log"
    store_dir = work / "runs" / "store"
    tune_dir = work / "runs" / "micro" / "ray" / "tune"

    proc = launch_bg(["launch", str(spec), "--no-report"], work, log)  # 1. start-up
    wait_for(lambda: (tune_dir / "tuner.pkl").exists(), proc, log, poll=0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    proc = launch_bg(["resume", "micro", "--no-report"], work, log)  # 2. Ctrl-C
    wait_for(lambda: published(store_dir, "finetune-"), proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    sigint_exit = proc.wait(timeout=300)
    sigint_out = log.read_text()
    status_after_sigint = cli("status", "micro", cwd=work).stdout

    proc = launch_bg(["resume", "micro", "--no-report"], work, log)  # 3. a Train worker, then the launcher
    published_before = published(store_dir)
    worker = wait_for(lambda: train_workers(proc.pid), proc, log)[0]
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: len(published(store_dir)) > len(published_before), proc, log)
    killed_with = published(store_dir)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only, as a crash or `kill -9` would
    killed_at_ms = int(time.time() * 1000)
    proc.wait(timeout=60)
    status_after_kill = cli("status", "micro", cwd=work).stdout

    resumed = cli("resume", "micro", cwd=work)
    uri = f"sqlite:///{work / 'runs' / 'micro' / 'mlflow.db'}"
    # Later tests launch other studies in `work`, on the same store (some on purpose, to test reuse): what the micro
    # study published is taken now.
    return {"work": work, "uri": uri, "killed_with": killed_with, "killed_at_ms": killed_at_ms,
            "published": set(published(store_dir)),
            "resume_out": resumed.stdout, "log": log.read_text() + resumed.stdout, "sigint_exit": sigint_exit,
            "sigint_out": sigint_out, "status_after_sigint": status_after_sigint,
            "status_after_kill": status_after_kill, "store": StageStore(str(store_dir))}


# The micro fixture launches and resumes the study four times: on a loaded machine its set-up alone can pass the
# default per-test limit.
pytestmark = pytest.mark.timeout(1800)


@pytest.mark.ray
def test_micro_study_records_exactly_the_expected_runs(micro):
    uri = micro["uri"]
    studies = runs_of(uri, "micro", "study")
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"
    trials = runs_of(uri, "micro", "trial")
    assert sorted((t.data.tags["model"], t.data.tags["seed"]) for t in trials) == [
        ("baseline", "0"), ("baseline", "1"), ("swwae-all", "0"), ("swwae-all", "1")]
    for t in trials:
        assert t.info.status == "FINISHED"
        assert t.data.tags["mlflow.parentRunId"] == studies[0].info.run_id
        assert t.data.params["model"] == t.data.tags["model"] and t.data.params["seed"] == t.data.tags["seed"]
        assert t.data.params["stages.finetune.epochs"] == "2"
        assert {"train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err"} <= set(t.data.metrics)
        if t.data.tags["model"] == "swwae-all":
            assert float(t.data.params["loss.weights.image"]) == 0.001
            assert float(t.data.params["loss.weights.pool1"]) == 0.0001
    stages = runs_of(uri, "micro", "stage")
    by_trial = {}
    for s in stages:
        by_trial.setdefault(s.data.tags["mlflow.parentRunId"], []).append(s)
    for t in trials:
        kinds = sorted(s.data.tags["stage"] for s in by_trial[t.info.run_id])
        expected = ["classifier", "finetune"] if t.data.tags["model"] == "baseline" else \
            ["classifier", "finetune", "layerwise", "topdown"]
        assert kinds == expected, (t.data.tags, kinds)
        assert t.data.tags["stage_keys"].split(",") and all(
            s.data.tags["stage_key"] in t.data.tags["stage_keys"].split(",") for s in by_trial[t.info.run_id])


@pytest.mark.ray
def test_no_run_or_metric_is_lost_and_every_stage_is_computed_once(micro):
    client = mlflow.MlflowClient(micro["uri"])
    stages = runs_of(micro["uri"], "micro", "stage")
    computed = [s for s in stages if s.data.tags["reused"] == "false"]
    keys = [s.data.tags["stage_key"] for s in computed]
    assert len(keys) == len(set(keys)), "a stage was computed twice"
    # 2 classifiers (one per seed), 2 layerwise, 2 top-down, 4 fine-tunings: 10 distinct stages, all stored.
    assert len(set(s.data.tags["stage_key"] for s in stages)) == 10 == len(micro["published"])
    for s in stages:
        assert s.info.status == "FINISHED"
        epochs = STAGES[s.data.tags["stage"]]["epochs"]
        history = client.get_metric_history(s.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (s.data.tags, history)
        assert {"train_top1_err", "val_top1_err"} <= set(s.data.metrics)
        if s.data.tags["stage"] in ("layerwise", "topdown", "finetune") and s.data.tags["model"] == "swwae-all":
            assert {"rec_err_image", "rec_err_pool1", "invert_err_pool1", "invert_err_pool2"} <= set(s.data.metrics)
            names = {a.path for a in client.list_artifacts(s.info.run_id, "recon")}
            assert names == {"recon/invert.npz", "recon/invert.png"}
        config = json.loads(Path(client.download_artifacts(s.info.run_id, "config.json")).read_text())
        assert config["key"] == s.data.tags["stage_key"] and config["code_version"]
    # Shared stages: both trials of a seed use one classifier, and at least one of them reused it.
    classifiers = [s for s in stages if s.data.tags["stage"] == "classifier"]
    for seed in ("0", "1"):
        mine = [s for s in classifiers if s.data.tags["seed"] == seed]
        assert len(mine) == 2 and len({s.data.tags["stage_key"] for s in mine}) == 1
        assert "true" in {s.data.tags["reused"] for s in mine}


@pytest.mark.ray
def test_resume_after_sigkill_completes_without_recomputing_finished_stages(micro):
    stages = runs_of(micro["uri"], "micro", "stage")
    after_kill = [s for s in stages if s.info.start_time > micro["killed_at_ms"]]
    assert after_kill, "the resumed launcher recorded nothing"
    # Stages stored before the kill come from the store after it; only the missing ones were computed.
    for s in after_kill:
        if s.data.tags["stage_key"] in micro["killed_with"]:
            assert s.data.tags["reused"] == "true", s.data.tags
    assert {s.data.tags["stage_key"] for s in after_kill if s.data.tags["reused"] == "false"}.isdisjoint(
        micro["killed_with"])
    assert "Results of micro" in micro["resume_out"]
    assert len({s.data.tags["stage_key"] for s in stages}) == 10


def chaos_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaos", Path(__file__).parent.parent / "bench" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
def test_ctrl_c_stops_the_study_cleanly_and_says_how_to_resume(micro):
    assert micro["sigint_exit"] == 130, micro["sigint_out"][-3000:]
    assert "Continue with: study resume micro" in micro["sigint_out"]
    assert "Traceback" not in micro["sigint_out"]
    for status in (micro["status_after_sigint"], micro["status_after_kill"]):
        assert "RUNNING" not in status and "INTERRUPTED" in status, status  # nothing runs, and status says so
        assert "`study resume micro` continues the interrupted trials" in status
    assert "PENDING" in micro["status_after_sigint"] or "FINISHED" in micro["status_after_sigint"]


@pytest.mark.ray
def test_sigterm_stops_the_study_with_exit_143_and_no_run_left_running(tmp_path):
    """SIGTERM to the launcher alone (as `kill` or a service manager sends it), once a trial runs. In a directory of
    its own: its classifier may be published before the stop, and must not land in the micro study's store."""
    work = tmp_path
    spec = write_spec(work, tiny_spec("terminated", ["baseline"]))
    log = work / "terminated.log"
    proc = launch_bg(["launch", str(spec), "--no-report"], work, log)
    wait_for(lambda: "started:" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    out = log.read_text()
    assert "SIGTERM received" in out and "Continue with: study resume terminated" in out, out[-3000:]
    assert "Traceback" not in out
    uri = f"sqlite:///{work / 'runs' / 'terminated' / 'mlflow.db'}"
    runs = [r for role in ("study", "trial", "stage") for r in runs_of(uri, "terminated", role)]
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.data.tags.get("role"), r.info.status) for r in runs]
    assert all(r.info.status == "KILLED" for r in runs_of(uri, "terminated", "study"))


@pytest.mark.ray
def test_every_interruption_recovers_the_undisturbed_results_and_records(micro):
    chaos = chaos_module()
    ref = chaos.reference(micro["work"] / "micro.yaml")  # plain PyTorch, one process, nothing interrupted
    assert set(ref) == micro["published"]
    for key, fingerprint in ref.items():
        assert chaos.stage_fingerprint(micro["store"].get(key)) == fingerprint, key
    problems = chaos.record_problems(micro["uri"], "micro")
    assert problems == {"orphan_runs": 0, "duplicated_runs": 0, "repeated_metric_values": 0}, problems


@pytest.mark.ray
def test_progress_lines_continue_across_resumes_without_ray_noise(micro):
    log = micro["log"]
    assert "\x1b[" not in log  # no ANSI colour codes, even into a file
    # (the line saying a stage was retried from its checkpoint is checked by the chaos bench's worker kill, whose
    # timing guarantees a checkpoint exists; here the worker may die before its first one)
    last = [l for l in micro["resume_out"].splitlines() if l.startswith("[")]
    numbers = {int(l[1:3]) for l in last}
    assert numbers and min(numbers) >= 1 and all(f"/4 " in l for l in last)
    assert not any(" 0 done" in l for l in last[-3:]), last  # the done count continues across a resume


@pytest.mark.ray
def test_status_shows_every_trial(micro):
    out = cli("status", "micro", cwd=micro["work"]).stdout
    lines = [l for l in out.splitlines() if " baseline " in l or " swwae-all " in l]
    assert len(lines) == 4 and all("FINISHED" in l for l in lines), out
    assert "2/2 finetune" in out and "4/4 finetune" in out
    assert "4 finished" in out


@pytest.mark.ray
def test_optuna_search_reuses_stages_of_another_study(micro):
    spec = write_spec(micro["work"], SEARCH)
    out = cli("launch", str(spec), "--no-report", cwd=micro["work"]).stdout
    assert "Results of micro-search" in out
    import optuna

    storage = f"sqlite:///{micro['work'] / 'runs' / 'micro-search' / 'optuna.db'}"
    study = optuna.load_study(study_name="micro-search", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2 and all("loss.weights.image" in t.params for t in complete)
    uri = f"sqlite:///{micro['work'] / 'runs' / 'micro-search' / 'mlflow.db'}"
    stages = runs_of(uri, "micro-search", "stage")
    reused = {s.data.tags["stage"]: s.data.tags["reused"] for s in stages if s.data.tags["stage"] != "finetune"}
    assert reused == {"classifier": "true", "layerwise": "true", "topdown": "true"}  # from the micro study
    weights = sorted(float(t.data.params["loss.weights.image"]) for t in runs_of(uri, "micro-search", "trial"))
    assert weights == sorted(t.params["loss.weights.image"] for t in complete)


def free_port() -> int:
    """A free port below the kernel's ephemeral range: it is bound only seconds later (by `ray start`, an MLflow
    server), and a port from that range could meanwhile go to any process's outgoing connection or port-0 bind."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    low = max(1024, first_ephemeral - 12000)
    candidates = random.sample(range(low, first_ephemeral), min(200, first_ephemeral - low)) + [0]
    for port in candidates:  # 0 (any ephemeral port) only where nothing below the range is free
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def wait_healthy(base: str, attempts: int = 240) -> None:
    """Wait until an MLflow server at `base` answers /health; fail if it never does."""
    for _ in range(attempts):
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no MLflow server answered at {base}/health")


def tiny_spec(name: str, models: list[str], **fields) -> dict:
    """A study at the `--smoke` size: tiny VGG, 200 images, one epoch per stage, one seed."""
    stage = {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.003}}
    return {"name": name, "models": models, "seeds": [0], "data": {"subset": 200, "val_size": 50},
            "model": {"encoder": "vgg_tiny"}, "stages": {kind: stage for kind in STAGES}, **fields}


@pytest.mark.ray
def test_study_ui_serves_the_mlflow_ui_with_the_studys_runs(micro):
    port = free_port()
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = subprocess.Popen([sys.executable, "-m", "study", "ui", "micro", "--port", str(port)], cwd=micro["work"],
                          env=env, stdout=open(micro["work"] / "ui.log", "w"), stderr=subprocess.STDOUT,
                          start_new_session=True)  # a file: a pipe nobody reads would block the server once full
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        req = urllib.request.Request(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=micro")
        exp = json.load(urllib.request.urlopen(req, timeout=10))["experiment"]
        body = json.dumps({"experiment_ids": [exp["experiment_id"]], "filter": "tags.role = 'trial'"}).encode()
        req = urllib.request.Request(base + "/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(req, timeout=10))["runs"]
        assert len(runs) == 4
        chromium = "/usr/bin/chromium"
        if os.path.exists(chromium):
            shot = Path(__file__).parent / "artifacts" / "mlflow-ui.png"
            shot.parent.mkdir(exist_ok=True)
            profile = micro["work"] / "chromium-profile"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=15000",
                            f"--screenshot={shot}", f"{base}/#/experiments/{exp['experiment_id']}/runs"],
                           capture_output=True, timeout=120)
            assert shot.exists() and shot.stat().st_size > 10_000
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


@pytest.mark.ray
def test_shipped_skip_ae_spec_runs_in_smoke_mode(micro):
    spec = Path(__file__).parent.parent / "studies" / "skip-ae.yaml"
    out = cli("launch", str(spec), "--smoke", "--no-report", cwd=micro["work"]).stdout
    assert "Results of skip-ae-smoke" in out
    uri = f"sqlite:///{micro['work'] / 'runs' / 'skip-ae-smoke' / 'mlflow.db'}"
    stages = runs_of(uri, "skip-ae-smoke", "stage")
    kinds = sorted((s.data.tags["model"], s.data.tags["stage"]) for s in stages)
    assert kinds == [("skipae", "finetune"), ("skipae", "pretrain"), ("skipae-scratch", "finetune")]
    pretrain = next(s for s in stages if s.data.tags["stage"] == "pretrain")
    assert "rec_err_image" in pretrain.data.metrics and "loss_rec_image" in pretrain.data.metrics


@pytest.mark.ray
def test_report_on_the_micro_study(micro):
    out = cli("report", "micro", cwd=micro["work"]).stdout.strip()
    report = Path(out.splitlines()[-1])
    assert report.name == "report.html" and report.exists()
    html = report.read_text()
    for text in ("baseline", "swwae-all", "Plotly"):
        assert text in html, text
    # Two seeds: a verdict for swwae-all vs the baseline, and the paper's claims judged.
    assert any(v in html for v in ("better optimum", "regularizes", "hurts", "no clear effect"))
    assert any(v in html for v in ("reproduced", "contradicted", "cannot decide"))
    assert (report.parent / "table.csv").exists() and (report.parent / "table.md").exists()
    client = mlflow.MlflowClient(micro["uri"])
    study_run = runs_of(micro["uri"], "micro", "study")[0]
    assert {a.path for a in client.list_artifacts(study_run.info.run_id, "report")} >= {
        "report/report.html", "report/table.csv", "report/table.md"}


@pytest.mark.ray
def test_a_failed_trial_is_recorded_failed_with_its_error(micro):
    stages = {**STAGES, "finetune": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 1.0e8}}}
    spec = write_spec(micro["work"], {**MICRO, "name": "micro-fail", "models": ["baseline"], "seeds": [0],
                                      "stages": stages, "loss": {}, "resources": {"max_failures": 0}})
    proc = cli("launch", str(spec), "--no-report", cwd=micro["work"], check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 trial(s) failed" in proc.stdout
    uri = f"sqlite:///{micro['work'] / 'runs' / 'micro-fail' / 'mlflow.db'}"
    (trial,) = runs_of(uri, "micro-fail", "trial")
    assert trial.info.status == "FAILED"
    assert "stage 'finetune' diverged" in trial.data.tags["status_detail"]
    (study,) = runs_of(uri, "micro-fail", "study")
    assert study.info.status == "FAILED"
