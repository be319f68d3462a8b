"""The project's own demo data: rendered shapes in an ImageFolder layout.

Each class is a shape (circle, square, triangle, cross, ring, bar); position, size, rotation,
colour and background vary per image, and the training set is small, so augmentation matters.
Images are written as JPEGs so the real decode path (DALI or PIL) is exercised.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "bar":
        pts = [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)]
    else:  # cross
        a, b = 1.0, 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
               (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of ``kind`` with random placement, scale, rotation and colours."""
    bg = tuple(int(v) for v in rng.integers(0, 120, 3))
    fg = tuple(int(v) for v in rng.integers(110, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(r, size - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r / 3)))
    else:
        d.polygon(_polygon(kind, cx, cy, r, angle), fill=fg)
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def make_shapes(root: str | Path, train_per_class: int = 120, test_per_class: int = 60, size: int = 32,
                seed: int = 0) -> Path:
    """Write ``root/{train,test}/<shape>/NNNN.jpg``; skipped when already complete."""
    root = Path(root)
    stamp = root / f".complete-{train_per_class}-{test_per_class}-{size}-{seed}"
    if stamp.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for kind in SHAPES:
            d = root / split / kind
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                render(kind, size, rng).save(d / f"{i:04d}.jpg", quality=90)
    stamp.touch()
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=".demo_data/shapes")
    p.add_argument("--train-per-class", type=int, default=120)
    p.add_argument("--test-per-class", type=int, default=60)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(make_shapes(a.out, a.train_per_class, a.test_per_class, a.size, a.seed))


if __name__ == "__main__":
    main()
