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
from typing import Iterable, NamedTuple, Sequence

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

VERDICTS: tuple[str, ...] = ("better optimum", "regularizes", "hurts", "no clear effect", "not enough seeds")


# --------------------------------------------------------------------------- mean and interval


class MeanCI(NamedTuple):
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> MeanCI:
    """Mean and two-sided Student-t confidence interval of the finite values; CI is NaN when n < 2."""
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
    return MeanCI(n, mean, sd, mean - half, mean + half)


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
            ci = mean_ci(group[metric])
            rows.append({"model": model, "metric": metric, **ci._asdict(), "single_seed": ci.n == 1})
    return pd.DataFrame(rows, columns=columns)


def paper_table(
    trials: pd.DataFrame, baseline: str = "baseline", metrics: Sequence[str] = ERROR_METRICS
) -> pd.DataFrame:
    """The results table: one row per model.

    Columns: `model`, `n` (finished trials), `single_seed`, then for each error metric present
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
        n = int((done["model"] == model).sum())
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

    kind is "vs baseline" (every other model vs the baseline), "placement" (first vs all vs
    layerwise within a decoder: all-first, layerwise-first, layerwise-all) or "decoder"
    (SWWAE vs SAE within a placement).
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


def _ttest_rel(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return math.nan
    d = a - b
    if np.allclose(d, d[0], rtol=0, atol=1e-12):
        # No spread in the differences: t is infinite unless they are all zero.
        return 1.0 if abs(d[0]) < 1e-12 else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_rel(a, b).pvalue)


def _fmt(x: float, digits: int = 2, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def verdicts(
    trials: pd.DataFrame,
    baseline: str = "baseline",
    comparisons: Sequence[tuple[str, str]] | Sequence[tuple[str, str, str]] | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Paired-by-seed comparisons of train and val top-1 error, with a verdict per comparison.

    For each (a, b): the per-seed differences a - b of `train_top1_err` and `val_top1_err`, their mean
    and 95% CI, a paired t-test, Holm-corrected across every p-value of this call; then
      "better optimum"  train and val significantly lower,
      "regularizes"     val significantly lower, train not significantly lower,
      "hurts"           val significantly higher,
      "no clear effect" otherwise,
      "not enough seeds" fewer than 2 paired seeds (no test is run; the direction is still reported).
    `comparisons` defaults to `default_comparisons(trials, baseline)`.
    """
    done = finished(trials)
    if not done.empty:
        require_columns(done, ["model", "seed"], "trials")
    comps = default_comparisons(done, baseline) if comparisons is None else list(comparisons)
    rows = []
    for comp in comps:
        a, b = str(comp[0]), str(comp[1])
        kind = comp[2] if len(comp) > 2 else ("vs baseline" if b == baseline else "custom")
        row: dict = {"a": a, "b": b, "kind": kind}
        pairs = {m: paired(done, a, b, m) for m in ("train_top1_err", "val_top1_err")}
        seeds = sorted(set(pairs["train_top1_err"]["seed"]) & set(pairs["val_top1_err"]["seed"]), key=str)
        row["n_pairs"] = len(seeds)
        row["seeds"] = ",".join(map(str, seeds))
        for metric, short in (("train_top1_err", "train"), ("val_top1_err", "val")):
            p = pairs[metric]
            p = p[p["seed"].isin(seeds)]
            av, bv = p["a"].to_numpy(float), p["b"].to_numpy(float)
            ci = mean_ci(av - bv)
            row[f"{short}_a"] = float(av.mean()) if av.size else math.nan
            row[f"{short}_b"] = float(bv.mean()) if bv.size else math.nan
            row[f"{short}_diff"] = ci.mean
            row[f"{short}_ci_low"] = ci.ci_low
            row[f"{short}_ci_high"] = ci.ci_high
            row[f"{short}_p"] = _ttest_rel(av, bv)
        rows.append(row)
    columns = [
        "a", "b", "kind", "n_pairs", "seeds",
        *[f"{s}_{c}" for s in ("train", "val") for c in ("a", "b", "diff", "ci_low", "ci_high", "p", "p_holm")],
        "verdict", "sentence",
    ]  # fmt: skip
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows)
    adjusted = holm(np.concatenate([table["train_p"].to_numpy(float), table["val_p"].to_numpy(float)]))
    table["train_p_holm"] = adjusted[: len(table)]
    table["val_p_holm"] = adjusted[len(table) :]
    table["verdict"] = [_classify(r, alpha) for r in table.itertuples()]
    table["sentence"] = [_sentence(r, alpha) for r in table.itertuples()]
    return table[columns]


def significant(diff: float, p_holm: float, alpha: float) -> int:
    """-1 significantly lower, +1 significantly higher, 0 not significant (or untestable)."""
    if not (np.isfinite(p_holm) and np.isfinite(diff)) or p_holm >= alpha or diff == 0:
        return 0
    return -1 if diff < 0 else 1


def _classify(r, alpha: float) -> str:
    if r.n_pairs < 2:
        return "not enough seeds"
    train = significant(r.train_diff, r.train_p_holm, alpha)
    val = significant(r.val_diff, r.val_p_holm, alpha)
    if val > 0:
        return "hurts"
    if val < 0 and train < 0:
        return "better optimum"
    if val < 0:
        return "regularizes"
    return "no clear effect"


_MEANING = {
    "better optimum": "lower training and validation error: it helps the classifier reach a better optimum",
    "regularizes": "lower validation error without lower training error: it acts as a regularizer",
    "hurts": "higher validation error",
    "no clear effect": "no difference in validation error that survives the test",
}


def _sentence(r, alpha: float) -> str:
    head = f"{r.a} vs {r.b}"
    if r.n_pairs < 2:
        if r.n_pairs == 0:
            return f"{head}: no seed has both models finished, so there is nothing to compare (no verdict)."
        return (
            f"{head}: only 1 paired seed, so no verdict (need at least 2). Direction only: "
            f"val top-1 {_fmt(r.val_a)}% vs {_fmt(r.val_b)}% ({_fmt(r.val_diff, signed=True)} points), "
            f"train top-1 {_fmt(r.train_a)}% vs {_fmt(r.train_b)}% ({_fmt(r.train_diff, signed=True)} points)."
        )
    verdict = _classify(r, alpha)
    return (
        f"{head} over {r.n_pairs} paired seeds: val top-1 {_fmt(r.val_a)}% vs {_fmt(r.val_b)}%, "
        f"difference {_fmt(r.val_diff, signed=True)} points [95% CI {_fmt(r.val_ci_low, signed=True)}, "
        f"{_fmt(r.val_ci_high, signed=True)}], Holm p={_fmt_p(r.val_p_holm)}; "
        f"train top-1 {_fmt(r.train_a)}% vs {_fmt(r.train_b)}%, difference {_fmt(r.train_diff, signed=True)} "
        f"[{_fmt(r.train_ci_low, signed=True)}, {_fmt(r.train_ci_high, signed=True)}], "
        f"Holm p={_fmt_p(r.train_p_holm)}. Verdict: {verdict} ({r.a} has {_MEANING[verdict]})."
    )


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


def varying_params(trials: pd.DataFrame, exclude: Sequence[str] = ("seed", "model")) -> list[str]:
    """Parameters that take more than one value within at least one model (searched, not ablated)."""
    done = finished(trials)
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
            ci = mean_ci(y.loc[idx])
            rows.append({"model": model, "param": label, "bin": i, "label": f"{interval.left:.3g}–{interval.right:.3g}",
                         "low": float(interval.left), "high": float(interval.right), "n": ci.n, "mean": ci.mean,
                         "ci_low": ci.ci_low, "ci_high": ci.ci_high})  # fmt: skip
        return rows
    values = sorted(x.unique(), key=lambda v: (not numeric, v if numeric else str(v)))
    for i, v in enumerate(values):
        ci = mean_ci(y[x == v])
        low = float(v) if numeric else math.nan
        rows.append({"model": model, "param": label, "bin": i, "label": f"{v:.3g}" if numeric else str(v),
                     "low": low, "high": low, "n": ci.n, "mean": ci.mean, "ci_low": ci.ci_low,
                     "ci_high": ci.ci_high})  # fmt: skip
    return rows


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
    evaluators = [(None, "fANOVA")]
    if hasattr(optuna.importance, "PedAnovaImportanceEvaluator"):
        evaluators.append((optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"))
    errors = []
    for evaluator, label in evaluators:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
        except Exception as exc:  # e.g. fANOVA needs scikit-learn, or all params fixed
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


def invertibility(stages: pd.DataFrame) -> pd.DataFrame:
    """invert_err_pool<k> per decoder, stage and depth k: n, mean, sd, ci_low, ci_high."""
    cols = ["decoder", "stage", "depth", "metric", "n", "mean", "sd", "ci_low", "ci_high"]
    if stages.empty:
        return pd.DataFrame(columns=cols)
    metrics = sorted((c for c in stages.columns if invert_depth(str(c)) is not None), key=invert_depth)
    if not metrics:
        return pd.DataFrame(columns=cols)
    runs = unique_stage_runs(stages)
    if "decoder" not in runs.columns:
        runs = runs.assign(decoder=[split_model(str(m))[0] for m in runs["model"]])
    rows = []
    for (decoder, stage), g in runs.groupby(["decoder", "stage"], sort=False):
        for metric in metrics:
            ci = mean_ci(g[metric])
            if ci.n:
                rows.append({"decoder": decoder, "stage": stage, "depth": invert_depth(metric), "metric": metric,
                             **ci._asdict()})  # fmt: skip
    out = pd.DataFrame(rows, columns=cols)
    if out.empty:
        return out
    return out.sort_values(["decoder", "stage", "depth"], key=_stage_decoder_key).reset_index(drop=True)


def _stage_decoder_key(col: pd.Series) -> pd.Series:
    order = {"stage": STAGES, "decoder": DECODERS}.get(str(col.name))
    if order is None:
        return col
    return col.map(lambda v: order.index(v) if v in order else len(order))
