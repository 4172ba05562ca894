"""The shipped cluster.yaml: valid for the Ray it will run, with shared storage, and a capacity that scales out."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

from study.cluster import autoscaler_max_resources
from study.launch import concurrency
from study.paths import StudyPaths
from study.spec import load_spec

ROOT = Path(__file__).parent.parent
CONFIG = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_against_the_schema_ray_ships():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(CONFIG, schema)
    assert CONFIG["head_node_type"] in CONFIG["available_node_types"]


def test_cluster_yaml_gives_every_node_one_storage_and_a_tracking_server():
    setup = "\n".join(CONFIG["head_setup_commands"])
    assert "STUDY_STORAGE=s3://" in setup and "MLFLOW_TRACKING_URI=http://" in setup
    server = next(c for c in CONFIG["head_start_ray_commands"] if "mlflow server" in c)
    assert "--artifacts-destination s3://" in server
    profiles = {t["node_config"].get("IamInstanceProfile", {}).get("Name") for t in CONFIG["available_node_types"].values()}
    assert len(profiles) == 1 and None not in profiles  # every node reaches the bucket the same way


def test_trials_at_once_come_from_the_autoscalers_maximum_not_the_nodes_up_at_launch():
    capacity = autoscaler_max_resources(CONFIG)
    assert capacity == {"CPU": 64, "GPU": 8}
    spec = load_spec(ROOT / "studies" / "paper-imagenet.yaml")  # 8 workers x 1 GPU per trial
    assert concurrency(spec, capacity) == 1
    smaller = load_spec(ROOT / "studies" / "paper-imagenet.yaml", ["resources.workers=1"])
    assert concurrency(smaller, capacity) == 8
    assert concurrency(smaller, {"CPU": 0}) == 1  # what the head alone (CPU 0) gave before
    capped = load_spec(ROOT / "studies" / "paper-imagenet.yaml", ["resources.workers=1", "resources.max_concurrent=3"])
    assert concurrency(capped, capacity) == 3


def test_one_storage_setting_places_every_shared_thing_under_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = StudyPaths.of("s", tmp_path / "runs", storage="s3://bucket/prefix")
    assert (paths.store_uri, paths.tune_storage, paths.train_storage, paths.artifact_location) == (
        "s3://bucket/prefix/store", "s3://bucket/prefix/s/ray", "s3://bucket/prefix/s/ray/train",
        "s3://bucket/prefix/s/mlartifacts")
    assert paths.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 's' / 'mlflow.db'}"  # the records stay on the head
    served = StudyPaths.of("s", tmp_path / "runs", storage="s3://bucket/prefix", tracking_uri="http://127.0.0.1:5000")
    assert served.artifact_location is None  # the server proxies artifacts
    monkeypatch.setenv("STUDY_STORAGE", "gs://b/p")
    assert StudyPaths.of("s", tmp_path / "runs").store_uri == "gs://b/p/store"
    monkeypatch.delenv("STUDY_STORAGE")
    default = StudyPaths.of("s", tmp_path / "runs")  # the single-machine default is what it was
    assert default.default_storage and default.store_uri == str(tmp_path / "runs" / "store")
    assert default.tune_storage == str(tmp_path / "runs" / "s" / "ray")
    assert default.artifact_location == (tmp_path / "runs" / "s" / "mlartifacts").as_uri()
