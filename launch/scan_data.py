"""Check a data folder before training: every unreadable file by name, every conversion, the time it took.

    python launch/scan_data.py DIR [--full]

DIR is an ImageFolder root (``DIR/train/<class>/`` and ``DIR/val/<class>/`` or ``DIR/test/<class>/``,
class sets compared) or a single ``DIR/<class>/`` folder (the tile layout of launch/bach.py).
Exit status: 0 when every file decodes, 1 when some do not (they are listed), 2 for a layout
error (missing folder, empty class folder, different class sets).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.folder import DataError, split_dirs
from pipelines.scan import SplitScan, scan_report


def summary(name: str, scan: SplitScan) -> list[str]:
    idx = scan.index
    lines = [f"{name}: {len(idx)} readable image(s) in {len(idx.classes)} class(es), {len(scan.problems)} "
             f"unreadable, {len(scan.conversions)} converted to 8-bit RGB ({scan.seconds:.2f} s, "
             f"{scan.seconds / max(1, len(idx) + len(scan.problems)) * 1e3:.2f} ms/file)"]
    kinds = Counter(part for n in scan.conversions for part in n.text.split("; "))
    lines += [f"  converted: {count} x {kind}" for kind, count in sorted(kinds.items())]
    lines += [f"  converted: {n}" for n in scan.conversions[:20]]
    lines += [f"  UNREADABLE {n}" for n in scan.problems]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="ImageFolder root (train/ and val/ or test/) or a folder of class folders")
    p.add_argument("--full", action="store_true", help="decode every file with PIL (slower; header checks otherwise)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads (default: 1 for header checks, up to 8 with --full)")
    a = p.parse_args(argv)
    root = Path(a.data)
    try:
        if (root / "train").is_dir():
            train_dir, eval_dir = split_dirs(root)
            train = scan_report(train_dir, full=a.full, workers=a.workers)
            scans = {"train": train,
                     eval_dir.name: scan_report(eval_dir, train.index.classes, full=a.full, workers=a.workers)}
        else:
            scans = {root.name or str(root): scan_report(root, full=a.full, workers=a.workers)}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, scan in scans.items():
        print("\n".join(summary(name, scan)))
    bad = sum(len(s.problems) for s in scans.values())
    if bad:
        print(f"{bad} unreadable file(s): fix or remove them, or train with --skip-unreadable to skip them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
