"""Plan a chain of stages into keys, and run one planned stage from its parent's stored weights to a store entry.

Nothing here knows about Ray: `on_ray.py` calls `run_stage` inside Ray Train workers, and `run_chain_locally`
runs the same code in this process (benchmarks, debugging).

A store entry holds:
    model.pt      the model's state dict (CPU tensors)
    record.json   {"key", "parent", "seed", "data_identity", "stage": Stage.describe(), "final": {...},
                   "history": [{"epoch": e, ...metrics}], "code_version": ..., "workers": data-parallel workers,
                   "precision": fp32 | bf16}
    invert.npz    decoder stages: validation inputs and their reconstructions from every encoder depth
    predictions.npz  per-image outcomes of the final evaluation (`evaluate.evaluate_stage`); absent in entries
                  stored before it existed
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..data import DataBundle
from ..models import create_model, model_config
from ..semantics import SEMANTICS_VERSION
from .balance import start_of_finetuning
from .evaluate import evaluate_stage, topk_errors
from .keys import stage_key
from .loop import Runtime, derive_seed, make_optimizer, prepare, run_epochs, unwrap
from .lr_probe import resolve_lr
from .precision import RESOLVED
from .procedure import Stage
from .store import CorruptEntry, StageStore

MODEL_FILE, RECORD_FILE, INVERT_FILE, PREDICTIONS_FILE = "model.pt", "record.json", "invert.npz", "predictions.npz"
DECODER_KINDS = ("layerwise", "topdown", "finetune", "pretrain")


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    key: str
    parent: str | None
    precision: str = "fp32"  # resolved (precision.resolve_precision): the stage trains in it; part of its key


def plan(stages: list[Stage], data_identity: str, seed: int, precision: str = "fp32",
         semantics: int = SEMANTICS_VERSION) -> list[PlannedStage]:
    """Keys for a chain of stages, root first: each key hashes the stage and its precision, its parent's key, the
    data, the seed and the code-semantics version."""
    if precision not in RESOLVED:
        raise ValueError(f"plan: precision {precision!r} is not resolved (expected one of {', '.join(RESOLVED)})")
    planned, parent = [], None
    for stage in stages:
        key = stage_key(stage.kind, {**stage.describe(), "precision": precision}, parent, data_identity, seed, semantics)
        planned.append(PlannedStage(stage, key, parent, precision))
        parent = key
    return planned


def read_record(store: StageStore, key: str) -> dict:
    """The verified record of a stored stage (raises CorruptEntry on a checksum mismatch)."""
    with open(os.path.join(store.get(key).path, RECORD_FILE)) as f:
        return json.load(f)


def build_model(planned: PlannedStage, store: StageStore, seed: int) -> torch.nn.Module:
    """The stage's network: fresh parts seeded by the stage key, inherited parts from the parent's stored weights.

    Every parameter of the parent must exist in the child with the same shape (a child only adds decoder blocks);
    anything else means the chain is inconsistent and is an error, never a silent partial load.
    """
    torch.manual_seed(derive_seed(seed, planned.key, "init"))
    model = create_model(planned.stage.model)
    if planned.parent is not None:
        entry = store.get(planned.parent)
        state = torch.load(os.path.join(entry.path, MODEL_FILE), map_location="cpu", weights_only=True)
        own = model.state_dict()
        bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
        if bad:
            raise ValueError(f"stage {planned.key}: parent {planned.parent} has weights this model cannot take: {bad[:5]}")
        model.load_state_dict(state, strict=False)
    return model


def load_network(store: StageStore, key: str) -> tuple[torch.nn.Module, dict]:
    """A stored stage's trained network (on the CPU, in eval mode) and its verified record."""
    record = read_record(store, key)
    network = create_model(model_config(record["stage"]["model"]))
    network.load_state_dict(torch.load(os.path.join(store.get(key).path, MODEL_FILE), map_location="cpu",
                                       weights_only=True))
    return network.eval(), record


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def write_entry(directory: str, planned: PlannedStage, model, final: dict, history: list[dict], arrays: dict,
                seed: int, data_identity: str, code_version: str, workers: int = 1,
                predictions: dict | None = None) -> None:
    torch.save(model_state(model), os.path.join(directory, MODEL_FILE))
    record = {"key": planned.key, "parent": planned.parent, "seed": seed, "data_identity": data_identity,
              "stage": planned.stage.describe(), "final": final, "history": history, "code_version": code_version, "workers": workers,
              "precision": planned.precision}
    with open(os.path.join(directory, RECORD_FILE), "w") as f:
        json.dump(record, f, indent=1)
    if arrays:
        np.savez_compressed(os.path.join(directory, INVERT_FILE), **arrays)
    if predictions:
        np.savez_compressed(os.path.join(directory, PREDICTIONS_FILE), **predictions)


def run_stage(
    planned: PlannedStage,
    store: StageStore,
    data: DataBundle,
    runtime: Runtime,
    seed: int,
    *,
    resume: dict | None = None,
    on_epoch: Callable[[int, dict, Callable[[], dict]], None] = lambda epoch, metrics, state: None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    publish: bool = True,
    code_version: str = "",
) -> dict:
    """Train one planned stage and (on the publishing worker) store it; returns its final metrics.

    `resume` is a checkpoint state from `on_epoch`'s `state()`: {"epoch", "model", "optimizer", "history"}.
    `wrap` lets the caller put the prepared model under DDP. Non-publishing workers (rank > 0) train and return {}.
    """
    runtime = replace(runtime, precision=planned.precision)  # the precision its key was computed with
    model = prepare(build_model(planned, store, seed), planned.stage, runtime)
    # Settled from the starting model and the seed alone (so a resumed run settles the same): lr "auto" rates,
    # balanced loss weights; the settled stage is what trains and what the record shows.
    stage, settled = resolve_lr(model, planned.stage, data, runtime.device, seed)
    stage, start = start_of_finetuning(model, stage, data, runtime.device, seed)
    settled.update(start)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model = wrap(model)
    optimizer = make_optimizer(unwrap(model), stage)
    history: list[dict] = list(resume["history"]) if resume else []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])

    def evaluate_epoch() -> dict:
        if not publish or not stage.ce:
            return {}
        return {f"val_{k}": v for k, v in topk_errors(unwrap(model), data.val, runtime.device).items()}

    def epoch_done(epoch: int, metrics: dict) -> None:
        history.append({"epoch": epoch, **metrics})
        state = lambda: {"epoch": epoch, "model": model_state(model), "optimizer": optimizer.state_dict(),  # noqa: E731
                         "history": list(history)}
        on_epoch(epoch, metrics, state)

    run_epochs(model, stage, data, runtime, seed, optimizer=optimizer,
               start_epoch=resume["epoch"] if resume else 0, on_epoch=epoch_done, evaluate_epoch=evaluate_epoch)
    if not publish:
        return {}
    final, arrays, predictions = evaluate_stage(unwrap(model), data, runtime.device,
                                                stage.kind in DECODER_KINDS and stage.weights != ())
    final.update(settled)
    if history and stage.ce:  # each weighted term's share of the loss over the last epoch
        final.update({f"loss_share_end_{k.removeprefix('loss_share_')}": v for k, v in history[-1].items()
                      if k.startswith("loss_share_")})
    with tempfile.TemporaryDirectory() as tmp:
        write_entry(tmp, replace(planned, stage=stage), model, final, history, arrays, seed, data.identity,
                    code_version, runtime.world, predictions=predictions)
        store.put(planned.key, tmp, meta={"kind": stage.kind, "variant": stage.model.variant})
    return final


def why_recomputed(store: StageStore, chain: list[PlannedStage], data_identity: str, seed: int) -> dict[str, str]:
    """Why each stage of `chain` that is not usable from the store must be computed, by key:
    "corrupt in the store", "code semantics version changed (vA -> vB)" (the same stage is stored under an older
    version), or "not in the store". Stages usable from the store are absent. Reads, never changes, the store."""
    reasons: dict[str, str] = {}
    precision = chain[0].precision if chain else "fp32"
    older = {v: plan([p.stage for p in chain], data_identity, seed, precision, semantics=v)
             for v in range(SEMANTICS_VERSION - 1, 0, -1)}
    for i, planned in enumerate(chain):
        if store.has(planned.key):
            try:
                store.get(planned.key)
                continue
            except CorruptEntry:
                reasons[planned.key] = "corrupt in the store"
                continue
        stored_as = [v for v, old in older.items() if store.has(old[i].key)]
        reasons[planned.key] = (f"code semantics version changed (v{stored_as[0]} -> v{SEMANTICS_VERSION})"
                                if stored_as else "not in the store")
    return reasons


def missing_from(store: StageStore, chain: list[PlannedStage]) -> int:
    """Index of the first stage that must be computed (len(chain) if the last one is stored and valid).

    Only the deepest stored stage matters: everything above it was needed to make it. Entries are verified;
    a corrupt one is discarded (and will be recomputed).
    """
    for i in range(len(chain) - 1, -1, -1):
        if store.has(chain[i].key):
            try:
                store.get(chain[i].key)
            except CorruptEntry:
                store.discard(chain[i].key)
                continue
            return i + 1
    return 0


def run_chain_locally(chain: list[PlannedStage], store: StageStore, data: DataBundle, runtime: Runtime, seed: int,
                      on_epoch=lambda planned, epoch, metrics: None) -> list[bool]:
    """Compute the missing stages of a chain in this process (no Ray, no claims); returns `computed` per stage."""
    start = missing_from(store, chain)
    for planned in chain[start:]:
        run_stage(planned, store, data, runtime, seed, on_epoch=lambda e, m, s, p=planned: on_epoch(p, e, m))
    return [i >= start for i in range(len(chain))]
