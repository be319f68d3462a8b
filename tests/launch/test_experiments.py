"""The experiment runner: a table from a grid, reused rows, and a rerun that reproduces its row."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--model", "cifar_resnet18_w16", "--image-size", "32", "--crop-pct", "1", "--batch-size", "8",
          "--epochs", "1", "--lr", "0.05", "--workers", "1", "--no-tensorboard", "--grid-every", "0"]


def runner(data, out, methods):
    cmd = [sys.executable, str(ROOT / "launch" / "experiments.py"), "--data", str(data), "--methods", methods,
           "--seeds", "0", "--out", str(out), "--", *COMMON]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_grid_table_and_reproducible_rerun(shapes_dir, tmp_path):
    out = runner(shapes_dir, tmp_path, "none,learned_affine")
    assert "| none |" in out and "| learned_affine |" in out and "1.00x" in out
    first = json.loads((tmp_path / "learned_affine_s0" / "metrics.json").read_text())
    again = runner(shapes_dir, tmp_path, "none,learned_affine")
    assert "done already" in again  # complete rows are reused, not rerun
    shutil.rmtree(tmp_path / "learned_affine_s0")
    runner(shapes_dir, tmp_path, "learned_affine")
    second = json.loads((tmp_path / "learned_affine_s0" / "metrics.json").read_text())
    assert second["test_acc"] == first["test_acc"]
    assert second["epochs"][0]["train_loss"] == first["epochs"][0]["train_loss"]
    assert (tmp_path / "results.csv").read_text().startswith("method,seed_0,mean,std,n,wall_time_s")


@pytest.mark.slow
def test_timing_sweep_and_table_only(shapes_dir, tmp_path):
    def call(*extra):
        cmd = [sys.executable, str(ROOT / "launch" / "experiments.py"), "--data", str(shapes_dir), "--out",
               str(tmp_path), *extra, "--", *COMMON]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    out = call("--methods", "none,predefined,learned_affine_j4,frozen_prior", "--timing-steps", "4")
    t = json.loads((tmp_path / "timing.json").read_text())["step_time_s"]
    assert set(t) == {"none", "predefined", "learned_affine_j4"} and all(v > 0 for v in t.values())
    assert "| none |" in out and "1.00x | " in out
    assert "skipping frozen_prior" in out  # its policy is not trained yet: said, not silently dropped
    policy = tmp_path / "learned_prior_s0"  # a trained policy where the frozen row looks for it
    shutil.copytree(tmp_path / "timing" / "learned_affine_j4_s0", policy)
    call("--methods", "none,frozen_prior", "--timing-steps", "4")
    t = json.loads((tmp_path / "timing.json").read_text())["step_time_s"]
    assert set(t) == {"none", "frozen_prior"} and t["frozen_prior"] > 0  # a frozen policy is measured too
    call("--methods", "none", "--seeds", "0")
    table = call("--methods", "none,predefined", "--seeds", "0,1", "--table-only")
    assert "| none | " in table and " / – |" in table and "(n=1)" in table  # seed 1 not run: shown, not invented
    assert "| predefined |" not in table.split("step cost")[1]  # no finished predefined row to report


def test_table_only_validated_reads_the_selecting_seeds_hold_out(tmp_path):
    """--table-only with --select-seed: seeds 1 and 2 report the hold-out accuracies seed 0 chose by."""
    def write(name, acc, magnitude=None, val=None):
        (tmp_path / name).mkdir()
        m = {"config": {"epochs": 1, "affine_magnitude": magnitude}, "test_acc": acc, "wall_time_s": 1.0,
             "epochs": [{"test_acc": acc, "val_acc": val}]}
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))

    for g, v in zip((0.05, 0.15, 0.3), (58.8, 58.6, 51.8), strict=True):
        write(f"validated_m{g}_holdout_s0", 50.0, g, v)
    for s, acc in enumerate((63.1, 62.9, 62.4)):
        write(f"validated_s{s}", acc, 0.05)
    cmd = [sys.executable, str(ROOT / "launch" / "experiments.py"), "--data", "unused", "--out", str(tmp_path),
           "--methods", "validated", "--seeds", "0,1,2", "--select-seed", "0", "--table-only"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "| validated | 63.1 / 62.9 / 62.4 | 62.80 ± 0.36 (n=3) |" in out
    assert "per seed: 0.05, 0.05, 0.05 (first seed's hold-out accuracy: 0.05: 58.8, 0.15: 58.6, 0.3: 51.8)" in out
