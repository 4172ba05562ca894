"""The quickstart answers: 3+ seeds of the 7 paper models, and `study launch` ends with verdicts with CIs."""

from __future__ import annotations

from pathlib import Path

from analysis.synthetic import demo_trials, write_study
from study.spec import load_spec
from study.status import verdict_lines
from trainables.models import PAPER_VARIANTS

QUICKSTART = Path(__file__).parent.parent / "studies" / "quickstart.yaml"


def test_the_quickstart_runs_the_7_models_with_enough_seeds_for_a_test():
    spec = load_spec(QUICKSTART)
    assert sorted(spec.models) == sorted(PAPER_VARIANTS) and len(spec.seeds) >= 3
    assert spec.resources.precision == "auto"


def test_launch_summary_verdicts_carry_confidence_intervals(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    write_study(uri, "demo", demo_trials(seeds=(0, 1, 2)), artifacts=False)
    lines = verdict_lines(uri, "demo", "baseline").splitlines()
    assert lines and all(line.startswith("- ") and "95% CI" in line and "Verdict:" in line for line in lines)
