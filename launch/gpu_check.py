"""Every GPU check in one run, each asserting a real outcome, with a results file naming the card.

    python launch/gpu_check.py --out OUT              # on a GPU machine (launch/gpu_check.sh wraps it)
    python launch/gpu_check.py --dry-run --out OUT    # every command on the CPU at toy sizes (CI runs this)

Two tiers, because a GPU machine may have torch, timm and accelerate but not DALI:

1. needs kornia only: the ``cuda``-marked tests (GPU against CPU references: a float32 bilevel step,
   the bf16 hypergradient against float64, fp16 steps, ViT in exact mode, resnet50's peak memory),
   end-to-end `launch/imagenet.py` runs (resnet50, 224 px, bf16, learned and predefined, and a
   predefined fp16 run, 30 steps each, ``--loader torch``), and the step cost (`launch/bench_step.py`);
2. needs DALI: GPU decoding against PIL (``cuda``-marked pipeline tests), the loader benchmark
   (`launch/bench_loaders.py --devices gpu,cpu`) and an end-to-end run through DALI's GPU pipeline
   (images/s and the share of time waiting for data).

The first tier never depends on the second. Each stage records PASS/FAIL with its numbers in
OUT/gpu_results.md and OUT/gpu_results.json; the exit status is 1 when any stage failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Sizes:
    """What the real check runs, and the toy sizes of its dry run on the CPU."""

    model: str = "resnet50"
    image_size: int = 224
    batch_size: int = 64
    steps: int = 30
    precision: str = "bf16"
    bench_model: str = "resnet50"
    bench_batch: int = 128
    bench_rows: str = "plain,predefined,exact_j1,exact_j1_hb0.125,exact_j1_hb0.25,exact_j8_hb0.25"  # j8: the default
    loader_batches: int = 8
    cpu_flag: list[str] = field(default_factory=list)

    @classmethod
    def dry(cls) -> Sizes:
        return cls(model="resnet18", image_size=32, batch_size=8, steps=2, precision="no", bench_model="resnet18",
                   bench_batch=8, bench_rows="plain,exact_j8_hb0.25", loader_batches=1, cpu_flag=["--cpu"])


class Check:
    def __init__(self, out: Path) -> None:
        self.out, self.results = out, []

    def stage(self, name: str, fn, *args: Any) -> None:
        t = time.perf_counter()
        try:
            info = fn(*args) or {}
            status = "PASS"
        except Exception as e:  # a failed stage is recorded and the others still run
            info, status = {"error": f"{type(e).__name__}: {e}"}, "FAIL"
        self.results.append({"stage": name, "status": status, "seconds": round(time.perf_counter() - t, 1), **info})
        print(f"[{status}] {name} ({self.results[-1]['seconds']} s) {json.dumps(info)[:400]}", flush=True)


def run(cmd: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-6:]
        raise RuntimeError(f"exit {r.returncode}: {' | '.join(tail)}")
    return r


def environment(dry: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"card": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "cuda_version": torch.version.cuda}
    elif not dry:
        raise RuntimeError("no CUDA device visible to torch")
    for mod in ("kornia", "timm", "accelerate", "nvidia.dali"):
        try:
            info[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            info[mod] = None
    if info["kornia"] is None:
        raise RuntimeError("kornia is missing: carry its wheels (../shared/device/stage-wheels --kornia-only)")
    return info


def cuda_tests(paths: list[str], dry: bool) -> dict:
    """The cuda-marked tests; on the CPU they must be collected and skipped, not erroring."""
    r = subprocess.run([PY, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs", *paths],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    if r.returncode not in (0, 5) or "error" in tail or "failed" in tail:
        raise RuntimeError(f"pytest: {tail}")
    if not dry and "passed" not in tail:
        raise RuntimeError(f"no cuda test ran: {tail}")
    return {"pytest": tail}


def make_data(root: Path, size: int, per_class: int) -> Path:
    run([PY, "-m", "dali_bilevel.demo_data", "--out", str(root), "--train-per-class", str(per_class),
         "--test-per-class", "8", "--size", str(size)], timeout=300)
    return root


def end_to_end(out: Path, data: Path, s: Sizes, name: str, flags: list[str], loader: str = "torch") -> dict:
    run_dir = out / f"e2e_{name}"
    cmd = [PY, "launch/imagenet.py", "--data", str(data), "--output", str(run_dir), "--model", s.model,
           "--image-size", str(s.image_size), "--crop-pct", "1", "--batch-size", str(s.batch_size), "--epochs", "1",
           "--max-steps-per-epoch", str(s.steps), "--lr", "0.05", "--loader", loader, "--no-progress",
           "--log-every", "10", "--grid-every", "0", "--checkpoint-every", "0", "--no-tensorboard", "--workers", "4",
           *s.cpu_flag, *flags]
    run(cmd, timeout=400)
    m = json.loads((run_dir / "metrics.json").read_text())
    e = m["epochs"][-1]
    want = "cpu" if s.cpu_flag else "cuda"
    assert m["device"].startswith(want), f"ran on {m['device']}, not {want}"
    assert math.isfinite(e["train_loss"]), f"train loss {e['train_loss']}"
    info = {"device": m["device"], "train_loss": round(e["train_loss"], 4), "images_per_s": round(e["images_per_s"], 1),
            "data_wait_frac": round(e["data_wait_frac"], 3), "skipped_steps": e["skipped_steps_nonfinite"],
            "loss_scale": e["loss_scale"]}
    if "--augment" not in flags or flags[flags.index("--augment") + 1] == "learned":
        assert e["aug_updates"] > 0 and e["aug_skipped_nonfinite"] == 0, (e["aug_updates"], e["aug_skipped_nonfinite"])
        assert e["aug_magnitudes"]["affine_abs_dev"] > 0, "the augmenter never moved"
        info |= {"aug_updates": e["aug_updates"], "affine_abs_dev": round(e["aug_magnitudes"]["affine_abs_dev"], 5)}
    if "fp16" in flags:  # after the scale settles from 2^16, no step may be skipped
        assert e["skipped_steps_nonfinite"] <= 5, f"{e['skipped_steps_nonfinite']} fp16 steps skipped"
    return info


def step_cost(out: Path, s: Sizes) -> dict:
    path = out / "step_gpu.json"
    run([PY, "launch/bench_step.py", "--model", s.bench_model, "--image-size", str(s.image_size), "--batch-size",
         str(s.bench_batch), "--precision", s.precision, "--rows", s.bench_rows, "--warmup", "1", "--repeats", "3",
         "--device", "cpu" if s.cpu_flag else "cuda", "--out", str(path)], timeout=600)
    rows = json.loads(path.read_text())["rows"]
    assert sum(r["default"] for r in rows) == 1, "bench_rows must include the default --augment learned row"
    return {r["name"]: {"ms": round(r["median_s"] * 1e3, 1), "x_plain": round(r["time_ratio"], 2),
                        "peak_mb": round(r["peak_mb"]), "mem_x_plain": round(r["memory_ratio"] or 0, 2),
                        "default": r["default"]} for r in rows}


def loaders(out: Path, data: Path, s: Sizes) -> dict:
    path = out / "loaders_gpu.json"
    devices, threads, repeats = ("cpu", "1", "1") if s.cpu_flag else ("gpu,cpu", "8", "2")
    run([PY, "launch/bench_loaders.py", "--data", str(data), "--mode", "train", "--devices", devices, "--threads",
         threads, "--batches", str(s.loader_batches), "--repeats", repeats, "--warmup", "1", "--out", str(path)],
        timeout=300)
    results = json.loads(path.read_text())["benchmarks"]["train"]["results"]
    assert results and all(r["images_per_s"] > 0 for r in results), results
    return {f"{r['loader']} ({r['decode_device']})": round(r["images_per_s"], 1) for r in results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_out"))
    p.add_argument("--dry-run", action="store_true", help="every command on the CPU at toy sizes")
    p.add_argument("--tier", default="all", choices=("1", "2", "all"))
    p.add_argument("--imagenet-sample", default=".gpudata/imagenet_sample", help="real JPEGs for the loader benchmark")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = Sizes.dry() if a.dry_run else Sizes()
    check = Check(out)
    check.stage("environment", environment, a.dry_run)
    env = check.results[0]
    data = make_data(out / "shapes", s.image_size, 8 if a.dry_run else 400)  # 30 steps of 64 after the 20% split
    if a.tier in ("1", "all"):
        check.stage("cuda tests (GPU against CPU references)", cuda_tests, ["tests/gpu"], a.dry_run)
        check.stage("end to end: learned, bf16, --loader torch", end_to_end, out, data, s, "learned",
                    ["--augment", "learned", "--mixed-precision", s.precision])
        check.stage("end to end: predefined, bf16, --loader torch", end_to_end, out, data, s, "predefined",
                    ["--augment", "predefined", "--mixed-precision", s.precision])
        if not a.dry_run:  # fp16 needs CUDA
            check.stage("end to end: predefined, fp16, --loader torch", end_to_end, out, data, s, "fp16",
                        ["--augment", "predefined", "--mixed-precision", "fp16"])
        check.stage("step cost and peak memory", step_cost, out, s)
    if a.tier in ("2", "all"):
        if env.get("nvidia.dali") is None:
            check.results.append({"stage": "tier 2 (DALI)", "status": "SKIP", "reason": "nvidia.dali not importable"})
        else:
            check.stage("cuda tests: DALI decoding against PIL", cuda_tests, ["tests/pipelines"], a.dry_run)
            sample = Path(a.imagenet_sample)
            check.stage("loader throughput", loaders, out, sample if sample.is_dir() else data, s)
            check.stage("end to end: learned, bf16, --loader dali", end_to_end, out, data, s, "learned_dali",
                        ["--augment", "learned", "--mixed-precision", s.precision], "dali")
    card = env.get("card", "no GPU (dry run)")
    when = time.strftime("%Y-%m-%d %H:%M") + (", dry run on the CPU" if a.dry_run else "")
    lines = [f"# GPU check: {card}", "", when, "", "| stage | status | s | numbers |", "|---|---|---|---|"]
    for r in check.results:
        nums = {k: v for k, v in r.items() if k not in ("stage", "status", "seconds")}
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | `{json.dumps(nums)[:600]}` |")
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_results.json").write_text(json.dumps({"card": card, "dry_run": a.dry_run, "stages": check.results},
                                                     indent=2))
    print(f"wrote {out / 'gpu_results.md'}")
    return int(any(r["status"] == "FAIL" for r in check.results))


if __name__ == "__main__":
    sys.exit(main())
