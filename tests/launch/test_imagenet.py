"""End to end through the launch script: outputs, user errors, and a 2-process CPU run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--model", "cifar_resnet18_w16", "--image-size", "32", "--crop-pct", "1", "--batch-size", "16",
         "--lr", "0.05", "--no-progress", "--transforms", "affine,color"]


def run(args, cwd=ROOT, env=None, launcher=None):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "launch" / "imagenet.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_learned_run_writes_metrics_and_grid(shapes_dir, tmp_path, loader):
    out = tmp_path / "out"
    r = run(["--data", str(shapes_dir), "--output", str(out), "--epochs", "2", "--loader", loader, "--workers", "1",
             *SMALL])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["augment"] == "learned" and len(m["epochs"]) == 2
    for e in m["epochs"]:
        assert {"train_loss", "val_acc", "test_acc", "images_per_s", "step_time_s"} <= set(e)
        assert e["test_count"] == 24 and e["aug_updates"] == 1 and e["aug_skipped_nonfinite"] == 0
    assert 0 <= m["test_acc"] <= 100
    assert (out / "augmentations_epoch001.png").stat().st_size > 1000
    assert (out / "augmenter.pt").exists()
    assert "final test accuracy" in r.stdout
    # the defaults on 48 images: no hold-out, 3 steps an epoch, so J = 8 becomes once an epoch, said once
    assert r.stdout.count("note: --aug-period 8 is more than the 3 steps of an epoch") == 1
    assert m["config"]["aug_period"] == 3 and m["train_images"] == 48


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--output", "x"], "the following arguments are required: --data"),
        (["--data", "/nonexistent/dir"], "error: --data: /nonexistent/dir: no such directory"),
        (["--model", "resnet181"], "error: --model: unknown model name 'resnet181'; did you mean: resnet18"),
        (["--augment", "magic"], "error: --augment: unknown mode 'magic'; choose learned, predefined, none"),
        (["--batch-size", "4096"], "error: --batch-size 4096 is larger than the 48 training images"),
        (["--unroll", "4"], "error: --unroll K=4 is more than the 3 steps of an epoch"),
    ],
)
def test_user_errors_are_one_line(shapes_dir, tmp_path, args, message):
    base = ["--data", str(shapes_dir), "--output", str(tmp_path), "--epochs", "1", *SMALL]
    # later flags win in argparse, so the case's flags override the base ones
    r = run(base + args if "--output" not in args else args)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert message in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_wrong_layout_is_one_line(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    r = run(["--data", str(tmp_path / "images"), "--output", str(tmp_path / "o"), *SMALL])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("(ImageFolder layout)")


@pytest.mark.slow
def test_two_cpu_processes(shapes_dir, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29517"]
    out = tmp_path / "out"
    r = run(["--data", str(shapes_dir), "--output", str(out), "--epochs", "1", "--workers", "1", *SMALL,
             "--aug-period", "1"], env={"ACCELERATE_USE_CPU": "1"}, launcher=launcher)  # θ's update every step
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_processes"] == 2 and m["epochs"][0]["test_count"] == 24
    assert m["epochs"][0]["aug_updates"] == 3  # 48 images, global batches of 16


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error path")
def test_gpu_requested_but_absent(shapes_dir, tmp_path):
    r = run(["--data", str(shapes_dir), "--output", str(tmp_path), *SMALL, "--dali-device", "gpu"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: --dali-device gpu: no CUDA device is available; "
                                                 "use --dali-device cpu")


def test_dali_not_installed(shapes_dir, tmp_path):
    # Block the import the way a missing package fails, then run the real launch script.
    code = ("import runpy, sys; sys.modules['nvidia.dali'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    launcher = [sys.executable, "-c", code]
    r = run(["--data", str(shapes_dir), "--output", str(tmp_path), *SMALL], launcher=launcher)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --loader dali: NVIDIA DALI is not usable here") and "--loader torch" in last
