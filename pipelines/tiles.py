"""Tiles of large images (BACH-style histology): each image is decoded once and many tiles are cut from it.

One DALI sample is one image: ``fn.readers.file`` → ``fn.peek_image_shape`` (header only) →
``fn.decoders.image`` (the whole image, once; ``mixed`` on a GPU, CPU operators with
``device_id=None`` otherwise) → K × ``fn.slice`` at anchors computed in the graph → ``fn.stack``
→ ``crop_mirror_normalize`` to ``(K, 3, T, T)`` float in [0, 1]. The anchors (top-left ``(y, x)``
of each tile) are

* ``random``: ``floor(u · (L − T + 1))`` per axis with ``u ~ U[0, 1)`` from ``fn.random.uniform``
  (seeded by the pipeline seed), uniform over every whole-tile position;
* ``grid``: ``(i·s, j·s)``, the regular stride-``s`` grid of whole tiles of the largest image. On a
  smaller image the positions that do not fit are clamped and flagged invalid: their tiles get
  label −1 and are masked in evaluation, like list padding.

On the torch side ``(B, K, 3, T, T)`` becomes ``(B·K, 3, T, T)`` on the training device, and every
tile gets its image's label and group (the image's position in the list, or the ``groups``
given), so `dali_bilevel.train.evaluate` can average tiles per image
(``loader.num_groups``). The reader's label is the image's position in the list; labels and
groups are looked up from it.

Shards, the last batch, device, decoder settings, stream order, passes and `close` follow
`pipelines.dali`: the caller's list is a whole number of ``images_per_batch × num_shards``
(padding images carry label −1), shard ``i`` reads the contiguous ``i``-th part, so every
process runs the same number of batches.

RandAugment / TrivialAugment (``auto_augment``, random tiles only) run in a second pipeline whose
samples are the tiles (``B·K`` per batch, fed from the cut pipeline's uint8 tiles by
``fn.external_source``), so every tile gets its own operations and magnitudes: DALI's policies draw
per sample, and one image's tiles would otherwise share its draw (`DaliTileLoader._build_policy`).
Without a policy the cut pipeline is the whole graph, as above.

`TorchTileLoader` is the same with PIL decodes in DataLoader workers (fallback and baseline).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pipelines.dali import (
    _auto_augment,
    _to_torch,
    check_auto_augment_name,
    dali_device_id,
    dali_import_error,
    decoder_options,
    resolve_device,
    run_passes,
)
from pipelines.torch_loader import open_rgb

POSITIONS = ("random", "grid")
PAD_LABEL = -1  # as dali_bilevel.data.PAD_LABEL: masked out by evaluation


def grid_shape(height: int, width: int, tile: int, stride: int) -> tuple[int, int]:
    """Rows and columns of the stride-``stride`` grid of whole ``tile`` px tiles in an image."""
    if stride < 1:
        raise ValueError(f"--eval-stride must be >= 1, got {stride}")
    if height < tile or width < tile:
        raise ValueError(f"a {height}x{width} image is smaller than the {tile} px tile")
    return (height - tile) // stride + 1, (width - tile) // stride + 1


def grid_anchors(rows: int, cols: int, stride: int) -> np.ndarray:
    """``(rows·cols, 2)`` int32 ``(y, x)`` anchors, row-major."""
    yy, xx = np.meshgrid(np.arange(rows) * stride, np.arange(cols) * stride, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], 1).astype(np.int32)


def random_anchors(u: np.ndarray, height: int, width: int, tile: int) -> np.ndarray:
    """``u ∈ [0, 1)^(K×2)`` → integer anchors, uniform over the whole-tile positions."""
    n = np.array([height - tile + 1, width - tile + 1])
    return np.minimum((u * n).astype(np.int32), n - 1)


def image_shapes(files: Sequence[str]) -> list[tuple[int, int]]:
    """``(height, width)`` from each file's header (as DALI's peek_image_shape: EXIF-rotated)."""
    out = []
    for f in files:
        with Image.open(f) as im:
            h, w = im.height, im.width
            if im.format in ("JPEG", "MPO") and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                h, w = w, h
        out.append((h, w))
    return out


class _TileLoader:
    """Shared arguments, checks and the torch-side flattening of both tile loaders."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        *,
        images_per_batch: int,
        tile_size: int,
        positions: str = "random",
        tiles_per_image: int = 8,
        stride: int = 0,
        groups: Sequence[int] | None = None,
        num_groups: int = 0,
        shapes: Sequence[tuple[int, int]] | None = None,
        shard_id: int = 0,
        num_shards: int = 1,
        seed: int = 0,
    ) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"unknown tile positions {positions!r}; choose {', '.join(POSITIONS)}")
        if len(files) % (num_shards * images_per_batch):
            raise ValueError(f"{len(files)} images do not split into {num_shards} shards of whole "
                             f"{images_per_batch}-image batches")
        self.files, self.tile_size, self.positions = list(files), tile_size, positions
        self.images_per_batch, self.shard_id, self.num_shards, self.seed = images_per_batch, shard_id, num_shards, seed
        shapes = list(shapes) if shapes is not None else image_shapes(self.files)
        small = [(f, s) for f, s in zip(self.files, shapes, strict=True) if min(s) < tile_size]
        if small:
            f, (h, w) = small[0]
            raise ValueError(f"{f}: {h}x{w} px is smaller than the {tile_size} px tile; lower --tile-size")
        if positions == "grid":
            stride = stride or tile_size
            rows, cols = grid_shape(max(h for h, _ in shapes), max(w for _, w in shapes), tile_size, stride)
            self.grid: np.ndarray | None = grid_anchors(rows, cols, stride)
            self.tiles_per_image = rows * cols
        else:
            if tiles_per_image < 1:
                raise ValueError(f"--tiles-per-image must be >= 1, got {tiles_per_image}")
            self.grid, self.tiles_per_image = None, tiles_per_image
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.groups = torch.as_tensor(list(groups) if groups is not None else range(len(files)), dtype=torch.long)
        self.num_groups = num_groups
        self.batches = len(files) // num_shards // images_per_batch

    def __len__(self) -> int:
        return self.batches

    def raw_batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(tiles float (B, K, 3, T, T) in [0, 1], anchors (B, K, 2), valid (B, K), list positions (B,))``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(tiles, labels, groups)``: float32 ``(B·K, 3, T, T)`` in [0, 1] and int64 per tile."""
        for tiles, _, valid, pos in self.raw_batches():
            b, k = valid.shape
            x = tiles.reshape(b * k, *tiles.shape[2:])
            y = torch.where(valid.cpu(), self.labels[pos][:, None], PAD_LABEL).reshape(-1)
            g = self.groups[pos].repeat_interleave(k)
            yield x, y.to(x.device), g.to(x.device)


class DaliTileLoader(_TileLoader):
    """DALI: decode each image once, cut ``tiles_per_image`` random tiles or the eval grid.

    ``auto_augment`` (``randaugment`` / ``trivialaugment``, random tiles only) applies DALI's policy to
    every tile with its own random operations and magnitudes (`_build_policy`).
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], *, device: str = "auto",
                 device_id: int | None = None, num_threads: int = 2, auto_augment: str | None = None,
                 **kw: Any) -> None:
        err = dali_import_error()
        if err:
            raise RuntimeError(err)
        check_auto_augment_name(auto_augment)
        if auto_augment is not None and kw.get("positions", "random") != "random":
            raise ValueError(f"--augment {auto_augment}: the auto-augmentation is for training tiles (random "
                             "positions), never the evaluation grid")
        super().__init__(files, labels, **kw)
        self.auto_augment = auto_augment
        self.device = resolve_device(device)
        self.device_id = device_id if device_id is not None else dali_device_id(self.device)
        self._position = 0
        # (anchors, valid, positions) of the cut batches the policy pipeline has taken and not yet returned
        self._pending: deque[tuple[Tensor, Tensor, Tensor]] = deque()
        self._pipe = self._build(num_threads)
        self._policy = self._build_policy(num_threads) if auto_augment is not None else None

    def _build(self, num_threads: int):
        """The cut pipeline of the module docstring. With a policy it hands over the uint8 ``(K, T, T, 3)``
        tiles instead of floats, for `_build_policy`; without one the graph is unchanged (no conditionals)."""
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, pipeline_def, types

        gpu, t, k = self.device == "gpu", self.tile_size, self.tiles_per_image
        n = len(self.files) // self.num_shards  # only this shard goes to DALI (positions stay global)
        lo = self.shard_id * n
        files, positions = self.files[lo : lo + n], list(range(lo, lo + n))

        @pipeline_def(batch_size=self.images_per_batch, num_threads=num_threads,
                      device_id=self.device_id if gpu else None, seed=self.seed, prefetch_queue_depth=2)
        def pipe():
            data, pos = fn.readers.file(files=files, labels=positions, random_shuffle=False, pad_last_batch=True,
                                        name="Reader")
            last = fn.peek_image_shape(data, dtype=types.INT32)[0:2] - t  # largest anchor per axis (y, x)
            img = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    **decoder_options(self.device))
            if self.grid is None:
                u = fn.random.uniform(range=[0.0, 1.0], shape=[k, 2])
                anchors = dmath.min(fn.cast(u * fn.cast(last + 1, dtype=types.FLOAT), dtype=types.INT32), last)
                valid = anchors >= 0
            else:
                grid = types.Constant(self.grid, dtype=types.INT32)
                anchors, valid = dmath.min(grid, last), grid <= last
            tiles = fn.stack(*[fn.slice(img, start=anchors[i], shape=[t, t], axis_names="HW") for i in range(k)],
                             axis_name="F")
            if self.auto_augment is not None:
                return tiles, anchors, valid, pos
            # float CHW in DALI's threads: a torch-side conversion would run on the training process
            tiles = fn.crop_mirror_normalize(tiles, dtype=types.FLOAT, output_layout="FCHW", mean=[0.0] * 3,
                                             std=[255.0] * 3)
            return tiles, anchors, valid, pos

        p = pipe()
        p.build()
        return p

    def _build_policy(self, num_threads: int):
        """RandAugment / TrivialAugment with the tiles as samples: a second pipeline of batch ``B·K``.

        DALI's auto_aug policies draw operations and magnitudes per *sample*: the draws are batches of
        ``fn.random.uniform``, and the chosen operation runs through conditionals that split the batch
        sample by sample (``nvidia.dali.auto_aug.core._select``; "each sample is processed with
        augmentations selected randomly", DALI's docs/auto_aug/auto_aug.rst). On the cut pipeline a
        sample is an image, and its ``FHWC`` tiles would all get its one draw, as the frames of a
        video do. DALI has no operator that turns a sample's tiles into samples, so this pipeline's
        ``fn.external_source`` takes each cut batch as ``B·K`` ``(T, T, 3)`` samples (a batch source
        may return a PyTorch tensor, CPU or GPU, with the batch as its outer dimension), and one
        policy instance draws per tile. (One policy instance per tile index on the cut pipeline is
        the alternative: ``K`` times the operators, each on a ``B``-sample batch; on 2 CPU cores, 8
        images x 16 tiles of 64 px, RandAugment took 680 ms per batch instead of 74 ms and 13 s to
        build instead of 2 s.)

        Seeded from the loader's seed through `policy_seed`, so a seeded loader repeats itself and the
        policy's draws are not the cut pipeline's. On a GPU the tiles stay on the device: the source
        copies them on torch's current stream, the stream DALI then copies from (it takes a PyTorch
        tensor's current stream when ``cuda_stream`` is not given).
        """
        from nvidia.dali import fn, pipeline_def, types

        gpu, t = self.device == "gpu", self.tile_size
        cut, pending, device, device_id = self._pipe, self._pending, self.device, self.device_id

        def next_cut() -> Tensor | np.ndarray:
            """The source: the next cut batch's uint8 tiles as ``(B·K, T, T, 3)`` samples; its anchors, validity
            and positions wait in ``_pending`` for the policy's output of the same batch (DALI calls this in
            order, in `run`'s thread, up to ``prefetch_queue_depth`` batches ahead). No reference to the
            loader: dropping it still shuts both pipelines down at once."""
            tiles, anchors, valid, pos = _run_pipe(cut, device, device_id)
            pending.append(_tile_info(anchors, valid, pos))
            x = _to_torch(tiles)
            x = x.reshape(-1, *x.shape[2:])
            # numpy on the CPU: for a torch tensor DALI asks torch for its current CUDA stream, CUDA or not
            return x if x.is_cuda else x.numpy()

        @pipeline_def(batch_size=self.images_per_batch * self.tiles_per_image, num_threads=num_threads,
                      device_id=self.device_id if gpu else None, seed=policy_seed(self.seed), prefetch_queue_depth=2,
                      enable_conditionals=True)
        def pipe():
            tiles = fn.external_source(source=next_cut, batch=True, device="gpu" if gpu else "cpu",
                                       layout="HWC", dtype=types.UINT8, ndim=3)
            tiles = _auto_augment(tiles, self.auto_augment, t)
            return fn.crop_mirror_normalize(tiles, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3,
                                            std=[255.0] * 3)

        p = pipe()
        p.build()
        return p

    def raw_batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        return run_passes(self, self.batches)

    def run(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The next batch as `raw_batches` yields it (on a GPU, ordered on torch's current stream)."""
        if self._pipe is None:
            raise RuntimeError("this DALI tile loader was closed; build a new one")
        self._position += 1
        if self._policy is None:
            tiles, anchors, valid, pos = _run_pipe(self._pipe, self.device, self.device_id)
            return _to_torch(tiles), *_tile_info(anchors, valid, pos)
        (tiles,) = _run_pipe(self._policy, self.device, self.device_id)  # feeds a later cut batch first
        x = _to_torch(tiles)
        return (x.reshape(-1, self.tiles_per_image, *x.shape[1:]), *self._pending.popleft())

    def close(self) -> None:
        """Shut the pipelines down now (see `pipelines.dali.DaliLoader.close`): the policy pipeline first, whose
        source holds the cut pipeline."""
        self._policy = None
        self._pipe = None
        self._pending.clear()


def _run_pipe(pipe: Any, device: str, device_id: int | None) -> tuple:
    """One batch of ``pipe``'s outputs, bound to torch's current stream on a GPU."""
    if device == "gpu":
        return pipe.run(torch.cuda.current_stream(device_id))
    return pipe.run()


def _tile_info(anchors, valid, pos) -> tuple[Tensor, Tensor, Tensor]:
    """The cut pipeline's CPU outputs as ``(anchors (B, K, 2), valid (B, K), list positions (B,))``, copied."""
    return _to_torch(anchors).long(), _to_torch(valid).all(-1), _to_torch(pos).reshape(-1).long()


def policy_seed(seed: int) -> int:
    """The policy pipeline's seed, derived from the loader's: DALI seeds each pipeline's operators in turn from
    its seed, so the same seed would give the policy's first draws the cut pipeline's anchor stream."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0] >> 1)


class _TileDataset(Dataset):
    def __init__(self, files: list[str], offset: int, tile: int, k: int, grid: np.ndarray | None, seed: int) -> None:
        self.files, self.offset, self.tile, self.k, self.grid, self.seed = files, offset, tile, k, grid, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, int]:
        pos = self.offset + i
        arr = np.asarray(open_rgb(self.files[i]))
        last = np.array(arr.shape[:2]) - self.tile
        if self.grid is None:
            u = np.random.default_rng([self.seed, pos]).random((self.k, 2))
            anchors = random_anchors(u, arr.shape[0], arr.shape[1], self.tile)
            valid = np.ones(self.k, dtype=bool)
        else:
            anchors, valid = np.minimum(self.grid, last), (self.grid <= last).all(1)
        t = self.tile
        tiles = torch.from_numpy(np.stack([arr[y : y + t, x : x + t] for y, x in anchors])).permute(0, 3, 1, 2)
        tiles = torch.empty(tiles.shape).copy_(tiles).div_(255)  # float CHW in the worker, as ToTensor does
        return tiles, torch.from_numpy(anchors), torch.from_numpy(valid), pos


class TorchTileLoader(_TileLoader):
    """PIL decodes in DataLoader workers, numpy tiles: the fallback when DALI is unavailable."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], *, device: str | torch.device = "cpu",
                 num_workers: int = 2, **kw: Any) -> None:
        super().__init__(files, labels, **kw)
        n = len(self.files) // self.num_shards
        lo = self.shard_id * n
        ds = _TileDataset(self.files[lo : lo + n], lo, self.tile_size, self.tiles_per_image, self.grid, self.seed)
        self.device = torch.device(device)
        self._loader: DataLoader | None = DataLoader(ds, batch_size=self.images_per_batch, shuffle=False,
                                                     num_workers=num_workers, pin_memory=self.device.type == "cuda")

    def raw_batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        if self._loader is None:
            raise RuntimeError("this tile loader was closed; build a new one")
        for tiles, anchors, valid, pos in self._loader:
            yield tiles.to(self.device, non_blocking=True), anchors.long(), valid, pos.long()

    def close(self) -> None:
        """Drop the DataLoader (its workers end with its last iterator)."""
        self._loader = None
