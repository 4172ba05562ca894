"""Statistics over the loaded frames: pure functions of DataFrames and arrays (no MLflow, no plotting).

Conventions:
- errors are in percent, as recorded; a *difference* is `a - b` in percentage points, so a negative
  difference means model `a` has the lower error;
- confidence intervals are two-sided 95% Student-t intervals over seeds; with one seed the interval
  is NaN and `single_seed` is True: a single run has no spread to report;
- only FINISHED trials count.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.common import (
    DECODERS,
    ERROR_METRICS,
    PARAM_PREFIX,
    PLACEMENTS,
    STAGES,
    AnalysisError,
    finished,
    invert_depth,
    ordered_models,
    require_columns,
    split_model,
)

CONFIDENCE = 0.95

# --------------------------------------------------------------------------- mean and interval


class MeanCI(NamedTuple):
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float


# An error rate in percent lies in [0, 100]: its interval is cut to that range.
ERROR_RANGE = (0.0, 100.0)
UNBOUNDED = (-math.inf, math.inf)


def metric_range(metric: str) -> tuple[float, float]:
    """The range a metric's value cannot leave: [0, 100] for an error rate in percent, unbounded otherwise."""
    return ERROR_RANGE if metric in ERROR_METRICS else UNBOUNDED


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE,
            bounds: tuple[float, float] = UNBOUNDED) -> MeanCI:
    """Mean and two-sided Student-t confidence interval of the finite values; CI is NaN when n < 2.

    `bounds` is the range the quantity cannot leave (an error rate's [0, 100]): the interval is intersected with it.
    That keeps its coverage, since the true mean lies in the range, and never shows a reader an impossible value
    (a top-5 error near 0 over 3 seeds has a t interval reaching below 0).
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    low, high = bounds
    return MeanCI(n, mean, sd, max(mean - half, low), min(mean + half, high))


def _present_metrics(frame: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if m in frame.columns and frame[m].notna().any()]


def summarize(trials: pd.DataFrame, metrics: Sequence[str] = ERROR_METRICS) -> pd.DataFrame:
    """Long frame: one row per model x metric with n, mean, sd, ci_low, ci_high, single_seed."""
    columns = ["model", "metric", "n", "mean", "sd", "ci_low", "ci_high", "single_seed"]
    done = finished(trials)
    if done.empty:
        return pd.DataFrame(columns=columns)
    require_columns(done, ["model"], "trials")
    rows = []
    for model in ordered_models(done["model"]):
        group = done[done["model"] == model]
        for metric in _present_metrics(done, metrics):
            per_seed = group.groupby("seed")[metric].mean()  # a seed run twice (a search's repeat) counts once
            ci = mean_ci(per_seed, bounds=metric_range(metric))
            rows.append({"model": model, "metric": metric, **ci._asdict(), "single_seed": ci.n == 1})
    return pd.DataFrame(rows, columns=columns)


def paper_table(
    trials: pd.DataFrame, baseline: str = "baseline", metrics: Sequence[str] = ERROR_METRICS
) -> pd.DataFrame:
    """The results table: one row per model.

    Columns: `model`, `n` (distinct seeds with a finished trial; repeats on a seed are averaged), `single_seed`, then for each error metric present
    `<metric>_mean`, `<metric>_ci_low`, `<metric>_ci_high` and `<metric>_vs_baseline`
    (mean minus the baseline's mean, in points; NaN when the study has no baseline).
    """
    done = finished(trials)
    if done.empty:
        return pd.DataFrame(columns=["model", "n", "single_seed"])
    present = _present_metrics(done, metrics)
    long = summarize(done, present)
    rows = []
    for model in ordered_models(done["model"]):
        n = int(done.loc[done["model"] == model, "seed"].nunique())
        row: dict = {"model": model, "n": n, "single_seed": n == 1}
        for metric in present:
            s = long[(long["model"] == model) & (long["metric"] == metric)]
            row[f"{metric}_mean"] = float(s["mean"].iloc[0]) if len(s) else math.nan
            row[f"{metric}_ci_low"] = float(s["ci_low"].iloc[0]) if len(s) else math.nan
            row[f"{metric}_ci_high"] = float(s["ci_high"].iloc[0]) if len(s) else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    for metric in present:
        base = table.loc[table["model"] == baseline, f"{metric}_mean"]
        ref = float(base.iloc[0]) if len(base) else math.nan
        table[f"{metric}_vs_baseline"] = table[f"{metric}_mean"] - ref
    return table


def generalization_gap(trials: pd.DataFrame) -> pd.DataFrame:
    """Val minus train top-1 error per model (points): n, mean, ci_low, ci_high, single_seed."""
    columns = ["model", "n", "mean", "sd", "ci_low", "ci_high", "single_seed"]
    done = finished(trials)
    if done.empty or not {"train_top1_err", "val_top1_err"} <= set(done.columns):
        return pd.DataFrame(columns=columns)
    gap = done["val_top1_err"] - done["train_top1_err"]
    rows = []
    for model in ordered_models(done["model"]):
        ci = mean_ci(gap[done["model"] == model])
        if ci.n:
            rows.append({"model": model, **ci._asdict(), "single_seed": ci.n == 1})
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- paired comparisons
#
# The design is written down in docs/STATISTICS.md; in short: the unit of replication is the seed; each per-seed
# difference is measured on the same images for both models, and the per-image differences give its sampling
# variance v_s, a floor under the variance of the seed-mean difference; families are Holm-corrected separately,
# one metric at a time; a verdict that needs two tests needs both (an intersection-union test).

ALPHA = 0.05
POWER = 0.80

BETTER, REGULARIZES, HURTS = "better optimum", "regularizes", "hurts"
UNCLEAR, NO_EFFECT, FEW_SEEDS = "lower validation error, mechanism unclear", "no clear effect", "not enough seeds"
VERDICTS: tuple[str, ...] = (BETTER, REGULARIZES, HURTS, UNCLEAR, NO_EFFECT, FEW_SEEDS)

# Comparison kinds and the family each belongs to (each family is corrected on its own).
FAMILIES: dict[str, str] = {"vs baseline": "primary", "placement": "secondary: placement",
                            "decoder": "secondary: decoder", "custom": "custom"}  # fmt: skip

# Per-image outcome arrays (predictions.npz) behind each trial-level error metric.
IMAGE_ARRAYS: dict[str, str] = {"train_top1_err": "train_top1_wrong", "val_top1_err": "val_top1_wrong",
                                "train_top5_err": "train_top5_wrong", "val_top5_err": "val_top5_wrong"}  # fmt: skip


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values; NaN entries stay NaN and do not count towards m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


class PairedTest(NamedTuple):
    """A paired test over seeds of per-seed differences (points), with the image-sampling floor."""

    n: int  # paired seeds
    diff: float  # mean of the per-seed differences
    sd_seeds: float  # SD of the per-seed differences (NaN with one seed)
    image_var: float  # mean over seeds of the within-seed sampling variance v_s (NaN without per-image data)
    se: float  # standard error used: sqrt(max(sd_seeds^2, image_var) / n)
    df: int  # n - 1
    t: float
    p: float  # two-sided; NaN when untestable (fewer than 2 seeds, or no spread and no per-image data)
    ci_low: float
    ci_high: float
    half_width: float  # of the 95% CI
    note: str  # why there is no test, or which variance was used


def paired_test(diffs: Sequence[float], image_vars: Sequence[float] | None = None,
                confidence: float = CONFIDENCE) -> PairedTest:
    """Test that the mean per-seed difference is 0: Student t with n-1 df on SE = sqrt(max(s_d^2, mean v_s) / n).

    `image_vars` holds, per seed, the sampling variance of that seed's difference over its images
    (var of the per-image differences / number of images); the seed-mean difference cannot vary less than
    mean(v_s) / n, so identical differences on every seed do not make p = 0 when images were recorded.
    With no spread and no per-image data there is no test (p NaN). Fewer than 2 seeds: no test.
    """
    d = np.asarray([x for x in diffs if x is not None], dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    v = np.asarray([x for x in (image_vars or []) if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    image_var = float(v.mean()) if v.size and v.size == n else math.nan
    nan = math.nan
    if n == 0:
        return PairedTest(0, nan, nan, image_var, nan, 0, nan, nan, nan, nan, nan, "no paired seeds")
    mean = float(d.mean())
    if n == 1:
        return PairedTest(1, mean, nan, image_var, nan, 0, nan, nan, nan, nan, nan,
                          "one seed: a single run has no seed-to-seed spread, so no test")  # fmt: skip
    sd = float(d.std(ddof=1))
    var = max(sd**2, image_var if np.isfinite(image_var) else 0.0)
    if var <= 0.0:
        return PairedTest(n, mean, sd, image_var, 0.0, n - 1, nan, nan, nan, nan, nan,
                          "identical differences on every seed and no per-image records: untestable")  # fmt: skip
    se = math.sqrt(var / n)
    t = mean / se
    p = float(2 * sps.t.sf(abs(t), n - 1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * se
    note = "image-sampling floor" if np.isfinite(image_var) and image_var > sd**2 else "seed-to-seed spread"
    return PairedTest(n, mean, sd, image_var, se, n - 1, t, p, mean - half, mean + half, half, note)


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER, max_n: int = 1000) -> float:
    """Smallest number of paired seeds n >= 2 at which a two-sided one-sample t-test at level `alpha` detects a
    true mean difference `effect` (per-seed SD `sd`) with probability >= `power` (noncentral t).

    NaN when the effect is 0 or not finite; inf when even `max_n` seeds are not enough.
    """
    if not (np.isfinite(effect) and np.isfinite(sd)) or effect == 0 or sd <= 0:
        return math.nan
    size = abs(effect) / sd
    for n in range(2, max_n + 1):
        df = n - 1
        crit = sps.t.ppf(1 - alpha / 2, df)
        nc = size * math.sqrt(n)
        achieved = sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc)
        if achieved >= power:
            return float(n)
    return math.inf


def image_variance(a_wrong: np.ndarray, b_wrong: np.ndarray) -> float:
    """Sampling variance (points^2) of the error difference a - b measured on the same images, one pair per image."""
    a, b = np.asarray(a_wrong, dtype=float), np.asarray(b_wrong, dtype=float)
    if a.shape != b.shape or a.size < 2:
        return math.nan
    e = 100.0 * (a - b)
    return float(e.var(ddof=1) / e.size)


def _model_meta(trials: pd.DataFrame) -> dict[str, tuple[str, str]]:
    meta = {}
    for model in trials["model"].unique():
        rows = trials[trials["model"] == model]
        guess = split_model(str(model))
        decoder = rows["decoder"].dropna().iloc[0] if "decoder" in rows and rows["decoder"].notna().any() else guess[0]
        placement = (
            rows["placement"].dropna().iloc[0] if "placement" in rows and rows["placement"].notna().any() else guess[1]
        )
        meta[str(model)] = (str(decoder), str(placement))
    return meta


def default_comparisons(trials: pd.DataFrame, baseline: str = "baseline") -> list[tuple[str, str, str]]:
    """(a, b, kind) pairs, a compared against b, for the models present in `trials`.

    kind is "vs baseline" (every other model vs the baseline: the primary family), "placement" (first vs all vs
    layerwise within a decoder: all-first, layerwise-first, layerwise-all) or "decoder" (SWWAE vs SAE within a
    placement); see FAMILIES.
    """
    if trials.empty:
        return []
    meta = _model_meta(trials)
    models = ordered_models(meta)
    out: list[tuple[str, str, str]] = []
    if baseline in meta:
        out += [(m, baseline, "vs baseline") for m in models if m != baseline]
    by_dp = {v: k for k, v in meta.items()}
    for decoder in DECODERS:
        for a, b in (("all", "first"), ("layerwise", "first"), ("layerwise", "all")):
            if (decoder, a) in by_dp and (decoder, b) in by_dp:
                out.append((by_dp[(decoder, a)], by_dp[(decoder, b)], "placement"))
    for placement in PLACEMENTS:
        if ("swwae", placement) in by_dp and ("sae", placement) in by_dp:
            out.append((by_dp[("swwae", placement)], by_dp[("sae", placement)], "decoder"))
    return out


def paired(trials: pd.DataFrame, a: str, b: str, metric: str) -> pd.DataFrame:
    """Per-seed values of `metric` for models a and b on the seeds both have (duplicates averaged)."""
    cols = ["seed", "a", "b"]
    if metric not in trials.columns:
        return pd.DataFrame(columns=cols)
    sub = trials[trials["model"].isin([a, b])][["model", "seed", metric]].dropna()
    if sub.empty:
        return pd.DataFrame(columns=cols)
    wide = sub.groupby(["seed", "model"])[metric].mean().unstack("model")
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=cols)
    wide = wide[[a, b]].dropna().reset_index()
    wide.columns = cols
    return wide


def _fmt(x: float, digits: int = 2, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


ImageOutcomes = Mapping[tuple[str, object], Mapping[str, np.ndarray]]

_SHORT = {"train_top1_err": "train", "val_top1_err": "val"}
VERDICT_COLUMNS = [
    "a", "b", "family", "kind", "n_pairs", "seeds", "n_images",
    *[f"{s}_{c}" for s in ("train", "val") for c in ("a", "b", "diff", "ci_low", "ci_high", "half_width", "sd_seeds",
                                                       "image_var", "p", "p_adj")],
    "gap_diff", "gap_p", "gap_p_adj", "alpha", "verdict", "seeds_needed", "sentence",
]  # fmt: skip


def _image_vars(images: ImageOutcomes | None, a: str, b: str, seeds, metric: str) -> list[float]:
    if not images or metric not in IMAGE_ARRAYS:
        return []
    key = IMAGE_ARRAYS[metric]
    out = []
    for seed in seeds:
        ia, ib = images.get((a, seed)), images.get((b, seed))
        if ia is None or ib is None or key not in ia or key not in ib:
            return []  # a floor from some seeds only would be a different estimator: use none
        out.append(image_variance(ia[key], ib[key]))
    return out if all(np.isfinite(out)) else []


def verdicts(
    trials: pd.DataFrame,
    baseline: str = "baseline",
    comparisons: Sequence[tuple[str, str]] | Sequence[tuple[str, str, str]] | None = None,
    alpha: float = ALPHA,
    images: ImageOutcomes | None = None,
) -> pd.DataFrame:
    """Paired comparisons of train and val top-1 error, one verdict per comparison (docs/STATISTICS.md).

    For each (a, b): per seed, the differences a - b of `train_top1_err`, `val_top1_err` and of the generalization
    gap (val - train); each tested by `paired_test` over the paired seeds, with the image-sampling floor when
    `images` ({(model, seed): arrays of predictions.npz}) has both models' per-image outcomes for every seed.
    p-values are Holm-adjusted within each family (FAMILIES), one metric at a time. Then, at level `alpha`:
      "better optimum"  val and train significantly lower,
      "regularizes"     val significantly lower and train significantly higher; or val significantly lower, the
                        gap significantly smaller and the training error not lower (its difference >= 0),
      "lower validation error, mechanism unclear"  val significantly lower, otherwise,
      "hurts"           val significantly higher,
      "no clear effect" val not significant (or untestable),
      "not enough seeds" fewer than 2 paired seeds (no test; the direction is still reported).
    `seeds_needed`: paired seeds for 80% power to detect the observed val difference at the family's Bonferroni
    level alpha/m (the strictest Holm step), with the SD the test used; reported for undecided comparisons.
    """
    done = finished(trials)
    if not done.empty:
        require_columns(done, ["model", "seed"], "trials")
    comps = default_comparisons(done, baseline) if comparisons is None else list(comparisons)
    rows = []
    for comp in comps:
        a, b = str(comp[0]), str(comp[1])
        kind = comp[2] if len(comp) > 2 else ("vs baseline" if b == baseline else "custom")
        row: dict = {"a": a, "b": b, "kind": kind, "family": FAMILIES.get(kind, kind), "alpha": alpha}
        pairs = {m: paired(done, a, b, m) for m in _SHORT}
        seeds = sorted(set(pairs["train_top1_err"]["seed"]) & set(pairs["val_top1_err"]["seed"]), key=str)
        row["n_pairs"] = len(seeds)
        row["seeds"] = ",".join(map(str, seeds))
        diffs, ivars = {}, {}
        for metric, short in _SHORT.items():
            p = pairs[metric].set_index("seed").loc[seeds] if seeds else pairs[metric].iloc[:0]
            av, bv = p["a"].to_numpy(float), p["b"].to_numpy(float)
            diffs[short], ivars[short] = av - bv, _image_vars(images, a, b, seeds, metric)
            test = paired_test(diffs[short], ivars[short])
            row[f"{short}_a"] = float(av.mean()) if av.size else math.nan
            row[f"{short}_b"] = float(bv.mean()) if bv.size else math.nan
            row.update({f"{short}_{k}": getattr(test, k) for k in ("diff", "ci_low", "ci_high", "half_width",
                                                                  "sd_seeds", "image_var", "p")})  # fmt: skip
            row[f"{short}_se"], row[f"{short}_note"] = test.se, test.note
        row["n_images"] = _n_images(images, a, seeds)
        gap_vars = [x + y for x, y in zip(ivars["val"], ivars["train"])] if ivars["val"] and ivars["train"] else []
        gap = paired_test(diffs["val"] - diffs["train"] if seeds else [], gap_vars)
        row["gap_diff"], row["gap_p"] = gap.diff, gap.p
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=VERDICT_COLUMNS)
    table = pd.DataFrame(rows)
    for col in ("train_p", "val_p", "gap_p"):
        table[col + "_adj"] = math.nan
        for _, idx in table.groupby("family").groups.items():
            table.loc[idx, col + "_adj"] = holm(table.loc[idx, col].to_numpy(float))
    m_family = table.groupby("family")["val_p"].transform(lambda s: max(1, int(s.notna().sum())))
    table["verdict"] = [classify(r, alpha) for r in table.itertuples()]
    table["seeds_needed"] = [
        seeds_needed(r.val_diff, r.val_se * math.sqrt(r.n_pairs), alpha / m) if r.verdict in (NO_EFFECT,) else math.nan
        for r, m in zip(table.itertuples(), m_family)
    ]  # fmt: skip
    table["sentence"] = [_sentence(r) for r in table.itertuples()]
    return table[VERDICT_COLUMNS]


def _n_images(images: ImageOutcomes | None, model: str, seeds) -> int:
    if not images or not seeds:
        return 0
    arrays = images.get((model, seeds[0])) or {}
    return int(len(arrays.get("val_top1_wrong", [])))


def significant(diff: float, p_adj: float, alpha: float) -> int:
    """-1 significantly lower, +1 significantly higher, 0 not significant (or untestable)."""
    if not (np.isfinite(p_adj) and np.isfinite(diff)) or p_adj >= alpha or diff == 0:
        return 0
    return -1 if diff < 0 else 1


def classify(r, alpha: float = ALPHA) -> str:
    """The verdict of one row of `verdicts` (columns n_pairs, {train,val,gap}_diff, {train,val,gap}_p_adj)."""
    if r.n_pairs < 2:
        return FEW_SEEDS
    train = significant(r.train_diff, r.train_p_adj, alpha)
    val = significant(r.val_diff, r.val_p_adj, alpha)
    gap = significant(r.gap_diff, r.gap_p_adj, alpha)
    if val > 0:
        return HURTS
    if val == 0:
        return NO_EFFECT
    if train < 0:
        return BETTER
    if train > 0 or (gap < 0 and r.train_diff >= 0):
        return REGULARIZES
    return UNCLEAR


_MEANING = {
    BETTER: "lower training and validation error: it helps the classifier reach a better optimum",
    REGULARIZES: "lower validation error with a higher training error (or a smaller gap without a lower training "
    "error): it acts as a regularizer",
    UNCLEAR: "lower validation error, but the training error does not say whether by optimization or regularization",
    HURTS: "higher validation error",
    NO_EFFECT: "no difference in validation error that survives the test",
}


def _sentence(r) -> str:
    head = f"{r.a} vs {r.b}"
    if r.n_pairs < 2:
        if r.n_pairs == 0:
            return f"{head}: no seed has both models finished, so there is nothing to compare (no verdict)."
        return (
            f"{head}: only 1 paired seed, so no verdict (need at least 2). Direction only: "
            f"val top-1 {_fmt(r.val_a)}% vs {_fmt(r.val_b)}% ({_fmt(r.val_diff, signed=True)} points), "
            f"train top-1 {_fmt(r.train_a)}% vs {_fmt(r.train_b)}% ({_fmt(r.train_diff, signed=True)} points)."
        )
    floor = f", {r.n_images} val images per seed" if r.n_images else ""
    text = (
        f"{head} over {r.n_pairs} paired seeds{floor}: val top-1 {_fmt(r.val_a)}% vs {_fmt(r.val_b)}%, "
        f"difference {_fmt(r.val_diff, signed=True)} points [95% CI {_fmt(r.val_ci_low, signed=True)}, "
        f"{_fmt(r.val_ci_high, signed=True)}], adjusted p={_fmt_p(r.val_p_adj)}; "
        f"train top-1 {_fmt(r.train_a)}% vs {_fmt(r.train_b)}%, difference {_fmt(r.train_diff, signed=True)} "
        f"[{_fmt(r.train_ci_low, signed=True)}, {_fmt(r.train_ci_high, signed=True)}], "
        f"adjusted p={_fmt_p(r.train_p_adj)}. Verdict: {r.verdict} ({r.a} has {_MEANING[r.verdict]})."
    )
    if r.verdict == NO_EFFECT:
        if not np.isfinite(r.val_p):
            text += f" No test: {r.val_note}."
        else:
            bound = max(abs(r.val_ci_low), abs(r.val_ci_high))
            text += f" Any effect on val top-1 is smaller than {_fmt(bound)} points in size"
            need = r.seeds_needed
            if np.isfinite(need):
                text += (f"; {int(need)} seeds would detect a difference of the observed size "
                         f"({_fmt(r.val_diff, signed=True)}) with 80% power.")  # fmt: skip
            elif need == math.inf:
                text += "; the observed difference is too small to detect with any practical number of seeds."
            else:
                text += "."
    return text


# --------------------------------------------------------------------------- learning speed


def seed_mean_curves(curves: pd.DataFrame, stage: str, metric: str) -> pd.DataFrame:
    """Per model and step: the mean over seeds of `metric` in `stage` (columns model, step, value, n)."""
    cols = ["model", "step", "value", "n"]
    if curves.empty:
        return pd.DataFrame(columns=cols)
    sub = curves[(curves["stage"] == stage) & (curves["metric"] == metric)]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    # One value per trial and step first (a trial could log a step twice), then over seeds.
    per_trial = sub.groupby(["model", "trial_id", "step"], as_index=False)["value"].mean()
    out = per_trial.groupby(["model", "step"])["value"].agg(["mean", "count"]).reset_index()
    out.columns = cols
    return out


def gain_share_by_epoch(
    curves: pd.DataFrame, baseline: str = "baseline", k: int = 4, stage: str = "finetune"
) -> pd.DataFrame:
    """Share of the final fine-tuning val top-1 gain over the baseline reached after k epochs.

    With seed-mean fine-tuning curves of `val_top1_err`: baseline_final is the baseline's value at its
    last epoch; for each other model, final_gain = baseline_final - model(last epoch) and
    gain_at_k = baseline_final - model(epoch k); share = gain_at_k / final_gain (the paper: 1.25 of
    1.66 points, 75%, within 4 epochs). share is NaN, with a `reason`, when there is no positive gain
    or the curve is not longer than k epochs.
    """
    cols = ["model", "k", "n_seeds", "epochs", "baseline_final", "final_val", "val_at_k", "final_gain",
            "gain_at_k", "share", "reason"]  # fmt: skip
    mean = seed_mean_curves(curves, stage, "val_top1_err")
    if mean.empty:
        return pd.DataFrame(columns=cols)
    base = mean[mean["model"] == baseline].sort_values("step")
    if base.empty:
        return pd.DataFrame(columns=cols)
    baseline_final = float(base["value"].iloc[-1])
    rows = []
    for model in ordered_models(mean["model"]):
        if model == baseline:
            continue
        c = mean[mean["model"] == model].sort_values("step")
        n_seeds = int(curves[(curves["model"] == model) & (curves["stage"] == stage)]["trial_id"].nunique())
        final_val = float(c["value"].iloc[-1])
        at_k = c[c["step"] == k]
        val_k = float(at_k["value"].iloc[0]) if len(at_k) else math.nan
        final_gain = baseline_final - final_val
        gain_k = baseline_final - val_k
        reason = ""
        share = math.nan
        if not len(at_k):
            reason = f"the {stage} curve has no epoch {k} (last epoch {int(c['step'].max())})"
        elif c["step"].max() <= k:
            reason = f"{stage} ran {int(c['step'].max())} epochs: the share after {k} needs a longer run"
        elif final_gain <= 0:
            reason = f"no final gain over {baseline} ({_fmt(final_gain, signed=True)} points), so no share"
        else:
            share = gain_k / final_gain
        rows.append({
            "model": model, "k": k, "n_seeds": n_seeds, "epochs": int(c["step"].max()),
            "baseline_final": baseline_final, "final_val": final_val, "val_at_k": val_k,
            "final_gain": final_gain, "gain_at_k": gain_k, "share": share, "reason": reason,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- searches


class Sensitivity(NamedTuple):
    correlations: pd.DataFrame  # model, param, n, spearman_rho, p_value, reason
    bins: pd.DataFrame  # model, param, bin, label, low, high, n, mean, ci_low, ci_high


def param_columns(trials: pd.DataFrame) -> list[str]:
    """Names (without the `params.` prefix) of the parameter columns of a trials frame."""
    return [c[len(PARAM_PREFIX) :] for c in trials.columns if str(c).startswith(PARAM_PREFIX)]


def varying_params(trials: pd.DataFrame, exclude: Sequence[str] = ("seed", "model"), finished_only: bool = True
                   ) -> list[str]:
    """Parameters that take more than one value within at least one model (searched, not ablated), among the
    finished trials (or all trials: `finished_only=False`)."""
    done = finished(trials) if finished_only else trials
    out = []
    for name in param_columns(done):
        if name in exclude:
            continue
        col = PARAM_PREFIX + name
        if (done.groupby("model")[col].nunique(dropna=True) > 1).any():
            out.append(name)
    return out


def _param_col(trials: pd.DataFrame, name: str) -> str:
    for col in (name, PARAM_PREFIX + name):
        if col in trials.columns:
            return col
    raise AnalysisError(f"no parameter {name!r} in the trials; parameters are {param_columns(trials)}")


def sensitivity(
    trials: pd.DataFrame,
    params: Sequence[str] | None = None,
    objective: str = "val_top1_err",
    n_bins: int = 5,
) -> Sensitivity:
    """Per model and parameter: Spearman correlation with `objective`, and its mean per value bin.

    Numeric parameters with more than `n_bins` distinct values are binned by quantile; others are
    grouped by value. `params` defaults to `varying_params(trials)`; the model "(all)" pools all models.
    """
    corr_cols = ["model", "param", "n", "spearman_rho", "p_value", "reason"]
    bin_cols = ["model", "param", "bin", "label", "low", "high", "n", "mean", "ci_low", "ci_high"]
    done = finished(trials)
    if done.empty or objective not in done.columns:
        return Sensitivity(pd.DataFrame(columns=corr_cols), pd.DataFrame(columns=bin_cols))
    names = varying_params(done) if params is None else list(params)
    corr_rows, bin_rows = [], []
    groups = [(m, done[done["model"] == m]) for m in ordered_models(done["model"])]
    if len(groups) > 1:
        groups.append(("(all)", done))
    for name in names:
        col = _param_col(done, name)
        label = col[len(PARAM_PREFIX) :] if col.startswith(PARAM_PREFIX) else col
        for model, g in groups:
            g = g[[col, objective]].dropna()
            if g[col].nunique() < 2:
                continue
            x = pd.to_numeric(g[col], errors="coerce")
            numeric = x.notna().all()
            rho = p = math.nan
            reason = ""
            if not numeric:
                reason = "categorical parameter: no rank correlation"
            elif len(g) < 3:
                reason = f"only {len(g)} trials: need at least 3 for a correlation"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = sps.spearmanr(x, g[objective])
                rho, p = float(res.statistic), float(res.pvalue)
            corr_rows.append({"model": model, "param": label, "n": len(g), "spearman_rho": rho, "p_value": p,
                              "reason": reason})  # fmt: skip
            bin_rows += _bins(model, label, x if numeric else g[col], g[objective], numeric, n_bins)
    return Sensitivity(pd.DataFrame(corr_rows, columns=corr_cols), pd.DataFrame(bin_rows, columns=bin_cols))


def _bins(model, label, x: pd.Series, y: pd.Series, numeric: bool, n_bins: int) -> list[dict]:
    rows = []
    if numeric and x.nunique() > n_bins:
        cut = pd.qcut(x, n_bins, duplicates="drop")
        for i, (interval, idx) in enumerate(y.groupby(cut, observed=True).groups.items()):
            ci = mean_ci(y.loc[idx], bounds=metric_range(str(y.name)))
            rows.append({"model": model, "param": label, "bin": i, "label": f"{interval.left:.3g}–{interval.right:.3g}",
                         "low": float(interval.left), "high": float(interval.right), "n": ci.n, "mean": ci.mean,
                         "ci_low": ci.ci_low, "ci_high": ci.ci_high})  # fmt: skip
        return rows
    values = sorted(x.unique(), key=lambda v: (not numeric, v if numeric else str(v)))
    for i, v in enumerate(values):
        ci = mean_ci(y[x == v], bounds=metric_range(str(y.name)))
        low = float(v) if numeric else math.nan
        rows.append({"model": model, "param": label, "bin": i, "label": f"{v:.3g}" if numeric else str(v),
                     "low": low, "high": low, "n": ci.n, "mean": ci.mean, "ci_low": ci.ci_low,
                     "ci_high": ci.ci_high})  # fmt: skip
    return rows


def _config_columns(trials: pd.DataFrame) -> list[str]:
    """The searched parameters: those that vary within a model over all trials (stopped ones included)."""
    return [PARAM_PREFIX + name for name in varying_params(trials, finished_only=False)]


def configurations(trials: pd.DataFrame, objective: str = "val_top1_err") -> pd.DataFrame:
    """A search's results: one row per configuration (model + values of the searched parameters), not per trial.

    Columns: config (1-based, in order of first appearance), model, the searched `params.*` columns, n_seeds
    (distinct seeds with a finished trial; repeats on a seed are averaged first), seeds, n_trials (all, stopped
    included), states (e.g. "2 COMPLETE, 1 PRUNED"), `<objective>_mean`, `_ci_low`, `_ci_high`
    (Student t over the configuration's seeds only; NaN with one seed), `train_top1_err_mean` and the Optuna trial
    numbers when recorded. Trials that did not finish count in `states` only.
    """
    cols = _config_columns(trials)
    base = ["config", "model", *cols, "n_seeds", "seeds", "n_trials", "states", f"{objective}_mean", f"{objective}_ci_low",
            f"{objective}_ci_high", "train_top1_err_mean", "optuna_trials"]  # fmt: skip
    if trials.empty or objective not in trials.columns:
        return pd.DataFrame(columns=base)
    keyed = trials.assign(_key=[tuple(map(str, k)) for k in trials[["model", *cols]].itertuples(index=False)])
    rows = []
    for i, (key, g) in enumerate(keyed.groupby("_key", sort=False), start=1):
        done = finished(g)
        per_seed = done.groupby("seed")[objective].mean()  # the same configuration run twice on a seed is one seed
        ci = mean_ci(per_seed, bounds=metric_range(objective)) if len(per_seed) else \
            MeanCI(0, math.nan, math.nan, math.nan, math.nan)
        states = g["trial_state"].replace("", np.nan).fillna(g["status"]) if "trial_state" in g else g["status"]
        numbers = g["optuna_trial_number"].dropna() if "optuna_trial_number" in g else pd.Series(dtype=float)
        rows.append({
            "config": i, "model": g["model"].iloc[0], **{c: g[c].iloc[0] for c in cols}, "n_seeds": ci.n,
            "seeds": ",".join(_seed_text(x) for x in sorted(per_seed.index, key=str)), "n_trials": len(g),
            "states": ", ".join(f"{n} {s}" for s, n in states.value_counts().items()),
            f"{objective}_mean": ci.mean, f"{objective}_ci_low": ci.ci_low, f"{objective}_ci_high": ci.ci_high,
            "train_top1_err_mean": float(done["train_top1_err"].mean()) if "train_top1_err" in done and len(done)
            else math.nan,
            "optuna_trials": ",".join(str(int(n)) for n in sorted(set(numbers))),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=base)


def _seed_text(seed) -> str:
    return str(int(seed)) if isinstance(seed, (int, float, np.number)) and float(seed).is_integer() else str(seed)


def best_configuration(configs: pd.DataFrame, objective: str = "val_top1_err") -> pd.Series | None:
    """The configuration with the lowest mean objective among those with the most finished seeds (None if none)."""
    col = f"{objective}_mean"
    done = configs[configs["n_seeds"] > 0] if len(configs) else configs
    if done.empty or col not in done:
        return None
    full = done[done["n_seeds"] == done["n_seeds"].max()]
    return full.loc[full[col].idxmin()]


def best_per_model(trials: pd.DataFrame, objective: str = "val_top1_err") -> pd.DataFrame:
    """The trials of each model's best configuration (all trials when nothing is searched)."""
    cols = _config_columns(trials)
    if not cols or trials.empty:
        return trials
    keep = []
    for model in ordered_models(trials["model"]):
        mine = trials[trials["model"] == model]
        best = best_configuration(configurations(mine, objective), objective)
        if best is None:
            continue
        match = np.ones(len(mine), dtype=bool)
        for c in cols:
            if c in best.index:
                match &= (mine[c].astype(str) == str(best[c])).to_numpy()
        keep.append(mine[match])
    return pd.concat(keep) if keep else trials.iloc[:0]


IMPORTANCE_EVALUATOR = "PED-ANOVA (Optuna's default evaluator)"


class ParamImportances(NamedTuple):
    table: pd.DataFrame  # param, importance (sums to 1 over params)
    reason: str  # why the table is empty, or which evaluator produced it


def param_importances(
    optuna_storage_url: str | None, study_name: str, target_name: str | None = None
) -> ParamImportances:
    """Optuna's hyperparameter importances for `study_name`; an empty table with a reason when unavailable."""
    empty = pd.DataFrame(columns=["param", "importance"])
    if not optuna_storage_url:
        return ParamImportances(empty, "no Optuna storage given (pass --optuna-storage for searched studies)")
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is a dependency
        return ParamImportances(empty, f"optuna is not importable: {exc}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=optuna_storage_url)
    except KeyError:
        return ParamImportances(empty, f"no Optuna study named {study_name!r} in {optuna_storage_url}")
    except Exception as exc:  # storage unreachable, bad URL, ...
        return ParamImportances(empty, f"cannot open Optuna storage {optuna_storage_url}: {exc}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return ParamImportances(empty, f"Optuna study {study_name!r} has {len(complete)} complete trial(s); need 2+")
    target = None
    if len(study.directions) > 1:
        names = study.metric_names or [str(i) for i in range(len(study.directions))]
        index = names.index(target_name) if target_name in names else 0
        target = lambda t: t.values[index]  # noqa: E731
    # Optuna 5's default evaluator (what get_param_importances and plot_param_importances use) is PED-ANOVA;
    # it is passed explicitly so that the label always names what computed the numbers.
    evaluators = [(optuna.importance.PedAnovaImportanceEvaluator(), IMPORTANCE_EVALUATOR)]
    errors = []
    for evaluator, label in evaluators:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
        except Exception as exc:  # e.g. too few trials above the quantile, or all params fixed
            errors.append(f"{label}: {exc}")
            continue
        table = pd.DataFrame({"param": list(imp), "importance": [float(v) for v in imp.values()]})
        return ParamImportances(table, f"{label} importances over {len(complete)} complete Optuna trials")
    return ParamImportances(empty, "Optuna could not compute importances (" + "; ".join(errors) + ")")


# --------------------------------------------------------------------------- invertibility


def unique_stage_runs(stages: pd.DataFrame) -> pd.DataFrame:
    """One row per computed stage: a stage reused by several trials is measured once, not once per trial."""
    if stages.empty or "stage_key" not in stages.columns:
        return stages
    ordered = stages.sort_values("reused", kind="stable") if "reused" in stages else stages
    keyed = ordered[ordered["stage_key"].notna() & (ordered["stage_key"] != "")]
    unkeyed = ordered[~ordered.index.isin(keyed.index)]
    return pd.concat([keyed.drop_duplicates("stage_key"), unkeyed]).sort_index()


def invertibility(stages: pd.DataFrame, stage_images: Mapping[str, Mapping[str, np.ndarray]] | None = None
                  ) -> pd.DataFrame:
    """invert_err_pool<k> per decoder, stage and depth k: n, mean, sd, ci_low, ci_high and `over`.

    With per-image errors (`stage_images`: {stage run id: arrays of predictions.npz}) for every run of a group,
    the interval is over validation images ("images": conditional on the trained classifiers, pooled over
    seeds); otherwise over computed stages, one value each ("seeds").
    """
    cols = ["decoder", "stage", "depth", "metric", "n", "mean", "sd", "ci_low", "ci_high", "over"]
    if stages.empty:
        return pd.DataFrame(columns=cols)
    metrics = sorted((c for c in stages.columns if invert_depth(str(c)) is not None), key=invert_depth)
    if not metrics:
        return pd.DataFrame(columns=cols)
    runs = unique_stage_runs(stages)
    if "decoder" not in runs.columns:
        runs = runs.assign(decoder=[split_model(str(m))[0] for m in runs["model"]])
    images = stage_images or {}
    rows = []
    for (decoder, stage), g in runs.groupby(["decoder", "stage"], sort=False):
        for metric in metrics:
            per_image = [images.get(rid, {}).get(metric) for rid in g.loc[g[metric].notna(), "run_id"]]
            if per_image and all(a is not None for a in per_image):
                ci, over = mean_ci(np.concatenate(per_image).astype(float)), "images"
            else:
                ci, over = mean_ci(g[metric]), "seeds"
            if ci.n:
                rows.append({"decoder": decoder, "stage": stage, "depth": invert_depth(metric), "metric": metric,
                             **ci._asdict(), "over": over})  # fmt: skip
    out = pd.DataFrame(rows, columns=cols)
    if out.empty:
        return out
    return out.sort_values(["decoder", "stage", "depth"], key=_stage_decoder_key).reset_index(drop=True)


def _stage_decoder_key(col: pd.Series) -> pd.Series:
    order = {"stage": STAGES, "decoder": DECODERS}.get(str(col.name))
    if order is None:
        return col
    return col.map(lambda v: order.index(v) if v in order else len(order))
