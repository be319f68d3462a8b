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

``--augment randaugment|trivialaugment`` (or ``--base-augment`` under ``learned``/``stn``) runs DALI's
policy on every training tile, each with its own draws (`pipelines.tiles.DaliTileLoader`, ``--loader
dali`` only); the augmenter's validation stream and the evaluation grids stay clean.
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
    EVAL_STREAM,
    TRAIN_STREAM,
    VAL_STREAM,
    Batch,
    FileList,
    check_auto_augment,
    dali_device,
    dali_threads,
    epoch_rng,
    epoch_split,
    eval_list,
    eval_val_due,
    load_scans,
    loader_seed,
    local_processes,
    scan_on_main,
    shard_order,
    stream_list,
    take,
    train_list,
)
from pipelines.dali import dali_import_error, resolve_device
from pipelines.folder import DataError, FolderIndex
from pipelines.scan import SplitScan, checked_index, scan_report
from pipelines.scan_cache import cache_dir
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


def scan_tiles(cfg: TileConfig, acc: Accelerator) -> FolderIndex:
    """``DIR/<class>/<image>``, every file checked, scanned once for all processes (`scan_on_main`)."""
    cache = cache_dir(cfg.scan_cache)

    def run() -> tuple[FolderIndex, list[SplitScan]]:
        scan = scan_report(cfg.data, cache=cache)
        return checked_index(scan, cfg.skip_unreadable), [scan]

    def load(refs: list[tuple[str, str, str]]) -> FolderIndex | None:
        got = load_scans(refs, cfg.skip_unreadable)
        return got[0] if got else None

    if not Path(cfg.data).is_dir():  # on every process, before any collective
        raise DataError(f"{Path(cfg.data)}: no such directory")
    return scan_on_main(acc, run, load)


def subset(index: FolderIndex, idx: np.ndarray) -> FolderIndex:
    return FolderIndex(index.root, index.classes, tuple(index.files[i] for i in idx),
                       tuple(index.labels[i] for i in idx), tuple(index.shapes[i] for i in idx))


class TileData:
    """`dali_bilevel.data.BilevelData` over tiles of ``DIR/<class>/<image>`` (DALI or torchvision)."""

    def __init__(self, cfg: TileConfig, acc: Accelerator, val_fraction: float) -> None:
        check_auto_augment(cfg)  # --augment/--base-augment randaugment|trivialaugment run in the DALI graph
        self.cfg, self.acc, self.val_fraction = cfg, acc, val_fraction
        k, t = cfg.tiles_per_image, cfg.tile_size
        if k < 1:
            raise ValueError(f"--tiles-per-image must be >= 1, got {k}")
        if cfg.batch_size % (k * acc.num_processes):
            raise ValueError(f"--batch-size {cfg.batch_size} (tiles) must be a multiple of --tiles-per-image {k} "
                             f"x {acc.num_processes} process(es)")
        index = scan_tiles(cfg, acc)
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
        self._shapes = dict(zip(self.train.files + self.test.files, self.train.shapes + self.test.shapes, strict=True))
        self._live: dict[str, tuple[int, Any]] = {}  # as FolderData: one loader per role, released before the next
        self._grid: torch.Tensor | None = None
        if cfg.loader == "dali":  # fail now, not in the first epoch, when DALI or the GPU is missing
            err = dali_import_error()
            if err:
                raise RuntimeError(f"--loader dali: {err}")
            if cfg.dali_device == "gpu":
                resolve_device("gpu")

    def _split(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return epoch_split(len(self.train), self.val_fraction, self.cfg.seed, epoch, self.cfg.augment == "learned")

    def loader(self, flist: FileList, positions: str, seed: int, images: int, groups: Sequence[int] | None = None,
               num_groups: int = 0, shard: bool = True, train: bool = False):
        """This process's tile loader over a pre-arranged image list (contiguous shard per process). ``train``:
        the classifier's stream, the only one the DALI policy (`TrainConfig.loader_policy`) is applied to."""
        cfg, acc = self.cfg, self.acc
        if shard:  # global batch t is flist[t*B:(t+1)*B] whatever the number of processes
            pos = list(range(len(flist)))
            perm = shard_order(FileList(pos, pos), images, acc.num_processes).labels
            flist = FileList([flist.files[i] for i in perm], [flist.labels[i] for i in perm])
            groups = [groups[i] for i in perm] if groups is not None else None
        kw: dict[str, Any] = dict(
            images_per_batch=images, tile_size=cfg.tile_size, positions=positions, tiles_per_image=cfg.tiles_per_image,
            stride=cfg.eval_stride, groups=groups, num_groups=num_groups, shapes=[self._shapes[f] for f in flist.files],
            shard_id=acc.process_index if shard else 0, num_shards=acc.num_processes if shard else 1, seed=seed,
        )
        if cfg.loader == "dali":
            device = dali_device(cfg, acc)
            auto = cfg.loader_policy() if train else None  # never on validation streams or evaluation grids
            return DaliTileLoader(flist.files, flist.labels, device=device, auto_augment=auto,
                                  num_threads=dali_threads(cfg.workers, device, local_processes(acc)), **kw)
        workers = dali_threads(cfg.workers, "cpu", local_processes(acc))
        return TorchTileLoader(flist.files, flist.labels, device=acc.device, num_workers=workers, **kw)

    def _seed(self, epoch: int, stream: int) -> int:
        return loader_seed(self.cfg.seed, epoch, stream, self.acc.process_index)

    def _swap(self, role: str, epoch: int, make: Any) -> Any:
        """As `dali_bilevel.data.FolderData._swap`."""
        self.release(role, *(r for r, (e, _) in self._live.items() if e < epoch))
        loader = make()
        self._live[role] = (epoch, loader)
        return loader

    def loaders(self) -> dict[str, Any]:
        """The loaders alive now, by role ("train", "stream", "val", "test")."""
        return {role: loader for role, (_, loader) in self._live.items()}

    def release(self, *roles: str) -> None:
        """Shut down the loaders of these roles (all when none given) now."""
        for role in roles or tuple(self._live):
            _, old = self._live.pop(role, (0, None))
            if old is not None:
                old.close()

    def steps_per_epoch(self) -> int:
        return self._steps

    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Batch]:
        """This epoch's random tiles from global step ``start`` on (resuming mid-epoch)."""
        tr, _ = self._split(epoch)
        b = self.images_per_step
        flist = train_list(self.train.files, self.train.labels, tr, b)
        lo, hi = start * b, self._steps * b
        return self._swap("train", epoch, lambda: self.loader(FileList(flist.files[lo:hi], flist.labels[lo:hi]),
                                                              "random", self._seed(epoch, TRAIN_STREAM),
                                                              b // self.acc.num_processes, train=True))

    def val_batches(self, epoch: int, n_batches: int, start: int = 0, share: float = 1.0) -> Iterator[Batch]:
        """The augmenter's validation stream of random tiles: ``n_batches`` batches, from ``start`` on, of
        ``share`` of a step's images (at least one per process)."""
        _, va = self._split(epoch)
        n = self.acc.num_processes
        b = max(n, round(share * self.images_per_step / n) * n)
        flist = stream_list(self.train.files, self.train.labels, va, n_batches * b, epoch_rng(self.cfg.seed, epoch, 2))
        flist = FileList(flist.files[start * b :], flist.labels[start * b :])
        if not len(flist):
            return iter(())
        return iter(self._swap("stream", epoch, lambda: self.loader(flist, "random", self._seed(epoch, VAL_STREAM),
                                                                    b // self.acc.num_processes)))

    def _grid_loader(self, split: FolderIndex | FileList, shard: bool = True):
        per = self.eval_images_per_proc
        n = len(split.files)
        flist = eval_list(split.files, split.labels, per * (self.acc.num_processes if shard else 1))
        groups = list(range(n)) + [n - 1] * (len(flist) - n)
        return self.loader(flist, "grid", self._seed(0, EVAL_STREAM), per, groups=groups, num_groups=n, shard=shard)

    def eval_splits(self, epoch: int) -> dict[str, Iterable[Batch]]:
        """As `dali_bilevel.data.FolderData.eval_splits`: "test" (one loader for the run), "val" when due."""
        self.release("train", "stream", "val")
        out: dict[str, Iterable[Batch]] = {}
        holdout = self.cfg.augment != "learned" and self.cfg.holdout > 0
        if self.val_fraction > 0 and eval_val_due(epoch, self.cfg.epochs, self.cfg.eval_val_every, holdout):
            va = take(self.train.files, self.train.labels, self._split(epoch)[1])
            out["val"] = self._swap("val", epoch, lambda: self._grid_loader(va))
        if "test" not in self._live:
            self._live["test"] = (1 << 62, self._grid_loader(self.test))
        out["test"] = self._live["test"][1]
        return out

    def grid_images(self) -> torch.Tensor:
        """8 test tiles for the augmentation grid (main process): the first grid tile of each image first;
        read once."""
        if self._grid is None:
            n = min(8, len(self.test))
            flist = take(self.test.files, self.test.labels, np.linspace(0, len(self.test) - 1, n).round().astype(int))
            loader = self.loader(flist, "grid", 0, n, shard=False)
            x, *_ = next(iter(loader))
            loader.close()
            k = x.shape[0] // n
            order = torch.arange(x.shape[0]).reshape(n, k).T.reshape(-1)  # tile 0 of every image, then tile 1, ...
            self._grid = x[order[:8]]
        return self._grid
