"""Analysis of studies recorded in MLflow (docs/RECORDS.md): load, statistics, paper claims, figures, report.

    from analysis import load_study, paper_table, verdicts, compare_claims, write_report
    runs = load_study("sqlite:///runs/mlflow.db", "ablation")
    verdicts(runs.trials, images=runs.trial_images())  # paired verdicts (docs/STATISTICS.md), one sentence each
    write_report("sqlite:///runs/mlflow.db", "ablation", "out/")

Submodules: `load` (the only MLflow reader), `stats` (pure statistics), `paper` (the paper's table and
claims), `figures` (data + plotly renderer per figure), `report` (HTML/CSV/Markdown), `synthetic`
(writes a study that follows the records contract, for tests and demos).
"""

from analysis.common import AnalysisError
from analysis.load import StudyRuns, load_inversion, load_study
from analysis.paper import compare_claims, paper_results
from analysis.report import write_report
from analysis.stats import (
    best_configuration,
    configurations,
    gain_share_by_epoch,
    generalization_gap,
    invertibility,
    paired_test,
    paper_table,
    param_importances,
    seeds_needed,
    sensitivity,
    verdicts,
)

__all__ = [
    "AnalysisError",
    "StudyRuns",
    "best_configuration",
    "compare_claims",
    "configurations",
    "gain_share_by_epoch",
    "generalization_gap",
    "invertibility",
    "load_inversion",
    "load_study",
    "paired_test",
    "paper_results",
    "paper_table",
    "param_importances",
    "seeds_needed",
    "sensitivity",
    "verdicts",
    "write_report",
]
