"""Plot learned augmentation magnitudes over training from runs' metrics.json.

    python launch/plot_magnitudes.py runs/cifar5k/learned_affine_s0 runs/cifar5k/learned_prior_s0 \
        --out docs/img/magnitudes_cifar.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dali_bilevel.viz import plot_magnitudes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding metrics.json")
    p.add_argument("--out", required=True, help="PNG to write")
    a = p.parse_args(argv)
    runs = {}
    for d in map(Path, a.runs):
        f = d / "metrics.json"
        if not f.is_file():
            print(f"error: {f}: no such file", file=sys.stderr)
            return 2
        runs[d.name] = json.loads(f.read_text())["epochs"]
    try:
        drawn = plot_magnitudes(runs, a.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {len(drawn)} curves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
