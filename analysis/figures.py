"""Report figures, each split into data and picture.

`*_data()` is a pure function of the loaded frames (tested on its own); `*_figure()` only draws what it
is given. An empty input gives a figure carrying a clear message, never an exception.
"""

from __future__ import annotations

import textwrap
import warnings
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.common import METRIC_LABELS, STAGES, finished, ordered_models, split_model
from analysis.stats import (
    ParamImportances,
    Sensitivity,
    generalization_gap,
    invertibility,
    mean_ci,
    metric_range,
)

HEIGHT = 440
FONT = dict(family="Helvetica, Arial, sans-serif", size=13)

_DECODER_COLORS = {"none": "#444444", "sae": "#1f77b4", "swwae": "#d62728", "skip": "#2ca02c"}
_MODEL_COLORS = {
    "baseline": "#444444",
    "sae-first": "#9ecae1",
    "sae-all": "#3182bd",
    "sae-layerwise": "#08306b",
    "swwae-first": "#fcae91",
    "swwae-all": "#e6550d",
    "swwae-layerwise": "#a50f15",
    "skipae": "#31a354",
    "skipae-scratch": "#a1d99b",
}
_EXTRA = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_DASH = {"first": "dot", "all": "solid", "layerwise": "dash", "none": "solid"}


def model_color(model: str) -> str:
    if model in _MODEL_COLORS:
        return _MODEL_COLORS[model]
    return _EXTRA[sum(map(ord, str(model))) % len(_EXTRA)]


def _layout(fig: go.Figure, title: str, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left"),
        template="plotly_white",
        font=FONT,
        height=height,
        margin=dict(l=70, r=30, t=70, b=60),
        legend=dict(orientation="v", yanchor="top", y=1, x=1.02),
    )
    return fig


def empty_figure(title: str, message: str, height: int = 260) -> go.Figure:
    """A figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text="<br>".join(textwrap.wrap(message, 100)), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=15, color="#666666"))  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


# --------------------------------------------------------------------------- train vs val scatter


class ScatterData(NamedTuple):
    x_metric: str
    y_metric: str
    points: pd.DataFrame  # model, seed, trial_id, x, y
    summary: pd.DataFrame  # model, n, x_mean, x_ci_low, x_ci_high, y_mean, y_ci_low, y_ci_high


def error_scatter_data(
    trials: pd.DataFrame, x_metric: str = "train_top1_err", y_metric: str = "val_top1_err"
) -> ScatterData:
    pcols = ["model", "seed", "trial_id", "x", "y"]
    scols = ["model", "n", "x_mean", "x_ci_low", "x_ci_high", "y_mean", "y_ci_low", "y_ci_high"]
    done = finished(trials)
    if done.empty or not {x_metric, y_metric} <= set(done.columns):
        return ScatterData(x_metric, y_metric, pd.DataFrame(columns=pcols), pd.DataFrame(columns=scols))
    pts = done[["model", "seed", "trial_id", x_metric, y_metric]].dropna()
    pts = pts.rename(columns={x_metric: "x", y_metric: "y"}).reset_index(drop=True)
    rows = []
    for model in ordered_models(pts["model"]):
        g = pts[pts["model"] == model]
        cx = mean_ci(g["x"], bounds=metric_range(x_metric))
        cy = mean_ci(g["y"], bounds=metric_range(y_metric))
        rows.append({"model": model, "n": cx.n, "x_mean": cx.mean, "x_ci_low": cx.ci_low, "x_ci_high": cx.ci_high,
                     "y_mean": cy.mean, "y_ci_low": cy.ci_low, "y_ci_high": cy.ci_high})  # fmt: skip
    return ScatterData(x_metric, y_metric, pts, pd.DataFrame(rows, columns=scols))


def error_scatter_figure(data: ScatterData, baseline: str = "baseline") -> go.Figure:
    title = f"{_label(data.y_metric)} vs {_label(data.x_metric)}: seeds (small) and mean ± 95% CI"
    if data.points.empty:
        return empty_figure(title, "no finished trials with train and val errors yet")
    fig = go.Figure()
    for row in data.summary.itertuples():
        color = model_color(row.model)
        pts = data.points[data.points["model"] == row.model]
        fig.add_trace(go.Scatter(
            x=pts["x"], y=pts["y"], mode="markers", legendgroup=row.model, showlegend=False,
            marker=dict(color=color, size=7, opacity=0.45), name=row.model,
            text=[f"{row.model} seed {s}" for s in pts["seed"]], hoverinfo="text+x+y",
        ))  # fmt: skip
        err = {}
        if row.n > 1:
            err = dict(
                error_x=dict(type="data", symmetric=False, array=[row.x_ci_high - row.x_mean],
                             arrayminus=[row.x_mean - row.x_ci_low], color=color),
                error_y=dict(type="data", symmetric=False, array=[row.y_ci_high - row.y_mean],
                             arrayminus=[row.y_mean - row.y_ci_low], color=color),
            )  # fmt: skip
        fig.add_trace(go.Scatter(
            x=[row.x_mean], y=[row.y_mean], mode="markers", legendgroup=row.model, name=f"{row.model} (n={row.n})",
            marker=dict(color=color, size=13, symbol="diamond", line=dict(color="white", width=1)), **err,
        ))  # fmt: skip
    xs = pd.concat([data.points["x"], data.summary["x_ci_low"], data.summary["x_ci_high"]]).dropna()
    ys = pd.concat([data.points["y"], data.summary["y_ci_low"], data.summary["y_ci_high"]]).dropna()
    xpad = max((xs.max() - xs.min()) * 0.08, 0.1)
    ypad = max((ys.max() - ys.min()) * 0.08, 0.1)
    xr = [xs.min() - xpad, xs.max() + xpad]
    yr = [ys.min() - ypad, ys.max() + ypad]
    # Diagonal references: y = x, and the baseline's generalization gap (same slope through its mean).
    lines = []
    if xr[0] < yr[1] and yr[0] < xr[1]:  # y = x crosses the plotted area
        lines.append((0.0, "y = x", "#bbbbbb"))
    base = data.summary[data.summary["model"] == baseline]
    if len(base):
        lines.append((float(base["y_mean"].iloc[0] - base["x_mean"].iloc[0]), f"{baseline}'s gap (slope 1)", "#888888"))
    for offset, name, color in lines:
        fig.add_trace(go.Scatter(x=xr, y=[xr[0] + offset, xr[1] + offset], mode="lines", name=name,
                                 line=dict(color=color, dash="dash", width=1), hoverinfo="skip"))  # fmt: skip
    fig.update_xaxes(title=_label(data.x_metric), range=xr, zeroline=False)
    fig.update_yaxes(title=_label(data.y_metric), range=yr, zeroline=False)
    return _layout(fig, title, 520)


# --------------------------------------------------------------------------- generalization gap


def generalization_gap_data(trials: pd.DataFrame) -> pd.DataFrame:
    """Per model: val − train top-1 error (points), mean and 95% CI over seeds."""
    return generalization_gap(trials)


def generalization_gap_figure(data: pd.DataFrame) -> go.Figure:
    title = "Generalization gap: val − train top-1 error (points), mean ± 95% CI"
    if data.empty:
        return empty_figure(title, "no finished trials with train and val top-1 errors yet")
    hi = (data["ci_high"] - data["mean"]).fillna(0)
    lo = (data["mean"] - data["ci_low"]).fillna(0)
    fig = go.Figure(go.Bar(
        x=data["model"], y=data["mean"], marker_color=[model_color(m) for m in data["model"]],
        error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo, color="#333333"),
        text=[f"n={n}" for n in data["n"]], textposition="inside", insidetextanchor="start",
        textfont=dict(color="white"), hovertemplate="%{x}: %{y:.2f} points<extra></extra>",
    ))  # fmt: skip
    fig.update_yaxes(title="val − train top-1 (points)")
    fig.update_xaxes(tickangle=-30)
    return _layout(fig, title)


# --------------------------------------------------------------------------- learning curves


class CurvesData(NamedTuple):
    stage: str
    metrics: tuple[str, ...]
    lines: pd.DataFrame  # model, metric, step, n, mean, ci_low, ci_high


def learning_curves_data(
    curves: pd.DataFrame, stage: str, metrics: Sequence[str] = ("val_top1_err", "loss")
) -> CurvesData:
    """Per model, metric and epoch: the mean (and 95% CI) over seeds of a stage's per-epoch metric."""
    cols = ["model", "metric", "step", "n", "mean", "ci_low", "ci_high"]
    if curves.empty:
        return CurvesData(stage, tuple(metrics), pd.DataFrame(columns=cols))
    sub = curves[(curves["stage"] == stage) & curves["metric"].isin(metrics)]
    per_trial = sub.groupby(["model", "metric", "trial_id", "step"], as_index=False)["value"].mean()
    rows = []
    for (model, metric, step), g in per_trial.groupby(["model", "metric", "step"]):
        ci = mean_ci(g["value"], bounds=metric_range(metric))
        rows.append({"model": model, "metric": metric, "step": int(step), "n": ci.n, "mean": ci.mean,
                     "ci_low": ci.ci_low, "ci_high": ci.ci_high})  # fmt: skip
    lines = pd.DataFrame(rows, columns=cols)
    if not lines.empty:
        order = {m: i for i, m in enumerate(ordered_models(lines["model"]))}
        lines = lines.sort_values(["model", "metric", "step"], key=lambda c: c.map(order) if c.name == "model" else c)
    return CurvesData(stage, tuple(metrics), lines.reset_index(drop=True))


def learning_curves_figure(data: CurvesData) -> go.Figure:
    title = f"Learning curves, stage {data.stage}: mean over seeds (band: 95% CI)"
    if data.lines.empty:
        return empty_figure(title, f"no runs with stage {data.stage} yet")
    fig = make_subplots(rows=1, cols=len(data.metrics), subplot_titles=[_label(m) for m in data.metrics],
                        horizontal_spacing=0.09)  # fmt: skip
    for col, metric in enumerate(data.metrics, start=1):
        sub = data.lines[data.lines["metric"] == metric]
        if sub.empty:
            fig.add_annotation(text=f"no {metric} logged", row=1, col=col, x=0.5, y=0.5, showarrow=False,
                               xref="x domain" if col == 1 else f"x{col} domain",
                               yref="y domain" if col == 1 else f"y{col} domain")  # fmt: skip
            continue
        for model in ordered_models(sub["model"]):
            g = sub[sub["model"] == model]
            color = model_color(model)
            band = g.dropna(subset=["ci_low", "ci_high"])
            if len(band) > 1:
                fig.add_trace(go.Scatter(
                    x=list(band["step"]) + list(band["step"])[::-1],
                    y=list(band["ci_high"]) + list(band["ci_low"])[::-1],
                    mode="lines", fill="toself", fillcolor=_rgba(color, 0.12), line=dict(width=0), hoverinfo="skip",
                    legendgroup=model, showlegend=False,
                ), row=1, col=col)  # fmt: skip
            fig.add_trace(go.Scatter(
                x=g["step"], y=g["mean"], mode="lines+markers", name=model, legendgroup=model,
                showlegend=col == 1, line=dict(color=color, dash=_DASH.get(split_model(model)[1], "solid")),
                marker=dict(size=5), customdata=g["n"], hovertemplate=f"{model} epoch %{{x}}: %{{y:.3g}} "
                "(n=%{customdata})<extra></extra>",
            ), row=1, col=col)  # fmt: skip
        fig.update_xaxes(title_text="epoch", row=1, col=col, dtick=1 if sub["step"].max() <= 12 else None)
    return _layout(fig, title)


def curve_stages(curves: pd.DataFrame) -> list[str]:
    """The stages that have per-epoch curves, in procedure order."""
    if curves.empty:
        return []
    present = set(curves["stage"].dropna())
    return [s for s in STAGES if s in present] + sorted(present - set(STAGES))


# --------------------------------------------------------------------------- sensitivity / importance


class ImportanceData(NamedTuple):
    bars: pd.DataFrame  # source, model, param, value
    reason: str  # why there are no bars, or what they are


def importance_data(
    sensitivity: Sensitivity | None = None, importances: ParamImportances | None = None
) -> ImportanceData:
    """Bars of |Spearman rho| (per model and parameter) and Optuna importances, in one frame."""
    rows, reasons = [], []
    if importances is not None:
        if importances.table.empty:
            reasons.append(f"Optuna importances: {importances.reason}")
        for r in importances.table.itertuples():
            rows.append({"source": "Optuna importance", "model": "(all)", "param": r.param, "value": r.importance})
    if sensitivity is not None:
        corr = sensitivity.correlations.dropna(subset=["spearman_rho"])
        if corr.empty:
            reasons.append("Spearman: no parameter varies over 3+ finished trials of a model")
        for r in corr.itertuples():
            rows.append({"source": "|Spearman ρ| with val top-1", "model": r.model, "param": r.param,
                         "value": abs(r.spearman_rho)})  # fmt: skip
    bars = pd.DataFrame(rows, columns=["source", "model", "param", "value"])
    return ImportanceData(bars, "; ".join(reasons) if bars.empty else "")


def importance_figure(data: ImportanceData) -> go.Figure:
    title = "Hyperparameter sensitivity"
    if data.bars.empty:
        return empty_figure(title, "no searched hyperparameters: " + (data.reason or "nothing varies"))
    sources = list(dict.fromkeys(data.bars["source"]))
    fig = make_subplots(rows=1, cols=len(sources), subplot_titles=sources, horizontal_spacing=0.25)
    for col, source in enumerate(sources, start=1):
        sub = data.bars[data.bars["source"] == source]
        for model in list(dict.fromkeys(sub["model"])):
            g = sub[sub["model"] == model].sort_values("value")
            fig.add_trace(go.Bar(
                y=g["param"], x=g["value"], orientation="h", name=model, legendgroup=model,
                marker_color=model_color(model) if model != "(all)" else "#555555", showlegend=col == len(sources),
            ), row=1, col=col)  # fmt: skip
        fig.update_xaxes(range=[0, 1], row=1, col=col)
    n_params = data.bars["param"].nunique()
    return _layout(fig, title, max(HEIGHT, 120 + 28 * n_params * max(1, data.bars["model"].nunique() // 2)))


# --------------------------------------------------------------------------- invertibility


def invertibility_data(stages: pd.DataFrame, stage_images: Mapping | None = None) -> pd.DataFrame:
    """Per decoder, stage and depth k: invert_err_pool<k> mean and 95% CI (over images when recorded per image,
    else over computed stages)."""
    return invertibility(stages, stage_images)


def invertibility_figure(data: pd.DataFrame) -> go.Figure:
    over = " and ".join(sorted(set(data["over"]))) if "over" in data and len(data) else "seeds"
    title = f"Invertibility: image MSE when decoding from pool k (mean ± 95% CI over {over})"
    if data.empty:
        return empty_figure(title, "no decoder stages with invert_err_pool<k> metrics yet")
    stages = [s for s in STAGES if s in set(data["stage"])] + sorted(set(data["stage"]) - set(STAGES))
    fig = make_subplots(rows=1, cols=len(stages), subplot_titles=[f"stage {s}" for s in stages],
                        shared_yaxes=True, horizontal_spacing=0.05)  # fmt: skip
    for col, stage in enumerate(stages, start=1):
        for decoder in list(dict.fromkeys(data["decoder"])):
            g = data[(data["stage"] == stage) & (data["decoder"] == decoder)].sort_values("depth")
            if g.empty:
                continue
            color = _DECODER_COLORS.get(decoder, model_color(decoder))
            fig.add_trace(go.Scatter(
                x=g["depth"], y=g["mean"], mode="lines+markers", name=decoder.upper(), legendgroup=decoder,
                showlegend=col == 1, line=dict(color=color), marker=dict(size=8),
                error_y=dict(type="data", symmetric=False, array=(g["ci_high"] - g["mean"]).fillna(0),
                             arrayminus=(g["mean"] - g["ci_low"]).fillna(0), color=color),
                customdata=g["n"], hovertemplate=f"{decoder} pool%{{x}}: %{{y:.4g}} (n=%{{customdata}})<extra></extra>",
            ), row=1, col=col)  # fmt: skip
        depths = sorted(data["depth"].unique())
        fig.update_xaxes(title_text="decoded from", tickvals=depths, ticktext=[f"pool{d}" for d in depths],
                         row=1, col=col)  # fmt: skip
    fig.update_yaxes(title_text="image MSE per element", row=1, col=1)
    return _layout(fig, title)


# --------------------------------------------------------------------------- Optuna's own figures

# (caption, Optuna plotting function name, extra keyword arguments); PED-ANOVA is Optuna 5's default evaluator.
_OPTUNA_FIGURES = (
    ("Optuna: objective (val top-1 error, %) of each trial and the best so far.", "plot_optimization_history", {}),
    ("Optuna: the objective after each fine-tuning epoch (the intermediate values ASHA decides on).",
     "plot_intermediate_values", {}),
    ("Optuna: parallel coordinates of the searched parameters, coloured by the objective.",
     "plot_parallel_coordinate", {}),
    ("Optuna: the objective against each searched parameter.", "plot_slice", {}),
    ("Optuna: hyperparameter importances by PED-ANOVA (Optuna's default evaluator).", "plot_param_importances", {}),
)  # fmt: skip


def optuna_figures(study, reason: str = "") -> list[tuple[str, go.Figure]]:
    """Optuna's own plotly figures of a search (`study` from analysis.load.load_optuna_study), each with a
    caption; a figure that Optuna cannot draw (too few trials, ...) becomes a message saying why."""
    if study is None:
        return [("Optuna's figures of the search.", empty_figure("Optuna", reason or "no Optuna study"))]
    import optuna.visualization as ov

    out = []
    for caption, name, kwargs in _OPTUNA_FIGURES:
        title = caption.split(": ", 1)[1].rstrip(".")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = getattr(ov, name)(study, **kwargs)
            if name == "plot_param_importances":
                fig.update_layout(title="Hyperparameter importances (PED-ANOVA, Optuna's default evaluator)")
            _layout(fig, fig.layout.title.text or title)
        except Exception as exc:  # e.g. importances need 2+ complete trials
            fig = empty_figure(title, f"Optuna could not draw it: {exc}")
        out.append((caption, fig))
    return out


# --------------------------------------------------------------------------- reconstruction grid


class ReconGrid(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8: one row of tiles per source, one column per validation image
    row_labels: list[str]  # "input", "from pool1", ...
    n_images: int
    tile: tuple[int, int]  # (h, w) of one tile, without padding
    pad: int


def _to_hwc(a: np.ndarray) -> np.ndarray:
    """(C,H,W) -> (H,W,3) in [0, 1], min-max normalised per image (the arrays are normalised inputs)."""
    a = np.asarray(a, dtype=float)
    if a.ndim == 2:
        a = a[None]
    if a.shape[0] not in (1, 3):
        a = a[:3] if a.shape[0] > 3 else a[:1]
    lo, hi = np.nanmin(a), np.nanmax(a)
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
    return np.transpose(a, (1, 2, 0))


def recon_grid_data(arrays: Mapping[str, np.ndarray] | None, n_images: int = 8, pad: int = 2) -> ReconGrid:
    """Tile `input` then `from_pool1`, `from_pool2`, ... (rows) for the first `n_images` images (columns)."""
    if not arrays or "input" not in arrays:
        return ReconGrid(np.zeros((0, 0, 3), np.uint8), [], 0, (0, 0), pad)
    pools = sorted((k for k in arrays if k.startswith("from_pool") and k[9:].isdigit()), key=lambda k: int(k[9:]))
    names = ["input", *pools]
    n = min(n_images, *(len(arrays[k]) for k in names))
    h, w = arrays["input"].shape[-2:]
    grid = np.ones((len(names) * (h + pad) + pad, n * (w + pad) + pad, 3))
    for r, name in enumerate(names):
        for c in range(n):
            tile = _to_hwc(arrays[name][c])
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = tile[:h, :w]
    labels = ["input"] + [f"from {k[5:]}" for k in pools]
    return ReconGrid((grid * 255).round().astype(np.uint8), labels, n, (h, w), pad)


def recon_grid_figure(data: ReconGrid, title: str = "Reconstructions") -> go.Figure:
    if data.n_images == 0:
        return empty_figure(title, "no recon/invert.npz artifact to show yet")
    h, w = data.tile
    fig = go.Figure(go.Image(z=data.image, hoverinfo="skip"))
    centers = [data.pad + r * (h + data.pad) + h / 2 for r in range(len(data.row_labels))]
    fig.update_yaxes(tickvals=centers, ticktext=data.row_labels, showgrid=False, ticks="")
    fig.update_xaxes(showticklabels=False, showgrid=False)
    width_px = 700
    height = int(min(900, max(260, 110 + width_px * data.image.shape[0] / max(1, data.image.shape[1]))))
    _layout(fig, title, height)
    fig.update_layout(margin=dict(l=100, r=20, t=60, b=20), showlegend=False)
    return fig


__all__ = [
    "CurvesData", "ImportanceData", "ReconGrid", "ScatterData", "curve_stages", "empty_figure",
    "error_scatter_data", "error_scatter_figure", "generalization_gap_data", "generalization_gap_figure",
    "importance_data", "importance_figure", "invertibility_data", "invertibility_figure",
    "learning_curves_data", "learning_curves_figure", "optuna_figures", "recon_grid_data", "recon_grid_figure",
]  # fmt: skip
