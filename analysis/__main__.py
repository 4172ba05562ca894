"""`python -m analysis report --tracking-uri URI --study NAME --out DIR [--optuna-storage URL]`.

`python -m analysis demo --out DIR` writes a synthetic study (the paper's numbers plus noise, 3 seeds)
into a fresh sqlite store under DIR and renders its report: a smoke test of the whole analysis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.common import AnalysisError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description="Analyse a study recorded in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="write report.html, table.csv and table.md for one study")
    rep.add_argument("--tracking-uri", required=True, help="MLflow tracking URI, e.g. sqlite:///runs/mlflow.db")
    rep.add_argument("--study", required=True, help="study name (= MLflow experiment name)")
    rep.add_argument("--out", required=True, type=Path, help="output directory")
    rep.add_argument("--optuna-storage", default=None, help="Optuna storage URL, for hyperparameter importances")
    rep.add_argument("--baseline", default="baseline", help="model name of the baseline (default: baseline)")
    rep.add_argument("--no-mlflow", action="store_true", help="do not log the files to the study run")
    demo = sub.add_parser("demo", help="render the report of a synthetic study (smoke test)")
    demo.add_argument("--out", required=True, type=Path, help="output directory (gets mlflow.db and the report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from analysis.report import write_report

    try:
        if args.command == "demo":
            from analysis.synthetic import demo_trials, write_study

            args.out.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
            write_study(uri, "demo", demo_trials())
            path = write_report(uri, "demo", args.out)
        else:
            path = write_report(
                args.tracking_uri,
                args.study,
                args.out,
                optuna_storage=args.optuna_storage,
                log_to_mlflow=not args.no_mlflow,
                baseline=args.baseline,
            )
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
