"""Hand-set augmentations: the paper's predefined flips and the ±k px translation baseline.

They are sampled outside the autograd graph: nothing here is learned.
"""

from __future__ import annotations

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
    shift = torch.randint(-max_px, max_px + 1, (b, 2), device=x.device, generator=generator)
    scale = torch.tensor([2.0 / w, 2.0 / h], device=x.device)
    return apply_transform(x, {"translation": shift.to(x.dtype) * scale})
