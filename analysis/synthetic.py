"""Write a synthetic study into MLflow exactly as docs/RECORDS.md describes, with numbers you choose.

For tests and for trying the report without training anything (`python -m analysis demo`).
It writes through the plain MlflowClient, the same records the study runner writes.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis.common import AnalysisError, split_model

FINAL_METRICS = ("train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err",
                 "val_top1_err_dense", "val_top5_err_dense")  # fmt: skip


def stages_of(model: str) -> list[str]:
    """The stages a model runs, in order (docs: PAPER.md's staged procedure)."""
    decoder, placement = split_model(model)
    if model == "skipae":
        return ["pretrain", "finetune"]
    if decoder in ("none", "skip"):
        return ["classifier", "finetune"]
    if placement == "layerwise":
        return ["classifier", "layerwise", "finetune"]
    return ["classifier", "layerwise", "topdown", "finetune"]


def rec_levels(model: str, depth: int) -> list[str]:
    """Levels that carry a reconstruction loss for this model."""
    decoder, placement = split_model(model)
    if decoder in ("none",):
        return []
    if decoder == "skip" or placement == "first":
        return ["image"]
    return ["image"] + [f"pool{k}" for k in range(1, depth)]


def default_invert(decoder: str, depth: int) -> dict[int, float]:
    """Invertibility errors shaped like the paper's claim: SWWAE nearly perfect, SAE worse with depth."""
    if decoder == "swwae":
        return {k: 0.002 * k for k in range(1, depth + 1)}
    return {k: 0.01 * k * k for k in range(1, depth + 1)}


def default_curve(final: float, epochs: int, start_offset: float = 3.0, rate: float = 0.5) -> list[float]:
    """A val error curve falling geometrically from final+start_offset to exactly `final` at the last epoch."""
    if epochs == 1:
        return [final]
    decay = [rate ** (e - 1) for e in range(1, epochs + 1)]
    return [final + start_offset * (d - decay[-1]) / (decay[0] - decay[-1]) for d in decay]


def _artifact_location(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def _recon_arrays(decoder: str, depth: int, seed: int, n: int = 6, channels: int = 1, hw: int = 16):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:hw, 0:hw] / hw
    base = np.stack([np.sin(6 * xx * (i + 1)) * np.cos(4 * yy + i) for i in range(n)])[:, None]
    x = (np.repeat(base, channels, axis=1) + 0.1 * rng.standard_normal((n, channels, hw, hw))).astype(np.float32)
    out = {"input": x}
    for k in range(1, depth + 1):
        if decoder == "swwae":
            noise = 0.05 * k
            blur = x
        else:  # SAE: lose "where" -> blocky, blurred reconstructions, worse with depth
            f = 2**k
            blur = np.repeat(np.repeat(x[:, :, ::f, ::f], f, axis=2), f, axis=3)[:, :, :hw, :hw]
            noise = 0.1 * k
        out[f"from_pool{k}"] = (blur + noise * rng.standard_normal(x.shape)).astype(np.float32)
    return out


def _png_rows(arrays: Mapping[str, np.ndarray]) -> bytes | None:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return None
    rows = []
    for name in ["input"] + sorted((k for k in arrays if k.startswith("from_pool")), key=lambda s: int(s[9:])):
        a = arrays[name][:, 0]
        a = (a - a.min(axis=(1, 2), keepdims=True)) / (np.ptp(a, axis=(1, 2), keepdims=True) + 1e-8)
        rows.append(np.concatenate(list(a), axis=1))
    buf = io.BytesIO()
    Image.fromarray((np.concatenate(rows, axis=0) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_study(
    tracking_uri: str,
    study: str,
    trials: Sequence[Mapping],
    *,
    epochs: int = 6,
    depth: int = 3,
    params: Mapping[str, object] | None = None,
    artifacts: bool = True,
    curve: Callable[[Mapping, int], list[float]] | None = None,
) -> str:
    """Write `study` and return the study run's id.

    Each trial mapping has `model`, `seed`, the final metrics it should report (any of FINAL_METRICS)
    and optionally: `trial_id`, `status` ("FINISHED"/"FAILED"), `params` (extra hyperparameters),
    `val_curve` (the fine-tuning val_top1_err per epoch; it should end at val_top1_err), `invert`
    ({k: invert_err_pool<k>}), `loss_curve`, `predictions` (arrays of the final stage's eval/predictions.npz)
    and `stage_predictions` ({stage: arrays}, for the stages this trial computes). Stages that several trials share (same seed, same
    upstream recipe) are written as reused runs with the same stage_key, as the stage store would.
    """
    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name(study) is not None:
        raise AnalysisError(f"study {study!r} already exists in {tracking_uri}; write synthetic studies to a fresh store")
    exp_id = client.create_experiment(study, artifact_location=_artifact_location(tracking_uri))
    now = int(time.time() * 1000)
    study_params = {"name": study, "epochs": epochs, **(params or {})}
    study_run = client.create_run(exp_id, tags={"role": "study"}, run_name=study, start_time=now)
    sid = study_run.info.run_id
    client.log_batch(sid, params=[Param(k, str(v)) for k, v in study_params.items()])
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(f"name: {study}\nepochs: {epochs}\n")
        if artifacts:
            client.log_artifact(sid, str(spec))
        computed: dict[str, list] = {}
        for i, trial in enumerate(trials):
            _write_trial(client, exp_id, sid, trial, i, epochs, depth, computed, artifacts, curve, Path(tmp))
    client.set_terminated(sid, "FINISHED")
    return sid


def _stage_key(model: str, seed, stage: str) -> str:
    decoder, placement = split_model(model)
    if stage == "classifier":
        return f"classifier-s{seed}"
    if stage == "layerwise":
        return f"{decoder}-layerwise-s{seed}"
    if stage == "topdown":
        return f"{decoder}-{placement}-topdown-s{seed}"
    return f"{model}-{stage}-s{seed}"


def _write_trial(client, exp_id, study_id, trial, index, epochs, depth, computed, artifacts, curve, tmp: Path):
    model, seed = str(trial["model"]), trial["seed"]
    decoder, placement = split_model(model)
    trial_id = str(trial.get("trial_id", f"{model}-s{seed}"))
    status = trial.get("status", "FINISHED")
    stages = stages_of(model)
    keys = [_stage_key(model, seed, s) for s in stages]
    t0 = int(time.time() * 1000) + index
    run = client.create_run(
        exp_id,
        start_time=t0,
        run_name=trial_id,
        tags={"mlflow.parentRunId": study_id, "role": "trial", "trial_id": trial_id, "model": model,
              "decoder": decoder, "placement": placement, "seed": str(seed), "stage_keys": ",".join(keys),
              "status_detail": trial.get("status_detail", "" if status == "FINISHED" else "synthetic failure")},
    )  # fmt: skip
    rid = run.info.run_id
    hyper = {"model": model, "seed": seed, "loss.weights.image": 0.0 if decoder == "none" else 1e-4,
             "stages.finetune.lr": 1e-3, "stages.finetune.epochs": epochs, **trial.get("params", {})}  # fmt: skip
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in hyper.items()])
    final = {k: float(trial[k]) for k in FINAL_METRICS if k in trial and trial[k] is not None}
    if status != "FINISHED":
        # A failed trial may have run some stages; here it fails in its first stage and reports nothing.
        client.set_terminated(rid, "FAILED")
        return
    for stage, key in zip(stages, keys):
        is_last = stage == stages[-1]
        reused = key in computed
        _write_stage(client, exp_id, rid, trial, stage, key, reused, is_last, final, epochs, depth, artifacts,
                     curve, tmp, computed)  # fmt: skip
    ts = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in final.items()])
    client.set_terminated(rid, "FINISHED")


def _write_stage(client, exp_id, trial_rid, trial, stage, key, reused, is_last, final, epochs, depth, artifacts,
                 curve, tmp: Path, computed: dict):  # fmt: skip
    model, seed = str(trial["model"]), trial["seed"]
    decoder, _ = split_model(model)
    run = client.create_run(
        exp_id,
        run_name=f"{trial.get('trial_id', model)}-{stage}",
        tags={"mlflow.parentRunId": trial_rid, "role": "stage", "stage": stage, "stage_key": key,
              "reused": "true" if reused else "false", "model": model, "seed": str(seed)},
    )  # fmt: skip
    rid = run.info.run_id
    ts = int(time.time() * 1000)
    seed_int = int(seed) if str(seed).lstrip("-").isdigit() else abs(hash(seed)) % 1000
    val_final = final.get("val_top1_err", 30.0)
    if is_last:
        val = list(trial.get("val_curve") or (curve(trial, epochs) if curve else default_curve(val_final, epochs)))
        ends = dict(final)
    else:
        # Upstream stages: the classifier before fine-tuning (decoder-only stages keep it fixed).
        start = val_final + 3.0
        val = [start + 1.0 * (epochs - e) / epochs if stage in ("classifier", "pretrain") else start
               for e in range(1, epochs + 1)]  # fmt: skip
        ends = {"train_top1_err": start - 10, "train_top5_err": (start - 10) / 4,
                "val_top1_err": val[-1], "val_top5_err": val[-1] / 3}  # fmt: skip
    n_ep = len(val)
    levels = rec_levels(model, depth) if stage != "classifier" else []
    loss = list(trial.get("loss_curve") or [2.0 * 0.8 ** (e - 1) + 0.01 * seed_int for e in range(1, n_ep + 1)])
    metrics = []
    for e in range(1, n_ep + 1):
        rec = {f"loss_rec_{lvl}": 0.5 * 0.7 ** (e - 1) / (j + 1) for j, lvl in enumerate(levels)}
        ce = loss[e - 1] - sum(rec.values()) * 1e-4
        per_epoch = {"loss": loss[e - 1], "loss_ce": ce, "val_top1_err": val[e - 1],
                     "val_top5_err": ends.get("val_top5_err", val[e - 1] / 3) + (val[e - 1] - val[-1]) / 3, **rec}  # fmt: skip
        metrics += [Metric(k, float(v), ts + e, e) for k, v in per_epoch.items()]
    last = {k: v for k, v in ends.items() if k not in ("val_top1_err", "val_top5_err")}
    last.update({f"rec_err_{lvl}": 0.02 * (j + 1) for j, lvl in enumerate(levels)})
    has_decoder = decoder in ("sae", "swwae") and stage in ("layerwise", "topdown", "finetune")
    if has_decoder:
        invert = trial.get("invert") or default_invert(decoder, depth)
        last.update({f"invert_err_pool{k}": float(v) for k, v in invert.items()})
    metrics += [Metric(k, float(v), ts + n_ep, n_ep) for k, v in last.items()]
    # A reused stage reports what the stage store holds: the metrics of the run that computed it.
    metrics = computed.setdefault(key, metrics) if not is_last else metrics
    predictions = trial.get("predictions") if is_last else (trial.get("stage_predictions") or {}).get(stage)
    if predictions is not None and not reused:
        path = tmp / "predictions.npz"
        np.savez_compressed(path, **predictions)
        client.log_artifact(rid, str(path), artifact_path="eval")
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i : i + 900])
    if artifacts:
        cfg = tmp / "config.json"
        cfg.write_text(json.dumps({"stage": stage, "model": model, "seed": seed, "epochs": epochs}))
        client.log_artifact(rid, str(cfg))
        if has_decoder:
            arrays = _recon_arrays(decoder, depth, seed_int)
            recon = tmp / "recon"
            recon.mkdir(exist_ok=True)
            np.savez(recon / "invert.npz", **arrays)
            png = _png_rows(arrays)
            if png:
                (recon / "invert.png").write_bytes(png)
            client.log_artifacts(rid, str(recon), artifact_path="recon")
            for f in recon.iterdir():
                f.unlink()
    client.set_terminated(rid, "FINISHED")


def image_outcomes(errors: Mapping[str, float], n_images: int, rng: np.random.Generator,
                   spread: float = 0.05) -> dict[str, np.ndarray]:
    """Per-image 0/1 outcomes of several models on the same images, each wrong on exactly round(err% * n) images.

    Images have a shared difficulty (uniform) plus a model's own noise (`spread`): the models mostly fail on the
    same hard images, as trained classifiers do, and disagree on some.
    """
    difficulty = rng.uniform(size=n_images)
    out = {}
    for model, err in errors.items():
        score = difficulty + spread * rng.standard_normal(n_images)
        wrong = np.zeros(n_images, dtype=np.uint8)
        wrong[np.argsort(-score)[: round(err * n_images / 100)]] = 1
        out[model] = wrong
    return out


def demo_trials(seeds: Sequence[int] = (0, 1, 2), n_images: int = 10000) -> list[dict]:
    """The paper's table plus seed-to-seed noise: a plausible study to try the report on.

    Each trial carries per-image outcomes (`predictions`) on `n_images` validation and training images, its
    errors rounded to what those images can show, and each decoder's layerwise stage per-image invertibility
    errors (`stage_predictions`)."""
    from analysis.paper import paper_results

    table = paper_results()
    rng = np.random.default_rng(0)
    out = []
    for seed in seeds:
        shift = rng.normal(0, 0.15)
        rows = {}
        for model, row in table.iterrows():
            noise = rng.normal(0, 0.05, size=len(row))
            rows[model] = {k: float(v) + shift + n for (k, v), n in zip(row.items(), noise) if not math.isnan(v)}
        outcomes = {split: image_outcomes({m: r[f"{split}_top1_err"] for m, r in rows.items()}, n_images, rng)
                    for split in ("train", "val")}  # fmt: skip
        for model, vals in rows.items():
            preds = {f"{split}_top1_wrong": outcomes[split][model] for split in outcomes}
            vals.update({f"{split}_top1_err": 100.0 * float(preds[f"{split}_top1_wrong"].mean()) for split in outcomes})
            trial = {"model": model, "seed": seed, **vals, "predictions": preds}
            decoder, placement = split_model(model)
            if decoder in ("sae", "swwae") and placement == "first":  # computes the decoder's layerwise stage
                trial["stage_predictions"] = {"layerwise": {
                    f"invert_err_pool{k}": (v * rng.lognormal(0, 0.3, 500)).astype(np.float16)
                    for k, v in default_invert(decoder, 3).items()}}  # fmt: skip
            out.append(trial)
    return out
