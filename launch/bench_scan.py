"""Start-up and per-epoch costs of the data layer at ImageNet scale: the file scan (first, cached, as the
other processes read it) and each epoch's set-up (file lists and DALI pipeline builds).

    python launch/bench_scan.py                       # 1000 classes x 120 + 5 files, ~2 min on 2 cores
    python launch/bench_scan.py --per-class 20 --out /tmp/scan.json   # a quick look

A tree of ``--classes`` x ``--per-class`` training and ``--val-per-class`` validation JPEGs is written
into a temporary folder (removed at the end, never committed): every file the same tiny 8x8 JPEG, so
the tree costs seconds to write and the scan's own cost (listing, one stat, header checks) is what is
measured, not the disk. Measured, in this order:

* **check modes** on the first ``--mode-files`` files: header checks in this process, in 2 threads, and
  in forked processes (one per CPU): what `pipelines.scan.inspect_many` chooses from;
* **first scan**: ``DIR/train`` and ``DIR/val`` with an empty cache (every file inspected, cache written);
* **cached scan** (``--repeats``, median): what a run's main process does at every later start: list the
  tree (one ``stat`` per file), read the cache, build the index; also the listing alone;
* **other processes**: reading the main process's cache files without touching the tree;
* **per-epoch set-up**: `dali_bilevel.data.FolderData`'s calls of one epoch of a learned run on
  process 0 of ``--processes`` (1 and that): ``val_batches`` + ``train_batches`` + ``eval_splits``
  (validation not due), i.e. the split and permutations, this process's part of each list, releasing
  the last epoch's DALI pipelines and building this epoch's (CPU operators; a GPU pipeline's build
  does the same per-file work). Epoch 0 (which also builds the reused test loader) and the median of
  epochs 1.. (``--epochs``) are reported, with the cost per training file; then the same at ImageNet's
  size, the tree's files listed again and again up to 1,281,167 training and 50,000 validation files
  (the lists and pipelines do not care that names repeat; nothing is decoded).

The table is printed and the JSON written to ``--out`` (docs/benchmarks/scan_cpu.json by default);
docs/benchmarks/scan_cpu.md turns the per-file costs into ImageNet's 1.28M files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import FolderData
from dali_bilevel.machine import machine_info
from pipelines.folder import FolderIndex, class_folders
from pipelines.scan import checked_index, inspect_image, inspect_many, list_split, load_report, split_reports

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def repeat(index: FolderIndex, n: int) -> FolderIndex:
    """``index``'s files listed again and again up to ``n`` entries."""
    k = -(-n // len(index))
    return FolderIndex(index.root, index.classes, (index.files * k)[:n], (index.labels * k)[:n],
                       (index.shapes * k)[:n])


def write_tree(root: Path, classes: int, per_class: int, val_per_class: int) -> float:
    """The benchmark tree: the same 8x8 JPEG bytes in every file. Returns the seconds it took."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    t0 = time.perf_counter()
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"n{c:08d}_{i:06d}.JPEG").write_bytes(data)
    return time.perf_counter() - t0


def machine() -> dict[str, Any]:
    return machine_info()


def timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def check_modes(root: Path, n: int) -> dict[str, float]:
    """ms per file of the header checks: in this process, 2 threads, forked processes."""
    paths = [str(p) for d in sorted((root / "train").iterdir()) for p in sorted(d.iterdir())][:n]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out = {}
    out["1 process"] = timed(lambda: inspect_many(paths, workers=1))[0]
    with ThreadPoolExecutor(2) as pool:
        out["2 threads"] = timed(lambda: list(pool.map(inspect_image, paths)))[0]
    out[f"{cpus} forked processes"] = timed(lambda: inspect_many(paths, workers=cpus))[0]
    return {k: v / len(paths) * 1e3 for k, v in out.items()}


def epoch_setup(cfg: TrainConfig, splits, processes: int, epochs: int) -> dict[str, Any]:
    """Seconds of one epoch's data calls on process 0 of ``processes`` (a learned run, J = 1)."""
    acc = SimpleNamespace(num_processes=processes, process_index=0, local_process_index=0,
                          device=torch.device("cpu"), is_main_process=True)
    init, data = timed(lambda: FolderData(cfg, acc, cfg.val_fraction, splits=splits))
    steps = data.steps_per_epoch()
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        data.val_batches(epoch, steps)  # the training loop builds the stream first
        data.train_batches(epoch)
        data.eval_splits(epoch)
        times.append(time.perf_counter() - t0)
    data.release()
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"processes": processes, "init_s": init, "epoch0_s": times[0], "epochs_s": times[1:],
            "steady_s": steady, "train_files": data.train_size, "us_per_train_file": steady / data.train_size * 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=120, help="training files per class")
    p.add_argument("--val-per-class", type=int, default=5, help="validation files per class")
    p.add_argument("--mode-files", type=int, default=20000, help="files for the check-mode comparison")
    p.add_argument("--repeats", type=int, default=3, help="cached scans timed (median)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of set-up timed per process count")
    p.add_argument("--processes", type=int, default=8, help="process count of the per-epoch set-up besides 1")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dir", default=None, help="where to write the tree (default: a new temporary folder)")
    p.add_argument("--out", default="docs/benchmarks/scan_cpu.json", help="JSON report")
    a = p.parse_args(argv)
    if a.classes < 1 or a.per_class < 1 or a.val_per_class < 1:
        p.error("--classes, --per-class and --val-per-class must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="bench_scan_", dir=a.dir))
    load0 = os.getloadavg()
    try:
        root, cache = work / "data", work / "cache"
        n_train, n_val = a.classes * a.per_class, a.classes * a.val_per_class
        print(f"writing {n_train} + {n_val} files under {root} ...", file=sys.stderr, flush=True)
        write_s = write_tree(root, a.classes, a.per_class, a.val_per_class)
        modes = check_modes(root, min(a.mode_files, n_train))
        print(f"check modes (ms/file): {modes}", file=sys.stderr, flush=True)
        first_s, (train, val) = timed(lambda: split_reports(root, cache=cache))
        cached = [timed(lambda: split_reports(root, cache=cache)) for _ in range(a.repeats)]
        cached_s = statistics.median(t for t, _ in cached)
        reused = cached[-1][1][0].reused + cached[-1][1][1].reused
        found = class_folders(root / "train")
        list_s = statistics.median(timed(lambda: list_split(root / "train", found))[0] for _ in range(a.repeats))
        refs = [(s.index.root, s.cache_file, s.cache_id) for s in cached[-1][1]]
        other_s = statistics.median(timed(lambda: [load_report(*r) for r in refs])[0] for _ in range(a.repeats))
        splits = (checked_index(train), checked_index(val))
        cfg = TrainConfig(data=str(root), batch_size=a.batch_size, dali_device="cpu", workers=1, epochs=a.epochs + 1,
                          scan_cache="none")
        setup = [epoch_setup(cfg, splits, n, a.epochs) for n in sorted({1, a.processes})]
        big = (repeat(splits[0], IMAGENET_TRAIN), repeat(splits[1], IMAGENET_VAL))
        setup_imagenet = [epoch_setup(cfg, big, n, a.epochs) for n in sorted({1, a.processes})]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = n_train + n_val
    report = {
        "machine": machine(), "load_average": {"start": load0, "end": os.getloadavg()},
        "command": " ".join(["python", "launch/bench_scan.py", *(argv if argv is not None else sys.argv[1:])]),
        "tree": {"classes": a.classes, "train_files": n_train, "val_files": n_val, "write_s": write_s},
        "check_modes_ms_per_file": modes, "check_mode_files": min(a.mode_files, n_train),
        "first_scan_s": first_s, "first_scan_ms_per_file": first_s / files * 1e3,
        "cached_scan_s": cached_s, "cached_scan_runs_s": [t for t, _ in cached], "cached_reused": reused,
        "cached_scan_us_per_file": cached_s / files * 1e6, "listing_train_s": list_s,
        "other_process_read_s": other_s, "epoch_setup": setup, "epoch_setup_imagenet_size": setup_imagenet,
    }
    print(table(report))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def table(r: dict[str, Any]) -> str:
    t = r["tree"]
    files = t["train_files"] + t["val_files"]
    rows = [f"{files} files ({t['classes']} classes); {r['machine']['cpu']}, {r['machine']['cpu_count']} CPUs; "
            f"load average {r['load_average']['start'][0]:.1f} -> {r['load_average']['end'][0]:.1f}", "",
            "| what | seconds | per file |", "|---|---|---|"]
    rows += [f"| header checks, {k} (first {r['check_mode_files']} files) | | {v:.3f} ms |"
             for k, v in r["check_modes_ms_per_file"].items()]
    rows += [f"| first scan (empty cache) | {r['first_scan_s']:.2f} | {r['first_scan_ms_per_file']:.3f} ms |",
             f"| cached scan (median of {len(r['cached_scan_runs_s'])}) | {r['cached_scan_s']:.2f} | "
             f"{r['cached_scan_us_per_file']:.1f} us |",
             f"| of which listing + stat of train | {r['listing_train_s']:.2f} | "
             f"{r['listing_train_s'] / t['train_files'] * 1e6:.1f} us |",
             f"| other processes: read the cache | {r['other_process_read_s']:.2f} | "
             f"{r['other_process_read_s'] / files * 1e6:.1f} us |"]
    for s in r["epoch_setup"] + r["epoch_setup_imagenet_size"]:
        rows.append(f"| per-epoch set-up, process 0 of {s['processes']}, {s['train_files']} train files "
                    f"(epoch 0: {s['epoch0_s']:.2f} s) | {s['steady_s']:.3f} | {s['us_per_train_file']:.2f} us |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
