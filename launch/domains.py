"""Every method on three domains, several seeds, as one grid: the cross-domain comparison of docs/results.md.

    python launch/domains.py --domains cifar,ucsb,ucmerced --seeds 0,1,2 --out runs/domains --jobs 2
    python launch/domains.py --domains cifar --methods learned_default,learned_random --out runs/domains
    python launch/domains.py --table-only --out runs/domains --csv docs/results/domains.csv

Domains (their data, network, schedule and the domain's own flips and predefined augmentation):
* ``cifar``: the CIFAR-10 subset (5k/1k, ``launch/cifar_subset.py``), width-16 CIFAR ResNet-18, 32 px;
* ``ucsb``: UCSB breast histology TIFFs as 64 px tiles (``launch/bach.py``), timm resnet10t;
* ``ucmerced``: UC Merced land use (700/300, aerial, rotation- and flip-invariant) at 64 px, resnet10t.
``--selection`` swaps each domain's data for its selection split (training images only, made by
``launch/selection_split.py``): choices are made there, never on a test split.

Each (domain, method, seed) runs its launch script in its own process (``launch/experiments.run_one``:
finished runs are reused), ``--jobs`` at a time with ``DALI_BILEVEL_THREADS`` threads each. A method
``X@eqtime`` is baseline X given the wall time of ``learned_default`` on its domain as extra epochs
(its epochs times the ratio of the two methods' mean wall times over finished seeds). The table goes to
``OUT/domains.md`` and one row per run to ``--csv`` (domain,method,seed,test_acc,wall_s,...); with
``--paired learned_default``, each domain's table is followed by the default's lead over every other method
seed by seed (a seed is the same initialisation and batch order for every method, and on UCSB the same test
slides) and the exact sign-flip test's p, which with n seeds cannot fall below 2/2^n.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiments import run_one, runner_log  # a sibling launch script

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Domain:
    script: str  # launch/<script>.py
    data: str
    selection: str  # the selection split's data (training images only)
    common: list[str]
    flips: str
    predefined: list[str]  # the domain's hand-set augmentation (with its flips)
    epochs: int
    notes: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)

    def epochs_flag(self, epochs: int) -> list[str]:
        return ["--epochs", str(epochs)]


HIST_AFFINE = ["--translate-px", "4", "--rotate-deg", "10", "--scale-range", "0.5,2"]
DOMAINS: dict[str, Domain] = {
    "cifar": Domain(
        "imagenet", str(ROOT / "data" / "cifar10_5k"), str(ROOT / "data" / "cifar10_5k_sel"),
        ["--model", "cifar_resnet18_w16", "--image-size", "32", "--crop-pct", "1", "--batch-size", "128", "--lr", "0.1",
         "--nesterov", "--weight-decay", "5e-4", "--schedule", "onecycle", "--train-crop", "center"],
        "h", ["--augment", "predefined", "--flip", "h", "--translate-px", "4"], 24),
    "ucsb": Domain(
        "bach", str(SHARED / "ucsb_breast_tiff"), "",
        ["--model", "resnet10t", "--tile-size", "64", "--tiles-per-image", "16", "--batch-size", "64", "--lr", "0.05",
         "--eval-stride", "128"],
        "hv", ["--augment", "predefined", "--flip", "hv", *HIST_AFFINE], 30,
        notes="the seed also draws the test slides: compare rows seed by seed"),
    "ucmerced": Domain(
        "imagenet", str(SHARED / "ucmerced_jpeg"), str(ROOT / "data" / "ucmerced_sel"),
        ["--model", "resnet10t", "--image-size", "64", "--crop-pct", "1", "--batch-size", "64", "--lr", "0.05",
         "--nesterov", "--weight-decay", "5e-4", "--schedule", "onecycle", "--train-crop", "center"],
        "hv", ["--augment", "predefined", "--flip", "hv", *HIST_AFFINE], 50),
}

_LEARNED = ["--augment", "learned", "--flip", "{flips}"]  # the project's learned defaults
_ZEROS = ["--padding-mode", "zeros"]  # the warp's padding up to the fifth round (then reflection)
_L1 = [*_LEARNED, "--aug-lr", "1e-3", *_ZEROS]  # the defaults up to the third round

#: method → flags, with {flips} and {predefined} taken from the domain.
METHODS: dict[str, list[str]] = {
    "none": ["--augment", "none"],
    "flips": ["--augment", "predefined", "--flip", "{flips}"],
    "predefined": ["{predefined}"],
    "randaugment": ["--augment", "randaugment", "--flip", "{flips}"],
    "trivialaugment": ["--augment", "trivialaugment", "--flip", "{flips}"],
    "learned_default": _LEARNED,  # the project's defaults, nothing else
    "learned_paper": [*_LEARNED, "--preset", "paper"],
    # The ablations of the signal: the same run with the hypergradient replaced by a random direction of
    # the same norm, and with the augmenter frozen at its initialisation (it never moves).
    "learned_random": [*_LEARNED, "--hypergrad-control", "random"],
    "learned_frozen": [*_LEARNED, "--aug-lr", "0", *_ZEROS],
    # The default of the third and fourth rounds (Adam 4e-3, zero padding) and its control.
    "learned_zeros": [*_LEARNED, *_ZEROS],
    "learned_random_zeros": [*_LEARNED, *_ZEROS, "--hypergrad-control", "random"],
    # The default before the third selection round (Adam 1e-3; now 4e-3) and its random-direction control.
    "learned_lr1e-3": _L1,
    "learned_random_lr1e-3": [*_L1, "--hypergrad-control", "random"],
    # Levers (docs/results.md says which were kept). Each ran on the 1e-3 default, so each pins it: a
    # row's flags are what its runs used.
    "learned_bicubic": [*_L1, "--warp-mode", "bicubic"],
    "learned_on_randaugment": [*_L1, "--base-augment", "randaugment"],
    "learned_sharpness": [*_L1, "--transforms", "affine,color,sharpness"],
    "learned_k2": [*_L1, "--unroll", "2"],
    "learned_prior": [*_L1, "--aug-init-translate-px", "{prior_px}"],
    "learned_full_batch": [*_L1, "--hyper-batch", "1"],
    # 4x the θ updates (J=2 on an eighth of the batch): the second selection round's best, a preset
    "learned_frequent": [*_LEARNED, "--preset", "frequent"],
    # The 4e-3 default on top of DALI's RandAugment (the CIFAR best variant, learned_on_randaugment, again)
    "learned_default_on_randaugment": [*_LEARNED, *_ZEROS, "--base-augment", "randaugment"],
    # The paper's K = J = 1 at a hyper-batch of 1/8 (issue 12's exact-K=J=1 cost target)
    "learned_j1_hb8": [*_L1, "--aug-period", "1", "--hyper-batch", "0.125"],
    # The default without hue rotation (sixth round's candidate): the colour changes RandAugment draws
    "learned_tone": [*_LEARNED, "--transforms", "affine,tone"],
    # The default with hue at slope 1 like every other parameter (seventh round's candidate)
    "learned_hue1": [*_LEARNED, "--hue-slope", "1"],
    # The default with its hue bounded by the training images' own hue spread (eighth round's candidate)
    "learned_huedata": [*_LEARNED, "--hue-bound", "data"],
    # The default with θ's Adam at 6e-3 instead of 4e-3 (ninth round's candidate)
    "learned_lr6e-3": [*_LEARNED, "--aug-lr", "6e-3"],
    # The default with half the train batch in the hypergradient instead of a quarter (ninth round's second)
    "learned_hb05": [*_LEARNED, "--hyper-batch", "0.5"],
    # The default plus the Cutout-like erase family (tenth round's candidate)
    "learned_erase": [*_LEARNED, "--transforms", "affine,color,erase"],
    # The default with the look-ahead step's length held at the real step's (tenth round's second candidate)
    "learned_fixed": [*_LEARNED, "--lookahead-length", "fixed"],
}
#: The candidates for the learned default, compared on the selection splits (explicit flags, so that
#: they do not move when the defaults do): no hold-out, J = 8, a quarter hyper-batch, Adam 1e-3, then one
#: lever each.
_SEL = [*_LEARNED, "--val-fraction", "0", "--aug-period", "8", "--hyper-batch", "0.25", "--transforms", "affine,color",
        "--aug-lr", "1e-3", *_ZEROS]
_SEL_BICUBIC = [*_SEL, "--warp-mode", "bicubic"]  # the first round's choice, under every later candidate
_SEL_4E3 = [*_SEL_BICUBIC, "--aug-lr", "4e-3"]  # the third round's choice (it overrides _SEL's 1e-3)
METHODS.update({
    "sel_base": _SEL,
    "sel_bicubic": _SEL_BICUBIC,
    "sel_on_randaugment": [*_SEL_BICUBIC, "--base-augment", "randaugment"],
    "sel_sharpness": [*_SEL_BICUBIC, "--transforms", "affine,color,sharpness"],
    "sel_lr3e-3": [*_SEL_BICUBIC, "--aug-lr", "3e-3"],
    "sel_j4": [*_SEL_BICUBIC, "--aug-period", "4"],
    "sel_prior": [*_SEL_BICUBIC, "--aug-init-translate-px", "{prior_px}"],
    "sel_j2_hb8": [*_SEL_BICUBIC, "--aug-period", "2", "--hyper-batch", "0.125"],
    "sel_k2": [*_SEL_BICUBIC, "--unroll", "2"],
    "sel_j4_hb8": [*_SEL_BICUBIC, "--aug-period", "4", "--hyper-batch", "0.125"],
    # Third round: frequent's four-fold θ movement at the default's cost (J=8: 4x the step size instead)
    "sel_lr4e-3": _SEL_4E3,
    "sel_lr1e-2": [*_SEL_BICUBIC, "--aug-lr", "1e-2"],
    # The 4e-3 default on DALI's RandAugment (its test rows came first; rejected in the fourth round)
    "sel_lr4e-3_on_randaugment": [*_SEL_4E3, "--base-augment", "randaugment"],
    # Fourth round: the sharpness family (best on UC Merced at 1e-3, first round) at 4e-3: a tie, not added
    "sel_lr4e-3_sharpness": [*_SEL_4E3, "--transforms", "affine,color,sharpness"],
    # Fifth round: what the warp puts where the image leaves the frame. Zeros (the default) paint black
    # borders no test image has, which may be what pulls shifts and zoom-outs back; border repeats the edge
    # pixels and reflection mirrors the content (the usual pad of CIFAR's ±4 px crops).
    "sel_lr4e-3_reflection": [*_SEL_4E3, "--padding-mode", "reflection"],
    "sel_lr4e-3_border": [*_SEL_4E3, "--padding-mode", "border"],
    # Sixth round: no hue rotation. The hypergradient grows a hue spread of 0.15-0.43 rad on every domain,
    # 2-4x its random control's, and the worst UCSB seed had the widest; RandAugment and TrivialAugment
    # never rotate hue. `tone` is the colour family without it.
    "sel_lr4e-3_reflection_tone": [*_SEL_4E3, "--padding-mode", "reflection", "--transforms", "affine,tone"],
    # Seventh round: hue at slope 1. Every bounded parameter is b*tanh(v/b), slope 1 at 0, except hue, which
    # kept the pre-bounds pi*tanh(v): a theta step moves it pi times as far. Between the default and `tone`.
    "sel_lr4e-3_reflection_hue1": [*_SEL_4E3, "--padding-mode", "reflection", "--hue-slope", "1"],
    # Eighth round: hue bounded by the training images' own hue spread (circular std of their mean hues,
    # pipelines/colour_stats.py): about 1.4 rad on CIFAR, 0.9 on UC Merced, 0.2 on UCSB's H&E slides.
    "sel_lr4e-3_reflection_huedata": [*_SEL_4E3, "--padding-mode", "reflection", "--hue-bound", "data"],
    # Ninth round: larger θ steps again. 4e-3 was chosen under zero padding (1e-2 overshot there: black
    # borders and a train loss of 1.0); reflection made the larger shifts benign, so the best step may have
    # moved up. Half as far again, at the same step cost.
    "sel_lr6e-3_reflection": [*_SEL_4E3, "--padding-mode", "reflection", "--aug-lr", "6e-3"],
    # ... and a less noisy hypergradient instead (signal-to-noise 0.33 per update, docs/results.md): half the
    # train batch in its second-order products instead of a quarter, at a larger step cost.
    "sel_lr4e-3_reflection_hb05": [*_SEL_4E3, "--padding-mode", "reflection", "--hyper-batch", "0.5"],
    # Tenth round: a family the paper lacks and Cutout has, and none of the nine rounds tried: a box of learned
    # opacity and size blended towards the image's mean colour, at a random position (models/augmenter.erase).
    # RandAugment's lead on CIFAR comes with a train loss the learned default does not reach; occlusion is the
    # regulariser of the CIFAR recipes, and it paints nothing outside the frame.
    "sel_lr4e-3_reflection_erase": [*_SEL_4E3, "--padding-mode", "reflection", "--transforms", "affine,color,erase"],
    # ... and what the known-answer runs of erase pointed to: Eq. 7 rewards a longer train gradient as much as a
    # better-aimed one, so a batch that makes a longer step wins for that alone (on noisier known-answer data the
    # erase family raised its box's contrast, opacity -0.8, whatever T*; with the length held it went positive
    # instead). Held at the real step's length, θ can only turn the step (dali_bilevel/hypergrad.py).
    "sel_lr4e-3_reflection_fixed": [*_SEL_4E3, "--padding-mode", "reflection", "--lookahead-length", "fixed"],
})


def flags_for(domain: Domain, method: str) -> list[str]:
    base = method.split("@")[0]
    size = next((int(v) for k, v in zip(domain.common, domain.common[1:], strict=False)
                 if k in ("--image-size", "--tile-size")), 32)
    out = []
    for f in METHODS[base]:
        if f == "{predefined}":
            out += domain.predefined
        else:
            out.append(f.format(flips=domain.flips, prior_px=size / 8))
    return out


def wall(out: Path, method: str, seeds: list[int]) -> float | None:
    """Mean wall time of the finished seeds of a method, or None."""
    times = []
    for s in seeds:
        f = out / f"{method}_s{s}" / "metrics.json"
        if f.exists():
            m = json.loads(f.read_text())
            if len(m["epochs"]) == m["config"]["epochs"]:
                times.append(m["wall_time_s"])
    return statistics.mean(times) if times else None


def run_task(name: str, domain: Domain, method: str, seed: int, out: Path, selection: bool, log) -> dict | None:
    data = domain.selection if selection else domain.data
    if not data or not Path(data).is_dir():
        log(f"{name}: skipping {method} seed {seed}: no data at {data or '(no selection split)'}")
        return None
    epochs = domain.epochs
    if "@eqtime" in method:  # the baseline given learned_default's wall time as extra epochs
        base, learned = wall(out, method.split("@")[0], [seed]), wall(out, "learned_default", [seed])
        if base is None or learned is None:
            log(f"{name}: {method} seed {seed} waits for its baseline and learned_default runs")
            return None
        epochs = max(domain.epochs, round(domain.epochs * learned / base))
    common = [*domain.common, *domain.epochs_flag(epochs), "--grid-every", str(max(1, epochs // 4)),
              "--checkpoint-every", "0", "--no-tensorboard"]
    return run_one(data, out, method, seed, common, log, domain.script, flags_for(domain, method))


def run_row(out: Path, name: str, method: str, seed: int) -> dict | None:
    """One finished run's CSV row from its metrics.json, or None while it is missing or unfinished."""
    f = out / f"{method}_s{seed}" / "metrics.json"
    m = json.loads(f.read_text()) if f.exists() else None
    if m is None or len(m["epochs"]) != m["config"]["epochs"]:
        return None
    last = m["epochs"][-1]
    acc = last.get("test_image_acc", m["test_acc"]) if name == "ucsb" else m["test_acc"]
    return {"domain": name, "method": method, "seed": seed, "test_acc": round(acc, 3),
            "wall_s": round(m["wall_time_s"], 1), "epochs": m["config"]["epochs"],
            "test_tile_acc": round(m["test_acc"], 3) if name == "ucsb" else "",
            "final_train_loss": round(last["train_loss"], 4)}


def read_csv_rows(csv_path: Path) -> dict[tuple[str, str, int], dict]:
    """The rows of an earlier ``--csv``, by (domain, method, seed): the record once the run folders are gone."""
    if not csv_path.exists():
        raise SystemExit(f"--merge: no earlier table at {csv_path}")
    with open(csv_path, newline="") as fh:
        return {(r["domain"], r["method"], int(r["seed"])): r for r in csv.DictReader(fh)}


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided exact p of the paired sign-flip test: the share of the 2^n sign patterns of the per-seed
    differences whose mean is at least as far from 0 as the observed one. It assumes nothing about the
    differences' distribution (a seed's spread here is not normal: UCSB's per-image accuracy moves in steps
    of 5-11 points: one of its 9-19 test images), and it says what n seeds can show at best: 2/2^n (3 seeds
    0.25, 5 seeds 0.0625)."""
    if not diffs:
        raise ValueError("sign_flip_p needs at least one difference")
    observed = abs(sum(diffs)) - 1e-9  # a tolerance, so that a pattern equal to the observed one counts
    hits = sum(abs(sum(d if (mask >> i) & 1 else -d for i, d in enumerate(diffs))) >= observed
               for mask in range(2 ** len(diffs)))
    return hits / 2 ** len(diffs)


def paired_lines(found: dict[tuple[str, int], dict | None], ref: str, methods: list[str], seeds: list[int],
                 keys: list[tuple[str, str]]) -> list[str]:
    """A markdown table of ``ref`` against each other method on the seeds both finished: the per-seed lead
    (ref − method: the same seed is the same initialisation, batch order and, on UCSB, test slides), its
    mean ± std, on how many seeds ref is ahead, and the sign-flip test's p. ``keys``: (CSV column, label)."""
    lines = ["", f"| {ref} − method, seed by seed | per seed | mean ± std | {ref} ahead | sign-flip p |",
             "|---|---|---|---|---|"]
    for method in methods:
        if method == ref:
            continue
        both = [s for s in seeds if found.get((ref, s)) and found.get((method, s))]
        for key, label in keys:
            diffs = [float(found[(ref, s)][key]) - float(found[(method, s)][key]) for s in both
                     if found[(ref, s)].get(key) not in (None, "") and found[(method, s)].get(key) not in (None, "")]
            if not diffs:
                continue
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            lines.append(f"| {method}{label} | {' / '.join(f'{d:+.1f}' for d in diffs)} | "
                         f"{statistics.mean(diffs):+.1f} ± {std:.1f} | {sum(d > 0 for d in diffs)} of {len(diffs)} | "
                         f"{sign_flip_p(diffs):.3g} |")
    return lines


def table(out_root: Path, domains: list[str], methods: list[str], seeds: list[int], csv_path: Path | None,
          merge: bool = False, wall_ref: str = "learned_default", paired: str = "") -> str:
    """Markdown tables and the CSV. With ``merge``, a run without a finished folder under ``out_root`` keeps
    its row of the existing CSV (rows of other methods and seeds are kept too), so that adding a method
    does not need every earlier run's folder. With ``paired``, each domain's table is followed by that
    method's per-seed lead over every other method (`paired_lines`)."""
    earlier = read_csv_rows(csv_path) if merge and csv_path is not None else {}
    lines, rows = [], {}
    for name in domains:
        lines += [f"\n### {name}" + (f" ({DOMAINS[name].notes})" if DOMAINS[name].notes else ""), "",
                  "| method | " + " / ".join(f"seed {s}" for s in seeds) + f" | mean ± std | wall vs {wall_ref} |"
                  " final train loss |", "|---|---|---|---|---|"]
        found = {(method, s): run_row(out_root / name, name, method, s) or earlier.get((name, method, s))
                 for method in {*methods, wall_ref, *([paired] if paired else [])} for s in seeds}
        ref = [float(r["wall_s"]) for s in seeds if (r := found[(wall_ref, s)])]
        for method in methods:
            got = [found[(method, s)] for s in seeds]
            cells = [f"{float(r['test_acc']):.1f}" if r else "–" for r in got]
            done = [r for r in got if r]
            rows.update({(name, method, int(r["seed"])): r for r in done})
            if not done:
                continue
            accs = [float(r["test_acc"]) for r in done]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            w = statistics.mean(float(r["wall_s"]) for r in done)
            ratio = f"{w / statistics.mean(ref):.2f}x" if ref else "-"
            loss = statistics.mean(float(r["final_train_loss"]) for r in done)
            lines.append(f"| {method} | {' / '.join(cells)} | {statistics.mean(accs):.1f} ± {std:.1f} | {ratio} | "
                         f"{loss:.3f} |")
        if paired:
            keys = [("test_acc", ""), ("test_tile_acc", " (per tile)")] if name == "ucsb" else [("test_acc", "")]
            lines += paired_lines(found, paired, methods, seeds, keys)
    if csv_path is not None and rows:
        out_rows = list(rows.values()) + [r for k, r in earlier.items() if k not in rows]
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(out_rows[0]))
            w.writeheader()
            w.writerows(out_rows)
    md = "\n".join(lines) + "\n"
    (out_root / "domains.md").write_text(md)
    return md


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--methods", default="none,flips,predefined,randaugment,trivialaugment,learned_default")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/domains")
    p.add_argument("--csv", default="", help="write one row per finished run here (domain,method,seed,test_acc,...)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets DALI_BILEVEL_THREADS threads)")
    p.add_argument("--selection", action="store_true", help="run on the domains' selection splits (training data)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--wall-ref", default="learned_default", help="the method whose mean wall time the table's "
                   "wall column divides by (runs from one machine only compare with runs from the same machine)")
    p.add_argument("--merge", action="store_true", help="with --csv: runs without a folder under --out keep their "
                   "row of the existing CSV (the record once run folders are gone), and its other rows are kept")
    p.add_argument("--paired", default="", metavar="METHOD", help="after each domain's table, METHOD's lead over "
                   "every other method seed by seed, with the exact sign-flip test's p (the seed pairs the runs)")
    a = p.parse_args()
    domains, methods = a.domains.split(","), a.methods.split(",")
    unknown = [d for d in domains if d not in DOMAINS] + [m for m in methods + ([a.paired] if a.paired else [])
                                                          if m.split("@")[0] not in METHODS]
    if unknown:
        p.error(f"unknown domain or method {unknown}; domains: {', '.join(DOMAINS)}; methods: {', '.join(METHODS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    out_root = Path(a.out)
    out_root.mkdir(parents=True, exist_ok=True)

    log = runner_log(out_root)
    if not a.table_only:
        os.environ.setdefault("DALI_BILEVEL_THREADS", str(max(1, (os.cpu_count() or 1) // a.jobs)))
        for phase in (False, True):  # baselines and learned runs first; then the equal-time baselines
            tasks = [(d, m, s) for d in domains for m in methods for s in seeds if ("@eqtime" in m) == phase]
            for d in domains:
                (out_root / d).mkdir(exist_ok=True)
            with ThreadPoolExecutor(a.jobs) as pool:
                futures = [pool.submit(run_task, d, DOMAINS[d], m, s, out_root / d, a.selection, log)
                           for d, m, s in tasks]
                for f in futures:
                    f.result()
    if a.merge and not a.csv:
        p.error("--merge needs --csv: the table whose rows it keeps")
    print(table(out_root, domains, methods, seeds, Path(a.csv) if a.csv else None, a.merge, a.wall_ref,
                a.paired))
    return 0


if __name__ == "__main__":
    sys.exit(main())
