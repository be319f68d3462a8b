"""Count host-device syncs per training step: every ``.item()``, ``bool(tensor)``, ``float(tensor)`` or
tensor print goes through ``aten._local_scalar_dense``, which a `TorchDispatchMode` sees on the CPU too.

Used by tests/dali_bilevel/test_syncs.py (which asserts zero between logging steps) and by
`launch/count_syncs.py` (the before/after table in docs/benchmarks/syncs.md).
"""

from __future__ import annotations

import itertools
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import FolderData


def _kornia_async_check(depth: int = 8) -> bool:
    """Whether this host read is kornia's `_check_async` (kornia >= 0.9.2, e.g. adjust_contrast's factor >= 0).
    On CUDA that check is ``torch._assert_async``, which queues a device-side assert and returns; only devices
    without the kernel, the CPU among them, read the condition on the host. So on a GPU it is no sync, and the
    count, which stands for the GPU's, leaves it out."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_check_async" and code.co_filename.replace("\\", "/").endswith("kornia/core/check.py"):
            return True
        frame = frame.f_back
    return False


class SyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every host read of a tensor's value, but kornia's asynchronous
    checks (`_kornia_async_check`), which read the host only where there is no device to queue them on."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.kornia_checks = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            if _kornia_async_check():
                self.kornia_checks += 1
            else:
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
