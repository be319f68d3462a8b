"""The magnitude plot draws every logged curve and refuses runs without any."""

import pytest
from PIL import Image

from dali_bilevel.viz import plot_magnitudes


def test_plot_magnitudes_writes_each_curve(tmp_path):
    eps = [{"epoch": i, "aug_magnitudes": {"affine_abs_dev": 0.01 * i, "affine_mean_dev": 0.001,
                                           "translation_px": 0.5 * i, "brightness_abs": 0.1}} for i in (1, 2, 3)]
    drawn = plot_magnitudes({"a": eps, "b": eps[:2]}, tmp_path / "m.png")
    assert sorted(drawn) == sorted(f"{r}:{k}" for r in "ab" for k in
                                   ("affine_abs_dev", "affine_mean_dev", "translation_px", "brightness_abs"))
    w, h = Image.open(tmp_path / "m.png").size
    assert w > 3 * h  # three panels side by side
    with pytest.raises(ValueError, match="no augmenter magnitudes"):
        plot_magnitudes({"none": [{"epoch": 1}]}, tmp_path / "x.png")
