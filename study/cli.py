"""`study`: launch, resume, inspect and report on studies.

    study launch studies/quickstart.yaml        validate, run every trial, print results, write the report
    study resume quickstart                     continue an interrupted study (nothing finished is recomputed)
    study status quickstart                     trial table: model, seed, parameters, stage reached, metrics
    study ui quickstart                         MLflow UI on http://127.0.0.1:5000 over the study's records
                                                (with a tracking server: where its UI is)
    study report quickstart                     (re)write the HTML report

Exit codes: 0 ok, 1 failed work (some trials failed, unreadable records), 2 bad input (spec, name, arguments,
data, weights, store, results directory, cluster address), 130 / 143 stopped by Ctrl-C / SIGTERM (`study resume`
continues). Errors are one line each; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path

from trainables.data import DataError
from trainables.stages.store import StoreError

from .cluster import StorageError
from .paths import StudyPaths
from .preflight import Context, PreflightError, preflight
from .spec import SpecError, load_spec, parse_spec, read_spec

BAD_INPUT = (SpecError, PreflightError, DataError, StorageError)  # exit 2: nothing was created


def _results_dir(args) -> str:
    return args.results_dir or os.environ.get("STUDY_RESULTS_DIR", "runs")


def _paths(name: str, args) -> StudyPaths:
    paths = StudyPaths.of(name, _results_dir(args))
    if not paths.spec_file.exists():
        raise PreflightError([f"no study {name!r} in {paths.root.parent} (looked for {paths.spec_file}); "
                              "launch it first, or pass --results-dir"], name)
    spec = load_spec(paths.spec_file)
    return StudyPaths.saved(spec.name, _results_dir(args), spec.store, getattr(args, "tracking_uri", None))


def _fail(message: str, code: int = 2) -> int:
    print(f"study: {message}", file=sys.stderr)
    return code


def _check(spec, paths: StudyPaths, args, document: dict | None = None) -> None:
    """Everything checkable about the run, before anything is created (PreflightError / DataError otherwise)."""
    from trainables.data import build_data

    from .plan import data_config

    from .final_test import needs_test

    try:
        data = build_data(data_config(spec), spec.seeds[0])  # the data exists and splits as asked
        if needs_test(spec):  # the test split the selected configurations meet after the search
            build_data(data_config(spec, eval_on="test"), spec.seeds[0])
    except DataError as exc:
        raise DataError(f"data: {exc}") from exc
    address = args.address or os.environ.get("RAY_ADDRESS")
    preflight(Context(spec, paths, address, (data.in_channels, data.num_classes, data.image_size), document))


def _summary(spec, paths: StudyPaths, results, report: bool) -> int:
    from .status import results_table, verdict_lines

    print()
    print(f"Results of {spec.name} (mean [95% CI] over seeds; difference to {spec.baseline} in brackets):")
    print(results_table(paths.tracking_uri, spec.name, spec.baseline))
    print("\nVerdicts (paired by seed, Holm-corrected):")
    print(verdict_lines(paths.tracking_uri, spec.name, spec.baseline))
    failed = len(results.errors)
    if failed:
        print(f"\n{failed} trial(s) failed; `study status {spec.name}` shows which, MLflow has their errors.")
    print(f"\nMLflow records: {paths.tracking_uri}  (browse: study ui {spec.name})")
    if report:
        report_path = _write_report(spec, paths)
        print(f"Report: {report_path}")
    return 1 if failed else 0


def _write_report(spec, paths: StudyPaths) -> Path:
    from analysis import write_report

    optuna = paths.optuna_storage if (paths.root / "optuna.db").exists() else None
    return write_report(paths.tracking_uri, spec.name, paths.report_dir, optuna_storage=optuna,
                        baseline=spec.baseline)


def cmd_launch(args) -> int:
    from .launch import launch

    document = read_spec(args.spec, args.set, args.smoke)  # validate before anything is created
    spec = parse_spec(document, str(args.spec))
    paths = StudyPaths.of(spec.name, args.results_dir or spec.results_dir, spec.store, args.storage or spec.storage,
                          args.tracking_uri)
    _check(spec, paths, args, document)
    print(f"study {spec.name}: {len(spec.models)} model(s) x {len(spec.seeds)} seed(s)"
          + (f", {spec.search.algorithm} search" if spec.search else "") + f" on {spec.data.dataset}")
    spec, paths, results = launch(args.spec, args.results_dir, args.address, args.set, args.smoke, args.storage,
                                  args.tracking_uri)
    return _summary(spec, paths, results, report=not args.no_report)


def cmd_resume(args) -> int:
    from .launch import resume

    paths = _paths(args.name, args)
    _check(load_spec(paths.spec_file), paths, args)
    spec, paths, results = resume(args.name, str(paths.root.parent), args.address, args.tracking_uri)
    return _summary(spec, paths, results, report=not args.no_report)


def cmd_status(args) -> int:
    import pandas as pd

    from .launch import launcher_alive
    from .status import trial_status

    paths = _paths(args.name, args)
    spec = load_spec(paths.spec_file)
    frame = trial_status(paths.tracking_uri, args.name, spec, paths.store_uri, launcher_alive(paths))
    if frame.empty:
        print(f"study {args.name}: no trial recorded yet")
        return 0
    with pd.option_context("display.max_rows", 500, "display.width", 200, "display.max_columns", 30,
                           "display.float_format", "{:.2f}".format):
        print(frame.to_string(index=False))
    counts = frame["status"].value_counts().to_dict()
    print("\n" + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()))
    if counts.get("INTERRUPTED"):
        print(f"`study resume {args.name}` continues the interrupted trials")
    return 0


def cmd_ui(args) -> int:
    from .tracking import ui_command

    paths = _paths(args.name, args)
    cmd = ui_command(paths.tracking_uri, paths.artifact_location, args.port)
    if cmd is None:
        print(f"{args.name} is recorded on the tracking server {paths.tracking_uri}: its UI is there "
              f"(experiment {args.name!r}). From another machine, forward its port first, e.g. "
              "`ray attach cluster.yaml -p 5000` (docs/CLUSTER.md).")
        return 0
    print(f"MLflow UI for {args.name}: http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    return subprocess.call(cmd)


def cmd_report(args) -> int:
    paths = _paths(args.name, args)
    spec = load_spec(paths.spec_file)
    print(_write_report(spec, paths))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error, not only its message")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, name=True):
        if name:
            sp.add_argument("name", help="the study's name (its spec's `name`)")
        sp.add_argument("--results-dir", help="where studies live (default: $STUDY_RESULTS_DIR or ./runs)")
        tracking(sp)

    def tracking(sp):
        sp.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. a tracking server http://host:5000 that "
                        "proxies artifacts (default: the one the study was launched with, $MLFLOW_TRACKING_URI, "
                        "else the study's embedded mlflow.db)")

    sp = sub.add_parser("launch", parents=[debug], help="validate a spec and run the study")
    sp.add_argument("spec", help="a study spec (YAML), e.g. studies/quickstart.yaml")
    sp.add_argument("--results-dir", help="override the spec's results_dir")
    sp.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    sp.add_argument("--storage", help="URI every node reaches (s3://bucket/prefix, gs://..., a shared mount): Tune "
                    "state, Train checkpoints, the stage store, MLflow artifacts without a server (default: the "
                    "spec's storage, $STUDY_STORAGE, else the results dir: one machine only)")
    tracking(sp)
    sp.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    sp.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                    help="override a spec field (value in YAML), e.g. --set data.subset=2000 --set seeds=[0,1]")
    sp.add_argument("--smoke", action="store_true",
                    help="the same study at toy size (tiny VGG, 200 images, 1 epoch per stage), named <name>-smoke")
    sp.set_defaults(func=cmd_launch)

    sp = sub.add_parser("resume", parents=[debug], help="continue an interrupted study")
    common(sp)
    sp.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    sp.add_argument("--no-report", action="store_true")
    sp.set_defaults(func=cmd_resume)

    sp = sub.add_parser("status", parents=[debug], help="table of the study's trials")
    common(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("ui", parents=[debug], help="serve the MLflow UI on 127.0.0.1 over the study's records")
    common(sp)
    sp.add_argument("--port", type=int, default=5000)
    sp.set_defaults(func=cmd_ui)

    sp = sub.add_parser("report", parents=[debug], help="write the study's HTML report")
    common(sp)
    sp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from analysis import AnalysisError

    from .launch import Interrupted
    from .status import RecordsError

    args = parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except Interrupted as exc:
        name = getattr(args, "name", None) or _name_of(args)
        print(f"study: stopped by {exc}; running trials were stopped and recorded as KILLED, finished stages are "
              f"kept. Continue with: study resume {name}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("study: interrupted", file=sys.stderr)
        return 130
    except BAD_INPUT as exc:
        if debug:
            traceback.print_exc()
        return _fail(str(exc), 2)
    except (AnalysisError, RecordsError, StoreError) as exc:
        if debug:
            traceback.print_exc()
        return _fail(str(exc), 1)
    except Exception as exc:  # noqa: BLE001 (anything else is failed work: one line, the traceback on --debug)
        if debug:
            traceback.print_exc()
        first = next((line for line in str(exc).strip().splitlines() if line.strip()), "")
        return _fail(f"{type(exc).__name__}: {first[:500]}" + ("" if debug else " (--debug shows the traceback)"), 1)


def _name_of(args) -> str:
    try:
        return load_spec(args.spec, args.set, args.smoke).name
    except Exception:  # noqa: BLE001
        return "<name>"


if __name__ == "__main__":
    sys.exit(main())
