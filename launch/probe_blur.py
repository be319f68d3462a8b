"""How much high-frequency detail augmentation removes: Laplacian energy after / before.

Test images are never augmented, so a policy that blurs every training image adds a train/test
mismatch that a magnitude table does not show. Compares integer ±4 px shifts with saved policies.

    python launch/probe_blur.py --data data/cifar10_5k runs/cifar5k/*/augmenter.pt \
        --out docs/results/probe_blur.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from models.augmenter import load_policy
from models.predefined import random_translate
from pipelines.folder import scan_folder


def high_freq_energy(x: Tensor, border: int = 4) -> float:
    """Mean squared Laplacian per channel, away from the (zero-padded) borders."""
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    lap = F.conv2d(x, k, groups=x.shape[1])[..., border:-border, border:-border]
    return lap.pow(2).mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policies", nargs="*", help="augmenter.pt files written by learned runs")
    p.add_argument("--data", required=True, help="ImageFolder root; its test/ (or val/) images are used")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--out", default=None, help="JSON to write")
    a = p.parse_args(argv)
    split = next((Path(a.data) / s for s in ("test", "val") if (Path(a.data) / s).is_dir()), None)
    if split is None:
        print(f"error: --data {a.data}: no test/ or val/ folder", file=sys.stderr)
        return 2
    files = scan_folder(split).files
    files = [files[i] for i in np.linspace(0, len(files) - 1, min(a.images, len(files))).astype(int)]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))) for f in files])
    x = x.permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)
    base = high_freq_energy(x)
    rows = {"integer shift ±4 px": high_freq_energy(random_translate(x, 4)) / base}
    for path in a.policies:
        try:
            policy = load_policy(path)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        with torch.no_grad():
            rows[path] = high_freq_energy(policy(x)) / base
    print("| augmentation | high-frequency energy kept |\n|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r:.2f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"images": len(files), "kept": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
