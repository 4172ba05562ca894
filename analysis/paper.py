"""The paper's results table and its claims, and a check of each claim against a study.

Source: /work/shared/PAPER.md (Zhang, Lee & Lee, ICML 2016, errors in % from the authors' slides).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.common import DECODERS, ERROR_METRICS, AnalysisError, finished, split_model
from analysis.stats import gain_share_by_epoch, holm, invertibility, significant, unique_stage_runs, verdicts

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
    """The paper's table: index `model`, columns ERROR_METRICS (percent)."""
    table = pd.DataFrame.from_dict(_PAPER_ROWS, orient="index", columns=list(ERROR_METRICS))
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


def _evidence(rows: pd.DataFrame) -> str:
    n = rows["n_pairs"]
    if (n >= 2).all():
        return f"paired t-test over {int(n.min())}-{int(n.max())} seeds, Holm-corrected" if n.nunique() > 1 else (
            f"paired t-test over {int(n.iloc[0])} seeds, Holm-corrected")  # fmt: skip
    return "direction only (fewer than 2 paired seeds: no test)"


def _direction(row, metric: str, alpha: float) -> int:
    """-1/0/+1: significant direction with 2+ seeds, the sign of the difference with 1 seed."""
    diff = getattr(row, f"{metric}_diff")
    if row.n_pairs >= 2:
        return significant(diff, getattr(row, f"{metric}_p_holm"), alpha)
    if row.n_pairs == 1 and np.isfinite(diff) and diff != 0:
        return -1 if diff < 0 else 1
    return 0


def _decide(rows: pd.DataFrame, wants: dict[str, int], alpha: float, what: Callable) -> tuple[str, str]:
    """Every comparison must go the wanted way on every metric; one going the other way contradicts."""
    support, against, unclear = [], [], []
    for r in rows.itertuples():
        dirs = {m: _direction(r, m, alpha) for m in wants}
        text = what(r)
        if any(d == -want for m, want in wants.items() if (d := dirs[m]) != 0):
            against.append(text)
        elif all(dirs[m] == want for m, want in wants.items()):
            support.append(text)
        else:
            unclear.append(text)
    if against:
        return CONTRADICTED, "goes the other way for " + "; ".join(against)
    if unclear:
        return UNDECIDED, "not significant for " + "; ".join(unclear) + (
            f" (as claimed for {'; '.join(support)})" if support else "")  # fmt: skip
    return REPRODUCED, "as claimed for " + "; ".join(support)


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
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Each claim of the paper with `status` "reproduced" / "contradicted" / "cannot decide".

    `trials_or_table` is a trials frame (from load_study) or a per-model results table (like
    `paper_results()`, taken as one seed). With fewer than 2 paired seeds a claim is decided on the
    direction of the differences only, and `evidence` says so; with 2+ seeds only differences that
    survive the paired t-test (Holm-corrected, as in `verdicts`) count. The learning-speed claim needs
    `curves`, the invertibility claims need `stages`.
    Columns: claim_id, claim, status, evidence, reason.
    """
    trials = trials_or_table if _is_trials(trials_or_table) else as_trials(trials_or_table)
    trials = finished(trials)
    table = verdicts(trials, baseline=baseline, alpha=alpha)
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

    add("gain-early", *_gain_claim(curves, baseline))
    for claim_id, result in zip(("swwae-invertible", "sae-depth"), _invert_claims(stages, alpha)):
        add(claim_id, *result)
    return pd.DataFrame(rows, columns=["claim_id", "claim", "status", "evidence", "reason"])


def _gain_claim(curves: pd.DataFrame | None, baseline: str, k: int = 4) -> tuple[str, str, str]:
    if curves is None or curves.empty:
        return UNDECIDED, "none", "needs per-epoch fine-tuning curves (val_top1_err of the finetune stages)"
    shares = gain_share_by_epoch(curves, baseline, k=k)
    shares = shares[shares["model"].isin(AUGMENTED) & shares["share"].notna()]
    if shares.empty:
        return UNDECIDED, "none", (f"no augmented model has a positive final gain over {baseline!r} and a "
                                   f"fine-tuning curve of at least {k} epochs")  # fmt: skip
    best = shares.sort_values("final_gain").iloc[-1]
    evidence = f"direction only: seed-mean curves, {int(best['n_seeds'])} seed(s), no interval on the share"
    text = (f"{best['model']} (largest final gain) reaches {best['gain_at_k']:.2f} of {best['final_gain']:.2f} "
            f"points ({best['share']:.0%}) after {k} epochs; the paper reports 75%")  # fmt: skip
    if best["share"] >= PAPER_GAIN_SHARE:
        return REPRODUCED, evidence, text
    if best["share"] < 0.5:
        return CONTRADICTED, evidence, text + "; under half the gain is early"
    return UNDECIDED, evidence, text + "; between 50% and 75%"


def _invert_claims(stages: pd.DataFrame | None, alpha: float) -> list[tuple[str, str, str]]:
    none = (UNDECIDED, "none", "needs stage runs with invert_err_pool<k> metrics of SAE and SWWAE decoders")
    if stages is None or stages.empty:
        return [none, none]
    inv = invertibility(stages)
    if inv.empty:
        return [none, none]
    # One stage per decoder: the latest one in the procedure that both decoders have.
    common = [s for s in inv["stage"].unique() if set(inv[inv["stage"] == s]["decoder"]) >= set(DECODERS)]
    runs = unique_stage_runs(stages)
    out = []
    # SWWAE below SAE at every depth.
    if not common:
        out.append((UNDECIDED, "none", "needs invertibility of both SAE and SWWAE decoders in the same stage"))
    else:
        stage = common[-1]
        sub = inv[inv["stage"] == stage]
        depths = sorted(set(sub[sub["decoder"] == "sae"]["depth"]) & set(sub[sub["decoder"] == "swwae"]["depth"]))
        tests = []
        for d in depths:
            col = f"invert_err_pool{d}"
            a = runs[(runs["decoder"] == "swwae") & (runs["stage"] == stage)][col].dropna().to_numpy(float)
            b = runs[(runs["decoder"] == "sae") & (runs["stage"] == stage)][col].dropna().to_numpy(float)
            tests.append((d, a, b))
        out.append(_directional_tests(tests, "SWWAE", "SAE", stage, alpha))
    # SAE error grows with depth: each depth vs the one below.
    sae = inv[inv["decoder"] == "sae"]
    if sae.empty or sae["depth"].nunique() < 2:
        out.append((UNDECIDED, "none", "needs SAE invertibility at 2 or more depths"))
    else:
        stage = [s for s in sae["stage"].unique()][-1]
        sruns = runs[(runs["decoder"] == "sae") & (runs["stage"] == stage)]
        depths = sorted(sae[sae["stage"] == stage]["depth"])
        tests = [(d, sruns[f"invert_err_pool{d - 1}"].dropna().to_numpy(float),
                  sruns[f"invert_err_pool{d}"].dropna().to_numpy(float)) for d in depths[1:]]  # fmt: skip
        out.append(_directional_tests(tests, "pool(k-1)", "pool(k)", stage, alpha, label="depth"))
    return out


def _welch_p(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no spread at all: the means differ or they do not
        return 1.0 if a[0] == b[0] else 0.0
    return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def _directional_tests(tests, a_name, b_name, stage, alpha, label="pool") -> tuple[str, str, str]:
    """Claim: a < b in every test. Welch t-tests with Holm when both sides have 2+ values, else direction."""
    n_min = min((min(a.size, b.size) for _, a, b in tests), default=0)
    if n_min == 0:
        return UNDECIDED, "none", f"missing values in stage {stage}"
    diffs = [float(a.mean() - b.mean()) for _, a, b in tests]
    if n_min >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = holm([_welch_p(a, b) for _, a, b in tests])
        dirs = [significant(d, pv, alpha) for d, pv in zip(diffs, p)]
        evidence = f"Welch t-test per depth over {n_min}+ stage runs each, Holm-corrected (stage {stage})"
    else:
        dirs = [0 if d == 0 else (-1 if d < 0 else 1) for d in diffs]
        evidence = f"direction only (one run per group, stage {stage})"
    parts = [f"{label}{d}: {a_name} {a.mean():.4g} vs {b_name} {b.mean():.4g}" for (d, a, b) in tests]
    text = "; ".join(parts)
    if any(x > 0 for x in dirs):
        return CONTRADICTED, evidence, "goes the other way somewhere: " + text
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


