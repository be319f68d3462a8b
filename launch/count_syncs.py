"""Host-device syncs per training step, counted as ``aten._local_scalar_dense`` calls (a
`TorchDispatchMode` sees every ``.item()``, ``bool(tensor)``, ``float(tensor)`` on the CPU too), per gap
between two train batches, for none / predefined / learned J=1 / learned J=4. Prints and writes JSON.

    python launch/count_syncs.py --out docs/benchmarks/syncs.json

Runs `training_function` on rendered shapes (6 classes x 32, 32 px) with timm resnet18, batch 16,
the progress bar and TensorBoard on, ``--log-every 4`` (a logging step reads the loss once). The
counter is the test's (`dali_bilevel.syncs`, tests/dali_bilevel/test_syncs.py): what CI asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dali_bilevel.config import TrainConfig
from dali_bilevel.demo_data import make_shapes
from dali_bilevel.syncs import syncs_per_step

CASES = {"none": {"augment": "none"}, "predefined": {"augment": "predefined", "translate_px": 4},
         "learned_j1": {"augment": "learned", "aug_period": 1}, "learned_j4": {"augment": "learned", "aug_period": 4}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--out", default="docs/benchmarks/syncs.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    shapes = make_shapes(tmp / "shapes", train_per_class=32, test_per_class=4, size=32)
    out = {}
    for name, kw in CASES.items():
        cfg = TrainConfig(data=str(shapes), output=str(tmp / name), model=a.model, image_size=32, crop_pct=1.0,
                          batch_size=a.batch_size, epochs=1, workers=1, grid_every=0, checkpoint_every=0,
                          log_every=a.log_every, **kw)
        out[name] = [n for _, _, n in syncs_per_step(cfg)]
        print(f"{name:<12} syncs per step: {out[name]}", flush=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "batch_size": a.batch_size, "log_every": a.log_every,
                                       "syncs_per_step": out}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
