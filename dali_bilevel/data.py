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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from pipelines import DaliLoader, TorchLoader, scan_splits
from pipelines.dali import AUTO_AUGMENTS, dali_import_error, resolve_device

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dali_bilevel.config import TrainConfig

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


def epoch_split(n: int, val_fraction: float, seed: int, epoch: int, redraw: bool) -> tuple[np.ndarray, np.ndarray]:
    """The learned augmenter's split is re-drawn every epoch (`split_train_val`); a baseline's
    ``--holdout`` is one fixed split, so its accuracy can choose a hyper-parameter honestly,
    while the training order is still shuffled every epoch."""
    if redraw or val_fraction == 0:
        return split_train_val(n, val_fraction, seed, epoch)
    tr, va = split_train_val(n, val_fraction, seed, 0)
    return epoch_rng(seed, epoch, 3).permutation(tr), va


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


def shard_order(flist: FileList, per_proc: int, num_shards: int) -> FileList:
    """Reorder so that contiguous reader shards yield global batch t = ``flist[t*B:(t+1)*B]``.

    Process r reads the r-th sub-chunk of every global batch. Global batches are then the same
    whatever the number of processes, and resuming at step s is slicing the list at s*B.
    """
    if num_shards == 1:
        return flist
    big = per_proc * num_shards
    order = [t * big + r * per_proc + j for r in range(num_shards) for t in range(len(flist) // big)
             for j in range(per_proc)]
    return FileList([flist.files[i] for i in order], [flist.labels[i] for i in order])


def dali_device(cfg: TrainConfig, acc: Accelerator) -> str:
    """Where DALI decodes: ``--dali-device``, with 'auto' following the training device."""
    if cfg.dali_device != "auto":
        return cfg.dali_device
    return "gpu" if acc.device.type == "cuda" else "cpu"


def check_auto_augment(cfg: TrainConfig) -> None:
    """``--augment randaugment|trivialaugment`` run inside the DALI graph: refuse the torchvision loader."""
    if cfg.augment in AUTO_AUGMENTS and cfg.loader != "dali":
        raise ValueError(f"--augment {cfg.augment} runs in the DALI pipeline; it needs --loader dali, "
                         f"not --loader {cfg.loader}")


def eval_list(files: Sequence[str], labels: Sequence[int], global_batch: int) -> FileList:
    """All samples in order, padded with label -1 to whole global batches."""
    pad = (-len(files)) % global_batch
    return FileList(list(files) + [files[-1]] * pad, [int(v) for v in labels] + [PAD_LABEL] * pad)


# ---------------------------------------------------------------------------------------------
# The data a bilevel run consumes, per process. `training_function` only talks to this protocol,
# so other sources (e.g. histology tiles) plug in beside `FolderData`.
# ---------------------------------------------------------------------------------------------

Batch = tuple  # (images [0,1] NCHW, labels) or (images, labels, groups) for tile aggregation


class BilevelData(Protocol):
    classes: tuple[str, ...]
    train_size: int  # images the classifier trains on per epoch (after the validation split)

    def steps_per_epoch(self) -> int: ...
    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Batch]: ...
    def val_batches(self, epoch: int, n_batches: int, start: int = 0) -> Iterator[Batch]: ...
    def eval_splits(self, epoch: int) -> dict[str, Iterable[Batch]]: ...
    def grid_images(self) -> torch.Tensor: ...


class FolderData:
    """ImageFolder data (``DIR/train``, ``DIR/val`` or ``DIR/test``) through DALI or torchvision."""

    def __init__(self, cfg: TrainConfig, acc: Accelerator, val_fraction: float) -> None:
        check_auto_augment(cfg)
        if cfg.batch_size % acc.num_processes:
            raise ValueError(f"--batch-size {cfg.batch_size} must divide evenly over {acc.num_processes} processes")
        self.cfg, self.acc, self.val_fraction = cfg, acc, val_fraction
        self.train, self.test = scan_splits(cfg.data, skip_unreadable=cfg.skip_unreadable)
        self.classes = self.train.classes
        self.per_proc = cfg.batch_size // acc.num_processes
        tr0, _ = self._split(0)
        self._steps = len(train_list(self.train.files, self.train.labels, tr0, cfg.batch_size)) // cfg.batch_size
        if cfg.max_steps_per_epoch:
            self._steps = min(self._steps, cfg.max_steps_per_epoch)
        self.train_size = len(tr0)
        if cfg.loader == "dali":  # fail now, not in the first epoch, when DALI or the GPU is missing
            err = dali_import_error()
            if err:
                raise RuntimeError(f"--loader dali: {err}")
            if cfg.dali_device == "gpu":
                resolve_device("gpu")  # raises when no CUDA device is usable

    def _split(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return epoch_split(len(self.train), self.val_fraction, self.cfg.seed, epoch, self.cfg.augment == "learned")

    def loader(self, flist: FileList, train: bool, seed: int, batch: int | None = None, shard: bool = True):
        """This process's loader over a pre-arranged list (contiguous shard per process)."""
        cfg, acc = self.cfg, self.acc
        if shard:
            flist = shard_order(flist, batch or self.per_proc, acc.num_processes)
        kw: dict[str, Any] = dict(
            batch_size=batch or self.per_proc, image_size=cfg.image_size,
            crop=cfg.resolved_train_crop() if train else "center", crop_pct=cfg.crop_pct,
            shard_id=acc.process_index if shard else 0, num_shards=acc.num_processes if shard else 1, seed=seed,
        )
        if cfg.loader == "dali":
            # RandAugment/TrivialAugment only on the classifier's stream, never on validation or evaluation.
            auto = cfg.augment if train and cfg.augment in AUTO_AUGMENTS else None
            return DaliLoader(flist.files, flist.labels, device=dali_device(cfg, acc),
                              device_id=acc.local_process_index, num_threads=cfg.workers, auto_augment=auto, **kw)
        return TorchLoader(flist.files, flist.labels, device=acc.device, num_workers=cfg.workers, **kw)

    def steps_per_epoch(self) -> int:
        return self._steps

    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Batch]:
        """This epoch's train batches from global step ``start`` on (resuming mid-epoch)."""
        tr, _ = self._split(epoch)
        b = self.cfg.batch_size
        flist = train_list(self.train.files, self.train.labels, tr, b)
        lo, hi = start * b, self._steps * b
        return self.loader(FileList(flist.files[lo:hi], flist.labels[lo:hi]), True, self.cfg.seed * 1000 + epoch)

    def val_batches(self, epoch: int, n_batches: int, start: int = 0) -> Iterator[Batch]:
        """The augmenter's validation stream: ``n_batches`` batches, from batch ``start`` on."""
        _, va = self._split(epoch)
        b = self.cfg.batch_size
        flist = stream_list(self.train.files, self.train.labels, va, n_batches * b, epoch_rng(self.cfg.seed, epoch, 2))
        flist = FileList(flist.files[start * b :], flist.labels[start * b :])
        return iter(self.loader(flist, False, self.cfg.seed * 1000 + epoch)) if len(flist) else iter(())

    def eval_splits(self, epoch: int) -> dict[str, Iterable[Batch]]:
        out: dict[str, Iterable[Batch]] = {}
        if self.val_fraction > 0:
            va = take(self.train.files, self.train.labels, self._split(epoch)[1])
            out["val"] = self.loader(eval_list(va.files, va.labels, self.cfg.batch_size), False, 0)
        out["test"] = self.loader(eval_list(self.test.files, self.test.labels, self.cfg.batch_size), False, 0)
        return out

    def grid_images(self) -> torch.Tensor:
        """8 test images spread over the classes, for the augmentation grid (main process)."""
        idx = [int(i) for i in np.linspace(0, len(self.test) - 1, 8)]
        flist = take(self.test.files, self.test.labels, np.array(idx))
        x, *_ = next(iter(self.loader(flist, False, 0, batch=len(idx), shard=False)))
        return x
