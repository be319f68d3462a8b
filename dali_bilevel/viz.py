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


#: The logged magnitudes (`models.augmenter.magnitudes`) a plot panel shows, with its title.
MAGNITUDE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mean |A - I| (spread, and |mean|: bias)", ("affine_abs_dev", "affine_mean_dev")),
    ("mean translation (px)", ("translation_px",)),
    ("colour amplitudes", ("brightness_abs", "contrast_abs_log", "saturation_abs_log", "hue_abs_rad")),
)


def plot_magnitudes(runs: dict[str, list[dict]], path: str | Path) -> list[str]:
    """One panel per magnitude group, one line per (run, key), over epochs; returns the keys drawn.

    ``runs`` maps a label to a metrics.json ``epochs`` list. Why: the numbers in a table hide
    whether a magnitude grew, collapsed or oscillated during training.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, keys) for t, keys in MAGNITUDE_PANELS
              if any(k in e.get("aug_magnitudes", {}) for eps in runs.values() for e in eps for k in keys)]
    if not panels:
        raise ValueError("no augmenter magnitudes in these runs (only learned, stn and frozen runs log them)")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    drawn = []
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for label, eps in runs.items():
            for k in keys:
                pts = [(e["epoch"], e["aug_magnitudes"][k]) for e in eps if k in e.get("aug_magnitudes", {})]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker="o", ms=3, label=f"{label}: {k}" if len(keys) > 1 else label)
                    drawn.append(f"{label}:{k}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
