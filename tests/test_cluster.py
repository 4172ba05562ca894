"""A study on a real two-node Ray cluster (`pytest -m cluster`).

Two Ray nodes on this machine, started as a user would (`ray start --head`, `ray start --address ...`), each with
one CPU and its own custom resource (`node_head`, `node_other`) that places the test's own claimant on the node it
means. The launcher is a separate process connecting with `--address`; the storage is a `file://` URI outside the
launcher's working directory. With one CPU per node, two trials' Train runs can only go one per node.

- a micro study runs its trials on both nodes, every stage computed once (cluster-wide claims);
- the same study again, with the non-head node killed mid-study: it finishes on the head with identical results;
- a claim held by a process on the killed node is free again once its lease lapses (recovery of dead claimants);
- a study without a shared storage is refused before anything is created, with a message naming the fix.

Teardown kills exactly the process groups of these two nodes (never `ray stop`, which would stop every Ray
instance of the user on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from test_study import free_port, runs_of, tiny_spec, write_spec  # tests/ is on sys.path
from trainables.stages.store import StageStore

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).parent.parent
RAY = str(Path(sys.executable).parent / "ray")
# Two seeds: within a seed the trials share the classifier (computed once, the other trial waits for it); across
# seeds they are independent, so while one trial trains its decoders another trial's Train run needs the other CPU.
STUDY = tiny_spec("two-nodes", ["baseline", "sae-first"], seeds=[0, 1], resources={"workers": 1, "cpus_per_worker": 1})
FINAL = ("train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err")


def node_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
           # The node loss this test makes is the only one it wants: Ray's memory monitor would otherwise kill
           # workers whenever the machine (shared with other Ray instances) nears its memory limit.
           "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_node(temp: Path, name: str, head_address: str | None) -> subprocess.Popen:
    ports = {flag: free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                            "--runtime-env-agent-port", "--metrics-export-port",
                                            "--node-manager-port", "--object-manager-port")}
    cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
           f"--resources={json.dumps({name: 1})}", f"--temp-dir={temp}", "--disable-usage-stats"]
    cmd += [f"{flag}={port}" for flag, port in ports.items()]
    if head_address is None:
        cmd += ["--head", f"--port={head_address_port(temp)}", "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
                # a dead node is noticed in ~2 s instead of ~15 s
                "--system-config=" + json.dumps({"health_check_period_ms": 500, "health_check_failure_threshold": 4})]
    else:
        cmd += [f"--address={head_address}"]
    log = open(temp / f"{name}.log", "w")
    return subprocess.Popen(cmd, env=node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def head_address_port(temp: Path) -> int:
    return int((temp / "port").read_text())


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL the node's whole process group (raylet, its workers, GCS on the head): a crashed machine."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="i10c-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    (temp / "port").write_text(str(free_port()))
    address = f"127.0.0.1:{head_address_port(temp)}"
    nodes = {}
    import ray

    try:
        nodes["node_head"] = start_node(temp, "node_head", None)
        deadline = time.time() + 300
        while not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except ConnectionError:
                alive = nodes["node_head"].poll() is None
                assert alive and time.time() < deadline, (temp / "node_head.log").read_text()[-3000:]
                time.sleep(1)
        nodes["node_other"] = start_node(temp, "node_other", address)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            alive = nodes["node_other"].poll() is None
            assert alive and time.time() < deadline, (temp / "node_other.log").read_text()[-3000:]
            time.sleep(1)
        ids = {name: next(n["NodeID"] for n in ray.nodes() if n["Alive"] and name in n["Resources"])
               for name in nodes}
        yield {"address": address, "nodes": nodes, "ids": ids, "temp": temp}
    finally:
        ray.shutdown()
        for proc in nodes.values():
            kill_node(proc)
        shutil.rmtree(temp, ignore_errors=True)


def launch(work: Path, address: str, *args: str, wait: bool = True):
    env = node_env()
    cmd = [sys.executable, "-m", "study", "launch", *args, "--address", address, "--no-report"]
    if wait:
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=open(work / "launch.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def results(work: Path, name: str) -> dict:
    """Every metric of every stage (losses, errors, reconstruction errors), by stage key, and the trials' finals."""
    uri = f"sqlite:///{work / 'runs' / name / 'mlflow.db'}"
    stages = {s.data.tags["stage_key"]: s.data.metrics for s in runs_of(uri, name, "stage")
              if s.data.tags["reused"] == "false"}
    trials = {(t.data.tags["model"], t.data.tags["seed"]): {k: t.data.metrics[k] for k in FINAL}
              for t in runs_of(uri, name, "trial")}
    return {"stages": stages, "trials": trials}


def stage_runs(work: Path, name: str):
    return runs_of(f"sqlite:///{work / 'runs' / name / 'mlflow.db'}", name, "stage")


def assert_computed_once(work: Path, name: str, store: StageStore) -> list:
    computed = [s for s in stage_runs(work, name) if s.data.tags["reused"] == "false"]
    keys = [s.data.tags["stage_key"] for s in computed]
    assert sorted(keys) == sorted(set(keys)) == store.keys()  # a classifier per seed, shared by its two trials
    assert len(keys) == 10
    return computed


@pytest.fixture(scope="module")
def healthy(cluster, tmp_path_factory):
    """The micro study on both nodes, storage on a file:// URI away from the launcher's working directory."""
    work, shared = tmp_path_factory.mktemp("launcher"), tmp_path_factory.mktemp("shared")
    spec = write_spec(work, STUDY)
    proc = launch(work, cluster["address"], str(spec), "--storage", shared.as_uri())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"work": work, "shared": shared}


@pytest.mark.ray
def test_a_study_without_shared_storage_is_refused_before_anything_starts(cluster, tmp_path):
    # (first: the later tests stop a node)
    spec = write_spec(tmp_path, {**STUDY, "name": "node-local"})
    proc = launch(tmp_path, cluster["address"], str(spec))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--storage" in proc.stderr and "node" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_trials_run_on_both_nodes_and_every_stage_is_computed_once(cluster, healthy):
    store = StageStore((healthy["shared"] / "store").as_uri())
    computed = assert_computed_once(healthy["work"], "two-nodes", store)
    assert {s.data.tags["node_id"] for s in computed} == set(cluster["ids"].values())
    # Everything shared lives in the storage; the launcher's directory holds only the records and the spec.
    assert (healthy["shared"] / "two-nodes" / "ray" / "tune").is_dir()
    assert (healthy["shared"] / "two-nodes" / "ray" / "train").is_dir()
    assert list((healthy["shared"] / "two-nodes" / "mlartifacts").rglob("config.json"))
    assert not (healthy["work"] / "runs" / "two-nodes" / "ray").exists()
    assert not (healthy["work"] / "runs" / "store").exists()


@pytest.mark.ray
def test_a_node_lost_mid_study_the_study_finishes_on_the_other_with_identical_results(cluster, healthy,
                                                                                      tmp_path_factory):
    import ray

    from study.claims import ClusterClaims, registry_for

    # A claimant on the node about to die holds a claim that nobody releases (the registry is this test's).
    # (a lease of 10 s: its holder renews every 2 s, so a loaded machine cannot make it lapse within the 3 s below)
    registry = registry_for("test-store", ttl=10.0, name="test-claims")  # noqa: F841 (owned while the test runs)
    claims = ClusterClaims("test-store", ttl=10.0, name="test-claims")

    @ray.remote(num_cpus=0, resources={"node_other": 0.01})
    class Claimant:
        def hold(self, claims, key):
            self.held = claims.claim(key)
            self.held.__enter__()
            return ray.get_runtime_context().get_node_id()

    claimant = Claimant.remote()
    assert ray.get(claimant.hold.remote(claims, "stage-x")) == cluster["ids"]["node_other"]
    with pytest.raises(Exception, match="timed out"):
        with claims.claim("stage-x", timeout=3):
            pass

    work, shared = tmp_path_factory.mktemp("launcher-kill"), tmp_path_factory.mktemp("shared-kill")
    spec = write_spec(work, {**STUDY, "name": "two-nodes-kill"})
    proc = launch(work, cluster["address"], str(spec), "--storage", shared.as_uri(), wait=False)
    store = StageStore((shared / "store").as_uri())
    # Both waits end before pytest's timeout (600 s), so a study that hangs fails with its launch log.
    deadline = time.time() + 240
    while not store.keys():  # the first stage is stored: trials are mid-study
        assert proc.poll() is None and time.time() < deadline, (work / "launch.log").read_text()[-3000:]
        time.sleep(0.2)
    kill_node(cluster["nodes"]["node_other"])
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = "still running after 300 s"
    assert code == 0, (work / "launch.log").read_text()[-3000:]

    after, before = results(work, "two-nodes-kill"), results(healthy["work"], "two-nodes")
    assert after == before and len(after["stages"]) == 10 and "loss" in after["stages"][store.keys()[0]]
    computed = assert_computed_once(work, "two-nodes-kill", store)
    assert cluster["ids"]["node_head"] in {s.data.tags["node_id"] for s in computed}
    # The dead claimant's claim lapsed with its lease.
    with claims.claim("stage-x", timeout=30):
        pass
