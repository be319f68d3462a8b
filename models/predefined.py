"""Hand-set augmentations: the paper's predefined flips, translation, histology affine and colour
jitter, and the one-magnitude random affine of the validated-magnitude baseline.

They are sampled outside the autograd graph: nothing here is learned.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from models.augmenter import apply_transform

FLIP_MODES = ("none", "h", "v", "hv")


@torch.no_grad()
def random_flip(x: Tensor, mode: str, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image with probability 1/2 per allowed axis (h: width, v: height)."""
    if mode not in FLIP_MODES:
        raise ValueError(f"--flip: unknown flip mode {mode!r}; choose {', '.join(FLIP_MODES)}")
    for axis, dim in (("h", -1), ("v", -2)):
        if axis in mode:
            mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(dim), x)
    return x


@torch.no_grad()
def random_translate(x: Tensor, max_px: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by a uniform integer offset in [-max_px, max_px], zero fill.

    Integer shifts sample exactly at pixel centres, so this equals pad-and-crop.
    """
    if max_px <= 0:
        return x
    b, _, h, w = x.shape
    shift = torch.randint(-max_px, max_px + 1, (b, 2), device=x.device, generator=generator).to(x.dtype)
    # Scalars, not a tensor built from a list: that would be a pageable host-to-device copy every step.
    return apply_transform(x, {"translation": torch.stack([shift[:, 0] * (2.0 / w), shift[:, 1] * (2.0 / h)], 1)})


@torch.no_grad()
def random_affine(x: Tensor, translate_px: float = 0.0, rotate_deg: float = 0.0,
                  scale: tuple[float, float] = (1.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """The paper's predefined histology affine: shift ±px, rotate ±deg, isotropic scale in ``scale``.

    The scale is drawn log-uniformly, so 0.5–2 zooms in as often as out. Bilinear, zero fill.
    """
    b, _, h, w = x.shape
    dev = x.device

    def u(n: int) -> Tensor:
        return torch.rand(b, n, device=dev, generator=generator) * 2 - 1

    lo, hi = math.log(scale[0]), math.log(scale[1])
    s = torch.exp(lo + (hi - lo) * (u(1)[:, 0] + 1) / 2)
    a = u(1)[:, 0] * math.radians(rotate_deg)
    t = u(2) * translate_px
    t = torch.stack([t[:, 0] * (2.0 / w), t[:, 1] * (2.0 / h)], 1)
    # Output pixel p samples the input at R(a) p / s + t: a zoom by s, rotated by a, shifted by t.
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    mat = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    residual = mat - torch.eye(2, 3, device=dev)  # apply_transform's parametrisation: A - I
    return apply_transform(x, {"affine": residual.reshape(b, 6).to(x.dtype)})


@torch.no_grad()
def random_affine_magnitude(x: Tensor, magnitude: float, generator: torch.Generator | None = None) -> Tensor:
    """One-knob random affine: every entry of A − I (2x3, normalised units) uniform in ±magnitude.

    The validated-magnitude baseline picks ``magnitude`` on the validation split; 0.25 shifts a
    32 px image by up to 4 px. It spans the same family as the learned affine augmenter.
    """
    if magnitude <= 0:
        return x
    delta = (torch.rand(x.shape[0], 6, device=x.device, generator=generator) * 2 - 1) * magnitude
    return apply_transform(x, {"affine": delta.to(x.dtype)})


ENHANCE_OPS = ("brightness", "contrast", "color")


def enhance(x: Tensor, op: str, factor: Tensor) -> Tensor:
    """``PIL.ImageEnhance`` on a [0, 1] batch with per-image ``factor`` (B,): blend with black
    (brightness), the mean grey level (contrast) or the grey image (color, i.e. saturation)."""
    f = factor.to(x.dtype)[:, None, None, None]
    grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3] if x.shape[1] == 3 else x
    if op == "brightness":
        base = torch.zeros_like(x)
    elif op == "contrast":
        base = grey.mean((1, 2, 3), keepdim=True).expand_as(x)
    elif op == "color":
        base = grey.expand_as(x)
    else:
        raise ValueError(f"unknown enhance op {op!r}; choose {', '.join(ENHANCE_OPS)}")
    return (base + f * (x - base)).clamp(0, 1)


@torch.no_grad()
def random_color_jitter(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Brightness, contrast and colour (saturation), each with an enhance factor drawn uniformly
    in 1 ± ``strength``, in a random order per batch. AutoAugment's range is 0.9."""
    if strength <= 0:
        return x
    for i in torch.randperm(3, generator=generator).tolist():
        f = 1 + (torch.rand(x.shape[0], device=x.device, generator=generator) * 2 - 1) * strength
        x = enhance(x, ENHANCE_OPS[i], f)
    return x


def predefined_policy(translate_px: int = 0, rotate_deg: float = 0.0, scale: tuple[float, float] = (1.0, 1.0),
                      affine_magnitude: float = 0.0, color_jitter: float = 0.0) -> Callable[[Tensor], Tensor]:
    """The hand-set augmentation after the flips, decided once: the histology affine when rotating or
    scaling (else integer shifts), then the one-magnitude affine, then colour jitter (each a no-op at 0)."""
    affine = bool(rotate_deg) or tuple(scale) != (1.0, 1.0)

    def transform(x: Tensor) -> Tensor:
        x = random_affine(x, translate_px, rotate_deg, scale) if affine else random_translate(x, translate_px)
        x = random_affine_magnitude(x, affine_magnitude)
        return random_color_jitter(x, color_jitter)

    return transform
