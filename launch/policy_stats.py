"""What trained augmenters draw: per quantity, the mean and the per-sample spread of their transforms.

    python launch/policy_stats.py runs/domains/*/learned_default_s*/augmenter.pt --out docs/results/policy_stats.json

A run's per-epoch `aug_magnitudes` say how far from identity its transforms are; this says whether
that distance is a moved mean (every image shifted or recoloured alike, which the test images never
are) or per-sample variety around the identity. Each policy draws ``--samples`` noise vectors from
``--seed``; the image size (for pixels) comes from the run's metrics.json beside the policy, or from
``--image-size``. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from models.augmenter import SPREAD_NAMES, load_policy, spread

#: Families summed in the table: (quantities, unit). Shift as a 2-vector; the rest per quantity.
SUMMARY = {"shift_px": ("tx_px", "ty_px"), "linear": ("a11", "a12", "a21", "a22"), "hue_rad": ("hue_rad",),
           "tone": ("brightness", "log_contrast", "log_saturation")}


def image_size_of(policy: Path, given: int | None) -> int:
    """The run's training image (or tile) size, which turns normalised shifts into pixels."""
    if given:
        return given
    metrics = policy.parent / "metrics.json"
    if not metrics.is_file():
        raise SystemExit(f"error: {policy}: no metrics.json beside it to read the image size from; pass --image-size")
    cfg = json.loads(metrics.read_text())["config"]
    return int(cfg.get("tile_size") or cfg["image_size"])


def summarise(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per group: |mean| (the norm of the means) and the spread (root of the summed variances)."""
    out = {}
    for group, names in SUMMARY.items():
        names = [n for n in names if n in stats]
        if names:
            out[group] = {"mean_norm": math.sqrt(sum(stats[n]["mean"] ** 2 for n in names)),
                          "spread": math.sqrt(sum(stats[n]["sd"] ** 2 for n in names))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policies", nargs="+", help="augmenter.pt files written by learned runs")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None, help="pixels for the shifts (default: the run's)")
    p.add_argument("--out", default=None, help="JSON to write")
    a = p.parse_args(argv)
    rows = []
    for f in map(Path, a.policies):
        if not f.is_file():
            print(f"error: {f}: no such file", file=sys.stderr)
            return 2
        aug = load_policy(f)
        size = image_size_of(f, a.image_size)
        with torch.no_grad():
            params = aug.sample_params(a.samples, aug.sample_noise(a.samples,
                                                                   generator=torch.Generator().manual_seed(a.seed)))
        stats = spread(params, size)
        rows.append({"policy": str(f), "image_size": size, "stats": stats, "summary": summarise(stats)})
    groups = list(SUMMARY)
    head = "".join(f"{g + ' |mean|':>16}{g + ' sd':>14}" for g in groups)
    print(f"{'policy':<48}{head}")
    for r in rows:
        cells = "".join(f"{r['summary'][g]['mean_norm']:>16.3f}{r['summary'][g]['spread']:>14.3f}"
                        if g in r["summary"] else f"{'-':>16}{'-':>14}" for g in groups)
        print(f"{r['policy'][-48:]:<48}{cells}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"command": "python launch/policy_stats.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "samples": a.samples, "seed": a.seed,
            "quantities": SPREAD_NAMES, "rows": rows}, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
