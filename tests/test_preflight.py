"""Everything checkable is checked before anything is created, and the CLI answers in one line, not a traceback.

Each check gets a spec (or arguments) that fails it: exit code 2, one message naming the field and the fix, and
nothing created (no study directory, no MLflow store, no stage store, no Ray).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from study.cli import main
from study.paths import StudyPaths
from study.preflight import Context, check_pretrained
from study.spec import parse_spec

from test_spec import GOOD, variant


def refused(tmp_path, monkeypatch, capsys, spec: dict | str, *args) -> str:
    """Launch `spec` from an empty directory; assert exit 2, nothing created and no Ray; return the message."""
    import ray

    path = tmp_path / "spec.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    before = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["launch", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before, "something was created"
    assert not ray.is_initialized()
    assert "Traceback" not in err and err.startswith("study: "), err
    return err


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(tmp_path, monkeypatch, capsys):
    text = yaml.safe_dump(GOOD, sort_keys=False) + "seeds: [1]\n"
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("name:"))
    text = text + "name: again\n"
    err = refused(tmp_path, monkeypatch, capsys, text)
    assert f"name: duplicate key (lines {first} and {len(text.splitlines())})" in err, err
    nested = "name: ok\ndata:\n  subset: 200\n  subset: 300\n"
    assert "subset: duplicate key (lines 3 and 4)" in refused(tmp_path, monkeypatch, capsys, nested)


def test_pretrained_weights_on_an_encoder_that_cannot_take_them(tmp_path, monkeypatch, capsys):
    err = refused(tmp_path, monkeypatch, capsys, variant(model={"encoder": "vgg_tiny", "pretrained": "IMAGENET1K_V1"}))
    assert "model.pretrained: torchvision weights exist for encoder 'vgg16' only, not 'vgg_tiny'" in err


VGG16 = parse_spec(variant(models=["baseline"], model={"encoder": "vgg16"}, data={"dataset": "cifar10"}))


def pretrained(name: str, shape=(3, 1000, 224)) -> list[str]:
    spec = VGG16.model_copy(update={"model": VGG16.model.model_copy(update={"pretrained": name})})
    return check_pretrained(Context(spec, StudyPaths.of("x", "/nonexistent"), None, shape))


def test_pretrained_weights_names_and_files_are_checked_against_the_encoder(tmp_path):
    from torchvision.models import vgg16

    assert pretrained("IMAGENET1K_V1") == []  # a known name whose shapes fit (nothing is downloaded)
    assert "torchvision has no vgg16 weights named 'IMAGENET1K_V9'" in pretrained("IMAGENET1K_V9")[0]
    assert pretrained("IMAGENET1K_V1", (3, 10, 32)) == []  # another class count: the model keeps its own last layer
    assert "no such file" in pretrained(str(tmp_path / "missing.pth"))[0]
    with torch.device("meta"):
        state = vgg16(num_classes=10).state_dict()
    good = tmp_path / "ten.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in state.items()}, good)
    assert pretrained(str(good), (3, 10, 32)) == []
    assert "does not fit" in pretrained(str(good), (1, 10, 32))[0]  # 1-channel data: features.0.weight differs
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, partial)
    assert "missing ['classifier.0.bias'" in pretrained(str(partial))[0]
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert "not a readable PyTorch state dict" in pretrained(str(junk))[0]


def test_a_store_that_cannot_be_written_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    err = refused(tmp_path, monkeypatch, capsys, variant(store=str(tmp_path / "afile" / "store")))
    assert "store: " in err and "is a file, not a directory" in err and "set `store:`" in err


def test_a_results_dir_that_cannot_be_written_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    err = refused(tmp_path, monkeypatch, capsys, GOOD, "--results-dir", str(tmp_path / "afile" / "runs"))
    assert "results_dir: " in err and "pass --results-dir" in err


def test_an_unreachable_cluster_address_is_refused(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    err = refused(tmp_path, monkeypatch, capsys, GOOD, "--address", f"127.0.0.1:{port}")
    assert f"--address: no Ray cluster answers at 127.0.0.1:{port}" in err
    assert "--address: 'headnode' is not host:port" in refused(tmp_path, monkeypatch, capsys, GOOD, "--address", "headnode")


def test_a_different_study_of_the_same_name_is_refused(tmp_path, monkeypatch, capsys):
    study = tmp_path / "runs" / "ok"
    study.mkdir(parents=True)
    (study / "spec.yaml").write_text(yaml.safe_dump({**GOOD, "seeds": [7]}))
    err = refused(tmp_path, monkeypatch, capsys, GOOD)
    assert "name: a different study named 'ok' exists" in err and "study resume ok" in err


def unreadable_study(tmp_path):
    study = tmp_path / "runs" / "ok"
    study.mkdir(parents=True)
    (study / "spec.yaml").write_text(yaml.safe_dump(GOOD))
    (study / "mlflow.db").write_bytes(b"this is not a database" * 100)
    return study


def test_status_on_unreadable_records_is_a_message(tmp_path, monkeypatch, capsys):
    unreadable_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["status", "ok"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("study: cannot read the MLflow records at sqlite:///") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert main(["status", "ok", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err  # --debug shows where it came from


def test_the_installed_command_gives_messages_not_tracebacks(tmp_path, monkeypatch, capsys):
    unreadable_study(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "study", "status", "ok"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("study: cannot read"), proc.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args, code in ((["report", "ok"], 1), (["resume", "nope"], 2)):
        assert main(args) == code, args
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("study: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [["launch", "x.yaml", "--debug"], ["status", "x", "--debug"], ["--debug", "status", "x"]])
def test_every_command_takes_debug(argv):
    from study.cli import parser

    assert parser().parse_args(argv).debug is True
