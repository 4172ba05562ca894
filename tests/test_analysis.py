"""analysis/: loading a real MLflow store written as docs/RECORDS.md says, statistics, verdicts, claims, figures.

The store is written once per module (sqlite in a temporary directory) with numbers chosen here, so every
expected value below is computed from those numbers with numpy/scipy, not read back from the code under test.
"""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import AnalysisError, compare_claims, load_study, paper_results, paper_table, verdicts
from analysis import figures as F
from analysis.stats import (
    gain_share_by_epoch,
    generalization_gap,
    holm,
    invertibility,
    mean_ci,
    paired_test,
    param_importances,
    seeds_needed,
    sensitivity,
)
from analysis.synthetic import write_study

SEEDS = [0, 1, 2, 3, 4]
SEED_SHIFT = np.array([0.0, 0.3, -0.2, 0.1, -0.15])  # a seed effect shared by all models: pairing removes it
SMALL_A = np.array([0.03, -0.02, 0.01, -0.04, 0.02])
SMALL_B = np.array([-0.01, 0.03, -0.02, 0.02, -0.03])
# (train diff to baseline, val diff to baseline) per seed, designed for one verdict each:
DESIGN = {
    "baseline": (np.zeros(5), np.zeros(5)),
    "sae-first": (-2.0 + SMALL_A, -1.5 + SMALL_B),  # better optimum: train and val lower
    "swwae-all": (0.8 + SMALL_B, -1.0 + SMALL_A),  # regularizes: train significantly higher, val lower
    "sae-all": (np.array([0.3, -0.4, 0.2, -0.1, -0.25]), -1.0 + SMALL_B),  # val lower, train slightly lower (n.s.)
    "sae-layerwise": (np.array([0.5, -0.6, 0.4, -0.3, 0.2]), 1.2 + SMALL_A),  # hurts: val higher
    "swwae-first": (np.array([0.3, -0.4, 0.2, -0.1, 0.05]), np.array([0.2, -0.3, 0.25, -0.2, 0.1])),  # no effect
    "swwae-layerwise": (np.full(5, -0.1), np.full(5, -0.1)),  # the same difference on every seed
}
EXPECTED_VERDICT = {"sae-first": "better optimum", "swwae-all": "regularizes", "sae-layerwise": "hurts",
                    "sae-all": "lower validation error, mechanism unclear", "swwae-first": "no clear effect",
                    "swwae-layerwise": "no clear effect"}  # fmt: skip
N_IMAGES = 2000  # per-image outcomes of baseline and swwae-layerwise: 1 image = 0.05 points
FLIPS = 20  # images swwae-layerwise gets wrong that the baseline gets right (and 22 the other way)
CURVE_OFFSETS = [3.0, 1.5, 0.8, 0.4, 0.1, 0.0]  # fine-tuning val error above its final value, epochs 1..6
BASE_CURVE_OFFSETS = [1.0, 0.5, 0.3, 0.2, 0.1, 0.0]
INVERT = {"sae": {1: 0.01, 2: 0.04, 3: 0.09}, "swwae": {1: 0.002, 2: 0.004, 3: 0.006}}


def metric_values(model: str) -> dict[str, np.ndarray]:
    train_d, val_d = DESIGN[model]
    train1 = 20.0 + SEED_SHIFT + train_d
    val1 = 30.0 + SEED_SHIFT + val_d
    return {
        "train_top1_err": train1,
        "val_top1_err": val1,
        "train_top5_err": train1 / 4,
        "val_top5_err": val1 / 3,
        "val_top1_err_dense": val1 - 2.0,
    }


def wrong_images(err: float, seed: int, split: str, model: str) -> np.ndarray:
    """Per-image 0/1 outcomes whose mean is exactly err%: the baseline's wrong images come first in a seeded
    order; swwae-layerwise (err 0.1 points lower) swaps FLIPS + 2 of them for FLIPS others."""
    order = np.random.default_rng([seed, len(split)]).permutation(N_IMAGES)
    wrong = np.zeros(N_IMAGES, dtype=np.uint8)
    if model == "baseline":
        wrong[order[: round(err * N_IMAGES / 100)]] = 1
        return wrong
    base = round((err + 0.1) * N_IMAGES / 100)
    wrong[order[: base - FLIPS - 2]] = 1
    wrong[order[base : base + FLIPS]] = 1
    return wrong


def invert_images(decoder: str, seed: int, n: int = 200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"invert_err_pool{k}": (v + 0.001 * seed + rng.normal(0, v / 4, n)).astype(np.float16)
            for k, v in INVERT[decoder].items()}  # fmt: skip


def ablation_trials() -> list[dict]:
    trials = []
    for model in DESIGN:
        values = metric_values(model)
        decoder = model.split("-")[0]
        for i, seed in enumerate(SEEDS):
            trial = {"model": model, "seed": seed, **{k: float(v[i]) for k, v in values.items()}}
            if model in ("baseline", "swwae-layerwise"):
                trial["predictions"] = {f"{split}_top1_wrong": wrong_images(trial[f"{split}_top1_err"], seed, split, model)
                                        for split in ("train", "val")}  # fmt: skip
            if decoder in INVERT and "layerwise" not in model:  # one trial per decoder computes the stage
                trial["stage_predictions"] = {"layerwise": invert_images(decoder, seed)}
            offsets = BASE_CURVE_OFFSETS if model == "baseline" else CURVE_OFFSETS
            trial["val_curve"] = [trial["val_top1_err"] + o for o in offsets]
            if decoder in INVERT:
                trial["invert"] = {k: v + 0.001 * seed for k, v in INVERT[decoder].items()}
            trials.append(trial)
    # A failed trial must not count anywhere.
    trials.append({"model": "sae-first", "seed": 5, "status": "FAILED", "train_top1_err": 0.0, "val_top1_err": 0.0})
    return trials


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    # WAL journal (stored in the file) makes sqlite commit with fewer fsyncs; it is still a normal MLflow store.
    sqlite3.connect(root / "mlflow.db").execute("PRAGMA journal_mode=WAL").fetchall()
    uri = f"sqlite:///{root}/mlflow.db"
    write_study(uri, "ablation", ablation_trials(), epochs=6, depth=3)
    paper = paper_results()
    write_study(uri, "paper", [{"model": m, "seed": 0, **row.to_dict()} for m, row in paper.iterrows()],
                epochs=4, artifacts=False)  # fmt: skip
    return uri


@pytest.fixture(scope="module")
def runs(store):
    return load_study(store, "ablation")


# --------------------------------------------------------------------------- loading


def test_unknown_study_names_the_study_and_the_existing_ones(store):
    with pytest.raises(AnalysisError) as err:
        load_study(store, "no-such-study")
    message = str(err.value)
    assert "no-such-study" in message and "'ablation'" in message and "'paper'" in message


def test_trials_frame_has_one_row_per_trial_with_tags_params_and_final_metrics(runs):
    t = runs.trials
    assert len(t) == len(DESIGN) * len(SEEDS) + 1
    for col in ("trial_id", "run_id", "model", "decoder", "placement", "seed", "status", "val_top1_err",
                "params.loss.weights.image", "params.stages.finetune.lr"):  # fmt: skip
        assert col in t.columns, col
    assert (t["status"] == "FAILED").sum() == 1
    row = t[(t["model"] == "swwae-all") & (t["seed"] == 3)].iloc[0]
    assert (row["decoder"], row["placement"]) == ("swwae", "all")
    assert row["val_top1_err"] == pytest.approx(metric_values("swwae-all")["val_top1_err"][3])
    assert row["params.loss.weights.image"] == pytest.approx(1e-4)  # params come back as numbers
    assert runs.study_run_id is not None


def test_stages_frame_marks_reused_stages_and_curves_hold_every_epoch(runs):
    s = runs.stages
    assert {"classifier", "layerwise", "topdown", "finetune"} <= set(s["stage"])
    seed0 = s[(s["seed"] == 0) & (s["stage"] == "classifier")]
    assert len(seed0) == len(DESIGN)  # one per trial ...
    assert seed0["stage_key"].nunique() == 1 and (~seed0["reused"]).sum() == 1  # ... computed once
    assert "rec_err_image" in s.columns and "invert_err_pool3" in s.columns

    c = runs.curves
    trial = runs.trials[(runs.trials["model"] == "sae-first") & (runs.trials["seed"] == 2)].iloc[0]
    curve = c[(c["trial_id"] == trial["trial_id"]) & (c["stage"] == "finetune") & (c["metric"] == "val_top1_err")]
    assert list(curve["step"]) == [1, 2, 3, 4, 5, 6]
    expected = metric_values("sae-first")["val_top1_err"][2] + np.array(CURVE_OFFSETS)
    np.testing.assert_allclose(curve["value"], expected)
    assert {"loss", "loss_ce", "loss_rec_image", "val_top5_err"} <= set(c["metric"])


def test_inversion_artifact_is_downloaded(runs):
    row = runs.stages[(runs.stages["decoder"] == "swwae") & (runs.stages["stage"] == "layerwise")].iloc[0]
    arrays = runs.inversion(row["run_id"])
    assert set(arrays) == {"input", "from_pool1", "from_pool2", "from_pool3"}
    assert arrays["input"].ndim == 4 and arrays["from_pool3"].shape == arrays["input"].shape
    baseline = runs.stages[runs.stages["model"] == "baseline"].iloc[0]
    with pytest.raises(AnalysisError, match="recon/invert.npz"):
        runs.inversion(baseline["run_id"])


# --------------------------------------------------------------------------- statistics


def test_paper_table_means_and_cis_are_exactly_as_constructed(runs):
    table = paper_table(runs.trials).set_index("model")
    assert list(table.index) == ["baseline", "sae-first", "sae-all", "sae-layerwise", "swwae-first", "swwae-all",
                                 "swwae-layerwise"]
    t = sps.t.ppf(0.975, len(SEEDS) - 1)
    for model in DESIGN:
        assert table.loc[model, "n"] == len(SEEDS)  # the failed sae-first trial is left out
        for metric, values in metric_values(model).items():
            half = t * values.std(ddof=1) / math.sqrt(len(values))
            assert table.loc[model, f"{metric}_mean"] == pytest.approx(values.mean(), abs=1e-9)
            assert table.loc[model, f"{metric}_ci_low"] == pytest.approx(values.mean() - half, abs=1e-9)
            assert table.loc[model, f"{metric}_ci_high"] == pytest.approx(values.mean() + half, abs=1e-9)
            base = metric_values("baseline")[metric].mean()
            assert table.loc[model, f"{metric}_vs_baseline"] == pytest.approx(values.mean() - base, abs=1e-9)
    assert "val_top5_err_dense_mean" not in table.columns  # never recorded, so no column


def test_an_error_near_zero_gets_an_interval_cut_at_zero_and_a_difference_is_not_cut():
    # top-5 errors 0, 0, 0.5 over 3 seeds: mean 1/6, sd sqrt(1/12), t(0.975, 2) = 4.3027; raw interval
    # [-0.5504, 0.8838]. An error rate cannot be below 0: the table shows [0, 0.8838].
    values = [0.0, 0.0, 0.5]
    half = sps.t.ppf(0.975, 2) * math.sqrt(1 / 12) / math.sqrt(3)
    assert half == pytest.approx(0.71711, abs=1e-5)
    trials = pd.DataFrame({"model": ["baseline"] * 3, "seed": [0, 1, 2], "status": ["FINISHED"] * 3,
                           "train_top5_err": values, "val_top5_err": [99.8, 100.0, 99.9]})
    row = paper_table(trials).iloc[0]
    assert row["train_top5_err_mean"] == pytest.approx(1 / 6)
    assert row["train_top5_err_ci_low"] == 0.0 and row["train_top5_err_ci_high"] == pytest.approx(1 / 6 + half)
    assert row["val_top5_err_ci_high"] == 100.0 and row["val_top5_err_ci_low"] == pytest.approx(99.9 - 0.2484, abs=1e-4)
    unbounded = mean_ci(values)  # a difference (or any quantity without a range) keeps its t interval
    assert unbounded.ci_low == pytest.approx(1 / 6 - half) and unbounded.ci_low < 0


def test_every_verdict_class_appears_where_constructed(runs):
    v = verdicts(runs.trials)
    vs_base = v[v["family"] == "primary"].set_index("a")
    for model, expected in EXPECTED_VERDICT.items():
        assert vs_base.loc[model, "verdict"] == expected, vs_base.loc[model, "sentence"]
        assert vs_base.loc[model, "n_pairs"] == len(SEEDS)
        assert expected in vs_base.loc[model, "sentence"]
    # The paired difference, its CI and the raw p-value, recomputed here from the design.
    train_d, val_d = DESIGN["swwae-all"]
    row = vs_base.loc["swwae-all"]
    assert row["val_diff"] == pytest.approx(val_d.mean())
    half = sps.t.ppf(0.975, 4) * val_d.std(ddof=1) / math.sqrt(5)
    assert (row["val_ci_low"], row["val_ci_high"]) == pytest.approx((val_d.mean() - half, val_d.mean() + half))
    base = metric_values("baseline")
    assert row["train_p"] == pytest.approx(sps.ttest_rel(metric_values("swwae-all")["train_top1_err"],
                                                         base["train_top1_err"]).pvalue)  # fmt: skip
    # Holm within each family, one metric at a time: the primary family alone, as the textbook formula.
    for metric in ("train", "val"):
        prim = v[v["family"] == "primary"]
        np.testing.assert_allclose(prim[f"{metric}_p_adj"], holm(prim[f"{metric}_p"]))
    assert set(v["family"]) == {"primary", "secondary: placement", "secondary: decoder"}
    assert {("swwae-all", "swwae-first"), ("swwae-first", "sae-first")} <= set(zip(v["a"], v["b"]))
    # Lower val with a slightly lower, non-significant train error is not "regularizes".
    assert vs_base.loc["sae-all", "train_diff"] < 0 and vs_base.loc["sae-all", "train_p_adj"] > 0.05


def test_identical_differences_are_untestable_without_images_and_tested_with_them(runs):
    primary = lambda v: v[v["family"] == "primary"].set_index("a")  # noqa: E731
    plain = primary(verdicts(runs.trials)).loc["swwae-layerwise"]
    assert plain["val_sd_seeds"] == 0 and math.isnan(plain["val_p"])  # never p = 0 from no spread
    assert plain["verdict"] == "no clear effect" and "untestable" in plain["sentence"]
    images = runs.trial_images()
    assert set(images) == {(m, s) for m in ("baseline", "swwae-layerwise") for s in SEEDS}
    v = verdicts(runs.trials, images=images)
    row = primary(v).loc["swwae-layerwise"]
    # The floor: per seed, var of the per-image differences (22 of -100, 20 of +100 points) / N_IMAGES.
    e = np.r_[np.full(FLIPS + 2, -100.0), np.full(FLIPS, 100.0), np.zeros(N_IMAGES - 2 * FLIPS - 2)]
    floor = e.var(ddof=1) / N_IMAGES
    assert row["val_image_var"] == pytest.approx(floor)
    se = math.sqrt(floor / 5)
    assert row["val_p"] == pytest.approx(2 * sps.t.sf(0.1 / se, 4))
    assert row["val_half_width"] == pytest.approx(sps.t.ppf(0.975, 4) * se)
    assert row["n_images"] == N_IMAGES and row["verdict"] == "no clear effect"
    assert row["seeds_needed"] == seeds_needed(-0.1, math.sqrt(floor), 0.05 / 6) > 5
    assert f"{int(row['seeds_needed'])} seeds would detect" in row["sentence"]
    # Comparisons without images for both models are unchanged.
    other = primary(v).loc["sae-first"]
    assert math.isnan(other["val_image_var"]) and other["verdict"] == "better optimum"


def test_paired_test_floor_and_seeds_needed_known_answers():
    # Variance floor: the image-level variance replaces a smaller seed-to-seed one, never a larger one.
    t = paired_test([-1.0, -1.2, -0.8], [0.01, 0.01, 0.01])
    assert t.note == "seed-to-seed spread" and t.se == pytest.approx(0.2 / math.sqrt(3))
    t = paired_test([-1.0, -1.01, -0.99], [0.04, 0.04, 0.04])
    assert t.note == "image-sampling floor" and t.se == pytest.approx(math.sqrt(0.04 / 3)) and t.df == 2
    assert math.isnan(paired_test([-1.0]).p) and paired_test([-1.0]).n == 1
    # One-sample two-sided t-test, alpha 0.05, power 0.8 (the textbook / G*Power numbers).
    assert [seeds_needed(d, 1.0) for d in (0.5, 0.8, 1.0, 0.2)] == [34, 15, 10, 199]
    assert math.isnan(seeds_needed(0.0, 1.0)) and seeds_needed(1e-4, 1.0, max_n=50) == math.inf


def test_regularizes_by_a_smaller_gap_needs_a_training_error_that_is_not_lower():
    def frame(train_d, val_d):
        rows = []
        for i in range(5):
            rows.append({"model": "baseline", "seed": i, "train_top1_err": 20.0 + SEED_SHIFT[i],
                         "val_top1_err": 30.0 + SEED_SHIFT[i]})
            rows.append({"model": "sae-all", "seed": i, "train_top1_err": 20.0 + SEED_SHIFT[i] + train_d[i],
                         "val_top1_err": 30.0 + SEED_SHIFT[i] + val_d[i]})
        return pd.DataFrame(rows)

    train = np.array([0.3, -0.2, 0.25, -0.1, 0.05])  # not significant, mean +0.06
    val = -1.0 + SMALL_A
    assert verdicts(frame(train, val))["verdict"].iloc[0] == "regularizes"  # the gap is significantly smaller
    assert verdicts(frame(train - 0.1, val))["verdict"].iloc[0] == "lower validation error, mechanism unclear"


def test_one_seed_gives_not_enough_seeds_and_never_a_verdict(runs):
    one = runs.trials[runs.trials["seed"] == 0]
    v = verdicts(one, images=runs.trial_images())  # per-image outcomes do not make one seed a replication
    assert (v["verdict"] == "not enough seeds").all() and v["seeds_needed"].isna().all()
    assert v["val_p"].isna().all()
    assert all("no verdict" in s for s in v["sentence"])
    assert mean_ci([1.0]).n == 1 and math.isnan(mean_ci([1.0]).ci_low)  # one value: no interval
    table = paper_table(one)
    assert table["single_seed"].all() and table["val_top1_err_ci_low"].isna().all()
    claims = compare_claims(one).set_index("claim_id")  # and no claim is reproduced or contradicted
    assert (claims["status"] == "cannot decide").all()


def test_holm_matches_hand_computation():
    p = [0.01, 0.04, np.nan, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, np.nan, 0.06, 0.02])


def test_generalization_gap_and_gain_share(runs):
    gap = generalization_gap(runs.trials).set_index("model")
    for model in DESIGN:
        values = metric_values(model)
        assert gap.loc[model, "mean"] == pytest.approx((values["val_top1_err"] - values["train_top1_err"]).mean())

    share = gain_share_by_epoch(runs.curves, k=4).set_index("model")
    base_final = metric_values("baseline")["val_top1_err"].mean()
    final = metric_values("sae-first")["val_top1_err"].mean()
    expected = (base_final - (final + CURVE_OFFSETS[3])) / (base_final - final)
    assert share.loc["sae-first", "share"] == pytest.approx(expected)
    assert math.isnan(share.loc["sae-layerwise", "share"]) and "no final gain" in share.loc["sae-layerwise", "reason"]
    assert gain_share_by_epoch(runs.curves, k=9)["reason"].str.contains("no epoch 9").all()
    assert gain_share_by_epoch(runs.curves, k=6)["reason"].str.contains("needs a longer run").all()


def test_invertibility_counts_a_reused_stage_once(runs):
    inv = invertibility(runs.stages)
    row = inv[(inv["decoder"] == "sae") & (inv["stage"] == "layerwise") & (inv["depth"] == 2)].iloc[0]
    # sae-first and sae-layerwise share each seed's layerwise stage: 5 measurements, not 10.
    assert row["n"] == len(SEEDS)
    assert row["mean"] == pytest.approx(np.mean([INVERT["sae"][2] + 0.001 * s for s in SEEDS]))
    swwae = inv[(inv["decoder"] == "swwae") & (inv["stage"] == "layerwise")]
    assert list(swwae["depth"]) == [1, 2, 3]


def test_sensitivity_finds_the_parameter_that_matters():
    rng = np.random.default_rng(0)
    lr = np.repeat([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], 4)
    trials = pd.DataFrame({
        "model": "sae-all", "seed": np.arange(lr.size), "status": "FINISHED",
        "params.stages.finetune.lr": lr, "params.noise": rng.normal(size=lr.size),
        "params.optimizer": ["sgd", "adam"] * (lr.size // 2),
        "val_top1_err": 30 + 2 * np.log10(lr) + rng.normal(0, 0.01, lr.size),
    })  # fmt: skip
    sens = sensitivity(trials)
    corr = sens.correlations.set_index("param")
    assert corr.loc["stages.finetune.lr", "spearman_rho"] > 0.95
    assert abs(corr.loc["noise", "spearman_rho"]) < 0.6
    assert "categorical" in corr.loc["optimizer", "reason"]
    lr_bins = sens.bins[sens.bins["param"] == "stages.finetune.lr"]
    assert len(lr_bins) == 5 and lr_bins["mean"].is_monotonic_increasing  # a 5-value grid: one bin per value
    assert sens.bins[sens.bins["param"] == "noise"]["n"].tolist() == [4] * 5  # continuous: quantile bins
    assert set(sens.bins[sens.bins["param"] == "optimizer"]["label"]) == {"adam", "sgd"}


def test_param_importances_from_optuna_and_without_storage(tmp_path):
    import optuna

    empty = param_importances(None, "x")
    assert empty.table.empty and "no Optuna storage" in empty.reason
    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="search", storage=url, sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 10 * t.suggest_float("lr", 0, 1) + 0.01 * t.suggest_float("wd", 0, 1), n_trials=12)
    imp = param_importances(url, "search")
    assert list(imp.table["param"])[0] == "lr" and imp.table["importance"].sum() == pytest.approx(1.0)
    assert "no Optuna study" in param_importances(url, "other").reason


# --------------------------------------------------------------------------- the paper's claims


def test_paper_numbers_as_one_seed_study_decide_no_claim_but_give_directions(store):
    trials = load_study(store, "paper", curves=False).trials
    table = paper_table(trials).set_index("model")
    paper = paper_results()
    for metric in paper.columns:  # round trip through MLflow keeps the numbers
        np.testing.assert_allclose(table.loc[paper.index, f"{metric}_mean"], paper[metric])
    claims = compare_claims(trials).set_index("claim_id")
    for claim in ("augmented-better", "all-regularizes", "swwae-better"):  # one seed: no test, no result
        assert claims.loc[claim, "status"] == "cannot decide", claims.loc[claim, "reason"]
        assert "directions only" in claims.loc[claim, "evidence"] and "direction:" in claims.loc[claim, "reason"]
    assert "swwae-all vs baseline: train -1.76, val -1.66 points" in claims.loc["augmented-better", "reason"]
    for claim in ("gain-early", "swwae-invertible", "sae-depth"):
        assert claims.loc[claim, "status"] == "cannot decide"  # no curves or stages were given
    # The same from the bare table.
    assert (compare_claims(paper)["status"] == claims["status"].to_numpy()).all()


def test_claims_with_seeds_use_the_statistics(runs):
    claims = compare_claims(runs.trials, curves=runs.curves, stages=runs.stages).set_index("claim_id")
    # sae-layerwise hurts and swwae-all has a higher training error: the first claim is contradicted.
    assert claims.loc["augmented-better", "status"] == "contradicted"
    assert "sae-layerwise" in claims.loc["augmented-better", "reason"]
    assert "paired test over 5 seeds" in claims.loc["augmented-better", "evidence"]
    share = (1.5 - 0.4) / 1.5  # sae-first, the largest final gain: 73%, under the paper's 75%
    assert claims.loc["gain-early", "status"] == "cannot decide"
    assert f"{share:.0%}" in claims.loc["gain-early", "reason"] and "significantly more than half" in (
        claims.loc["gain-early", "reason"])
    # Invertibility: only with per-image errors of decoders on a fixed classifier.
    assert claims.loc["swwae-invertible", "status"] == "cannot decide"
    stage_images = runs.predictions(runs.stages[runs.stages["stage"] == "layerwise"]["run_id"])
    assert len(stage_images) == 2 * len(SEEDS)  # one computed layerwise stage per decoder and seed
    one = runs.stages[runs.stages["seed"] == 0]
    claims = compare_claims(runs.trials, stages=one, stage_images=stage_images).set_index("claim_id")
    for claim in ("swwae-invertible", "sae-depth"):  # one seed decides: paired per image, classifier fixed
        assert claims.loc[claim, "status"] == "reproduced", claims.loc[claim, "reason"]
        assert "200+ validation images" in claims.loc[claim, "evidence"]
    # A decoder that inverts worse contradicts it, significantly, with the same one seed.
    worse = {rid: {k: (v * 20 if rid in set(one[one["decoder"] == "swwae"]["run_id"]) else v) for k, v in a.items()}
             for rid, a in stage_images.items()}  # fmt: skip
    claims = compare_claims(runs.trials, stages=one, stage_images=worse).set_index("claim_id")
    assert claims.loc["swwae-invertible", "status"] == "contradicted"


# --------------------------------------------------------------------------- figures: data and picture


def test_figure_data_functions(runs):
    sc = F.error_scatter_data(runs.trials)
    assert len(sc.points) == 35 and len(sc.summary) == 7
    s = sc.summary.set_index("model")
    assert s.loc["swwae-all", "y_mean"] == pytest.approx(metric_values("swwae-all")["val_top1_err"].mean())

    lc = F.learning_curves_data(runs.curves, "finetune")
    row = lc.lines[(lc.lines["model"] == "baseline") & (lc.lines["metric"] == "val_top1_err") & (lc.lines["step"] == 1)]
    assert row["mean"].iloc[0] == pytest.approx(metric_values("baseline")["val_top1_err"].mean() + 1.0)
    assert row["n"].iloc[0] == len(SEEDS)
    assert F.curve_stages(runs.curves) == ["classifier", "layerwise", "topdown", "finetune"]

    arrays = {"input": np.arange(2 * 1 * 4 * 4, dtype=float).reshape(2, 1, 4, 4), "from_pool2": np.ones((2, 1, 4, 4)),
              "from_pool1": np.zeros((2, 1, 4, 4))}  # fmt: skip
    grid = F.recon_grid_data(arrays, pad=1)
    assert grid.row_labels == ["input", "from pool1", "from pool2"]
    assert grid.image.shape == (3 * 5 + 1, 2 * 5 + 1, 3) and grid.image.dtype == np.uint8
    tile = grid.image[1:5, 1:5, 0]
    assert tile.min() == 0 and tile.max() == 255  # min-max per image


def test_figures_render_and_empty_inputs_say_why():
    empty_trials = pd.DataFrame(columns=["trial_id", "model", "seed", "status"])
    empty_curves = pd.DataFrame(columns=["trial_id", "model", "seed", "stage", "metric", "step", "value"])
    figs = [
        F.error_scatter_figure(F.error_scatter_data(empty_trials)),
        F.generalization_gap_figure(F.generalization_gap_data(empty_trials)),
        F.learning_curves_figure(F.learning_curves_data(empty_curves, "topdown")),
        F.importance_figure(F.importance_data(sensitivity(empty_trials), param_importances(None, "s"))),
        F.invertibility_figure(F.invertibility_data(pd.DataFrame())),
        F.recon_grid_figure(F.recon_grid_data(None)),
    ]
    texts = [fig.layout.annotations[0].text for fig in figs]
    assert "no runs with stage topdown yet" in texts[2]
    assert all(t for t in texts)


def test_figures_draw_real_data(runs):
    fig = F.error_scatter_figure(F.error_scatter_data(runs.trials))
    assert not fig.layout.annotations and len(fig.data) >= 10
    fig = F.learning_curves_figure(F.learning_curves_data(runs.curves, "finetune"))
    names = {t.name for t in fig.data if t.showlegend is not False}
    assert names == set(DESIGN)
    fig = F.invertibility_figure(F.invertibility_data(runs.stages))
    assert {t.name for t in fig.data} == {"SAE", "SWWAE"}
