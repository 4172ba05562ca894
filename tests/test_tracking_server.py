"""A study recorded on a real MLflow tracking server (`mlflow server --artifacts-destination`), as a team runs one.

The test starts `mlflow server` on 127.0.0.1 (a free port), launches a micro study against it with the CLI, and
reads everything back through the server only: the study -> trial -> stage lineage, an artifact downloaded through
the server's proxy, each trial's fine-tuned model as a LoggedModel that `mlflow.pytorch.load_model` serves without
the stage store, the data as a dataset input with its digest, the standard tags, opt-in system metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from study.plan import data_config
from study.spec import parse_spec
from trainables.data import build_data

from test_study import cli, free_port, tiny_spec, wait_healthy, write_spec  # tests/ is on sys.path

MICRO = tiny_spec("served", ["baseline", "sae-first"], system_metrics=True,
                  description="Does a decoding pathway help? (a micro study on a tracking server)")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def served(tmp_path_factory, fmnist_root, monkeypatch_module):
    work = tmp_path_factory.mktemp("served")
    artifacts = work / "server-artifacts"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{work / 'server.db'}", "--artifacts-destination", artifacts.as_uri()],
        cwd=work, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        spec = write_spec(work, MICRO)
        monkeypatch_module.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # samples within a short study
        monkeypatch_module.setenv("RAY_memory_monitor_refresh_ms", "0")  # no OOM kills on a machine shared by tests
        out = cli("launch", str(spec), "--tracking-uri", url, cwd=work).stdout
        yield {"work": work, "url": url, "out": out, "artifacts": artifacts}
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server's process group only
        server.wait(timeout=60)


def runs(client, exp, role):
    return client.search_runs([exp.experiment_id], f"tags.role = '{role}'", max_results=100)


@pytest.mark.ray
def test_the_study_is_recorded_on_the_server_with_its_lineage_and_proxied_artifacts(served):
    client = mlflow.MlflowClient(served["url"])
    exp = client.get_experiment_by_name("served")
    (study,) = runs(client, exp, "study")
    trials, stages = runs(client, exp, "trial"), runs(client, exp, "stage")
    assert study.info.status == "FINISHED" and len(trials) == 2
    by_id = {r.info.run_id: r for r in trials}
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == study.info.run_id
        mine = [s for s in stages if s.data.tags["mlflow.parentRunId"] == t.info.run_id]
        assert [s.data.tags["stage_key"] for s in sorted(mine, key=lambda s: t.data.tags["stage_keys"].index(
            s.data.tags["stage_key"]))] == t.data.tags["stage_keys"].split(",")
    assert all(s.data.tags["mlflow.parentRunId"] in by_id for s in stages)
    # Artifacts went through the server's proxy into its destination, none to the launcher's disk.
    stage = next(s for s in stages if s.data.tags["stage"] == "classifier")
    assert stage.info.artifact_uri.startswith("mlflow-artifacts:")
    config = json.loads(Path(client.download_artifacts(stage.info.run_id, "config.json", str(served["work"]))).read_text())
    assert config["key"] == stage.data.tags["stage_key"]
    assert not (served["work"] / "runs" / "served" / "mlartifacts").exists()
    assert list(served["artifacts"].rglob("config.json"))
    # The analysis read the server: the summary table and the report (uploaded to the study run through it).
    assert "Results of served" in served["out"] and "sae-first" in served["out"]
    assert {a.path for a in client.list_artifacts(study.info.run_id, "report")} >= {"report/report.html"}


@pytest.mark.ray
def test_each_trial_logs_its_finetuned_model_usable_without_the_store(served, monkeypatch):
    client = mlflow.MlflowClient(served["url"])
    exp = client.get_experiment_by_name("served")
    models = client.search_logged_models([exp.experiment_id])
    trials = {t.info.run_id: t for t in runs(client, exp, "trial")}
    assert sorted(m.source_run_id for m in models) == sorted(trials)
    # `models:/` URIs resolve against the tracking URI: set through the environment for this test only, so later
    # tests in this process do not talk to a server that is gone by then.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["url"])
    assert mlflow.get_tracking_uri() == served["url"]
    data = build_data(data_config(parse_spec(MICRO)), 0)
    images = torch.stack([data.val[i][0] for i in range(len(data.val))]) + torch.tensor(data.mean).view(1, -1, 1, 1)
    labels = torch.tensor([data.val[i][1] for i in range(len(data.val))])
    for m in models:
        trial = trials[m.source_run_id]
        assert {x.key for x in m.metrics} >= {"val_top1_err", "train_top1_err"}
        model = mlflow.pytorch.load_model(f"models:/{m.model_id}")
        with torch.no_grad():
            err = 100.0 * (model(images).argmax(1) != labels).float().mean().item()
        assert err == pytest.approx(trial.data.metrics["val_top1_err"], abs=1e-3), trial.data.tags["model"]


@pytest.mark.ray
def test_data_input_standard_tags_note_and_system_metrics(served):
    client = mlflow.MlflowClient(served["url"])
    exp = client.get_experiment_by_name("served")
    (study,) = runs(client, exp, "study")
    assert study.data.tags["mlflow.note.content"] == MICRO["description"]
    assert study.data.tags.get("mlflow.source.git.commit")
    assert any(k.startswith("system/") for k in study.data.metrics), study.data.metrics
    for t in runs(client, exp, "trial"):
        (entry,) = t.inputs.dataset_inputs
        assert entry.dataset.name.startswith("fashion_mnist-") and entry.dataset.name.endswith(entry.dataset.digest)
        assert t.data.tags.get("mlflow.source.git.commit")
    # Later commands find the server the study was launched with; `study ui` says where its UI is.
    out = cli("status", "served", cwd=served["work"]).stdout
    assert "2 finished" in out
    ui = cli("ui", "served", cwd=served["work"]).stdout
    assert served["url"] in ui
