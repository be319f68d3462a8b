"""Loader throughput: DALI (GPU, CPU) against torchvision + PIL on the same files and transform.

    python launch/bench_loaders.py --data ../shared/data/imagenet_sample --mode train --out out.json
    python launch/bench_loaders.py --data ../shared/data/ucsb_breast_tiff --mode tiles --out out.json --append
    python launch/bench_loaders.py --data DIR --devices gpu,cpu          # on a GPU machine

``--out PATH`` writes the JSON report, as in the other benchmarks (``launch/bench_step.py``,
``launch/bench_scan.py``); ``--json`` is its deprecated old name.

Every loader gets the same file list (all images under ``--data``, cycled to whole batches), the
same transform (``train``: random-resized crop to 224; ``eval``: resize 256 + centre crop 224;
``tiles``: ``--tiles-per-image`` random 224 px tiles per decoded image), the same batch size and
the same CPU thread count (DALI ``num_threads`` = DataLoader ``num_workers`` = ``--threads``).
Loaders take turns: in each of ``--repeats`` rounds every loader is built, drains ``--warmup``
batches untimed, times ``--batches`` batches and is shut down before the next one starts, so the
steady state is measured (construction and worker start-up excluded), no loader's prefetching
overlaps another's timing, and a shared machine's changing load hits all loaders alike. The
median is reported with the ratio to each torchvision row.

Only one PIL build can be installed in a venv: run the script again from a venv with the other
one and ``--loaders torch --append`` to add its row (commands in docs/benchmarks/loaders_cpu.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dali_bilevel.machine import machine_info
from pipelines.folder import IMAGE_EXTENSIONS
from pipelines.torch_loader import pil_flavour

MODES = ("train", "eval", "tiles")


def image_files(root: Path) -> list[str]:
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"error: --data: no image files under {root}")
    return files


def machine() -> dict[str, Any]:
    return {**machine_info(), "pil": pil_flavour()}


def make_loader(kind: str, device: str, files: list[str], a: argparse.Namespace):
    """A loader over ``files``: kind 'dali' or 'torch'; ``device`` is where DALI decodes / batches land."""
    n_img = a.batch_size // a.tiles_per_image if a.mode == "tiles" else a.batch_size
    if a.mode == "tiles":
        from pipelines.tiles import DaliTileLoader, TorchTileLoader

        kw: dict[str, Any] = dict(images_per_batch=n_img, tile_size=a.image_size, positions="random",
                                  tiles_per_image=a.tiles_per_image, seed=0)
        if kind == "dali":
            return DaliTileLoader(files, [0] * len(files), device=device, num_threads=a.threads, **kw)
        return TorchTileLoader(files, [0] * len(files), device="cuda" if device == "gpu" else "cpu",
                               num_workers=a.threads, **kw)
    from pipelines import DaliLoader, TorchLoader

    kw = dict(batch_size=n_img, image_size=a.image_size, crop="random" if a.mode == "train" else "center",
              crop_pct=a.image_size / 256, seed=0)
    if kind == "dali":
        return DaliLoader(files, [0] * len(files), device=device, num_threads=a.threads, **kw)
    return TorchLoader(files, [0] * len(files), device="cuda" if device == "gpu" else "cpu", num_workers=a.threads,
                       **kw)


def measure(runs: list[tuple[str, str]], files: list[str], a: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s of each ``(kind, device)``. Each of ``--repeats`` rounds builds every loader afresh,
    in turn (order alternating between rounds, so a shared machine's changing load hits all alike),
    drains ``--warmup`` batches untimed, times ``--batches`` batches and shuts it down before the
    next one starts: no loader's background prefetching overlaps another's timed run."""
    per_batch = a.batch_size // a.tiles_per_image if a.mode == "tiles" else a.batch_size
    rates: list[list[float]] = [[] for _ in runs]
    for r in range(a.repeats):
        order = list(range(len(runs)))[:: 1 if r % 2 == 0 else -1]
        for i in order:
            kind, device = runs[i]
            start = r * (a.warmup + a.batches) * per_batch  # each round its own stretch of the cycled set
            listed = [files[(start + j) % len(files)] for j in range((a.warmup + a.batches) * per_batch)]
            loader = make_loader(kind, device, listed, a)
            it = iter(loader)
            sync = torch.cuda.synchronize if device == "gpu" and torch.cuda.is_available() else (lambda: None)
            for _ in range(a.warmup):
                next(it)
            sync()
            t0 = time.perf_counter()
            for _ in range(a.batches):
                x = next(it)[0]
            sync()
            rates[i].append(a.batches * per_batch / (time.perf_counter() - t0))
            assert x.dtype == torch.float32 and x.shape[1:] == (3, a.image_size, a.image_size), x.shape
            del it, loader, x
            gc.collect()  # DataLoader workers and DALI threads end here, before the next loader starts
    out = []
    for (kind, device), r in zip(runs, rates, strict=True):
        name = "dali" if kind == "dali" else f"torchvision+{a.pil_label or pil_flavour().split(' (')[0]}"
        med = statistics.median(r)
        out.append({"loader": name, "decode_device": device if kind == "dali" else "cpu", "images_per_s": med,
                    "runs": r, "tiles_per_s": med * a.tiles_per_image if a.mode == "tiles" else None})
    return out


def dali_stages(files: list[str], a: argparse.Namespace) -> dict[str, float]:
    """Images/s of growing prefixes of the DALI train graph (pipeline only, no torch hand-over):
    where the time of a 224 random-resized crop goes on this machine."""
    from nvidia.dali import fn, pipeline_def, types

    def rrc(d):
        return fn.decoders.image_random_crop(d, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0],
                                             random_aspect_ratio=[3 / 4, 4 / 3])

    s = a.image_size
    stages = {
        "read": lambda d: d,
        "decode (whole image)": lambda d: fn.decoders.image(d, device="cpu", output_type=types.RGB),
        "ROI decode (image_random_crop)": rrc,
        "ROI decode + resize (antialiased linear)": lambda d: fn.resize(rrc(d), resize_x=s, resize_y=s),
        "ROI decode + resize without antialias": lambda d: fn.resize(rrc(d), resize_x=s, resize_y=s, antialias=False),
        "ROI decode + resize + to float CHW (= DaliLoader)": lambda d: fn.crop_mirror_normalize(
            fn.resize(rrc(d), resize_x=s, resize_y=s), dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3,
            std=[255.0] * 3),
    }
    listed = [files[i % len(files)] for i in range(a.batch_size * (a.warmup + a.batches))]
    out = {}
    for name, body in stages.items():
        @pipeline_def(batch_size=a.batch_size, num_threads=a.threads, device_id=None, seed=0)
        def pipe(body=body):
            data, _ = fn.readers.file(files=listed, random_shuffle=False)
            return body(data)

        pp = pipe()
        pp.build()
        rates = []
        for _ in range(a.repeats):
            for _ in range(a.warmup):
                pp.run()
            t0 = time.perf_counter()
            for _ in range(a.batches):
                pp.run()
            rates.append(a.batches * a.batch_size / (time.perf_counter() - t0))
        out[name] = statistics.median(rates)
        print(f"  DALI stage {name}: {out[name]:.0f} images/s", file=sys.stderr, flush=True)
        del pp
    return out


def add_ratios(results: list[dict[str, Any]]) -> list[str]:
    """``ratio_to[<torch row>]`` for every row; returns the baseline names."""
    bases = [r for r in results if r["loader"].startswith("torchvision")]
    for r in results:
        r["ratio_to"] = {b["loader"]: r["images_per_s"] / b["images_per_s"] for b in bases}
    return [b["loader"] for b in bases]


def table(bench: dict[str, Any]) -> str:
    """One benchmark's markdown table: a row per loader, a ratio column per torchvision row."""
    results, bases = bench["results"], add_ratios(bench["results"])
    unit = "images/s (tiles/s)" if bench["config"]["mode"] == "tiles" else "images/s"
    head = ["loader", "decode on", f"{unit}, median", "runs"] + [f"x {b}" for b in bases]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rate = f"{r['images_per_s']:.0f}" + (f" ({r['tiles_per_s']:.0f})" if r.get("tiles_per_s") else "")
        runs = ", ".join(f"{v:.0f}" for v in r["runs"])
        rows.append("| " + " | ".join([r["loader"], r["decode_device"], rate, runs]
                                      + [f"{r['ratio_to'][b]:.2f}" for b in bases]) + " |")
    return "\n".join(rows)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, GPU: {m['gpu'] or 'none'}; torch {m['torch']}, "
           f"DALI {m['dali']}, {m['pil']}.", ""]
    for mode, bench in report["benchmarks"].items():
        if mode == "dali_stages":
            out += ["**DALI CPU train graph, stage by stage** (pipeline only, images/s, median): "
                    + "; ".join(f"{k}: {v:.0f}" for k, v in bench["images_per_s"].items()), ""]
            continue
        c = bench["config"]
        what = {"train": f"random-resized crop to {c['image_size']}",
                "eval": f"resize {round(c['image_size'] / 0.875)} + centre crop {c['image_size']}",
                "tiles": f"{c['tiles_per_image']} random {c['image_size']} px tiles per image"}[mode]
        out += [f"**{mode}**: {c['files']} files of `{c['data']}`, {what}, batch {c['batch_size']}, "
                f"{c['threads']} threads, {c['repeats']} x {c['batches']} timed batches", "", table(bench), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder searched recursively for images")
    p.add_argument("--mode", default="train", choices=MODES)
    p.add_argument("--loaders", default="dali,torch", help="comma list of dali, torch")
    p.add_argument("--devices", default="cpu", help="comma list of cpu, gpu: where DALI decodes (torch: where to)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (tiles per batch in tiles mode)")
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--image-size", type=int, default=224, help="crop or tile size")
    p.add_argument("--tiles-per-image", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before each timed run")
    p.add_argument("--batches", type=int, default=4, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs")
    p.add_argument("--pil-label", default="", help="name of the PIL build in the torch row (default: detected)")
    p.add_argument("--out", "--json", dest="out", default="",
                   help="write (or with --append, extend) this JSON report (--json: deprecated name)")
    p.add_argument("--append", action="store_true", help="add this run's rows to an existing --out report")
    p.add_argument("--md", default="", help="also write the table as markdown here")
    p.add_argument("--dali-stages", action="store_true", help="train mode: also time DALI CPU graph prefixes")
    a = p.parse_args(argv)
    if a.mode != "tiles":
        a.tiles_per_image = 1
    elif a.batch_size % a.tiles_per_image:
        p.error("--batch-size must be a multiple of --tiles-per-image in tiles mode")
    files = image_files(Path(a.data))
    devices = [d.strip() for d in a.devices.split(",") if d.strip()]
    runs = [(kind, device) for kind in [k.strip() for k in a.loaders.split(",") if k.strip()]
            for device in (devices if kind == "dali" else devices[:1])]
    print(f"measuring {runs} on {len(files)} files ...", file=sys.stderr, flush=True)
    results = measure(runs, files, a)
    config = {k: v for k, v in vars(a).items() if k not in ("out", "append", "md", "pil_label")}
    config["files"] = len(files)
    report = {"machine": machine(), "benchmarks": {a.mode: {"config": config, "results": results}}}
    if a.dali_stages and a.mode == "train":
        report["benchmarks"]["dali_stages"] = {"config": config, "images_per_s": dali_stages(files, a)}
    if a.append and a.out and Path(a.out).exists():
        old = json.loads(Path(a.out).read_text())
        bench = old["benchmarks"].setdefault(a.mode, {"config": config, "results": []})
        same = ("batch_size", "threads", "image_size", "tiles_per_image", "files")
        if any(bench["config"][k] != config[k] for k in same):
            p.error(f"--append: the {a.mode} benchmark in {a.out} used other settings ({', '.join(same)})")
        bench["results"] += results
        if "dali_stages" in report["benchmarks"]:
            old["benchmarks"]["dali_stages"] = report["benchmarks"]["dali_stages"]
        if report["machine"]["pil"] not in (old["machine"]["pil"], *old["machine"].get("other_pil", [])):
            old["machine"].setdefault("other_pil", []).append(report["machine"]["pil"])
        report = old
    md = markdown(report)
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    if a.md:
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
