"""The paper's results table and its claims, and a check of each claim against a study.

Source: /work/shared/PAPER.md (Zhang, Lee & Lee, ICML 2016, errors in % from the authors' slides).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.common import PAPER_METRICS, AnalysisError, finished, invert_depth, split_model
from analysis.stats import (
    ALPHA,
    gain_share_by_epoch,
    holm,
    paired_test,
    significant,
    unique_stage_runs,
    verdicts,
)

_PAPER_ROWS = {
    #                  train1  val1   train5 val5  val1 dense val5 dense
    "baseline":        (17.43, 29.05, 4.02, 10.07, 26.97, 8.94),
    "sae-first":       (15.36, 27.70, 3.13, 9.28, 26.09, 8.30),
    "sae-all":         (15.64, 27.54, 3.23, 9.17, 26.10, 8.21),
    "sae-layerwise":   (16.20, 27.60, 3.42, 9.19, 26.06, 8.17),
    "swwae-first":     (15.10, 27.60, 3.08, 9.23, 25.87, 8.14),
    "swwae-all":       (15.67, 27.39, 3.24, 9.06, 25.79, 8.13),
    "swwae-layerwise": (15.42, 27.53, 3.32, 9.10, 25.97, 8.20),
}  # fmt: skip

AUGMENTED = tuple(m for m in _PAPER_ROWS if m != "baseline")

# How much of the final gain the paper reached within 4 fine-tuning epochs (1.25 of 1.66 points).
PAPER_GAIN_SHARE = 0.75

CLAIMS: dict[str, str] = {
    "augmented-better": "Every augmented model has lower training and validation top-1 error than the baseline "
    "(the decoding pathways help optimization, not regularization).",
    "all-regularizes": "-all vs -first: higher training error but lower validation error (the per-level losses "
    "regularize).",
    "swwae-better": "SWWAE is slightly better than SAE (lower validation top-1 error in every placement).",
    "gain-early": "75% of the top-1 gain (1.25 of 1.66 points) is reached within the first 4 epochs of "
    "fine-tuning.",
    "swwae-invertible": "SWWAE decoders reconstruct images almost perfectly even from deep layers: their "
    "invertibility error is lower than SAE's at every depth.",
    "sae-depth": "Deeper layers reconstruct worse with SAE decoders (invertibility error grows with depth).",
}


def paper_results() -> pd.DataFrame:
    """The paper's table: index `model`, columns PAPER_METRICS (percent)."""
    table = pd.DataFrame.from_dict(_PAPER_ROWS, orient="index", columns=list(PAPER_METRICS))
    table.index.name = "model"
    return table


def as_trials(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """A per-model table (index or column `model`, metric columns) as a one-seed trials frame."""
    t = table.reset_index() if "model" not in table.columns else table.copy()
    if "model" not in t.columns:
        raise AnalysisError("a results table needs a `model` column or index")
    meta = [split_model(str(m)) for m in t["model"]]
    return t.assign(
        trial_id=[f"{m}-s{seed}" for m in t["model"]],
        decoder=[d for d, _ in meta],
        placement=[p for _, p in meta],
        seed=seed,
        status="FINISHED",
    )


def _is_trials(frame: pd.DataFrame) -> bool:
    return "seed" in frame.columns


# --------------------------------------------------------------------------- claim checks

REPRODUCED, CONTRADICTED, UNDECIDED = "reproduced", "contradicted", "cannot decide"

# Stages where the classifier is fixed and only decoders train: where the paper states its invertibility claims.
FIXED_CLASSIFIER_STAGES = ("layerwise", "topdown")


def _evidence(rows: pd.DataFrame) -> str:
    n = rows["n_pairs"]
    if (n >= 2).all():
        seeds = f"{int(n.min())}-{int(n.max())}" if n.nunique() > 1 else f"{int(n.iloc[0])}"
        family = ", ".join(sorted(set(rows["family"])))
        return f"paired test over {seeds} seeds (image-sampling floor where recorded), Holm within the {family} family"
    return "fewer than 2 paired seeds for some comparison: no test, directions only"


def _decide(rows: pd.DataFrame, wants: dict[str, int], alpha: float, what: Callable) -> tuple[str, str]:
    """Reproduced when every comparison goes the claimed way significantly on every metric; contradicted when one
    goes significantly the other way; otherwise cannot decide, with the observed directions."""
    support, against, unclear = [], [], []
    for r in rows.itertuples():
        dirs = {m: significant(getattr(r, f"{m}_diff"), getattr(r, f"{m}_p_adj"), alpha) for m in wants}
        text = what(r)
        if any(d == -want for m, want in wants.items() if (d := dirs[m]) != 0):
            against.append(text)
        elif all(dirs[m] == want for m, want in wants.items()):
            support.append(text)
        else:
            unclear.append(text)
    if against:
        return CONTRADICTED, "significantly the other way for " + "; ".join(against)
    if unclear:
        return UNDECIDED, "not significant (direction: " + "; ".join(unclear) + ")" + (
            f"; significant as claimed for {'; '.join(support)}" if support else "")  # fmt: skip
    return REPRODUCED, "significant as claimed for " + "; ".join(support)


def _pair_text(r) -> str:
    return (f"{r.a} vs {r.b}: train {r.train_diff:+.2f}, val {r.val_diff:+.2f} points")  # fmt: skip


def _val_text(r) -> str:
    return f"{r.a} vs {r.b}: val {r.val_diff:+.2f} points"


def compare_claims(
    trials_or_table: pd.DataFrame,
    baseline: str = "baseline",
    *,
    curves: pd.DataFrame | None = None,
    stages: pd.DataFrame | None = None,
    alpha: float = ALPHA,
    images=None,
    stage_images: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    verdict_table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Each claim of the paper with `status` "reproduced" / "contradicted" / "cannot decide".

    `trials_or_table` is a trials frame (from load_study) or a per-model results table (like `paper_results()`,
    taken as one seed). A claim is reproduced or contradicted only on significant tests (docs/STATISTICS.md);
    without them it "cannot decide" and `reason` gives the observed directions. The comparison claims use
    `verdicts` (with `images`, the per-image outcomes of the trials, when given, or `verdict_table` as computed
    by the caller); the learning-speed claim needs `curves`; the invertibility claims need `stages` and
    `stage_images` ({stage run id: arrays of predictions.npz}) of decoder stages on a fixed classifier.
    Columns: claim_id, claim, status, evidence, reason.
    """
    trials = trials_or_table if _is_trials(trials_or_table) else as_trials(trials_or_table)
    trials = finished(trials)
    table = verdicts(trials, baseline=baseline, alpha=alpha, images=images) if verdict_table is None else verdict_table
    rows = []

    def add(claim_id: str, status: str, evidence: str, reason: str) -> None:
        rows.append({"claim_id": claim_id, "claim": CLAIMS[claim_id], "status": status, "evidence": evidence,
                     "reason": reason})  # fmt: skip

    def from_verdicts(claim_id, sub, wants, what, missing):
        if sub.empty:
            add(claim_id, UNDECIDED, "none", missing)
            return
        status, reason = _decide(sub, wants, alpha, what)
        add(claim_id, status, _evidence(sub), reason)

    present = set(trials["model"]) if not trials.empty else set()
    aug = table[(table["kind"] == "vs baseline") & table["a"].isin(AUGMENTED)]
    from_verdicts("augmented-better", aug, {"train": -1, "val": -1}, _pair_text,
                  f"needs the baseline {baseline!r} and at least one SAE/SWWAE model; the study has "
                  f"{sorted(present) or 'no finished trials'}")  # fmt: skip
    placement = table[(table["kind"] == "placement")]
    placement = placement[[a.endswith("-all") and b.endswith("-first") for a, b in zip(placement["a"], placement["b"])]]
    from_verdicts("all-regularizes", placement, {"train": +1, "val": -1}, _pair_text,
                  "needs an -all and a -first model with the same decoder")  # fmt: skip
    dec = table[table["kind"] == "decoder"]
    from_verdicts("swwae-better", dec, {"val": -1}, _val_text,
                  "needs SAE and SWWAE models with the same placement")  # fmt: skip

    add("gain-early", *_gain_claim(curves, baseline, alpha))
    for claim_id, result in zip(("swwae-invertible", "sae-depth"), _invert_claims(stages, stage_images, alpha)):
        add(claim_id, *result)
    return pd.DataFrame(rows, columns=["claim_id", "claim", "status", "evidence", "reason"])


def _gain_claim(curves: pd.DataFrame | None, baseline: str, alpha: float, k: int = 4) -> tuple[str, str, str]:
    """Most of the final gain after k epochs: per seed x_s = gain_at_k - 0.5 * final_gain (points), t-tested over
    seeds. Reproduced when x is significantly positive and the estimated share is at least the paper's 75%;
    contradicted when x is significantly negative (under half of the gain is early)."""
    if curves is None or curves.empty:
        return UNDECIDED, "none", "needs per-epoch fine-tuning curves (val_top1_err of the finetune stages)"
    shares = gain_share_by_epoch(curves, baseline, k=k)
    shares = shares[shares["model"].isin(AUGMENTED) & shares["share"].notna()]
    if shares.empty:
        return UNDECIDED, "none", (f"no augmented model has a positive final gain over {baseline!r} and a "
                                   f"fine-tuning curve longer than {k} epochs")  # fmt: skip
    best = shares.sort_values("final_gain").iloc[-1]
    text = (f"{best['model']} (largest final gain) reaches {best['gain_at_k']:.2f} of {best['final_gain']:.2f} "
            f"points ({best['share']:.0%}) after {k} epochs; the paper reports 75%")  # fmt: skip
    x = gain_margin_per_seed(curves, best["model"], baseline, k, 0.5)
    test = paired_test(x)
    evidence = (f"t-test over {test.n} seed(s) of gain_at_{k} - 0.5 x final gain (is more than half of the gain "
                "early?), for the model with the largest gain")  # fmt: skip
    if not np.isfinite(test.p):
        return UNDECIDED, evidence, f"{text}; no test ({test.note})"
    if test.p >= alpha:
        return UNDECIDED, evidence, f"{text}; more or less than half: not significant (p={test.p:.3g})"
    if test.diff < 0:
        return CONTRADICTED, evidence, f"{text}; significantly under half of the gain is early (p={test.p:.3g})"
    if best["share"] >= PAPER_GAIN_SHARE:
        return REPRODUCED, evidence, f"{text}; significantly more than half is early (p={test.p:.3g})"
    return UNDECIDED, evidence, (f"{text}; significantly more than half is early (p={test.p:.3g}), but the "
                                 "estimate is under the paper's 75%")


def gain_margin_per_seed(curves: pd.DataFrame, model: str, baseline: str, k: int, share: float) -> np.ndarray:
    """Per seed: (baseline final - model at epoch k) - share * (baseline final - model final), fine-tuning val top-1."""
    sub = curves[(curves["stage"] == "finetune") & (curves["metric"] == "val_top1_err")]
    sub = sub.groupby(["model", "seed", "step"], as_index=False)["value"].mean()
    out = []
    for seed in sorted(set(sub[sub["model"] == model]["seed"]) & set(sub[sub["model"] == baseline]["seed"]), key=str):
        m = sub[(sub["model"] == model) & (sub["seed"] == seed)].set_index("step")["value"]
        b = sub[(sub["model"] == baseline) & (sub["seed"] == seed)].set_index("step")["value"]
        if k in m.index and len(b):
            base_final = float(b.loc[b.index.max()])
            out.append((base_final - float(m.loc[k])) - share * (base_final - float(m.loc[m.index.max()])))
    return np.asarray(out, dtype=float)


class ImagePairTest(NamedTuple):
    label: str  # what is compared, e.g. "seed 0, pool2"
    n_images: int
    diff: float  # mean per-image difference a - b
    p: float  # paired t-test over images (two-sided)


def image_paired_test(label: str, a: np.ndarray, b: np.ndarray) -> ImagePairTest:
    """Paired t-test over images of per-image errors a - b (the same images, in the same order)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size < 2:
        return ImagePairTest(label, int(min(a.size, b.size)), math.nan, math.nan)
    d = a - b
    if np.ptp(d) == 0:  # every image the same difference: exact when it is 0, otherwise no spread to test
        return ImagePairTest(label, a.size, float(d.mean()), 1.0 if d[0] == 0 else math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(sps.ttest_1samp(d, 0.0).pvalue)
    return ImagePairTest(label, a.size, float(d.mean()), p)


def _invert_claims(stages: pd.DataFrame | None, stage_images, alpha: float) -> list[tuple[str, str, str]]:
    none = (UNDECIDED, "none", "needs decoder stages on a fixed classifier (layerwise/topdown) with per-image "
            "invertibility errors (eval/predictions.npz)")
    if stages is None or stages.empty or not stage_images:
        return [none, none]
    runs = unique_stage_runs(stages)
    runs = runs[runs["stage"].isin(FIXED_CLASSIFIER_STAGES) & runs["run_id"].isin(list(stage_images))]
    if runs.empty:
        return [none, none]
    if "decoder" not in runs.columns or runs["decoder"].isna().any():
        runs = runs.assign(decoder=[split_model(str(m))[0] for m in runs["model"]])
    stage = "layerwise" if "layerwise" in set(runs["stage"]) else FIXED_CLASSIFIER_STAGES[-1]
    runs = runs[runs["stage"] == stage]
    arrays = {(r.decoder, r.seed): stage_images[r.run_id] for r in runs.itertuples()}
    out = []
    # SWWAE below SAE at every depth, per seed (each seed's classifier fixed), paired per image.
    tests = []
    for (decoder, seed), sw in sorted(arrays.items(), key=lambda kv: str(kv[0])):
        sae = arrays.get(("sae", seed))
        if decoder != "swwae" or sae is None:
            continue
        for depth in _depths(sw) & _depths(sae):
            key = f"invert_err_pool{depth}"
            tests.append(image_paired_test(f"seed {seed}, pool{depth}: SWWAE - SAE", sw[key], sae[key]))
    out.append(_image_claim(tests, stage, alpha) if tests else (
        UNDECIDED, "none", f"needs SAE and SWWAE decoders of the same seed in stage {stage}"))  # fmt: skip
    # SAE error grows with depth: pool(k-1) below pool(k), per seed.
    tests = []
    for (decoder, seed), sae in sorted(arrays.items(), key=lambda kv: str(kv[0])):
        depths = sorted(_depths(sae)) if decoder == "sae" else []
        tests += [image_paired_test(f"seed {seed}: pool{d - 1} - pool{d}", sae[f"invert_err_pool{d - 1}"],
                                    sae[f"invert_err_pool{d}"]) for d in depths[1:]]  # fmt: skip
    out.append(_image_claim(tests, stage, alpha) if tests else (
        UNDECIDED, "none", f"needs SAE invertibility at 2 or more depths in stage {stage}"))  # fmt: skip
    return out


def _depths(arrays: Mapping[str, np.ndarray]) -> set[int]:
    return {d for name in arrays if (d := invert_depth(name)) is not None}


def _image_claim(tests: list[ImagePairTest], stage: str, alpha: float) -> tuple[str, str, str]:
    """Claim: a < b in every test. Holm over the tests; reproduced when all are significantly negative."""
    p = holm([t.p for t in tests])
    dirs = [significant(t.diff, pv, alpha) for t, pv in zip(tests, p)]
    n_img = min(t.n_images for t in tests)
    evidence = (f"paired t-test over {n_img}+ validation images per test, conditional on each seed's fixed "
                f"classifier (stage {stage}), Holm over the {len(tests)} tests")  # fmt: skip
    text = "; ".join(f"{t.label} {t.diff:+.3g} (adj. p={pv:.2g})" for t, pv in zip(tests, p))
    if any(x > 0 for x in dirs):
        return CONTRADICTED, evidence, "significantly the other way somewhere: " + text
    if all(x < 0 for x in dirs):
        return REPRODUCED, evidence, text
    return UNDECIDED, evidence, "not significant everywhere: " + text


def paper_vs_ours(ours: pd.DataFrame) -> pd.DataFrame:
    """Side by side: per model, our mean and the paper's value for top-1 errors (ours from `paper_table`)."""
    paper = paper_results()
    rows = []
    for model in ours["model"] if "model" in ours else []:
        row = {"model": model}
        for metric in ("train_top1_err", "val_top1_err"):
            row[f"{metric} (ours)"] = ours.loc[ours["model"] == model, f"{metric}_mean"].iloc[0] if (
                f"{metric}_mean" in ours) else math.nan  # fmt: skip
            row[f"{metric} (paper)"] = paper.loc[model, metric] if model in paper.index else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


