"""One self-contained HTML report per study (plotly.js inlined once), plus table.csv and table.md."""

from __future__ import annotations

import html
import math
import re
import socket
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from analysis import figures as F
from analysis.common import ERROR_METRICS, METRIC_LABELS, AnalysisError, finished
from analysis.load import StudyRuns, load_inversion, load_optuna_study, load_study
from analysis.paper import FIXED_CLASSIFIER_STAGES, compare_claims, paper_vs_ours
from analysis.stats import (
    VERDICT_COLUMNS,
    best_configuration,
    best_per_model,
    configurations,
    gain_share_by_epoch,
    paper_table,
    param_importances,
    sensitivity,
    varying_params,
    verdicts,
)

# Written beside each other for every study (configurations.csv only for searches); columns in docs/RECORDS.md.
REPORT_FILES = ("report.html", "table.csv", "table.md", "verdicts.csv", "claims.csv")
SEARCH_FILE = "configurations.csv"


# --------------------------------------------------------------------------- tables as text


def format_table(table: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """`paper_table` as display strings: "mean [ci_low, ci_high] (±diff vs baseline)" per error."""
    if table.empty:
        return pd.DataFrame(columns=["model", "n"])
    out = pd.DataFrame({"model": table["model"], "n": table["n"].astype(int)})
    for metric in ERROR_METRICS:
        if f"{metric}_mean" not in table:
            continue
        cells = []
        for r in table.itertuples():
            mean, lo, hi = (getattr(r, f"{metric}_{s}") for s in ("mean", "ci_low", "ci_high"))
            diff = getattr(r, f"{metric}_vs_baseline")
            if not math.isfinite(mean):
                cells.append("–")
                continue
            cell = f"{mean:.2f}"
            if math.isfinite(lo):
                cell += f" [{lo:.2f}, {hi:.2f}]"
            if r.model != baseline and math.isfinite(diff):
                cell += f" ({diff:+.2f})"
            cells.append(cell)
        out[METRIC_LABELS[metric]] = cells
    return out


def to_markdown(frame: pd.DataFrame) -> str:
    """Markdown table (pandas' to_markdown when `tabulate` is installed, else a plain pipe table)."""
    try:
        return frame.to_markdown(index=False)
    except ImportError:
        cells = [[str(c) for c in frame.columns]] + [[str(v) for v in row] for row in frame.itertuples(index=False)]
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("---" for _ in frame.columns) + "|")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the report's content


class Section(NamedTuple):
    title: str
    html: str


class Report(NamedTuple):
    runs: StudyRuns
    table: pd.DataFrame
    verdicts: pd.DataFrame
    claims: pd.DataFrame
    gain_share: pd.DataFrame
    figures: list[tuple[str, go.Figure]]  # (caption, figure)
    configs: pd.DataFrame  # a search's configurations (empty when nothing is searched)
    best: pd.Series | None  # the best configuration of a search


def _recon_figures(runs: StudyRuns) -> list[tuple[str, go.Figure]]:
    """One reconstruction grid per decoder: the last decoder stage of its first trial that has the artifact."""
    stages = runs.stages
    out = []
    if stages.empty or "decoder" not in stages:
        return [("Reconstructions from each depth", F.recon_grid_figure(F.recon_grid_data(None), "Reconstructions"))]
    inv_cols = [c for c in stages.columns if str(c).startswith("invert_err_pool")]
    for decoder in ("sae", "swwae"):
        cand = stages[(stages["decoder"] == decoder) & (stages["status"] == "FINISHED")]
        if inv_cols:
            cand = cand[cand[inv_cols].notna().any(axis=1)]
        title = f"{decoder.upper()}: input, then reconstructions from pool1, pool2, … (min-max per image)"
        if cand.empty:
            continue
        row = cand.iloc[-1]
        try:
            arrays = load_inversion(runs.tracking_uri, row["run_id"])
            title = f"{decoder.upper()} ({row['model']}, seed {row['seed']}, stage {row['stage']}): " + (
                "input, then decoded from pool1, pool2, …")  # fmt: skip
        except AnalysisError as exc:
            arrays = None
            title += f" — {exc}"[:160]
        out.append((title, F.recon_grid_figure(F.recon_grid_data(arrays), title)))
    if not out:
        out.append(("Reconstructions", F.recon_grid_figure(F.recon_grid_data(None), "Reconstructions from each depth")))
    return out


def loss_balance_table(stages: pd.DataFrame) -> pd.DataFrame:
    """Per model and level: each weighted reconstruction term's share of the total loss at the start and the end of
    fine-tuning, and its weight (means over seeds); empty when no fine-tuning stage has reconstruction terms."""
    cols = [c for c in stages.columns if c.startswith("loss_share_start_")] if not stages.empty else []
    if not cols:
        return pd.DataFrame(columns=["model", "level", "n", "share_start", "share_end", "weight"])
    rows = []
    finetune = stages[stages["stage"] == "finetune"]
    for model, group in finetune.groupby("model"):
        for col in cols:
            level = col.removeprefix("loss_share_start_")
            if group[col].notna().any():
                rows.append({"model": model, "level": level, "n": int(group[col].notna().sum()),
                             "share_start": group[col].mean(),
                             "share_end": group.get(f"loss_share_end_{level}", pd.Series(dtype=float)).mean(),
                             "weight": group.get(f"loss_weight_{level}", pd.Series(dtype=float)).mean()})
    return pd.DataFrame(rows, columns=["model", "level", "n", "share_start", "share_end", "weight"])


def _fixed_classifier_images(runs: StudyRuns) -> dict:
    """Per-image outcomes of the decoder stages trained on a fixed classifier (for the invertibility claims)."""
    st = runs.stages
    if st.empty or "stage" not in st:
        return {}
    ids = st[st["stage"].isin(FIXED_CLASSIFIER_STAGES) & (st["status"] == "FINISHED")]["run_id"]
    return runs.predictions(ids)


def build_report(runs: StudyRuns, *, baseline: str = "baseline", optuna_storage: str | None = None) -> Report:
    """Every table and figure of the report, computed from loaded runs (no HTML yet).

    In a search, the results table, verdicts and curves use each model's best configuration (selected on the
    validation objective, so they are optimistic); the configurations table lists every configuration.
    """
    all_trials, stages = runs.trials, runs.stages
    searched = bool(varying_params(all_trials, finished_only=False)) or (runs.study_params or {}).get(
        "search", "none") != "none"
    configs = configurations(all_trials) if searched else pd.DataFrame()
    best = best_configuration(configs) if searched else None
    trials = best_per_model(finished(all_trials)) if searched else all_trials
    curves = runs.curves[runs.curves["trial_id"].isin(set(trials["trial_id"]))] if searched else runs.curves
    images = runs.trial_images(finished(trials))
    stage_images = _fixed_classifier_images(runs)
    table = paper_table(trials, baseline)
    verdict_table = verdicts(trials, baseline, images=images)
    claims = compare_claims(trials, baseline, curves=curves, stages=stages, stage_images=stage_images,
                            verdict_table=verdict_table)  # fmt: skip
    gains = gain_share_by_epoch(curves, baseline)
    figs: list[tuple[str, go.Figure]] = []
    scatter = F.error_scatter_figure(F.error_scatter_data(trials), baseline)
    figs.append(("Each small dot is one seed; diamonds are means with 95% CIs. Below the grey 'gap' line a model "
                 "generalizes better than the baseline; left of it, it fits the training set better.", scatter))  # fmt: skip
    figs.append(("Validation minus training top-1 error; a smaller gap with lower validation error means "
                 "regularization.", F.generalization_gap_figure(F.generalization_gap_data(trials))))  # fmt: skip
    stages_with_curves = F.curve_stages(curves) or ["finetune"]
    for stage in stages_with_curves:
        figs.append((f"Per-epoch validation top-1 error and total loss in stage {stage}.",
                     F.learning_curves_figure(F.learning_curves_data(curves, stage))))  # fmt: skip
    if searched:
        sens = sensitivity(all_trials)
        imps = param_importances(optuna_storage, runs.study)
        figs.append(("Searched hyperparameters: rank correlation with val top-1 error over finished trials, and "
                     "Optuna's importances (PED-ANOVA, its default evaluator) when the study has an Optuna storage.",
                     F.importance_figure(F.importance_data(sens, imps))))  # fmt: skip
        study, reason = load_optuna_study(optuna_storage, runs.study)
        figs += F.optuna_figures(study, reason)
    figs.append(("How well each decoder inverts the classifier: image error when decoding from pool k, per "
                 "image (95% CI over validation images, conditional on the trained classifiers; over seeds where "
                 "no per-image errors were recorded). The paper: SWWAE nearly perfect even from deep layers, SAE "
                 "worse with depth.", F.invertibility_figure(F.invertibility_data(stages, stage_images))))  # fmt: skip
    figs += [("Validation images decoded from each pooling level (recon/invert.npz).", fig)
             for _, fig in _recon_figures(runs)]  # fmt: skip
    return Report(runs, table, verdict_table, claims, gains, figs, configs, best)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1300px; color: #222; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; margin: 2px 0; }
table.data { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
table.data th { background: #f4f4f4; text-align: left; } table.data td:first-child, table.data th:first-child { text-align: left; }
table.data td.text { text-align: left; max-width: 640px; }
.note { color: #555; font-size: 13px; }
.verdict { display: inline-block; min-width: 120px; padding: 1px 6px; border-radius: 3px; font-size: 12px;
  font-weight: bold; color: white; margin-right: 6px; text-align: center; }
.v-better-optimum, .v-reproduced { background: #2a7d2a; } .v-regularizes { background: #2b6cb0; }
.v-hurts, .v-contradicted { background: #c0392b; } .v-no-clear-effect, .v-cannot-decide { background: #888; }
.v-not-enough-seeds { background: #b7950b; } .v-lower-validation-error-mechanism-unclear { background: #2c8c8c; }
ul.verdicts li { margin: 6px 0; list-style: none; } ul.verdicts { padding-left: 0; }
figure { margin: 18px 0 30px 0; } figcaption { color: #555; font-size: 13px; margin-top: 4px; }
.warn { background: #fff6d6; border: 1px solid #e8d17a; padding: 8px 12px; border-radius: 4px; }
"""

# Recorded before anything else runs: the test (and a curious reader) can see JS errors in the DOM.
_ERROR_HOOK = """
window.__reportErrors = [];
function __recordError(msg) {
  window.__reportErrors.push(String(msg));
  var joined = window.__reportErrors.join(' | ');
  document.documentElement.setAttribute('data-js-errors', joined);
  if (document.body) document.body.setAttribute('data-js-errors', joined);
}
window.onerror = function (msg, src, line) { __recordError(msg + ' at ' + src + ':' + line); };
window.addEventListener('unhandledrejection', function (e) { __recordError('unhandled rejection: ' + e.reason); });
"""

# After plotly has drawn: how many figures have an svg (polled for a few seconds of page time).
_FIGURE_CHECK = """
window.addEventListener('load', function () {
  var expected = parseInt(document.body.dataset.figuresExpected, 10), tries = 0;
  document.body.setAttribute('data-js-errors', window.__reportErrors.join(' | '));
  (function check() {
    var drawn = Array.prototype.filter.call(document.querySelectorAll('.js-plotly-plot'), function (el) {
      return el.querySelector('svg.main-svg') !== null;
    }).length;
    document.body.dataset.figures = String(drawn);
    if (drawn < expected && tries++ < 50) { setTimeout(check, 100); } else { document.body.dataset.checked = '1'; }
  })();
});
"""


def _table_html(frame: pd.DataFrame, text_cols: tuple[str, ...] = ()) -> str:
    if frame.empty:
        return "<p class='note'>(nothing to show yet)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for col, value in zip(frame.columns, row):
            text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
            if isinstance(text, float):
                text = f"{text:.2f}" if text == 0 or abs(text) >= 0.01 else f"{text:.3g}"  # e.g. learning rates
            cls = " class='text'" if col in text_cols else ""
            if col == "status":
                text = _badge(str(text))
                cells.append(f"<td{cls}>{text}</td>")
                continue
            cells.append(f"<td{cls}>{html.escape(str(text))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='data'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _badge(label: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return f"<span class='verdict v-{slug}'>{html.escape(label)}</span>"


def _sentence_html(a: str, b: str, sentence: str) -> str:
    head = f"{a} vs {b}"
    if sentence.startswith(head):
        return f"<b>{html.escape(head)}</b>{html.escape(sentence[len(head):])}"
    return html.escape(sentence)


def _summary_html(runs: StudyRuns, baseline: str) -> str:
    t = runs.trials
    n = len(t)
    counts = t["status"].value_counts().to_dict() if n else {}
    done = finished(t)
    models = ", ".join(f"{m} ({k})" for m, k in done["model"].value_counts(sort=False).items()) if len(done) else "none"
    seeds = sorted(done["seed"].astype(str).unique(), key=lambda s: (len(s), s)) if len(done) else []
    when = ""
    start, end = (pd.to_datetime(t[c], utc=True) for c in ("start_time", "end_time")) if n else (None, None)
    if n and start.notna().any():
        if end.isna().any():
            when = f"Trials started {start.min():%Y-%m-%d %H:%M} UTC; {int(end.isna().sum())} still running. "
        else:
            when = f"Trials ran {start.min():%Y-%m-%d %H:%M} – {end.max():%Y-%m-%d %H:%M} UTC. "
    now = datetime.now(timezone.utc)
    status_text = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or "none yet"
    lines = [
        f"<p class='meta'><b>{n}</b> trial(s): {html.escape(status_text)}. Finished per model: {html.escape(models)}.</p>",
        f"<p class='meta'>Seeds: {html.escape(', '.join(seeds) or 'none')}. Baseline: <code>{html.escape(baseline)}</code>. "
        "Errors are percent; differences are points; intervals are 95% Student-t over seeds (an error's cut to "
        "[0, 100]).</p>",
        f"<p class='meta'>{html.escape(when)}Report generated on <b>{html.escape(socket.gethostname())}</b> at "
        f"{now:%Y-%m-%d %H:%M} UTC from <code>{html.escape(runs.tracking_uri)}</code> "
        f"(experiment {html.escape(runs.experiment_id)}).</p>",
    ]  # fmt: skip
    params = runs.study_params or {}
    if params.get("eval_on") == "test" and params.get("search", "none") != "none":
        lines.append("<p class='warn'>Configurations were selected on the <b>held-out validation split</b>; the "
                     "<b>test split</b> (data.eval_on: test) was evaluated afterwards for the selected configurations "
                     "only (each model's best): the 'Test' columns. 'Val' numbers of a selected configuration are "
                     "optimistic, its 'Test' numbers are not.</p>")
    elif params.get("eval_on") == "test":
        lines.append("<p class='warn'>This study evaluates on the <b>test split</b> (data.eval_on: test): every "
                     "'val' number below is a test-split error, of configurations fixed before the study (nothing "
                     "was selected on it).</p>")
    if params.get("labeled_fraction") not in (None, "1.0", "1"):
        lines.append(f"<p class='meta'>Labels on {html.escape(str(params['labeled_fraction']))} of the training "
                     "split: training errors count the labeled examples only.</p>")
    if n == 0:
        lines.append("<p class='warn'>No trials recorded yet: start the study, then regenerate this report.</p>")
    failed = t[t["status"] == "FAILED"] if n else t
    if len(failed):
        items = "".join(f"<li><code>{html.escape(str(r.trial_id))}</code>: {html.escape(str(r.status_detail))}</li>"
                        for r in failed.itertuples())  # fmt: skip
        lines.append(f"<div class='warn'>Failed trials are left out of every statistic:<ul>{items}</ul></div>")
    return "\n".join(lines)


def _verdicts_html(table: pd.DataFrame) -> str:
    if table.empty:
        return "<p class='note'>No comparisons yet: they need at least two models with finished trials.</p>"
    parts = []
    for family in dict.fromkeys(table["family"]):
        sub = table[table["family"] == family]
        items = "".join(f"<li>{_badge(r.verdict)}{_sentence_html(r.a, r.b, r.sentence)}</li>" for r in sub.itertuples())
        parts.append(f"<h3>{html.escape(family.capitalize())} family ({len(sub)} comparison(s))</h3>"
                     f"<ul class='verdicts'>{items}</ul>")  # fmt: skip
    floor = "with the per-image sampling variance as a floor" if (table["n_images"] > 0).any() else (
        "without per-image outcomes (no image-sampling floor)")  # fmt: skip
    return "".join(parts) + (
        f"<p class='note'>Each difference is paired by seed and measured on the same validation images for both "
        f"models; t-test over seeds {floor}. p-values are Holm-adjusted within each family, one metric at a time; "
        f"alpha = {table['alpha'].iloc[0]:g}. Definitions (docs/STATISTICS.md): better optimum = val and train "
        "significantly lower; regularizes = val significantly lower and train significantly higher (or the gap "
        "significantly smaller with a training error that is not lower); hurts = val significantly higher. "
        "verdicts.csv has every number.</p>")


def _search_html(report: Report) -> str:
    configs, best = report.configs, report.best
    head = ""
    if best is not None:
        params = ", ".join(f"{c[len('params.'):]}={best[c]:.4g}" if isinstance(best[c], float) else
                           f"{c[len('params.'):]}={best[c]}" for c in configs.columns if c.startswith("params."))
        ci = "" if not math.isfinite(best["val_top1_err_ci_low"]) else (
            f" [95% CI over its seeds {best['val_top1_err_ci_low']:.2f}, {best['val_top1_err_ci_high']:.2f}]")
        head = (f"<p><b>Best configuration</b> (lowest mean val top-1 error among those with the most finished "
                f"seeds): #{int(best['config'])} {html.escape(str(best['model']))}, {html.escape(params)}: "
                f"{best['val_top1_err_mean']:.2f}%{ci} over {int(best['n_seeds'])} seed(s).</p>")  # fmt: skip
    return head + _table_html(configs, text_cols=("states", "seeds")) + (
        "<p class='note'>One row per configuration; intervals are over that configuration's seeds only (none with "
        "one seed). The configuration was selected on the validation split, so its validation error is an "
        "optimistic estimate; the results table, verdicts and curves above and below use each model's best "
        "configuration. configurations.csv has this table.</p>")


def render_html(report: Report, baseline: str = "baseline") -> str:
    runs = report.runs
    shown = format_table(report.table, baseline)
    single = bool(report.table["single_seed"].any()) if "single_seed" in report.table else False
    sections = [Section("Results", _table_html(shown) + (
        "<p class='note'>Cells: mean [95% CI] (difference to the baseline, points). Models with n = 1 have no "
        "interval: one run has no spread, so read those numbers as anecdotes.</p>" if single else
        "<p class='note'>Cells: mean [95% CI] (difference to the baseline, points).</p>"))]  # fmt: skip
    if report.configs is not None and len(report.configs):
        sections.append(Section("Search: configurations", _search_html(report)))
    sections.append(Section("Verdicts", _verdicts_html(report.verdicts)))
    claims = report.claims[["claim", "status", "evidence", "reason"]]
    pvo = paper_vs_ours(report.table) if not report.table.empty else pd.DataFrame()
    sections.append(Section("Comparison with the paper (Zhang, Lee & Lee, ICML 2016)", _table_html(
        claims, text_cols=("claim", "evidence", "reason")) + "<p class='note'>The paper trained VGG16 on ImageNet; "
        "a smaller setting need not match its absolute numbers, so the claims are about directions.</p>"
        + _table_html(pvo)))  # fmt: skip
    gains = report.gain_share
    if not gains.empty:
        g = gains[["model", "n_seeds", "baseline_final", "final_val", "val_at_k", "final_gain", "gain_at_k",
                   "share", "reason"]].copy()  # fmt: skip
        g["share"] = [f"{s:.0%}" if math.isfinite(s) else "–" for s in g["share"]]
        sections.append(Section(f"Learning speed: gain reached after {int(gains['k'].iloc[0])} fine-tuning epochs",
                                _table_html(g, text_cols=("reason",)) + "<p class='note'>Gain = baseline's final "
                                "val top-1 − the model's val top-1 (seed-mean curves). The paper: 75% within 4 epochs."
                                "</p>"))  # fmt: skip
    balance = loss_balance_table(runs.stages)
    if not balance.empty:
        shown_balance = balance.assign(**{c: [f"{v:.2%}" if v == v else "–" for v in balance[c]]
                                          for c in ("share_start", "share_end")})
        sections.append(Section("Loss balance in fine-tuning", _table_html(shown_balance) + (
            "<p class='note'>Each weighted reconstruction term's share of the total loss on the first batches "
            "(start) and over the last epoch (end). A level with a share near 0 does nothing; "
            "<code>loss.balance: auto</code> sets the weights from target shares.</p>")))  # fmt: skip
    fig_html = []
    for i, (caption, fig) in enumerate(report.figures):
        height = fig.layout.height or F.HEIGHT
        div = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"figure-{i}",
                          default_height=f"{height}px", default_width="100%",
                          config={"displaylogo": False, "responsive": True})  # fmt: skip
        fig_html.append(f"<figure>{div}<figcaption>{html.escape(caption)}</figcaption></figure>")
    sections.append(Section("Figures", "\n".join(fig_html)))
    body = "\n".join(f"<h2>{html.escape(s.title)}</h2>\n{s.html}" for s in sections)
    title = f"Study report: {runs.study}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script>{_ERROR_HOOK}</script>
<script type="text/javascript">{get_plotlyjs()}</script>
</head>
<body data-figures-expected="{len(report.figures)}" data-figures="0" data-js-errors="">
<h1>{html.escape(title)}</h1>
{_summary_html(runs, baseline)}
{body}
<script>{_FIGURE_CHECK}</script>
</body></html>
"""


def write_report(
    tracking_uri: str,
    study: str,
    out_dir: str | Path,
    *,
    optuna_storage: str | None = None,
    log_to_mlflow: bool = True,
    baseline: str = "baseline",
) -> Path:
    """Write report.html, table.csv, table.md, verdicts.csv, claims.csv (and configurations.csv for a search) into
    `out_dir`; return the path of report.html. Columns: docs/RECORDS.md.

    With `log_to_mlflow`, the files are also logged under `report/` of the study run (role=study).
    """
    runs = load_study(tracking_uri, study)
    report = build_report(runs, baseline=baseline, optuna_storage=optuna_storage)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "report.html"
    page.write_text(render_html(report, baseline), encoding="utf-8")
    report.table.to_csv(out / "table.csv", index=False)
    report.verdicts.to_csv(out / "verdicts.csv", index=False, columns=VERDICT_COLUMNS)
    report.claims.to_csv(out / "claims.csv", index=False)
    files = list(REPORT_FILES)
    if len(report.configs):
        report.configs.to_csv(out / SEARCH_FILE, index=False)
        files.append(SEARCH_FILE)
    n = len(finished(runs.trials))
    (out / "table.md").write_text(
        f"# {study}\n\n{n} finished trial(s); cells: mean [95% CI] (difference to {baseline}, points); errors in %.\n\n"
        + to_markdown(format_table(report.table, baseline)) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    if log_to_mlflow:
        if runs.study_run_id is None:
            warnings.warn(f"study {study!r} has no run with tag role=study; the report was not logged to MLflow")
        else:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri)
            for name in files:
                client.log_artifact(runs.study_run_id, str(out / name), artifact_path="report")
    return page
