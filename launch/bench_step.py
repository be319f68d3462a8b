"""Time per iteration and peak memory: plain training against bilevel training (exact and finite
difference, update period J), for a model chosen by name. Prints a table of ratios to plain and
writes JSON.

    python launch/bench_step.py --model resnet18 --image-size 32 --batch-size 128 --out docs/benchmarks/step_cpu.json

Each configuration runs in its own child process (one process, no distribution), so peak memory
is its own: on CUDA ``max_memory_allocated``; on the CPU the child's peak resident set above its
resident set after setup. Warm-up steps first, then the median of repeated timed cycles of J steps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = [("plain", "-", 1), ("exact", "exact", 1), ("exact", "exact", 2), ("exact", "exact", 4),
           ("finite_difference", "finite_difference", 1), ("finite_difference", "finite_difference", 2),
           ("finite_difference", "finite_difference", 4)]


def run_config(args: argparse.Namespace, kind: str, J: int, queue: mp.Queue) -> None:
    import torch
    import torch.nn.functional as F

    from dali_bilevel.hypergrad import hypergradient, train_gradient
    from models import Augmenter, create_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = create_backbone(args.model, args.num_classes).to(dev, memory_format=fmt).train()
    if kind == "exact":
        import timm.layers

        timm.layers.set_fused_attn(False)
    aug = Augmenter("affine,color", "small").to(dev)
    torch.nn.init.normal_(aug.head.weight, std=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    aug_opt = torch.optim.Adam(aug.parameters(), lr=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x = torch.rand(shape, device=dev).contiguous(memory_format=fmt)
    xv = torch.rand(shape, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype else nullcontext

    def plain_step(augment: bool) -> None:
        with torch.no_grad():
            xa = aug(x) if augment else x
        with autocast():
            loss = F.cross_entropy(model(xa), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cycle() -> None:
        if kind == "plain":
            plain_step(False)
            return
        for _ in range(J - 1):
            plain_step(True)
        rec, _, g = train_gradient(model, aug, opt, x, y, mode=kind, autocast=autocast)
        for p, gi in zip(params, g, strict=True):
            p.grad = gi
        opt.step()
        opt.zero_grad(set_to_none=True)
        _, h = hypergradient(model, aug, [rec], params, xv, y, mode=kind, autocast=autocast)
        for t, hi in zip(aug.parameters(), h, strict=True):
            t.grad = hi
        aug_opt.step()
        aug_opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        cycle()
    times = []
    for _ in range(args.repeats):
        sync()
        t = time.perf_counter()
        cycle()
        sync()
        times.append((time.perf_counter() - t) / (1 if kind == "plain" else J))
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    queue.put({"times_s": times, "median_s": statistics.median(times), "peak_mb": peak_mb})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="docs/benchmarks/step.json")
    args = p.parse_args()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    ctx = mp.get_context("spawn")
    rows = []
    for name, kind, J in CONFIGS:
        q = ctx.Queue()
        proc = ctx.Process(target=run_config, args=(args, kind if kind != "-" else "plain", J, q))
        proc.start()
        res = q.get()
        proc.join()
        rows.append({"mode": name, "J": J, **res})
        print(f"  measured {name} J={J}: {res['median_s'] * 1e3:.1f} ms/iter", file=sys.stderr)
    plain = rows[0]
    for r in rows:
        r["time_ratio"] = r["median_s"] / plain["median_s"]
        r["memory_ratio"] = r["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else None
    print(f"\n{args.model} @ {args.image_size}px, batch {args.batch_size}, {args.precision}, {machine}")
    print(f"{'mode':<18} {'J':>2} {'ms/iter':>9} {'x plain':>8} {'peak MB':>9} {'x plain':>8}")
    for r in rows:
        mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        print(f"{r['mode']:<18} {r['J']:>2} {r['median_s'] * 1e3:>9.1f} {r['time_ratio']:>8.2f} "
              f"{r['peak_mb']:>9.0f} {mem:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "torch": torch.__version__, "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
