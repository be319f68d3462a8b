"""launch/policy_stats.py: a policy's moved mean and its per-sample spread, in the run's pixels."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from models.augmenter import Augmenter, save_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
import policy_stats


def test_a_constant_shift_is_all_mean_and_the_run_sets_the_pixels(tmp_path, capsys):
    aug = Augmenter("affine,color", "small")
    with torch.no_grad():
        aug.head.bias[2], aug.head.bias[5] = 0.3, -0.4  # x and y shifts, the same for every sample
    run = tmp_path / "run"
    run.mkdir()
    save_policy(aug, run / "augmenter.pt")
    (run / "metrics.json").write_text(json.dumps({"config": {"image_size": 64, "tile_size": None}}))
    out = tmp_path / "stats.json"
    assert policy_stats.main([str(run / "augmenter.pt"), "--samples", "64", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["image_size"] == 64
    want = math.hypot(math.tanh(0.3), math.tanh(-0.4)) * 32  # 64 px: half the image is 32 px
    assert row["summary"]["shift_px"]["mean_norm"] == pytest.approx(want, rel=1e-6)
    assert row["summary"]["shift_px"]["spread"] < 1e-6 and row["summary"]["hue_rad"]["mean_norm"] == 0.0
    assert "augmenter.pt" in capsys.readouterr().out


def test_no_run_beside_the_policy_needs_the_size(tmp_path):
    save_policy(Augmenter("affine", "small"), tmp_path / "augmenter.pt")
    with pytest.raises(SystemExit, match=r"augmenter\.pt: no metrics\.json beside it.*--image-size"):
        policy_stats.main([str(tmp_path / "augmenter.pt")])
    assert policy_stats.main([str(tmp_path / "augmenter.pt"), "--image-size", "32"]) == 0
    assert policy_stats.main([str(tmp_path / "missing.pt"), "--image-size", "32"]) == 2
