"""The staged procedure: procedures as data, one training loop, the stage store, and Ray Train at the edge.

    procedure.py  stage kinds and the chains of the 7 paper models and the skip autoencoder
    keys.py       a stage's key: a hash of everything that determines its output
    store.py      content-addressed, atomic, checksummed stage entries on any pyarrow filesystem
    loop.py       one stage's training loop (plain PyTorch)
    evaluate.py   end-of-stage errors, reconstruction errors, invertibility
    chain.py      plan a chain into keys; run one planned stage into the store (no Ray)
    on_ray.py     the missing stages of a chain as Ray Train runs (the only Ray code here)
"""

from .chain import PlannedStage, plan, read_record, run_chain_locally
from .procedure import KINDS, LossConfig, OptimizerConfig, Stage, StageSettings, procedure
from .store import CorruptEntry, StageStore, StoreError

__all__ = [
    "KINDS", "CorruptEntry", "LossConfig", "OptimizerConfig", "PlannedStage", "Stage", "StageSettings", "StageStore",
    "StoreError", "plan", "procedure", "read_record", "run_chain_locally",
]
