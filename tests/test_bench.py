"""Every benchmark runs in smoke mode and ends with one JSON object carrying its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def run_smoke(name: str, tmp_path) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_step_time_smoke(tmp_path):
    out = run_smoke("step_time", tmp_path)
    models = out["setups"]["vgg_tiny@28"]["models"]
    assert set(models) == {"sae-first", "sae-all", "sae-layerwise", "swwae-first", "swwae-all", "swwae-layerwise"}
    assert all(m["flops_ratio"] > 1 for m in models.values())  # a decoder adds arithmetic
    assert out["worst_time_over_flops_ratio"] == max(m["time_over_flops"] for m in models.values())


def test_stage_tree_smoke_counts_exact_reuse(tmp_path):
    out = run_smoke("stage_tree", tmp_path)
    assert out["executed_epochs"] == out["exact_reuse_epochs"] and out["ratio"] == out["exact_reuse_ratio"] < 1


@pytest.mark.ray
def test_overhead_smoke(tmp_path):
    out = run_smoke("overhead", tmp_path)
    assert out["ratio"] > 0 and out["same_results"] is True
    assert out["study_ratio"] > 0 and out["train_start_s"] > 0 and out["train_teardown_s"] >= 0
    # Where the study's CPU went, by process: the training worker, Ray Train's controller, the launcher.
    cpu = out["study"]["platform_cpu_by_process"]
    assert {"RayTrainWorker", "TrainController", "launcher"} <= set(cpu), cpu
    assert out["study"]["platform_cpu_s"] == pytest.approx(sum(cpu.values()), abs=1.0)


@pytest.mark.ray
def test_chaos_smoke_recovers_identical_results(tmp_path):
    out = run_smoke("chaos", tmp_path)
    assert out["attempts"] == 1 and out["recovered_identical"] == 1, out  # identical to the plain-PyTorch run
    assert (out["stages_recomputed"], out["orphan_runs"], out["duplicated_runs"], out["repeated_metric_values"]) == (0, 0, 0, 0)
    # A Train worker killed after a checkpoint: its stage goes on from it, and the CLI says so in a line of its own.
    assert out["kills"] == {"worker": 1} and out["worker_kills_after_a_checkpoint"] == 1, out
    assert out["retry_lines"] == 1, out


def test_throughput_smoke_reports_bf16_speedup_and_peak_fraction_per_model(tmp_path):
    out = run_smoke("throughput", tmp_path)
    assert len(out["models"]) == 7
    assert all(m["bf16_speedup"] > 0 and 0 < m["peak_fraction"] for m in out["models"].values()), out["models"]
    assert set(out["accuracy"]["val_top1_err"]) == {"fp32", "bf16"}


def test_input_pipeline_smoke(tmp_path):
    out = run_smoke("input_pipeline", tmp_path)
    assert out["img_per_s"]["1"] > 0 and out["img_per_s"]["2"] > 0
    assert out["scaling_1_to_2"] == pytest.approx(out["img_per_s"]["2"] / out["img_per_s"]["1"], rel=0.01)
    assert out["img_per_s_per_core"] == out["img_per_s"]["1"] and out["cores_per_gpu"] > 0
