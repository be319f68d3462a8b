"""How far the training images' colours vary between images: the data's own bound for a hue rotation.

A hue rotation by δ moves an image's mean hue by δ. Histology stains (H&E) give every slide nearly the
same hues, aerial and natural photographs do not; a learned rotation larger than the spread among the
training images makes colours no image of the domain has (docs/results.md: the hue the hypergradient grows
costs the histology tiles and helps the aerial images). `hue_spread` measures that spread on the training
files alone, so ``--hue-bound data`` can bound the augmenter's hue by it without a look at any test image.

Each image's hue is the circular mean of its pixels' hues weighted by chroma (saturation × value: a grey
pixel has no hue); the spread is the circular standard deviation of those means, ``sqrt(-2 ln R)`` with
``R`` the length of their mean unit vector (radians; about the ordinary standard deviation when the hues
are concentrated, unbounded as they spread around the circle).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.folder import DataError

#: Images are shrunk to this side before their hue is read: the mean hue of a photograph barely moves.
THUMBNAIL = 64


@dataclass(frozen=True)
class HueSpread:
    spread: float  # circular standard deviation of the images' mean hues, radians (inf: no hue at all)
    images: int  # images read
    with_hue: int  # of those, images with any chroma (a grey image has no hue and does not count)


def image_hue(rgb: np.ndarray) -> tuple[float, float]:
    """``(mean hue in radians, total chroma)`` of an (H, W, 3) uint8 image, PIL's HSV hue circle."""
    x = rgb.astype(np.float64) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    chroma = mx - mn  # = saturation × value in HSV
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    angle = h * (math.pi / 3)  # six sectors of 60°
    z = (chroma * np.exp(1j * angle)).sum()
    return float(np.angle(z)), float(chroma.sum())


def circular_spread(angles: Sequence[float]) -> float:
    """Circular standard deviation ``sqrt(-2 ln R)`` of angles in radians (inf when they cancel out)."""
    if not len(angles):
        raise ValueError("circular_spread needs at least one angle")
    r = abs(np.exp(1j * np.asarray(angles, dtype=np.float64)).mean())
    return math.sqrt(max(0.0, -2.0 * math.log(r))) if r > 1e-12 else math.inf  # equal angles: r may round above 1


def hue_spread(files: Sequence[str], max_images: int = 512) -> HueSpread:
    """The spread of the mean hues of up to ``max_images`` of ``files``, taken evenly through the list
    (the same images on every process; a folder's list is ordered by class, so every class is read)."""
    if not files:
        raise DataError("--hue-bound data: the training split has no images")
    idx = np.unique(np.linspace(0, len(files) - 1, min(max_images, len(files))).round().astype(int))
    hues = []
    for i in idx:
        try:
            with Image.open(files[i]) as im:
                im.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at a fraction of the size
                im = im.convert("RGB")
                im.thumbnail((THUMBNAIL, THUMBNAIL))
                hue, chroma = image_hue(np.asarray(im))
        except OSError as e:
            raise DataError(f"{files[i]}: cannot read it for --hue-bound data ({e})") from None
        if chroma > 0:
            hues.append(hue)
    spread = circular_spread(hues) if hues else math.inf
    return HueSpread(spread, len(idx), len(hues))


def hue_bound(spread: HueSpread) -> float:
    """The bound ``--hue-bound data`` uses: the spread, at most π (hues that cover the circle bound nothing)."""
    if not spread.spread > 0:
        raise DataError(f"--hue-bound data: the {spread.with_hue} training image(s) with any colour share one mean "
                        "hue, so they give no bound; pass --hue-bound in radians instead")
    return min(math.pi, spread.spread)
