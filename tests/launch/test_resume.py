"""Preemption: SIGTERM mid-epoch, then --resume auto, ends on exactly the weights of an
uninterrupted run; checkpoints load without unpickling; TensorBoard gets scalars and the grid."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--model", "cifar_resnet18_w16", "--image-size", "32", "--crop-pct", "1", "--batch-size", "8",
        "--lr", "0.05", "--no-progress", "--transforms", "affine,color", "--epochs", "2", "--workers", "1",
        "--checkpoint-every", "0", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cmd(data, out, *extra):
    return [sys.executable, str(ROOT / "launch" / "imagenet.py"), "--data", str(data), "--output", str(out),
            *ARGS, *extra]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    return {**load_file(str(ckpt / "model.safetensors")),
            **{f"aug.{k}": v for k, v in load_file(str(ckpt / "augmenter.safetensors")).items()}}


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_is_exact(shapes_dir, tmp_path):
    ref = subprocess.run(cmd(shapes_dir, tmp_path / "ref"), env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "cut"
    proc = subprocess.Popen(cmd(shapes_dir, out, "--log-every", "1"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the run is inside epoch 2
        if line.startswith("epoch 2 step 1/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal at epoch 2, step" in err
    step = int(err.split("stopped by signal at epoch 2, step ")[1].split(";")[0])
    assert 1 <= step < 4  # mid-epoch (4 steps per epoch)

    res = subprocess.run(cmd(shapes_dir, out, "--resume", "auto"), env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints'}" in res.stdout and f"epoch 2, step {step}" in res.stdout
    a, b = final_weights(tmp_path / "ref"), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_roundtrip_is_weights_only(tmp_path):
    from accelerate import Accelerator

    from dali_bilevel.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    from models import Augmenter, create_backbone

    acc = Accelerator(cpu=True)
    model, aug = create_backbone("cifar_resnet18_w16", 3), Augmenter("affine")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    state = {"opt": opt.state_dict(), "sched": sched.state_dict(), "progress": {"epoch": 1, "step": 2}}
    for step in (5, 10, 15):
        save_checkpoint(tmp_path / "checkpoints", step, acc, {"model": model, "augmenter": aug}, state)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000010", "step-00000015"]
    path = find_checkpoint("auto", tmp_path)
    assert path.name == "step-00000015" and not list((tmp_path / "checkpoints").glob(".tmp*"))
    model2 = create_backbone("cifar_resnet18_w16", 3)
    saved = load_checkpoint(path, acc, {"model": model2, "augmenter": Augmenter("affine")})
    assert saved["progress"] == {"epoch": 1, "step": 2}
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    with pytest.raises(FileNotFoundError, match="--resume"):
        find_checkpoint(str(tmp_path / "nothing"), tmp_path)


@pytest.mark.slow
def test_tensorboard_event_file_has_scalars_and_grid(shapes_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    r = subprocess.run(cmd(shapes_dir, out, "--epochs", "1", "--log-every", "2"), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    ea = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    for tag in ("train/loss", "epoch/test_acc", "epoch/images_per_s", "epoch/data_wait_frac",
                "augmenter/affine_abs_dev", "augmenter/translation_px", "augmenter/hue_abs_rad"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert "augmentations" in tags["images"]
