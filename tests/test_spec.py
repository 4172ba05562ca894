"""Bad specs are refused before anything exists: one clear message per problem, exit code 2, nothing created."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study.cli import main
from study.spec import SpecError, load_spec, parse_spec

GOOD = {
    "name": "ok",
    "models": ["baseline", "swwae-all"],
    "model": {"encoder": "vgg_tiny"},
    "stages": {k: {"epochs": 1} for k in ("classifier", "layerwise", "topdown", "finetune")},
}


def variant(**changes):
    spec = copy.deepcopy(GOOD)
    for path, value in changes.items():
        target = spec
        *parents, leaf = path.split("__")
        for p in parents:
            target = target.setdefault(p, {})
        if value is ...:
            del target[leaf]
        else:
            target[leaf] = value
    return spec


BAD = [
    (variant(modles=["baseline"]), "modles: unknown key (did you mean 'models'?)"),
    (variant(models=["baseline", "swae-all"]), "models: unknown model(s) 'swae-all' (did you mean 'swwae-all'?)"),
    (variant(stages__classifier__epochs="three"), "stages.classifier.epochs: Input should be a valid integer"),
    (variant(loss={"weights": {"image": -0.5}}), "loss.weights.image: Input should be greater than or equal to 0"),
    (variant(loss={"weights": {"pool7": 0.1}}), "loss.weights: level(s) ['pool7'] exist in none of the models"),
    (variant(loss={"weights": {"conv1": 0.1}}), "unknown level 'conv1'"),
    (variant(data={"dataset": "mnist"}), "data.dataset: unknown dataset 'mnist'"),
    (variant(stages__topdown=...), "stages.topdown: missing, but model 'swwae-all' needs it"),
    (variant(model={"encoder": "vgg19"}), "model.encoder: unknown encoder 'vgg19'"),
    (variant(models=["sae-first"], search={"space": {"loss.weights.pool1": {"type": "loguniform", "low": 1e-5, "high": 1}}}),
     "search.space.loss.weights.pool1: no model of this study has level 'pool1'"),
    (variant(search={"space": {"stages.finetune.optimizer.lrate": {"type": "uniform", "low": 0.1, "high": 1}}}),
     "search.space.stages.finetune.optimizer.lrate: unknown parameter"),
    (variant(search={"space": {"loss.weights.image": {"type": "loguniform", "low": 0, "high": 1}}}),
     "a loguniform distribution needs low > 0"),
    (variant(seeds=[0, 1], search={"space": {"loss.weights.image": {"type": "uniform", "low": 0, "high": 1}},
                                   "scheduler": {"type": "asha"}}),
     "search.scheduler: ASHA stops trials on one fine-tuning curve; use a single seed"),
    (variant(name="my study!"), "name: String should match pattern"),
    (variant(resources={"workers": 0}), "resources.workers: Input should be greater than or equal to 1"),
    (variant(model={"encoder": "vgg16"}), "model: 'baseline' cannot be built"),  # 28x28 is too small for 5 poolings
    (variant(data={"subset": 100, "val_size": 100}), "data.val_size: 100 held out of a subset of 100 leaves no training data"),
    (variant(seeds=[1, 1]), "seeds must be a non-empty list of distinct integers"),
    (variant(resources={"amp": True}), "resources: 'amp' was replaced by 'precision: auto | fp32 | bf16'"),
    (variant(resources={"precision": "fp16"}), "resources.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    (variant(resources={"train_runs": "shared"}), "resources.train_runs: Input should be 'per_trial' or 'pooled'"),
]


def test_the_good_spec_is_accepted():
    spec = parse_spec(GOOD)
    assert spec.models == ["baseline", "swwae-all"] and spec.stages["finetune"].epochs == 1
    with pytest.raises(Exception):  # frozen: nothing downstream can change it
        spec.name = "other"


@pytest.mark.parametrize("spec, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_spec_is_refused_with_its_own_message_and_nothing_is_created(spec, message, tmp_path, monkeypatch, capsys):
    import ray

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert sorted(os.listdir(tmp_path)) == ["spec.yaml"]  # no runs/, no mlflow.db, no store
    assert not ray.is_initialized()


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as info:
        parse_spec(variant(modles=[], data={"dataset": "mnist"}, stages__finetune__epochs=-1))
    assert len(info.value.problems) == 3


def test_unreadable_files_are_refused_clearly(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(SpecError, match="a study spec is a mapping"):
        load_spec(bad)


def test_missing_data_is_refused_before_anything_is_created(tmp_path, monkeypatch, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(variant(data={"dataset": "cifar10", "root": str(tmp_path / "nowhere")})))
    monkeypatch.chdir(tmp_path)
    assert main(["launch", str(path)]) == 2
    assert "data:" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["spec.yaml"]


SHIPPED = sorted((Path(__file__).parent.parent / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_specs_are_valid_and_plan_every_trial(path):
    from study.plan import resolve

    for smoke in (False, True):
        spec = load_spec(path, smoke=smoke)
        for model in spec.candidate_models():
            plan = resolve(spec, {"model": model, "seed": spec.seeds[0]})
            chain = plan.chain("data", spec.seeds[0], "fp32")
            assert chain[-1].stage.kind == "finetune" and chain[-1].stage.model.variant == model
    assert load_spec(path, smoke=True).name.endswith("-smoke")


def test_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    spec = load_spec(path, ["data.subset=500", "seeds=[3, 4]", "stages.finetune.optimizer.lr=0.5"])
    assert (spec.data.subset, spec.seeds, spec.stages["finetune"].optimizer.lr) == (500, [3, 4], 0.5)
    with pytest.raises(SpecError, match="expected path=value"):
        load_spec(path, ["data.subset"])
    with pytest.raises(SpecError, match="data.sbuset: unknown key"):
        load_spec(path, ["data.sbuset=5"])


def test_the_installed_command_exits_2(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(variant(models=["nope"])))
    proc = subprocess.run([sys.executable, "-m", "study", "launch", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown model(s) 'nope'" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["spec.yaml"]


def test_unknown_study_names_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in ("status", "resume", "report", "ui"):
        assert main([command, "nothing-here"]) == 2
        assert "no study 'nothing-here'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_an_ablation_grid_varies_seeds_fastest_and_covers_every_pair():
    """Trials that start together use different seeds' classifiers (no trial waits for another's classifier), and a
    grid search still runs every (model, seed, value) combination once."""
    from ray.tune.search.variant_generator import generate_variants

    from study.plan import grid_space, trial_config

    spec = parse_spec({**GOOD, "seeds": [0, 1, 2], "search": {
        "algorithm": "grid", "num_samples": 1,
        "space": {"loss.weights.image": {"type": "grid", "values": [0.1, 0.01]}}}})
    configs = [trial_config(config) for _, config in generate_variants(grid_space(spec))]
    assert [c["seed"] for c in configs[:3]] == [0, 1, 2]
    assert sorted((c["model"], c["seed"], c["loss.weights.image"]) for c in configs) == sorted(
        (m, s, w) for m in ("baseline", "swwae-all") for s in (0, 1, 2) for w in (0.1, 0.01))
