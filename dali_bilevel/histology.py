"""Histology images as tiles (BACH-style): `TileConfig` flags and the `TileData` source for training.

The classifier trains on random tiles (``--tiles-per-image`` per image and epoch, each image decoded
once, see `pipelines.tiles`) and is scored per tile and per image: every image's grid tiles
(stride ``--eval-stride``) are averaged (``*_image_acc`` in metrics.json).

Splits never put tiles of one image on both sides:

* test: whole slides (``--split-by slide``: the file-name prefix matched by ``--slide-regex``,
  ``ytmaNN`` for the UCSB set) or whole images (``--split-by image``), about ``--test-fraction`` of
  the images, every class on both sides, fixed by ``--seed``;
* the augmenter's validation split: whole training images, re-drawn every epoch
  (``--val-fraction``), as for `dali_bilevel.data.FolderData`.

``--batch-size`` counts tiles: a step takes ``batch_size / tiles_per_image`` images.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import (
    Batch,
    FileList,
    dali_device,
    epoch_rng,
    epoch_split,
    eval_list,
    shard_order,
    stream_list,
    take,
    train_list,
)
from pipelines.dali import dali_import_error, resolve_device
from pipelines.folder import DataError, FolderIndex
from pipelines.scan import scan_split
from pipelines.tiles import DaliTileLoader, TorchTileLoader, grid_shape

if TYPE_CHECKING:
    from accelerate import Accelerator

SPLIT_UNITS = ("slide", "image")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TileConfig(TrainConfig):
    data: str = _f(None, "folder of <class>/<image> files (BACH Photos/, ucsb_breast_tiff/); the test split is "
                         "drawn from it", required=True)
    image_size: int = _f(0, "unused: the network sees --tile-size px tiles")
    flip: str = _f("hv", "predefined flips, applied in every mode but none: h, v, hv or none",
                   choices=("none", "h", "v", "hv"))
    tile_size: int = _f(224, "tile side in pixels")
    tiles_per_image: int = _f(8, "random tiles cut from each training image per epoch (one decode)")
    eval_stride: int = _f(0, "stride of the evaluation grid of tiles in pixels (0: the tile size)")
    split_by: str = _f("slide", "test split unit: slide (--slide-regex of the file name) or image",
                       choices=SPLIT_UNITS)
    slide_regex: str = _f(r"^[^_.]+", "regex whose match in the file name names its slide (ytmaNN for UCSB)")
    test_fraction: float = _f(0.25, "share of the images held out for testing (whole slides with --split-by slide)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.augment in ("randaugment", "trivialaugment"):
            raise ValueError(f"--augment {self.augment}: not available for tiles (the tile pipeline has no "
                             "DALI auto-augmentation); use predefined, learned, stn or none")
        if self.image_size not in (0, self.tile_size):
            raise ValueError(f"--image-size {self.image_size}: tiles are --tile-size {self.tile_size} px; "
                             "set --tile-size instead")
        self.image_size = self.tile_size


def slide_keys(files: Sequence[str], split_by: str, slide_regex: str) -> list[str]:
    """The unit each file belongs to for the test split: its slide, or itself."""
    if split_by not in SPLIT_UNITS:
        raise ValueError(f"--split-by: unknown unit {split_by!r}; choose {', '.join(SPLIT_UNITS)}")
    if split_by == "image":
        return list(files)
    pattern = re.compile(slide_regex)
    keys = []
    for f in files:
        m = pattern.search(Path(f).name)
        if not m or not m.group(0):
            raise DataError(f"{f}: --slide-regex '{slide_regex}' does not match the file name; "
                            "use --split-by image or another --slide-regex")
        keys.append(m.group(0))
    return keys


def split_by_group(keys: Sequence[str], labels: Sequence[int], test_fraction: float, seed: int,
                   tries: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` indices: whole groups on each side, about ``test_fraction`` of the items
    in test, every class on both sides. Seeded: the same split for every process and run."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    names, inverse = np.unique(np.asarray(keys), return_inverse=True)
    labels = np.asarray(labels)
    sizes = np.bincount(inverse, minlength=len(names))
    classes = set(labels.tolist())
    target = test_fraction * len(keys)
    rng = np.random.default_rng([seed, 104729])
    for _ in range(tries):
        chosen, count = [], 0
        for gi in rng.permutation(len(names)):
            if abs(count + sizes[gi] - target) < abs(count - target):
                chosen.append(gi)
                count += sizes[gi]
        test = np.isin(inverse, chosen)
        if set(labels[test].tolist()) == classes == set(labels[~test].tolist()):
            return np.flatnonzero(~test), np.flatnonzero(test)
    raise DataError(f"cannot split {len(names)} group(s) so that every class is in both train and test with "
                    f"--test-fraction {test_fraction}; use --split-by image, another --test-fraction or more data")


def subset(index: FolderIndex, idx: np.ndarray) -> FolderIndex:
    return FolderIndex(index.root, index.classes, tuple(index.files[i] for i in idx),
                       tuple(index.labels[i] for i in idx), tuple(index.shapes[i] for i in idx))


class TileData:
    """`dali_bilevel.data.BilevelData` over tiles of ``DIR/<class>/<image>`` (DALI or torchvision)."""

    def __init__(self, cfg: TileConfig, acc: Accelerator, val_fraction: float) -> None:
        self.cfg, self.acc, self.val_fraction = cfg, acc, val_fraction
        k, t = cfg.tiles_per_image, cfg.tile_size
        if k < 1:
            raise ValueError(f"--tiles-per-image must be >= 1, got {k}")
        if cfg.batch_size % (k * acc.num_processes):
            raise ValueError(f"--batch-size {cfg.batch_size} (tiles) must be a multiple of --tiles-per-image {k} "
                             f"x {acc.num_processes} process(es)")
        index = scan_split(cfg.data, skip_unreadable=cfg.skip_unreadable)
        small = [(f, s) for f, s in zip(index.files, index.shapes, strict=True) if min(s) < t]
        if small:
            raise DataError(f"{small[0][0]}: {small[0][1][0]}x{small[0][1][1]} px is smaller than --tile-size {t}"
                            + (f" (and {len(small) - 1} more)" if len(small) > 1 else ""))
        keys = slide_keys(index.files, cfg.split_by, cfg.slide_regex)
        tr, te = split_by_group(keys, index.labels, cfg.test_fraction, cfg.seed)
        self.train, self.test = subset(index, tr), subset(index, te)
        self.classes = index.classes
        self.images_per_step = cfg.batch_size // k  # global
        tr0, _ = self._split(0)
        if len(tr0) < self.images_per_step:
            raise ValueError(f"--batch-size {cfg.batch_size} tiles = {self.images_per_step} images per step is more "
                             f"than the {len(tr0)} training images of this split; lower --batch-size or raise "
                             "--tiles-per-image")
        self._steps = len(tr0) // self.images_per_step
        if cfg.max_steps_per_epoch:
            self._steps = min(self._steps, cfg.max_steps_per_epoch)
        self.train_size = len(tr0)
        # Evaluation: a batch holds as many whole grids as fit in this process's tile batch.
        rows, cols = grid_shape(max(h for h, _ in index.shapes), max(w for _, w in index.shapes), t,
                                cfg.eval_stride or t)
        self.eval_images_per_proc = max(1, cfg.batch_size // acc.num_processes // (rows * cols))
        if cfg.loader == "dali":  # fail now, not in the first epoch, when DALI or the GPU is missing
            err = dali_import_error()
            if err:
                raise RuntimeError(f"--loader dali: {err}")
            if cfg.dali_device == "gpu":
                resolve_device("gpu")

    def _split(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return epoch_split(len(self.train), self.val_fraction, self.cfg.seed, epoch, self.cfg.augment == "learned")

    def loader(self, flist: FileList, positions: str, seed: int, images: int, groups: Sequence[int] | None = None,
               num_groups: int = 0, shard: bool = True):
        """This process's tile loader over a pre-arranged image list (contiguous shard per process)."""
        cfg, acc = self.cfg, self.acc
        if shard:  # global batch t is flist[t*B:(t+1)*B] whatever the number of processes
            pos = list(range(len(flist)))
            perm = shard_order(FileList(pos, pos), images, acc.num_processes).labels
            flist = FileList([flist.files[i] for i in perm], [flist.labels[i] for i in perm])
            groups = [groups[i] for i in perm] if groups is not None else None
        shapes = dict(zip(self.train.files + self.test.files, self.train.shapes + self.test.shapes, strict=True))
        kw: dict[str, Any] = dict(
            images_per_batch=images, tile_size=cfg.tile_size, positions=positions, tiles_per_image=cfg.tiles_per_image,
            stride=cfg.eval_stride, groups=groups, num_groups=num_groups, shapes=[shapes[f] for f in flist.files],
            shard_id=acc.process_index if shard else 0, num_shards=acc.num_processes if shard else 1, seed=seed,
        )
        if cfg.loader == "dali":
            return DaliTileLoader(flist.files, flist.labels, device=dali_device(cfg, acc),
                                  device_id=acc.local_process_index, num_threads=cfg.workers, **kw)
        return TorchTileLoader(flist.files, flist.labels, device=acc.device, num_workers=cfg.workers, **kw)

    def steps_per_epoch(self) -> int:
        return self._steps

    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Batch]:
        """This epoch's random tiles from global step ``start`` on (resuming mid-epoch)."""
        tr, _ = self._split(epoch)
        b = self.images_per_step
        flist = train_list(self.train.files, self.train.labels, tr, b)
        lo, hi = start * b, self._steps * b
        return self.loader(FileList(flist.files[lo:hi], flist.labels[lo:hi]), "random", self.cfg.seed * 1000 + epoch,
                           b // self.acc.num_processes)

    def val_batches(self, epoch: int, n_batches: int, start: int = 0) -> Iterator[Batch]:
        """The augmenter's validation stream of random tiles: ``n_batches`` batches, from ``start`` on."""
        _, va = self._split(epoch)
        b = self.images_per_step
        flist = stream_list(self.train.files, self.train.labels, va, n_batches * b, epoch_rng(self.cfg.seed, epoch, 2))
        flist = FileList(flist.files[start * b :], flist.labels[start * b :])
        if not len(flist):
            return iter(())
        return iter(self.loader(flist, "random", self.cfg.seed * 1000 + epoch + 500, b // self.acc.num_processes))

    def _grid_loader(self, split: FolderIndex | FileList, shard: bool = True):
        per = self.eval_images_per_proc
        n = len(split.files)
        flist = eval_list(split.files, split.labels, per * (self.acc.num_processes if shard else 1))
        groups = list(range(n)) + [n - 1] * (len(flist) - n)
        return self.loader(flist, "grid", 0, per, groups=groups, num_groups=n, shard=shard)

    def eval_splits(self, epoch: int) -> dict[str, Iterable[Batch]]:
        out: dict[str, Iterable[Batch]] = {}
        if self.val_fraction > 0:
            out["val"] = self._grid_loader(take(self.train.files, self.train.labels, self._split(epoch)[1]))
        out["test"] = self._grid_loader(self.test)
        return out

    def grid_images(self) -> torch.Tensor:
        """8 test tiles for the augmentation grid (main process): the first grid tile of each image first."""
        n = min(8, len(self.test))
        flist = take(self.test.files, self.test.labels, np.linspace(0, len(self.test) - 1, n).round().astype(int))
        x, *_ = next(iter(self.loader(flist, "grid", 0, n, shard=False)))
        k = x.shape[0] // n
        order = torch.arange(x.shape[0]).reshape(n, k).T.reshape(-1)  # tile 0 of every image, then tile 1, ...
        return x[order[:8]]
