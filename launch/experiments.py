"""Run a grid of methods x seeds on one data set and write a results table (Markdown and CSV).

    python launch/experiments.py --data data/cifar10_5k --methods none,learned_affine,learned_affine_j4 \
        --seeds 0,1,2 --out runs/cifar5k -- --model cifar_resnet18_w16 --image-size 32 --crop-pct 1 \
        --batch-size 128 --epochs 12 --lr 0.1 --nesterov --weight-decay 5e-4 --schedule onecycle

Each (method, seed) runs `launch/imagenet.py` in its own process into OUT/<method>_s<seed>/; a row
whose metrics.json is complete is not run again (delete the folder to rerun it; the same seed
reproduces it). Arguments after ``--`` go to every run. Progress goes to stdout and OUT/runner.log.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Method name → the flags that define it (on top of the common ones).
METHODS: dict[str, list[str]] = {
    "none": ["--augment", "none"],
    "hflip": ["--augment", "predefined", "--flip", "h", "--train-crop", "center"],
    "predefined": ["--augment", "predefined", "--flip", "h", "--translate-px", "4", "--train-crop", "center"],
    "learned_translation": ["--augment", "learned", "--transforms", "translation", "--flip", "h"],
    "learned_affine": ["--augment", "learned", "--transforms", "affine", "--flip", "h"],
    "learned_color": ["--augment", "learned", "--transforms", "color", "--flip", "h"],
    "learned_affine_color": ["--augment", "learned", "--transforms", "affine,color", "--flip", "h"],
    "learned_affine_j4": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--aug-period", "4"],
    "learned_affine_reuse": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--val-fraction", "0"],
    "learned_affine_fd": ["--augment", "learned", "--transforms", "affine", "--flip", "h",
                          "--hypergrad", "finite_difference"],
}


def run_one(data: str, out: Path, method: str, seed: int, common: list[str], log) -> dict:
    run_dir = out / f"{method}_s{seed}"
    metrics = run_dir / "metrics.json"
    cmd = [sys.executable, str(ROOT / "launch" / "imagenet.py"), "--data", data, "--output", str(run_dir),
           "--seed", str(seed), "--no-progress", *common, *METHODS[method]]
    if metrics.exists():
        m = json.loads(metrics.read_text())
        if len(m["epochs"]) == m["config"]["epochs"]:
            log(f"{method} seed {seed}: done already, test acc {m['test_acc']:.2f}")
            return m
    log(f"{method} seed {seed}: running  {' '.join(cmd)}")
    t = time.perf_counter()
    with open(out / f"{method}_s{seed}.log", "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed (exit {r.returncode}); see {out / f'{method}_s{seed}.log'}")
    m = json.loads(metrics.read_text())
    log(f"{method} seed {seed}: test acc {m['test_acc']:.2f} in {time.perf_counter() - t:.0f} s")
    return m


def table(out: Path, results: dict[str, list[dict]], seeds: list[int]) -> str:
    base = results.get("none")
    base_time = statistics.mean(m["wall_time_s"] for m in base) if base else None
    rows, lines = [], ["| method | " + " / ".join(f"seed {s}" for s in seeds) + " | mean ± std | time vs none |",
                       "|---|---|---|---|"]
    for method, ms in results.items():
        accs = [m["test_acc"] for m in ms]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        wall = statistics.mean(m["wall_time_s"] for m in ms)
        ratio = f"{wall / base_time:.2f}x" if base_time else "-"
        lines.append(f"| {method} | {' / '.join(f'{a:.1f}' for a in accs)} | {mean:.2f} ± {std:.2f} | {ratio} |")
        rows.append({"method": method, **{f"seed_{s}": a for s, a in zip(seeds, accs, strict=True)},
                     "mean": mean, "std": std, "wall_time_s": wall})
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    return md


def main() -> int:
    argv = sys.argv[1:]
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--methods", required=True, help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(out / "runner.log", "a") as fh:
            fh.write(line + "\n")

    results = {m: [run_one(a.data, out, m, s, common, log) for s in seeds] for m in methods}
    print(table(out, results, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
