"""Link the CIFAR-10 CPU subset (first N train and M test files per class, sorted) into a folder.

    python launch/cifar_subset.py --src ../shared/data/cifar10_jpeg --dst data/cifar10_5k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="cifar10_jpeg root with train/ and test/")
    p.add_argument("--dst", required=True)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    a = p.parse_args()
    src = Path(a.src).resolve()
    for split, n in (("train", a.train_per_class), ("test", a.test_per_class)):
        if not (src / split).is_dir():
            print(f"error: --src: {src / split}: no such directory", file=sys.stderr)
            return 2
        for cls in sorted(d for d in (src / split).iterdir() if d.is_dir()):
            out = Path(a.dst) / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                link = out / f.name
                if not link.exists():
                    link.symlink_to(f)
    print(Path(a.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
