"""Per-epoch splits and file lists for the bilevel loop.

Every epoch, a fresh seeded permutation of the training set gives the augmenter's validation
split (``val_fraction``, 20% by default) and the classifier's train split. The test split is only
evaluated for reporting. File lists are arranged so that every process runs the same number of
whole batches:

* training: the permuted list is cut to a multiple of the global batch (the cut-off tail is a
  different random subset each epoch, the usual drop-last);
* evaluation: the list is padded to a multiple of the global batch with label -1, which is
  masked out, so every sample is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD_LABEL = -1


@dataclass(frozen=True)
class FileList:
    files: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """Independent, reproducible randomness per (seed, epoch, purpose)."""
    return np.random.default_rng([seed, epoch, stream])


def split_train_val(n: int, val_fraction: float, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-draw the augmenter's validation split for this epoch (indices into the train set).

    With ``val_fraction == 0`` the classifier sees the whole training set and validation
    batches are other random batches of it, the paper's data-reuse variant.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    perm = epoch_rng(seed, epoch, 0).permutation(n)
    n_val = round(n * val_fraction)
    if val_fraction == 0:
        return perm, epoch_rng(seed, epoch, 1).permutation(n)
    return perm[n_val:], perm[:n_val]


def take(files: Sequence[str], labels: Sequence[int], idx: np.ndarray) -> FileList:
    return FileList([files[i] for i in idx], [int(labels[i]) for i in idx])


def train_list(files: Sequence[str], labels: Sequence[int], idx: np.ndarray, global_batch: int) -> FileList:
    """Shuffled train indices cut to whole global batches."""
    if len(idx) < global_batch:
        raise ValueError(f"--batch-size {global_batch} is larger than the {len(idx)} training images of this split")
    return take(files, labels, idx[: len(idx) // global_batch * global_batch])


def stream_list(files: Sequence[str], labels: Sequence[int], idx: np.ndarray, n_samples: int,
                rng: np.random.Generator) -> FileList:
    """``n_samples`` validation samples: fresh permutations of ``idx`` back to back."""
    if len(idx) == 0:
        raise ValueError("the validation split is empty; raise --val-fraction or use more data")
    reps = -(-n_samples // len(idx))
    order = np.concatenate([rng.permutation(idx) for _ in range(reps)])[:n_samples]
    return take(files, labels, order)


def eval_list(files: Sequence[str], labels: Sequence[int], global_batch: int) -> FileList:
    """All samples in order, padded with label -1 to whole global batches."""
    pad = (-len(files)) % global_batch
    return FileList(list(files) + [files[-1]] * pad, [int(v) for v in labels] + [PAD_LABEL] * pad)
