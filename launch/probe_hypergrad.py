"""How accurate is the hypergradient on the networks we train? Cosine (and norm ratio) of the augmenter
gradient of one bilevel step against the exact float64 one, per network, batch, mode and precision.

    python launch/probe_hypergrad.py --seeds 0,1 --out docs/results/hypergradient.json

The state of the step is `dali_bilevel.accuracy.step_state` (real networks, 32 px random data, an
augmenter with a non-zero head, SGD with momentum after two warm-up steps); every variant starts from
that very state, so it is compared with the exact float64 gradient of the same step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dali_bilevel.accuracy import augmenter_gradient, cosine, step_state
from dali_bilevel.machine import machine_info

#: name → keyword arguments of `augmenter_gradient`
VARIANTS: dict[str, dict] = {
    "exact_fp32": dict(mode="exact"),  # products "auto": the double backward on the full batch
    "exact_fp32_forward": dict(mode="exact", products="forward"),
    "exact_fp32_double": dict(mode="exact", products="double"),
    "exact_bf16_policy": dict(mode="exact", autocast=torch.bfloat16, precision="fp32"),
    "exact_bf16_autocast": dict(mode="exact", autocast=torch.bfloat16, precision="autocast"),
    "fd_fp32": dict(mode="finite_difference"),
    "fd_fp32_eps1e-3": dict(mode="finite_difference", fd_eps=1e-3),
    "fd_bf16_policy": dict(mode="finite_difference", autocast=torch.bfloat16, precision="fp32"),
    "fd_bf16_autocast": dict(mode="finite_difference", autocast=torch.bfloat16, precision="autocast"),
    "exact_fp32_hyperbatch_0.25": dict(mode="exact", hyper_batch=0.25),
    "fd_fp64": dict(mode="finite_difference", dtype=torch.float64),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cifar_resnet18_w16,resnet18")
    p.add_argument("--batches", default="32,128")
    p.add_argument("--seeds", default="0")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="docs/results/hypergradient.json")
    a = p.parse_args()
    rows = []
    print(f"{'model':<20} {'batch':>5} {'seed':>4} {'variant':<28} {'cosine':>8} {'norm ratio':>10} {'s':>6}")
    for model_name in a.models.split(","):
        for batch in map(int, a.batches.split(",")):
            for seed in map(int, a.seeds.split(",")):
                state = step_state(model_name, batch, seed)
                # the reference: float64, double backward (independent of the default forward-mode products)
                ref = augmenter_gradient(state, torch.float64, mode="exact", products="double")
                for v in a.variants.split(","):
                    t = time.perf_counter()
                    kw = dict(VARIANTS[v])
                    if "hyper_batch" in kw:  # a share of the batch: one sub-batch's estimate of Eq. 7
                        kw["hyper_batch"] = round(kw["hyper_batch"] * batch)
                    g = augmenter_gradient(state, **kw)
                    sec = time.perf_counter() - t
                    cos, ratio = cosine(g, ref), (g.norm() / ref.norm()).item()
                    rows.append({"model": model_name, "batch": batch, "seed": seed, "variant": v, "cosine": cos,
                                 "norm_ratio": ratio, "seconds": sec})
                    print(f"{model_name:<20} {batch:>5} {seed:>4} {v:<28} {cos:>8.4f} {ratio:>10.3f} {sec:>6.1f}",
                          flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {**machine_info(), "threads": torch.get_num_threads()},
                               "torch": torch.__version__, "variants": {k: {n: str(x) for n, x in v.items()}
                                                                        for k, v in VARIANTS.items()},
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
