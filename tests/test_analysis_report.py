"""analysis.report and `python -m analysis`: files, MLflow upload, CLI errors, and rendering in headless chromium."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from analysis import load_study, paper_table, write_report
from analysis.__main__ import main
from analysis.stats import VERDICT_COLUMNS
from analysis.synthetic import demo_trials, write_study

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
browser = pytest.mark.browser
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    sqlite3.connect(root / "mlflow.db").execute("PRAGMA journal_mode=WAL").fetchall()  # fewer fsyncs
    uri = f"sqlite:///{root}/mlflow.db"
    trials = demo_trials(seeds=(0, 1, 2))
    trials.append({"model": "swwae-all", "seed": 3, "status": "FAILED", "status_detail": "CUDA out of memory"})
    write_study(uri, "demo", trials, epochs=6)
    write_study(uri, "empty", [])
    return uri


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(store, "demo", out)


@pytest.fixture(scope="module")
def empty_report(store, tmp_path_factory):
    return write_report(store, "empty", tmp_path_factory.mktemp("empty"), log_to_mlflow=False)


def test_report_files_tables_and_mlflow_upload(store, report):
    out = report.parent
    assert sorted(p.name for p in out.iterdir()) == ["claims.csv", "report.html", "table.csv", "table.md",
                                                     "verdicts.csv"]
    expected = paper_table(load_study(store, "demo", curves=False).trials)
    pd.testing.assert_frame_equal(pd.read_csv(out / "table.csv"), expected, check_dtype=False)
    md = (out / "table.md").read_text()
    assert "| model" in md and "swwae-layerwise" in md and "[" in md  # means with intervals

    page = report.read_text()
    assert page.count("* plotly.js v") == 1  # plotly.js inlined exactly once ...
    assert not re.search(r"<script[^>]+src=", page)  # ... and nothing fetched from the network
    assert "Study report: demo" in page and "Report generated on" in page
    assert "CUDA out of memory" in page  # the failed trial is named, and left out
    assert "better optimum" in page and "reproduced" in page

    study_run = load_study(store, "demo", curves=False).study_run_id
    logged = {Path(a.path).name for a in MlflowClient(store).list_artifacts(study_run, "report")}
    assert logged == {"report.html", "table.csv", "table.md", "verdicts.csv", "claims.csv"}
    # Machine-readable verdicts and claims, with the documented columns (docs/RECORDS.md).
    v = pd.read_csv(out / "verdicts.csv")
    assert list(v.columns) == VERDICT_COLUMNS and len(v) == 6 + 6 + 3
    assert set(v["family"]) == {"primary", "secondary: placement", "secondary: decoder"}
    assert (v["n_images"] == 10000).all() and v["val_image_var"].gt(0).all()  # the image-level floor was used
    c = pd.read_csv(out / "claims.csv")
    assert list(c.columns) == ["claim_id", "claim", "status", "evidence", "reason"] and len(c) == 6
    # Invertibility from per-image errors of one fixed classifier per seed decides (the demo: SWWAE better).
    assert c.set_index("claim_id").loc["swwae-invertible", "status"] == "reproduced"


def test_empty_study_gives_a_report_that_says_so(empty_report):
    page = empty_report.read_text()
    assert "No trials recorded yet" in page
    assert "no finished trials with train and val errors yet" in page
    assert "no runs with stage finetune yet" in page


def test_cli_unknown_study_exits_2_with_the_existing_studies(store, tmp_path, capsys):
    code = main(["report", "--tracking-uri", store, "--study", "typo", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "no study 'typo'" in err and "'demo'" in err and "'empty'" in err


def test_cli_report(store, tmp_path, capsys):
    assert main(["report", "--tracking-uri", store, "--study", "empty", "--out", str(tmp_path), "--no-mlflow"]) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert (tmp_path / "table.md").exists()


# --------------------------------------------------------------------------- in a real browser


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _body_attrs(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "chromium dumped no <body>"
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def _check_figures(dom: str) -> None:
    attrs = _body_attrs(dom)
    expected = int(attrs["data-figures-expected"])
    assert expected >= 5
    assert attrs.get("data-js-errors") == "", attrs.get("data-js-errors")
    assert int(attrs["data-figures"]) == expected, f"{attrs['data-figures']} of {expected} figures drew"


@browser
@needs_chromium
def test_report_in_chromium_draws_every_figure_without_errors_and_screenshots(report, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    result = _chromium(tmp_path, "--dump-dom", f"--screenshot={shot}", "--window-size=1400,3000", report.as_uri())
    _check_figures(result.stdout)
    assert shot.exists(), result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


@browser
@needs_chromium
def test_empty_report_in_chromium_draws_its_message_figures(empty_report, tmp_path):
    _check_figures(_chromium(tmp_path, "--dump-dom", empty_report.as_uri()).stdout)
