"""Names shared by the analysis modules: the one exception, metric and model vocabularies.

Every name here is spelled exactly as docs/RECORDS.md spells it.
"""

from __future__ import annotations

import re

import pandas as pd


class AnalysisError(ValueError):
    """Anything the analysis cannot do with the records it was given; the message says how to fix it."""


# Final error metrics of a trial, in percent (0-100), in the order the paper's table uses.
PAPER_METRICS: tuple[str, ...] = (
    "train_top1_err",
    "val_top1_err",
    "train_top5_err",
    "val_top5_err",
    "val_top1_err_dense",
    "val_top5_err_dense",
)
# A search with `data.eval_on: test` evaluates each model's selected configuration on the test split (only those).
TEST_METRICS: tuple[str, ...] = ("test_top1_err", "test_top5_err")
ERROR_METRICS: tuple[str, ...] = PAPER_METRICS + TEST_METRICS

METRIC_LABELS: dict[str, str] = {
    "train_top1_err": "Train top-1 (%)",
    "val_top1_err": "Val top-1 (%)",
    "train_top5_err": "Train top-5 (%)",
    "val_top5_err": "Val top-5 (%)",
    "val_top1_err_dense": "Val top-1 dense (%)",
    "val_top5_err_dense": "Val top-5 dense (%)",
    "test_top1_err": "Test top-1 (%)",
    "test_top5_err": "Test top-5 (%)",
}

# Stage names in the order a trial runs them.
STAGES: tuple[str, ...] = ("classifier", "pretrain", "layerwise", "topdown", "finetune")

# Model names in display order; unknown names sort after these, alphabetically.
MODEL_ORDER: tuple[str, ...] = (
    "baseline",
    "sae-first",
    "sae-all",
    "sae-layerwise",
    "swwae-first",
    "swwae-all",
    "swwae-layerwise",
    "skipae",
    "skipae-scratch",
)

DECODERS: tuple[str, ...] = ("sae", "swwae")
PLACEMENTS: tuple[str, ...] = ("first", "all", "layerwise")

# Prefix of parameter columns in the trials frame (as in mlflow.search_runs' own frames).
PARAM_PREFIX = "params."

_INVERT_RE = re.compile(r"^invert_err_pool(\d+)$")


def invert_depth(metric: str) -> int | None:
    """`invert_err_pool3` -> 3; anything else -> None."""
    match = _INVERT_RE.match(metric)
    return int(match.group(1)) if match else None


def model_sort_key(name: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(name) if name in MODEL_ORDER else len(MODEL_ORDER), str(name))


def ordered_models(names) -> list[str]:
    return sorted({str(n) for n in names}, key=model_sort_key)


def split_model(name: str) -> tuple[str, str]:
    """(decoder, placement) guessed from a model name, for frames that lack those tags."""
    if name == "baseline":
        return "none", "none"
    if name.startswith("skipae"):
        return "skip", "none"
    decoder, _, placement = name.partition("-")
    return decoder, placement or "none"


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """Only the trials that completed; frames without a `status` column are taken as all finished."""
    if "status" not in trials.columns:
        return trials
    return trials[trials["status"] == "FINISHED"]


def require_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise AnalysisError(
            f"{what} is missing column(s) {missing}; it has {sorted(map(str, frame.columns))}. "
            "Build it with analysis.load_study(...) or give it these columns."
        )
