"""Full-size known-answer runs of the hypergradient's signal (dali_bilevel/known_answer.py).

Each task's validation images are a known transformation T* of the training distribution; the
augmenter, trained online from the identity with the exact or finite-difference hypergradient, must
recover T*; the control (a random direction of the hypergradient's norm every update) must not.
Prints a table (per task and mode: the recovered magnitude over seeds, its relative error, how many
seeds land within ±25%) and writes every run to JSON.

    python launch/known_answer.py --seeds 8 --steps 600 --out docs/results/known_answer.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dali_bilevel.known_answer import (
    DEFAULT_ANSWERS,
    TASKS,
    UNITS,
    KnownAnswer,
    RunConfig,
    known_magnitude,
    run_known_answer,
)
from dali_bilevel.machine import machine_info

MODES = ("exact", "finite_difference", "control")


def parse_answer(task: str, values: dict[str, str]) -> KnownAnswer:
    if task not in values:
        return DEFAULT_ANSWERS[task]
    return KnownAnswer(task, tuple(float(v) for v in values[task].split("/")))


def summarise(task: str, mode: str, answer: KnownAnswer, finals: list[dict[str, float]],
              seconds: list[float]) -> dict[str, object]:
    vals = [f["value"] for f in finals]
    errs = [f["rel_error"] for f in finals]
    return {"task": task, "family": answer.family, "known": list(answer.value), "known_str": known_str(answer),
            "known_magnitude": math.hypot(*known_magnitude(answer)), "units": UNITS[task], "mode": mode,
            "value_mean": statistics.mean(vals), "value_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "rel_error_median": statistics.median(errs), "rel_error_max": max(errs),
            "within_25pct": sum(e <= 0.25 for e in errs), "outside_50pct": sum(e > 0.5 for e in errs),
            "full_error_max": max(f["full_error"] for f in finals), "seeds": len(finals),
            "seconds_per_run": statistics.mean(seconds)}


def known_str(answer: KnownAnswer) -> str:
    if answer.task == "shift":
        return f"({answer.value[0]:+g}, {answer.value[1]:+g}) px"
    return {"rotation": "{:g}°", "zoom": "×{:g}", "brightness": "{:+g}", "contrast": "×{:g}",
            "erase": "opacity {:g}"}[answer.task].format(
        answer.value[0])


def table(rows: list[dict[str, object]]) -> str:
    head = ("| task (family) | T* | mode | recovered, mean ± sd over seeds | rel. error median / max | "
            "within ±25% | full error max | s/run |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['task']} ({r['family']}) | {r['known_str']} | {r['mode']} | "
                     f"{r['value_mean']:.3f} ± {r['value_sd']:.3f} {r['units']} (known {r['known_magnitude']:.3f}) | "
                     f"{r['rel_error_median']:.2f} / {r['rel_error_max']:.2f} | {r['within_25pct']}/{r['seeds']} | "
                     f"{r['full_error_max']:.2f} | {r['seconds_per_run']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 per task and mode")
    p.add_argument("--steps", type=int, default=600, help="bilevel updates per run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--aug-optimizer", default="normalized", choices=("normalized", "adam"))
    p.add_argument("--aug-lr", type=float, default=0.003)
    p.add_argument("--variety-lr-ratio", type=float, default=0.1)
    p.add_argument("--lookahead-length", default="free", choices=("free", "fixed"),
                   help="the look-ahead step's length under theta (dali_bilevel/hypergrad.py)")
    p.add_argument("--values", default="", help="override known answers, e.g. 'rotation:20,shift:2/1'")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="docs/results/known_answer.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [t for t in tasks if t not in TASKS] + [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown task or mode {bad}")
    values = dict(kv.split(":", 1) for kv in a.values.split(",") if kv)
    rows, runs, t0 = [], [], time.perf_counter()
    for task in tasks:
        answer = parse_answer(task, values)
        for mode in modes:
            finals, secs = [], []
            for seed in range(a.seeds):
                cfg = RunConfig(answer, mode="exact" if mode == "control" else mode, control=mode == "control",
                                steps=a.steps, seed=seed, batch=a.batch, aug_optimizer=a.aug_optimizer,
                                aug_lr=a.aug_lr, variety_lr_ratio=a.variety_lr_ratio, step_length=a.lookahead_length)
                res = run_known_answer(cfg)
                finals.append(res.final)
                secs.append(res.seconds)
                runs.append({"task": task, "mode": mode, "seed": seed, **asdict(res)})
            rows.append(summarise(task, mode, answer, finals, secs))
            row = rows[-1]
            print(f"{task:10s} {mode:17s} {row['value_mean']:+.3f} ± {row['value_sd']:.3f} {UNITS[task]:10s} "
                  f"rel err median {row['rel_error_median']:.2f} max {row['rel_error_max']:.2f}  "
                  f"within ±25% {row['within_25pct']}/{a.seeds}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    print()
    print(table(rows))
    out = {"command": "python launch/known_answer.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "torch": torch.__version__,
           "threads": a.threads, "args": vars(a), "wall_s": time.perf_counter() - t0, "summary": rows, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
