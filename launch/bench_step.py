"""Time per classifier step and peak memory of each kind of step, as a ratio to a plain step, side by
side in one run. Drives the training loop's own step objects (`dali_bilevel.train.build_step`) on
synthetic batches, so what is timed is what `training_function` runs. Prints a table, writes JSON.

    python launch/bench_step.py --model resnet18 --image-size 32 --batch-size 128 --out docs/benchmarks/step_cpu.json

Each row runs in its own child process (one process, no distribution), so its peak memory is its own:
on CUDA ``max_memory_allocated``; on the CPU the peak resident set above the one after set-up, in a
second child started with ``MALLOC_MMAP_THRESHOLD_=65536``, so that every tensor buffer is its own
mapping, returned when freed, and the resident set follows the live tensors (glibc's default keeps
freed buffers of up to 32 MB in its heap, which measured allocator history, not tensors). Warm-up
cycles first, then the median of timed cycles (whole windows of J steps, at least 8), per step.
The row of the project's default ``--augment learned`` configuration carries ``"default": true``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: name → TrainConfig overrides. "plain" is the reference: no augmentation, the cheapest real step.
ROWS: dict[str, dict] = {
    "plain": {"augment": "none"},
    "predefined": {"augment": "predefined", "translate_px": 4},
    "exact_j1": {"hypergrad": "exact", "aug_period": 1, "hyper_batch": 1.0},  # the paper's K = J = 1
    "exact_j1_hb0.25": {"hypergrad": "exact", "aug_period": 1, "hyper_batch": 0.25},
    "exact_j1_hb0.25_double": {"hypergrad": "exact", "aug_period": 1, "hyper_batch": 0.25,
                               "hypergrad_products": "double"},
    "exact_j1_hb0.125": {"hypergrad": "exact", "aug_period": 1, "hyper_batch": 0.125},
    "exact_j4": {"hypergrad": "exact", "aug_period": 4, "hyper_batch": 1.0},
    "exact_j4_hb0.25": {"hypergrad": "exact", "aug_period": 4, "hyper_batch": 0.25},
    "exact_j8_hb0.25": {"hypergrad": "exact", "aug_period": 8, "hyper_batch": 0.25},
    "exact_j8_hb0.25_double": {"hypergrad": "exact", "aug_period": 8, "hyper_batch": 0.25,
                               "hypergrad_products": "double"},
    "exact_j8_hb0.25_zeros": {"hypergrad": "exact", "aug_period": 8, "hyper_batch": 0.25,
                              "padding_mode": "zeros"},  # the default before the fifth round (reflection)
    "exact_j12_hb0.25": {"hypergrad": "exact", "aug_period": 12, "hyper_batch": 0.25},
    "exact_j2_hb0.125": {"hypergrad": "exact", "aug_period": 2, "hyper_batch": 0.125},
    "exact_j4_hb0.125": {"hypergrad": "exact", "aug_period": 4, "hyper_batch": 0.125},
    "exact_j8_hb0.125": {"hypergrad": "exact", "aug_period": 8, "hyper_batch": 0.125},
    "exact_k2_j4_hb0.25": {"hypergrad": "exact", "aug_period": 4, "unroll": 2, "hyper_batch": 0.25},
    "fd_j1": {"hypergrad": "finite_difference", "aug_period": 1, "hyper_batch": 1.0},
    "fd_j4_hb0.25": {"hypergrad": "finite_difference", "aug_period": 4, "hyper_batch": 0.25},
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_after_setup() -> int:
    """The resident set now, in KiB, with the high-water mark reset to it (Linux ``clear_refs`` 5): the
    set-up's own transient peak (the products check at build time) is not the step's. Elsewhere the
    process's high-water mark so far (ru_maxrss), which can hide a step peak below the set-up's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    try:
        return _status_kib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run_row(args: argparse.Namespace, overrides: dict, queue: mp.Queue, memory_only: bool = False) -> None:
    import torch
    from accelerate import Accelerator

    from dali_bilevel.config import TrainConfig
    from dali_bilevel.train import build_step

    if args.threads:
        torch.set_num_threads(args.threads)
    acc = Accelerator(cpu=args.device == "cpu")
    dev = acc.device
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = TrainConfig(data="-", model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                      lr=0.05, nesterov=True, weight_decay=5e-4, mixed_precision=args.precision,
                      transforms="affine,color", flip="h", **overrides)
    step = build_step(cfg, acc, args.num_classes, steps=10_000)
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x = torch.rand(shape, device=dev, generator=gen)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=dev, generator=gen)

    def val_stream():
        while True:
            yield x, y

    step.begin_epoch(0, 0, val_stream())
    period = overrides.get("aug_period", 1)
    cycle = period * -(-8 // period)  # whole windows of J steps, at least 8 steps

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base_rss = rss_after_setup()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # the memory child times nothing, so it runs at least one cycle even with --warmup 0
    for _ in range((max(args.warmup, 1) if memory_only else args.warmup) * cycle):
        step(x, y)
    times = []
    for _ in range(0 if memory_only else args.repeats):
        sync()
        t = time.perf_counter()
        for _ in range(cycle):
            step(x, y)
        sync()
        times.append((time.perf_counter() - t) / cycle)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (peak_rss_kib() - base_rss) / 1024
    queue.put({"times_s": times, "median_s": statistics.median(times) if times else None, "peak_mb": peak_mb})


def child(ctx: mp.context.BaseContext, args: argparse.Namespace, overrides: dict, memory_only: bool = False) -> dict:
    q = ctx.Queue()
    proc = ctx.Process(target=run_row, args=(args, overrides, q, memory_only))
    proc.start()
    res = q.get()
    proc.join()
    return res


def default_overrides() -> dict:
    """The learned configuration a user gets with no flags (TrainConfig's defaults)."""
    from dali_bilevel.config import TrainConfig

    d = TrainConfig(data="-")
    return {"hypergrad": d.hypergrad, "aug_period": d.aug_period, "unroll": d.unroll, "hyper_batch": d.hyper_batch,
            "hypergrad_products": d.hypergrad_products, "padding_mode": d.padding_mode, "warp_mode": d.warp_mode}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up cycles (at least 8 steps each)")
    p.add_argument("--repeats", type=int, default=3, help="timed cycles (at least 8 steps each)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    p.add_argument("--rounds", type=int, default=1, help="time every row this many times, interleaved, and keep "
                   "each row's median: a neighbour whose load varies then weighs on all rows alike")
    p.add_argument("--out", default="docs/benchmarks/step.json")
    args = p.parse_args()
    import torch

    from dali_bilevel.machine import machine_info

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.threads or torch.get_num_threads()
    info = {**machine_info(), "threads": threads}
    machine = info["gpu"] if args.device == "cuda" else f"{info['cpu']} ({info['cpu_capability']}), {threads} threads"
    names = [n.strip() for n in args.rows.split(",")]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    default = default_overrides()
    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            res = child(ctx, args, ROWS[name])
            results[name].append(res)
            print(f"  round {r + 1}/{args.rounds} {name}: {res['median_s'] * 1e3:.1f} ms/step", file=sys.stderr,
                  flush=True)
    rows = []
    for name in names:
        times = [t for res in results[name] for t in res["times_s"]]
        res = {"times_s": times, "round_medians_s": [res["median_s"] for res in results[name]],
               "median_s": statistics.median(res["median_s"] for res in results[name])}
        if args.device == "cpu":  # peak memory from a child whose resident set follows the live tensors
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
            res["peak_mb"] = child(ctx, args, ROWS[name], memory_only=True)["peak_mb"]
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            res["peak_mb"] = max(r["peak_mb"] for r in results[name])
        learned = ROWS[name].get("augment", "learned") == "learned"
        is_default = learned and all(ROWS[name].get(k, v) == v for k, v in default.items())
        rows.append({"name": name, **ROWS[name], "default": is_default, **res})
    plain = next(r for r in rows if r["name"] == "plain") if "plain" in names else rows[0]
    for r in rows:
        r["time_ratio"] = r["median_s"] / plain["median_s"]
        r["memory_ratio"] = r["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else None
    print(f"\n{args.model} @ {args.image_size}px, batch {args.batch_size}, precision {args.precision}, {machine}")
    print(f"{'step':<30} {'ms/step':>9} {'x plain':>8} {'peak MB':>9} {'x plain':>8}")
    for r in rows:
        mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        name = r["name"] + (" (default)" if r["default"] else "")
        print(f"{name:<30} {r['median_s'] * 1e3:>9.1f} {r['time_ratio']:>8.2f} {r['peak_mb']:>9.0f} {mem:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": info, "torch": torch.__version__, "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
