"""A selection data set made of training images only: choices (the learned default, a magnitude) are
made on it, so the test split is never used for one.

    python launch/selection_split.py --src data/cifar10_5k --dst data/cifar10_5k_sel --holdout 0.2

For each class of ``SRC/train``, the last ``--holdout`` share of its files in name order becomes
``DST/test/<class>`` and the rest ``DST/train/<class>`` (symbolic links; nothing is copied).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="ImageFolder root with train/<class>/")
    p.add_argument("--dst", required=True)
    p.add_argument("--holdout", type=float, default=0.2, help="share of each class held out as the selection split")
    a = p.parse_args()
    train = Path(a.src).resolve() / "train"
    if not train.is_dir():
        print(f"error: --src: {train}: no such directory", file=sys.stderr)
        return 2
    if not 0 < a.holdout < 1:
        print(f"error: --holdout must be in (0, 1), got {a.holdout}", file=sys.stderr)
        return 2
    for cls in sorted(d for d in train.iterdir() if d.is_dir()):
        files = sorted(f for f in cls.iterdir() if not f.name.startswith("."))
        cut = len(files) - round(len(files) * a.holdout)
        for split, part in (("train", files[:cut]), ("test", files[cut:])):
            out = Path(a.dst) / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in part:
                link = out / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    print(Path(a.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
