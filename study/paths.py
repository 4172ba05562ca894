"""Where a study keeps things: one directory per study, and a stage store shared by the studies beside it.

    <results_dir>/store/             stage store (default; any pyarrow URI via spec.store)
    <results_dir>/<name>/spec.yaml   the spec as launched (what `study resume` runs again)
    <results_dir>/<name>/mlflow.db   embedded MLflow tracking store (MLFLOW_TRACKING_URI overrides)
    <results_dir>/<name>/mlartifacts MLflow artifacts of the embedded store
    <results_dir>/<name>/optuna.db   Optuna storage of a search (optuna-dashboard opens it)
    <results_dir>/<name>/ray/        Ray Tune experiment state and Ray Train checkpoints
    <results_dir>/<name>/report/     the HTML report, table.csv, table.md
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StudyPaths:
    root: Path
    store_uri: str

    @classmethod
    def of(cls, name: str, results_dir: str | Path, store: str | None = None) -> "StudyPaths":
        results = Path(results_dir).expanduser().resolve()
        return cls(results / name, store or str(results / "store"))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        return (self.root / "mlartifacts").as_uri()

    @property
    def optuna_storage(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    @property
    def train_storage(self) -> str:
        return str(self.root / "ray" / "train")

    @property
    def report_dir(self) -> Path:
        return self.root / "report"
