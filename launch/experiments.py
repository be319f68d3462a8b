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
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Method name → the flags that define it (on top of the common ones). ``{out}`` and ``{seed}`` are
#: filled in, so a frozen-policy row can use the same seed's learned run.
METHODS: dict[str, list[str]] = {
    # ---- natural images (CIFAR) ----
    "none": ["--augment", "none"],
    "hflip": ["--augment", "predefined", "--flip", "h", "--train-crop", "center"],
    "predefined": ["--augment", "predefined", "--flip", "h", "--translate-px", "4", "--train-crop", "center"],
    "predefined_color": ["--augment", "predefined", "--flip", "h", "--translate-px", "4", "--color-jitter", "0.9",
                         "--train-crop", "center"],
    "randaugment": ["--augment", "randaugment", "--flip", "h", "--train-crop", "center"],
    "trivialaugment": ["--augment", "trivialaugment", "--flip", "h", "--train-crop", "center"],
    "stn": ["--augment", "stn", "--transforms", "affine", "--flip", "h"],
    "learned_translation": ["--augment", "learned", "--transforms", "translation", "--flip", "h"],
    "learned_affine": ["--augment", "learned", "--transforms", "affine", "--flip", "h"],
    "learned_color": ["--augment", "learned", "--transforms", "color", "--flip", "h"],
    "learned_affine_color": ["--augment", "learned", "--transforms", "affine,color", "--flip", "h"],
    "learned_affine_color_reuse": ["--augment", "learned", "--transforms", "affine,color", "--flip", "h",
                                   "--val-fraction", "0"],
    "learned_affine_j4": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--aug-period", "4"],
    # The transform families at J=4 (a third of J=1's cost; J=4 matched J=1 on affine, docs/results.md).
    "learned_translation_j4": ["--augment", "learned", "--transforms", "translation", "--flip", "h",
                               "--aug-period", "4"],
    "learned_color_j4": ["--augment", "learned", "--transforms", "color", "--flip", "h", "--aug-period", "4"],
    "learned_affine_color_j4": ["--augment", "learned", "--transforms", "affine,color", "--flip", "h",
                                "--aug-period", "4"],
    "learned_affine_reuse": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--val-fraction", "0"],
    "learned_affine_reuse_j4": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--val-fraction", "0",
                                "--aug-period", "4"],
    "learned_affine_fd": ["--augment", "learned", "--transforms", "affine", "--flip", "h",
                          "--hypergrad", "finite_difference"],
    # The gap-closing variant (docs/results.md): start θ at the ±4 px prior, no hold-out, J=4.
    "learned_prior": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--val-fraction", "0",
                      "--aug-period", "4", "--aug-init-translate-px", "4"],
    "learned_prior_bicubic": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--val-fraction", "0",
                              "--aug-period", "4", "--aug-init-translate-px", "4", "--warp-mode", "bicubic"],
    "learned_affine_j4_bicubic": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--aug-period", "4",
                                  "--warp-mode", "bicubic"],
    "learned_prior_holdout": ["--augment", "learned", "--transforms", "affine", "--flip", "h", "--aug-period", "4",
                              "--aug-init-translate-px", "4"],
    "frozen_prior": ["--augment", "frozen:{out}/learned_prior_s{seed}/augmenter.pt", "--flip", "h"],
    "frozen_prior_bicubic": ["--augment", "frozen:{out}/learned_prior_bicubic_s{seed}/augmenter.pt", "--flip", "h"],
    # ---- histology tiles (launch/bach.py) ----
    "vflip": ["--augment", "predefined", "--flip", "v", "--train-crop", "center"],
    "hist_predefined": ["--augment", "predefined", "--flip", "hv", "--translate-px", "4", "--rotate-deg", "10",
                        "--scale-range", "0.5,2"],
    "hist_predefined_color": ["--augment", "predefined", "--flip", "hv", "--translate-px", "4", "--rotate-deg", "10",
                              "--scale-range", "0.5,2", "--color-jitter", "0.9"],
    "hist_learned": ["--augment", "learned", "--transforms", "affine,color", "--flip", "hv"],
    "hist_learned_reuse": ["--augment", "learned", "--transforms", "affine,color", "--flip", "hv",
                           "--val-fraction", "0", "--warp-mode", "bicubic"],
}

#: The validated-magnitude baseline: a random affine whose one magnitude is chosen by accuracy on
#: a fixed 20% hold-out (never the test set), then retrained on all training data.
VALIDATED_GRID = (0.05, 0.15, 0.3)
VALIDATED = "validated"
VALIDATED_FLAGS = ["--augment", "predefined", "--flip", "h", "--train-crop", "center"]  # + --affine-magnitude M


def runner_log(out: Path):
    """Progress lines with the time, to stdout and OUT/runner.log."""

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(out / "runner.log", "a") as fh:
            fh.write(line + "\n")

    return log


def run_one(data: str, out: Path, method: str, seed: int, common: list[str], log, script: str = "imagenet",
            flags: list[str] | None = None) -> dict:
    run_dir = out / f"{method}_s{seed}"
    metrics = run_dir / "metrics.json"
    flags = [f.format(out=out, seed=seed) for f in (METHODS[method] if flags is None else flags)]
    cmd = [sys.executable, str(ROOT / "launch" / f"{script}.py"), "--data", data, "--output", str(run_dir),
           "--seed", str(seed), "--no-progress", *common, *flags]
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


def run_validated(data: str, out: Path, seed: int, common: list[str], log, script: str,
                  select_seed: int | None) -> dict:
    """Choose the magnitude on the hold-out of ``select_seed`` (default: this seed), then train on all data."""
    sel = seed if select_seed is None else select_seed
    val = {}
    for m in VALIDATED_GRID:
        r = run_one(data, out, f"validated_m{m}_holdout", sel, common, log, script,
                    [*VALIDATED_FLAGS, "--affine-magnitude", str(m), "--holdout", "0.2"])
        val[m] = r["epochs"][-1]["val_acc"]
    best = max(VALIDATED_GRID, key=lambda m: val[m])
    log(f"validated seed {seed}: hold-out accuracy {val} (seed {sel}) → magnitude {best}")
    r = run_one(data, out, VALIDATED, seed, common, log, script, [*VALIDATED_FLAGS, "--affine-magnitude", str(best)])
    r["chosen_magnitude"], r["holdout_acc"] = best, {str(k): v for k, v in val.items()}
    return r


def timing(data: str, out: Path, methods: list[str], common: list[str], log, script: str, steps: int) -> str:
    """Cost per classifier step of each method, measured back to back in one sweep (a fair ratio even
    when the grid's own wall times shared the machine). Compute only: data waiting is excluded."""
    tdir = out / "timing"
    if tdir.exists():
        shutil.rmtree(tdir)  # always measured afresh, side by side
    tdir.mkdir(parents=True)
    short = ["--epochs", "1", "--max-steps-per-epoch", str(steps), "--grid-every", "0", "--no-tensorboard"]
    rows = {}
    for m in methods:
        flags = METHODS.get(m) or [*VALIDATED_FLAGS, "--affine-magnitude", str(VALIDATED_GRID[1])]
        flags = [f.format(out=out, seed=0) for f in flags]  # a frozen row uses the grid's seed-0 policy
        policies = [f.removeprefix("frozen:") for f in flags if f.startswith("frozen:")]
        missing = [pth for pth in policies if not Path(pth).is_file()]
        if missing:
            log(f"timing: skipping {m}; its policy {missing[0]} is not trained yet")
            continue
        r = run_one(data, tdir, m, 0, [*common, *short], log, script, flags)
        rows[m] = r["epochs"][0]["step_time_s"]
    base = rows.get("none")
    pre = rows.get("predefined")
    lines = ["| method | s / step | vs none | vs predefined |", "|---|---|---|---|"]
    for m, t in rows.items():
        lines.append(f"| {m} | {t:.3f} | {t / base:.2f}x | {t / pre:.2f}x |" if base and pre else
                     f"| {m} | {t:.3f} | {t / base if base else float('nan'):.2f}x | - |")
    md = (f"Cost per classifier step, {steps} steps per method, run back to back on "
          f"{platform.node()} ({os.cpu_count()} CPUs).\n\n" + "\n".join(lines) + "\n")
    (out / "timing.md").write_text(md)
    (out / "timing.json").write_text(json.dumps({"steps": steps, "step_time_s": rows}, indent=2))
    return md


def table(out: Path, results: dict[str, list[dict | None]], seeds: list[int]) -> str:
    """Paper-style table: accuracy per seed and mean ± std (missing seeds shown as –), wall time
    relative to none, and, when OUT/timing.json exists, the side-by-side cost per step."""
    done = {m: [r for r in rs if r is not None] for m, rs in results.items()}
    base = done.get("none")
    base_time = statistics.mean(m["wall_time_s"] for m in base) if base else None
    cost = json.loads((out / "timing.json").read_text())["step_time_s"] if (out / "timing.json").exists() else {}
    head = "| method | " + " / ".join(f"seed {s}" for s in seeds) + " | mean ± std | wall vs none |"
    images = any("test_image_acc" in r["epochs"][-1] for rs in done.values() for r in rs)  # tiles: per image too
    head += " per-image acc, mean ± std |" if images else ""
    head += " step cost vs none |" if cost else ""
    lines = [head, "|---|---|---|---|" + ("---|" if images else "") + ("---|" if cost else "")]
    rows = []
    for method, rs in results.items():
        accs = [r["test_acc"] for r in done[method]]
        if not accs:
            continue
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        wall = statistics.mean(r["wall_time_s"] for r in done[method])
        ratio = f"{wall / base_time:.2f}x" if base_time else "-"
        per_seed = " / ".join("–" if r is None else f"{r['test_acc']:.1f}" for r in rs)
        line = f"| {method} | {per_seed} | {mean:.2f} ± {std:.2f} (n={len(accs)}) | {ratio} |"
        if images:
            ia = [r["epochs"][-1].get("test_image_acc", float("nan")) for r in done[method]]
            line += f" {statistics.mean(ia):.1f} ± {statistics.stdev(ia) if len(ia) > 1 else 0.0:.1f} |"
        if cost:
            c = cost.get(method)
            line += f" {c / cost['none']:.2f}x |" if c and cost.get("none") else " - |"
        lines.append(line)
        rows.append({"method": method, **{f"seed_{s}": (None if r is None else r["test_acc"])
                                           for s, r in zip(seeds, rs, strict=True)},
                     "mean": mean, "std": std, "n": len(accs), "wall_time_s": wall,
                     "step_cost_vs_none": (cost[method] / cost["none"]) if method in cost and "none" in cost
                     else None})
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for method, rs in done.items():
        if any("chosen_magnitude" in r for r in rs):
            held = ", ".join(f"{g}: {'–' if v is None else f'{v:.1f}'}" for g, v in rs[0]["holdout_acc"].items())
            lines.append(f"\n{method}: magnitude chosen on the hold-out, per seed: "
                         + ", ".join(str(r["chosen_magnitude"]) for r in rs)
                         + f" (first seed's hold-out accuracy: {held})")
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    return md


def existing(out: Path, method: str, seed: int, select_seed: int | None = None) -> dict | None:
    """A finished row's metrics, or None (for --table-only). A validated row's hold-out runs are
    looked up under ``select_seed`` when the grid chose every seed's magnitude there."""
    f = out / f"{method}_s{seed}" / "metrics.json"
    if not f.exists():
        return None
    m = json.loads(f.read_text())
    if len(m["epochs"]) != m["config"]["epochs"]:
        return None
    if method == VALIDATED:
        m["chosen_magnitude"] = m["config"]["affine_magnitude"]
        sel = seed if select_seed is None else select_seed
        m["holdout_acc"] = {str(g): (existing(out, f"validated_m{g}_holdout", sel) or {}).get("epochs", [{}])[-1]
                            .get("val_acc") for g in VALIDATED_GRID}
    return m


def main() -> int:
    argv = sys.argv[1:]
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--methods", required=True,
                   help=f"comma-separated, from: {', '.join([*METHODS, VALIDATED])}")
    p.add_argument("--script", default="imagenet", choices=("imagenet", "bach"),
                   help="launch/imagenet.py (ImageFolder) or launch/bach.py (histology tiles)")
    p.add_argument("--select-seed", type=int, default=None,
                   help="validated: choose the magnitude on this seed's hold-out for every seed (saves runs)")
    p.add_argument("--timing-steps", type=int, default=0,
                   help="instead of the grid: run every method for this many steps, one after another, and "
                        "write OUT/timing.{md,json} with the cost per step relative to none (run on an idle machine)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: tabulate the finished rows in OUT (missing seeds shown as –)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS and m != VALIDATED]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join([*METHODS, VALIDATED])}")
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    log = runner_log(out)

    def run(m: str, s: int) -> dict:
        if m == VALIDATED:
            return run_validated(a.data, out, s, common, log, a.script, a.select_seed)
        return run_one(a.data, out, m, s, common, log, a.script)

    if a.timing_steps:
        print(timing(a.data, out, methods, common, log, a.script, a.timing_steps))
        return 0
    if a.table_only:
        results = {m: [existing(out, m, s, a.select_seed) for s in seeds] for m in methods}
        if not any(r for rs in results.values() for r in rs):
            p.error(f"--table-only: no finished runs of {methods} in {out}")
    else:
        results = {m: [run(m, s) for s in seeds] for m in methods}
    print(table(out, results, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
