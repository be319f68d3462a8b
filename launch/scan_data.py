"""Check a data folder before training: every unreadable file by name, every conversion, the time it took.

    python launch/scan_data.py DIR [--full] [--scan-cache auto|none|FOLDER] [--workers N]

DIR is an ImageFolder root (``DIR/train/<class>/`` and ``DIR/val/<class>/`` or ``DIR/test/<class>/``,
class sets compared) or a single ``DIR/<class>/`` folder (the tile layout of launch/bach.py).
Exit status: 0 when every file decodes, 1 when some do not (they are listed), 2 for a layout
error (missing folder, empty class folder, different class sets).

The scan cache is the training runs' (``--scan-cache``, default auto: ``$XDG_CACHE_HOME/dali-bilevel``
or ``~/.cache/dali-bilevel``): a scan here makes the next run's start cheap, and only files added or
changed since the last scan are inspected again (pipelines/scan_cache.py).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.folder import DataError, split_dirs
from pipelines.scan import SplitScan, scan_report
from pipelines.scan_cache import cache_dir


def summary(name: str, scan: SplitScan) -> list[str]:
    idx = scan.index
    n = len(idx) + len(scan.problems)
    cached = f", {scan.reused} from the cache {scan.cache_file}" if scan.reused else ""
    lines = [f"{name}: {len(idx)} readable image(s) in {len(idx.classes)} class(es), {len(scan.problems)} "
             f"unreadable, {len(scan.conversions)} converted to 8-bit RGB ({scan.seconds:.2f} s, "
             f"{scan.seconds / max(1, n) * 1e3:.2f} ms/file{cached})"]
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
                   help="processes for the checks (default: one per CPU, up to 32, when there are 2000 files or "
                        "more; 1: in this process)")
    p.add_argument("--scan-cache", default="auto",
                   help="folder of the scan cache shared with training runs (auto: $XDG_CACHE_HOME/dali-bilevel or "
                        "~/.cache/dali-bilevel; none: no cache)")
    a = p.parse_args(argv)
    if a.workers is not None and a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    root = Path(a.data)
    kw = dict(full=a.full, workers=a.workers, cache=cache_dir(a.scan_cache))
    try:
        if (root / "train").is_dir():
            train_dir, eval_dir = split_dirs(root)
            train = scan_report(train_dir, **kw)
            scans = {"train": train, eval_dir.name: scan_report(eval_dir, train.index.classes, **kw)}
        else:
            scans = {root.name or str(root): scan_report(root, **kw)}
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
