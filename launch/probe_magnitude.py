"""Measure which way the one-step hypergradient pushes a translation magnitude, and how noisily.

A classifier trains with the predefined augmentation (hflip + ±4 px). At chosen epochs, the
augmenter is replaced by a one-parameter family, translation u·s px with u ~ U(-1, 1)², and the
exact K=1 hypergradient dL_val/ds (`dali_bilevel.hypergrad.bilevel_step`, the real optimizer state)
is taken over many independent train/validation batch pairs at several s. A positive mean means
gradient descent on θ shrinks the augmentation; mean / standard error says whether an optimizer
step follows a signal or a random walk.

    python launch/probe_magnitude.py --data data/cifar10_5k --out docs/results/probe_magnitude.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dali_bilevel.hypergrad import bilevel_step
from dali_bilevel.machine import machine_info
from models import apply_transform, create_backbone, random_flip, random_translate
from pipelines.folder import scan_folder


class ScaledTranslation(nn.Module):
    """Translation of u · s px, u ~ U(-1, 1)² per sample: θ is the single magnitude s."""

    def __init__(self, s_px: float, size: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s_px)))
        self.size = size
        self.noise_dim = 2

    def sample_noise(self, batch_size: int) -> Tensor:
        return torch.rand(batch_size, 2) * 2 - 1

    def forward(self, x: Tensor, noise: Tensor) -> Tensor:
        return apply_transform(x, {"translation": noise * self.s * 2 / self.size})


def load_images(folder: Path, size: int) -> tuple[Tensor, Tensor]:
    idx = scan_folder(folder)
    xs = [torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((size, size)))) for f in idx.files]
    return torch.stack(xs).permute(0, 3, 1, 2).float().div(255), torch.tensor(idx.labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root with train/")
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--model", default="cifar_resnet18_w16")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="constant classifier lr (also the look-ahead's η)")
    p.add_argument("--probe-epochs", default="1,4,8", help="probe after these many epochs of training")
    p.add_argument("--magnitudes", default="0.5,2,4", help="translation magnitudes s in px to probe at")
    p.add_argument("--pairs", type=int, default=12, help="train/validation batch pairs per (epoch, s)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    x_all, y_all = load_images(Path(a.data) / "train", a.image_size)
    model = create_backbone(a.model, int(y_all.max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n, b = len(x_all), a.batch_size
    probe_epochs = [int(e) for e in a.probe_epochs.split(",")]
    mags = [float(s) for s in a.magnitudes.split(",")]
    rows, t0 = [], time.perf_counter()
    for epoch in range(1, max(probe_epochs) + 1):
        model.train()
        for idx in torch.randperm(n).split(b):
            if len(idx) < b:
                break
            x = random_translate(random_flip(x_all[idx], "h"), 4)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch not in probe_epochs:
            continue
        buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
        for s in mags:
            aug = ScaledTranslation(s, a.image_size)
            grads = []
            for _ in range(a.pairs):
                tr, va = torch.randperm(n)[: 2 * b].split(b)  # disjoint train and validation batches
                res = bilevel_step(model, aug, opt, random_flip(x_all[tr], "h"), y_all[tr], x_all[va], y_all[va])
                grads.append(res.augmenter_grads[0].item())
                model.load_state_dict(buffers, strict=False)  # the probe must not move BatchNorm statistics
            mean, sd = statistics.mean(grads), statistics.stdev(grads)
            se = sd / math.sqrt(len(grads))
            row = {"epoch": epoch, "s_px": s, "dLval_ds_mean": mean, "dLval_ds_se": se, "t_stat": mean / se,
                   "frac_positive": sum(g > 0 for g in grads) / len(grads), "grads": grads}
            rows.append(row)
            print(f"epoch {epoch}  s {s:4.1f} px  dL_val/ds {mean:+.2e} ± {se:.1e} (t {mean / se:+.1f}, "
                  f"{row['frac_positive']:.0%} > 0)  [{time.perf_counter() - t0:.0f} s]", flush=True)
    out = {"machine": {**machine_info(), "threads": torch.get_num_threads()},
           "args": vars(a), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
