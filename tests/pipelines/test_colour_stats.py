"""The training images' hue spread (``--hue-bound data``): hues against PIL's HSV, the circular statistic
against its closed form, and the real domains' spreads where ../shared/data is present."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.colour_stats import circular_spread, hue_bound, hue_spread, image_hue
from pipelines.folder import DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def solid(hue: float, s: float = 0.8, v: float = 0.9, size: int = 8) -> np.ndarray:
    """An image of one colour with the given HSV hue (radians)."""
    r, g, b = colorsys.hsv_to_rgb((hue / (2 * math.pi)) % 1.0, s, v)
    return np.full((size, size, 3), np.round(np.array([r, g, b]) * 255), dtype=np.uint8)


def angle_gap(a: float, b: float) -> float:
    return abs((a - b + math.pi) % (2 * math.pi) - math.pi)


@pytest.mark.parametrize("hue", [0.0, 0.3, 1.5, 3.0, -0.4, -2.5])
def test_image_hue_of_one_colour_is_its_hue(hue):
    got, chroma = image_hue(solid(hue))
    assert angle_gap(got, hue) < 0.02  # 8-bit rounding of the colour
    assert chroma == pytest.approx(64 * (0.8 * 0.9), abs=64 * 0.01)  # chroma = saturation × value per pixel
    assert image_hue(np.full((4, 4, 3), 77, np.uint8))[1] == 0.0  # grey: no chroma, so no hue


def test_image_hue_agrees_with_pils_hsv_on_random_pixels():
    """A second implementation: PIL's own HSV conversion, hue and chroma = S·V per pixel, then the same
    chroma-weighted circular mean."""
    noise = np.random.default_rng(0).normal(0, 45, (40, 50, 3))  # H&E-like pink with every hue in its noise
    rgb = np.clip(np.array([200, 120, 180]) + noise, 0, 255).astype(np.uint8)
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"), dtype=np.float64)
    angle = (hsv[..., 0] + 0.5) / 255 * 2 * math.pi  # PIL truncates hue·255: a bin's centre is +0.5
    chroma = hsv[..., 1] / 255 * hsv[..., 2] / 255
    want = np.angle((chroma * np.exp(1j * angle)).sum())
    got, total = image_hue(rgb)
    assert angle_gap(got, want) < 0.002
    assert total == pytest.approx(chroma.sum(), rel=0.01)


def test_circular_spread_matches_its_closed_form_and_the_linear_std():
    for a in (0.05, 0.3, 1.0):  # two hues at ±a: R = cos a
        assert circular_spread([a, -a]) == pytest.approx(math.sqrt(-2 * math.log(math.cos(a))), rel=1e-12)
    hues = np.random.default_rng(1).normal(0, 0.05, 4000)
    assert circular_spread(hues) == pytest.approx(hues.std(), rel=0.01)  # concentrated: the ordinary std
    assert circular_spread(hues + 3.1) == pytest.approx(circular_spread(hues), rel=1e-9)  # across ±π, unchanged
    for a in np.linspace(-3.1, 3.1, 63):  # equal hues: 0, never a domain error from R rounding above 1
        assert 0.0 <= circular_spread([a] * 7) < 1e-6
    assert circular_spread([0.0, math.pi]) == math.inf  # opposite hues cancel out: no bound at all
    with pytest.raises(ValueError):
        circular_spread([])


def test_hue_spread_reads_the_files_and_names_a_bad_one(tmp_path):
    hues = [0.1, 0.3, -0.1, 0.2]
    files = []
    for i, h in enumerate(hues):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(solid(h, size=96)).save(files[-1])
    grey = str(tmp_path / "grey.png")
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(grey)
    got = hue_spread([*files, grey])
    assert (got.images, got.with_hue) == (5, 4)  # the grey image is read and has no hue
    assert got.spread == pytest.approx(circular_spread(hues), abs=0.02)
    assert hue_spread(files, max_images=2).images == 2  # the first and the last of the list
    assert hue_spread([grey]).spread == math.inf
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg: cannot read it for --hue-bound data"):
        hue_spread([*files, str(broken)])
    with pytest.raises(DataError, match="no images"):
        hue_spread([])
    assert hue_bound(got) == got.spread and hue_bound(hue_spread([grey])) == math.pi  # no hue: no bound
    with pytest.raises(DataError, match=r"--hue-bound data: the 1 training image\(s\) .* share one mean hue"):
        hue_bound(hue_spread(files[:1]))


@pytest.mark.skipif(not (SHARED / "ucsb_breast_tiff").is_dir() or not (SHARED / "ucmerced_jpeg").is_dir(),
                    reason="needs ../shared/data/ucsb_breast_tiff and ucmerced_jpeg")
def test_histology_hues_spread_far_less_than_aerial_photographs():
    """What ``--hue-bound data`` rests on, on the real sets: H&E slides share their stain's hues (about
    0.2 rad between images), aerial photographs do not (about 0.9)."""
    def files(root: Path) -> list[str]:
        return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".tif"))

    ucsb = hue_spread(files(SHARED / "ucsb_breast_tiff"))
    aerial = hue_spread(files(SHARED / "ucmerced_jpeg" / "train"), max_images=128)
    assert ucsb.with_hue == ucsb.images == 40
    assert 0.1 < ucsb.spread < 0.3 and 0.7 < aerial.spread < 1.2
