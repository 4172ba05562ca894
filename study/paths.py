"""Where a study keeps things: one directory per study on the launching machine, and one storage for what every
node of a Ray cluster must reach.

On the launching machine (the head node of a cluster):

    <results_dir>/<name>/spec.yaml      the spec as launched (what `study resume` runs again)
    <results_dir>/<name>/settings.json  the storage and tracking URI it was launched with (resume, status, ui reuse them)
    <results_dir>/<name>/mlflow.db      embedded MLflow tracking store (--tracking-uri / MLFLOW_TRACKING_URI override)
    <results_dir>/<name>/optuna.db      Optuna storage of a search (optuna-dashboard opens it)
    <results_dir>/<name>/report/        the HTML report, table.csv, table.md

In the storage (`--storage`, $STUDY_STORAGE or the spec's `storage:`; default: `<results_dir>`, one machine only):

    <storage>/store/                    stage store shared by every study using this storage (or the spec's `store:`)
    <storage>/<name>/ray/tune           Ray Tune experiment state
    <storage>/<name>/ray/train          Ray Train checkpoints
    <storage>/<name>/mlartifacts        MLflow artifacts, unless a tracking server proxies them

The storage is a URI any pyarrow filesystem reaches (`s3://bucket/prefix`, `gs://...`) or a path, which on a
cluster must be a shared mount (study/cluster.py refuses a node-local one before anything starts).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

STORAGE_ENV = "STUDY_STORAGE"


def is_uri(location: str) -> bool:
    return "://" in location


def join(location: str, *parts: str) -> str:
    """`location`/parts for a local path or a URI (URIs keep their scheme and query-free '/' joins)."""
    return "/".join([location.rstrip("/"), *parts])


def is_tracking_server(tracking_uri: str) -> bool:
    """A tracking server (http/https, or Databricks) stores artifacts itself: the study gives no artifact location."""
    return tracking_uri.startswith(("http://", "https://", "databricks"))


@dataclass(frozen=True)
class StudyPaths:
    root: Path  # <results_dir>/<name> on the launching machine
    storage: str  # URI or absolute path shared by every node (the results dir by default)
    store_uri: str
    tracking: str | None = None  # tracking URI chosen at launch (None: $MLFLOW_TRACKING_URI or the embedded store)

    @classmethod
    def of(cls, name: str, results_dir: str | Path, store: str | None = None, storage: str | None = None,
           tracking_uri: str | None = None) -> "StudyPaths":
        results = Path(results_dir).expanduser().resolve()
        storage = storage or os.environ.get(STORAGE_ENV) or str(results)
        if not is_uri(storage):
            storage = str(Path(storage).expanduser().resolve())
        return cls(results / name, storage, store or join(storage, "store"), tracking_uri)

    @classmethod
    def saved(cls, name: str, results_dir: str | Path, store: str | None = None,
              tracking_uri: str | None = None) -> "StudyPaths":
        """The paths a study was launched with (its settings.json), `tracking_uri` overriding the saved one."""
        file = Path(results_dir).expanduser().resolve() / name / "settings.json"
        saved = json.loads(file.read_text()) if file.exists() else {}
        return cls.of(name, results_dir, store, saved.get("storage"), tracking_uri or saved.get("tracking_uri"))

    def save(self) -> None:
        settings = {"storage": self.storage, "tracking_uri": self.tracking}
        (self.root / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def default_storage(self) -> bool:
        """True when the storage is the results directory of the launching machine (no storage was chosen)."""
        return self.storage == str(self.root.parent)

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def tracking_uri(self) -> str:
        return self.tracking or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.embedded_db}"

    @property
    def embedded_db(self) -> Path:
        """The embedded MLflow store's file (used when no tracking URI is given)."""
        return self.root / "mlflow.db"

    def ensure_tracking_store(self) -> None:
        """Create the embedded MLflow store atomically: MLflow builds its schema in many migration steps, and a
        launcher killed between two of them would leave a database every later run refuses as out of date. So the
        schema is built in a temporary file that is renamed into place only when complete."""
        db = self.embedded_db
        if self.tracking_uri != f"sqlite:///{db}":
            return  # a server or a database the user manages
        if db.exists():
            return
        import mlflow

        tmp = db.with_name(f".mlflow.db.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        mlflow.MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # runs every migration
        os.replace(tmp, db)

    @property
    def artifact_location(self) -> str | None:
        """Where the study's experiment keeps artifacts; None when a tracking server proxies them."""
        if is_tracking_server(self.tracking_uri):
            return None
        location = join(self.storage, self.name, "mlartifacts")
        return location if is_uri(location) else Path(location).as_uri()

    @property
    def optuna_storage(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"

    @property
    def tune_storage(self) -> str:
        """Ray Tune's storage_path: the experiment lives in <tune_storage>/tune."""
        return join(self.storage, self.name, "ray")

    @property
    def train_storage(self) -> str:
        return join(self.storage, self.name, "ray", "train")

    @property
    def report_dir(self) -> Path:
        return self.root / "report"
