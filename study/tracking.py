"""MLflow as a team uses it: standard tags, the data as a dataset input, each fine-tuned model as an MLflow model,
and the tracking server (`--tracking-uri http://...`) for records and artifacts.

Called by the one MLflow writer (`records.py`) in the launcher process; nothing here runs in trials.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

import mlflow
import numpy as np
import torch
from mlflow.entities import DatasetInput, InputTag
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from trainables.models.export import Classifier
from trainables.stages.chain import load_network
from trainables.stages.store import StageStore

from .paths import is_tracking_server

MODEL_NAME = "model"  # the LoggedModel's name (and its artifact path under the run)
TRAINABLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainables")


def standard_tags() -> dict[str, str]:
    """MLflow's own run context (user, source name and type, git commit of the code that runs)."""
    from mlflow.tracking.context.registry import resolve_tags

    return {k: v for k, v in resolve_tags().items() if k.startswith("mlflow.") and k != "mlflow.runName"}


def log_data_input(client: mlflow.MlflowClient, run_id: str, identity: str, settings: dict) -> None:
    """The data a run trained on, as an MLflow dataset input: name = the data identity (`<dataset>-<16 hex>`,
    what every stage key hashes), digest = its hash part, source = the settings that shaped it."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    digest = identity.rsplit("-", 1)[-1]
    source = CodeDatasetSource({k: str(v) for k, v in settings.items()})
    dataset = MetaDataset(source, name=identity, digest=digest)
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "train")])])


def log_finetuned_model(tracking_uri: str, run_id: str, store: StageStore, stage_key: str, mean: list[float]) -> str:
    """Log the stage's network as an MLflow pytorch model (a LoggedModel of the run, linked to the run's metrics at
    step 0, so log those first); loadable with `mlflow.pytorch.load_model` without the stage store, and without this
    package installed (its `trainables` code travels with the model). Returns the model id."""
    network, record = load_network(store, stage_key)
    model = Classifier(network, mean).eval()
    config = record["stage"]["model"]
    images = TensorSpec(np.dtype(np.float32), (-1, config["in_channels"], config["image_size"], config["image_size"]))
    logits = TensorSpec(np.dtype(np.float32), (-1, config["num_classes"]))
    mlflow.set_tracking_uri(tracking_uri)  # log_model resolves the store through the fluent API
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # pickle is deliberate (see serialization_format)
    client = mlflow.MlflowClient(tracking_uri)
    # Created here, in the run's experiment (log_model alone would put it in the fluent API's current experiment).
    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, MODEL_NAME, run_id,
                                        tags={"stage_key": stage_key}, params={"stage_key": stage_key})
    with tempfile.TemporaryDirectory() as tmp:
        code = shutil.copytree(TRAINABLES, os.path.join(tmp, "trainables"), ignore=shutil.ignore_patterns("__pycache__"))
        mlflow.pytorch.log_model(
            model, name=MODEL_NAME, run_id=run_id, model_id=logged.model_id, code_paths=[code],
            serialization_format="pickle",  # pt2 would fix the batch size to an example's
            signature=ModelSignature(Schema([images]), Schema([logits])),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"])  # no slow requirement inference
    return logged.model_id


def ui_command(tracking_uri: str, artifact_location: str | None, port: int) -> list[str] | None:
    """The `mlflow server` command serving the UI over a study's records, or None when a tracking server already
    serves them (its own UI is the place to look)."""
    if is_tracking_server(tracking_uri):
        return None
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if tracking_uri.startswith("sqlite:") and artifact_location:
        cmd += ["--default-artifact-root", artifact_location]
    return cmd
