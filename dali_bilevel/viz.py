"""Pictures of the augmentation, as in the paper's Fig. 3."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid, save_image


@torch.no_grad()
def augmentation_grid(images: Tensor, augment: Callable[[Tensor], Tensor], rows: int = 4) -> Tensor:
    """Top row: originals; each further row: one independent draw of ``augment``."""
    out = [images] + [augment(images).clamp(0, 1) for _ in range(rows)]
    grid = torch.cat(out).float().cpu()
    if grid.shape[-1] < 96:  # small images: nearest upscale so a person can see them
        grid = F.interpolate(grid, scale_factor=max(1, 96 // grid.shape[-1]), mode="nearest")
    return make_grid(grid, nrow=images.shape[0], padding=2, pad_value=1.0)


def save_grid(grid: Tensor, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
