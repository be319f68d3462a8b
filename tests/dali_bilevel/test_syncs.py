"""No host-device sync in a steady-state step: every `.item()`, `bool(tensor)`, `float(tensor)` or tensor
print goes through ``aten._local_scalar_dense``, which a `TorchDispatchMode` sees on the CPU as well.

Counted around the whole `training_function` (the step objects and the loop's own bookkeeping), per
gap between two consecutive train batches; a gap holding a --log-every read is allowed its one read.
"""

from __future__ import annotations

import pytest

from dali_bilevel.config import TrainConfig
from dali_bilevel.syncs import syncs_per_step


@pytest.mark.slow
@pytest.mark.parametrize(("augment", "extra"), [
    ("none", {}), ("predefined", {"translate_px": 4}),
    ("learned", {"aug_period": 1}), ("learned", {"aug_period": 4}),
    ("learned", {"aug_period": 2, "hypergrad": "finite_difference", "hyper_batch": 0.5}),
    ("learned", {"aug_period": 2, "lookahead_length": "fixed", "transforms": "affine,color,erase"}),
])
def test_no_host_sync_between_logging_steps(shapes_dir, tmp_path, augment, extra):
    log_every = 4
    cfg = TrainConfig(data=str(shapes_dir), output=str(tmp_path), model="cifar_resnet18_w16", image_size=32,
                      crop_pct=1.0, batch_size=3, epochs=1, progress=False, workers=1, grid_every=0,
                      tensorboard=False, checkpoint_every=0, log_every=log_every, augment=augment, **extra)
    counts = syncs_per_step(cfg)
    steady = [n for _, i, n in counts if (i + 1) % log_every]
    logged = [n for _, i, n in counts if not (i + 1) % log_every]
    assert len(steady) >= 8 and steady == [0] * len(steady), counts
    assert logged and max(logged) <= 1, counts  # the loss read for the log line


def test_the_counter_sees_host_reads_but_not_kornias_queued_checks():
    """A value read (``.item()``, ``bool``) counts; kornia's `_check_async` (kornia >= 0.9.2: a contrast factor's
    sign) is ``torch._assert_async`` on CUDA, no sync there, and is told apart, not counted."""
    import kornia
    import kornia.core.check as kcheck
    import torch

    from dali_bilevel.syncs import SyncCounter

    counter = SyncCounter()
    x = torch.rand(2, 3, 4, 4)
    with counter:
        torch.ones(()).item()
        bool(x.sum() > 0)
        kornia.enhance.adjust_contrast(x, torch.tensor([0.5, 1.5]))
    assert counter.n == 2
    assert counter.kornia_checks == (1 if hasattr(kcheck, "_check_async") else 0)
