"""Count host-device syncs per training step: every ``.item()``, ``bool(tensor)``, ``float(tensor)`` or
tensor print goes through ``aten._local_scalar_dense``, which a `TorchDispatchMode` sees on the CPU too.

Used by tests/dali_bilevel/test_syncs.py (which asserts zero between logging steps) and by
`launch/count_syncs.py` (the before/after table in docs/benchmarks/syncs.md).
"""

from __future__ import annotations

import itertools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import FolderData


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def syncs_per_step(cfg: TrainConfig) -> list[tuple[int, int, int]]:
    """Run `training_function` under the counter: (epoch, step, syncs from that step's start to the next
    batch) for every step but an epoch's last. The gap holds the step object's call and the loop's own
    per-step work (progress, stop flag, checkpoint test), but no evaluation."""
    from accelerate.state import AcceleratorState, GradientState

    from dali_bilevel.train import training_function

    counter, marks = SyncCounter(), []

    class Marked(FolderData):
        def train_batches(self, epoch: int, start: int = 0):
            for i, batch in enumerate(super().train_batches(epoch, start), start=start):
                marks.append((epoch, i, counter.n))
                yield batch

    try:
        with counter:
            training_function(cfg, make_data=Marked)
    finally:  # Accelerate keeps process-wide state; the next in-process run starts clean
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return [(e, i, n2 - n1) for (e, i, n1), (e2, _, n2) in itertools.pairwise(marks) if e == e2]
