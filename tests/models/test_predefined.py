"""Predefined augmentations against PIL and against their stated distributions."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from models.predefined import enhance, random_affine, random_affine_magnitude, random_color_jitter


def _square(size: int = 32, side: int = 4) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size, dtype=torch.float64)
    lo = size // 2 - side // 2
    x[..., lo : lo + side, lo : lo + side] = 1.0
    return x


@pytest.mark.parametrize(("op", "pil_op"), [("brightness", ImageEnhance.Brightness),
                                            ("contrast", ImageEnhance.Contrast), ("color", ImageEnhance.Color)])
@pytest.mark.parametrize("factor", [0.3, 1.6])
def test_enhance_matches_pil(op, pil_op, factor):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ref = np.asarray(pil_op(Image.fromarray(img)).enhance(factor)).astype(np.float64)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
    ours = (enhance(x, op, torch.tensor([factor])) * 255)[0].permute(1, 2, 0).numpy()
    # PIL rounds its grey image and (for contrast) the mean to integers before blending.
    assert np.abs(ours - ref).max() <= 2.0 + 1.5 * factor


def test_colour_jitter_zero_is_identity_and_stays_in_range():
    x = torch.rand(8, 3, 16, 16)
    assert torch.equal(random_color_jitter(x, 0.0), x)
    y = random_color_jitter(x, 0.9)
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)


def test_affine_scale_is_log_uniform_in_range():
    torch.manual_seed(0)
    x = _square().expand(2000, 3, 32, 32)
    y = random_affine(x, scale=(0.5, 2.0))
    # The square's area grows by s^2 (bilinear resampling conserves mass up to border effects).
    log_s = 0.5 * torch.log(y.sum((1, 2, 3)) / x.sum((1, 2, 3)))
    assert log_s.min() > math.log(0.5) - 0.08 and log_s.max() < math.log(2.0) + 0.08
    assert abs(log_s.mean().item()) < 0.05  # zooms in as often as out
    assert log_s.std().item() == pytest.approx(2 * math.log(2) / math.sqrt(12), rel=0.1)


def test_affine_translation_and_rotation_bounds():
    torch.manual_seed(0)
    x = _square().expand(500, 3, 32, 32)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def centroid(t):
        m = t[:, 0]
        return torch.stack([(m * xs).sum((1, 2)), (m * ys).sum((1, 2))], 1) / m.sum((1, 2))[:, None]

    shift = centroid(random_affine(x, translate_px=4)) - centroid(x)
    assert shift.abs().max() <= 4.0 + 1e-6 and shift.abs().max() > 3.5
    # Rotating a square about its own centre moves no mass off-centre.
    assert (centroid(random_affine(x, rotate_deg=10)) - centroid(x)).abs().max() < 1e-6


def test_affine_magnitude_spans_the_learned_family():
    torch.manual_seed(0)
    x = _square().expand(500, 3, 32, 32)
    assert torch.equal(random_affine_magnitude(x, 0.0), x)
    y = random_affine_magnitude(x, 0.25)
    assert not torch.allclose(x, y)
    # The centre lands at -A^-1 t: |t| <= 4 px per axis and |A - I| <= 0.25 entrywise, so within 8 px.
    xs = torch.arange(32.0).expand(32, 32)
    cx = (y[:, 0] * xs).sum((1, 2)) / y[:, 0].sum((1, 2))
    assert (cx - 15.5).abs().max() < 8.0 and (cx - 15.5).abs().mean() > 1.0
