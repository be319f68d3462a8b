"""Per-epoch splits and file lists for the bilevel loop.

Every epoch, a fresh seeded permutation of the training set gives the augmenter's validation
split (``val_fraction``, 20% by default) and the classifier's train split. The test split is only
evaluated for reporting. File lists are arranged so that every process runs the same number of
whole batches:

* training: the permuted list is cut to a multiple of the global batch (the cut-off tail is a
  different random subset each epoch, the usual drop-last);
* evaluation: the list is padded to a multiple of the global batch with label -1, which is
  masked out, so every sample is counted exactly once.

Per process, the data set is scanned once, on the main process, through the on-disk scan cache
(`scan_on_main`), and every epoch only builds this process's own part of each list (numpy index
arithmetic, `shard_positions`) and the loaders over it. Loaders are released before the next
ones are built, the test split's loader is reused across epochs, and the validation split is
scored only when `eval_val_due` says so (docs/benchmarks/scan_cpu.md has the costs).

Randomness in the loaders (random crops, RandAugment, random tiles) is seeded per (seed, epoch,
stream, rank) (`loader_seed`): ranks draw differently, while which files form global batch t
depends only on (seed, epoch), never on the number of processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch

from pipelines import DaliLoader, TorchLoader
from pipelines.dali import AUTO_AUGMENTS, GPU_DECODE_THREADS, dali_import_error, resolve_device
from pipelines.folder import DataError, FolderIndex, split_dirs
from pipelines.scan import SplitScan, checked_index, load_report, split_reports
from pipelines.scan_cache import cache_dir

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dali_bilevel.config import TrainConfig

log = logging.getLogger(__name__)

PAD_LABEL = -1
# Loader random streams (`loader_seed`)
TRAIN_STREAM, VAL_STREAM, EVAL_STREAM = 0, 1, 2
R = TypeVar("R")


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


def shard_positions(n: int, per_proc: int, num_shards: int, shard: int) -> np.ndarray:
    """Positions in a list of ``n`` items that process ``shard`` reads, in its order: the ``shard``-th
    contiguous part of `shard_order`'s list, computed without building it (what each process needs
    per epoch; numpy, so 1.28M items cost milliseconds)."""
    if num_shards == 1:
        return np.arange(n)
    big = per_proc * num_shards
    t = np.arange(n // big)[:, None] * big
    return (t + shard * per_proc + np.arange(per_proc)[None, :]).reshape(-1)


def loader_seed(seed: int, epoch: int, stream: int, rank: int) -> int:
    """The loader's (DALI pipeline's, DataLoader generator's) seed for a run seed, epoch, stream and rank.

    One seed per rank, or every rank would draw the same random crops and RandAugment operations
    for its part of the global batch. Files are not chosen by this seed (the lists are fixed by
    (seed, epoch) alone), so global batches are unchanged. Hashed by numpy's SeedSequence: nearby
    inputs give unrelated streams. 31 bits: DALI takes a non-negative int.
    """
    return int(np.random.SeedSequence([seed, epoch, stream, rank]).generate_state(1)[0] >> 1)


def eval_val_due(epoch: int, epochs: int, every: int, holdout: bool) -> bool:
    """Whether epoch ``epoch`` (0-based) scores the validation split (``--eval-val-every``).

    ``every`` N > 0: every N epochs and at the last. 0: never, except at the last epoch of a
    ``--holdout`` run, whose hold-out accuracy chooses a hyper-parameter (the learned augmenter's
    re-drawn split is only ever trained on, and scoring it costs an evaluation pass per epoch).
    """
    last = epoch == epochs - 1
    if every > 0:
        return (epoch + 1) % every == 0 or last
    return holdout and last


def dali_threads(workers: int, device: str, local_processes: int) -> int:
    """DALI threads (or DataLoader workers, with ``device="cpu"``) per process: ``--workers`` when > 0; 0
    (auto) gives this process's share of the CPUs, capped at `pipelines.dali.GPU_DECODE_THREADS` when
    decoding on a GPU."""
    if workers > 0:
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cpus // max(1, local_processes))
    return min(share, GPU_DECODE_THREADS) if device == "gpu" else share


def local_processes(acc: Accelerator) -> int:
    """Processes on this machine: ``LOCAL_WORLD_SIZE`` from the launcher (torchrun, accelerate), else all."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or acc.num_processes


def scan_on_main(acc: Accelerator, run: Callable[[], tuple[R, list[SplitScan]]],
                 load: Callable[[list[tuple[str, str, str]]], R | None]) -> R:
    """Scan once, on the main process; every other process gets exactly that scan.

    ``run()`` scans (through the on-disk cache) and returns the result and its split scans; ``load(refs)``
    rebuilds the result from the cache files those scans wrote, without touching the data (None when
    it cannot: no cache, a cache folder local to another node, a file rewritten since). The other
    processes wait for the main one in the first broadcast (a barrier), then read the cache; if any
    could not, the main process broadcasts the result itself. A scan error (a bad file) reaches every
    process as the same one-line `DataError`, so no process is left waiting in a collective.
    """
    if acc.num_processes == 1:
        return run()[0]
    import torch.distributed as dist

    result: R | None = None
    error: BaseException | None = None
    message: tuple = ("ok", None)
    if acc.is_main_process:
        try:
            result, scans = run()
            refs = [(str(s.index.root), s.cache_file, s.cache_id) for s in scans]
            message = ("ok", refs if all(s.cache_file for s in scans) else None)
        except Exception as e:  # sent on, then raised here too
            error, message = e, ("error", type(e).__name__, str(e))
    box = [message]
    dist.broadcast_object_list(box, src=0)
    message = box[0]
    if message[0] == "error":
        if error is not None:
            raise error
        if message[1] == "DataError":
            raise DataError(message[2])
        raise RuntimeError(f"the main process failed to scan the data ({message[1]}: {message[2]})")
    if not acc.is_main_process and message[1] is not None:
        try:
            result = load(message[1])
        except Exception as e:  # whatever it is, this process must still reach the collectives below
            log.warning("process %d cannot read the scan cache (%s: %s); receiving the scan instead",
                        acc.process_index, type(e).__name__, e)
    missing: list[Any] = [None] * acc.num_processes
    dist.all_gather_object(missing, result is None)
    if any(missing):
        box = [result if acc.is_main_process else None]
        dist.broadcast_object_list(box, src=0)
        if result is None:
            result = box[0]
    return result  # type: ignore[return-value]


def load_scans(refs: list[tuple[str, str, str]], skip_unreadable: bool) -> list[FolderIndex] | None:
    """The split indexes from the main process's cache files (`scan_on_main`'s ``load``)."""
    out = []
    for root, file, cache_id in refs:
        scan = load_report(root, file, cache_id)
        if scan is None:
            return None
        out.append(checked_index(scan, skip_unreadable, log_skips=False))  # the main process logged them
    return out


def scan_data(cfg: TrainConfig, acc: Accelerator) -> tuple[FolderIndex, FolderIndex]:
    """``DIR/train`` and ``DIR/val|test``, every file checked (`pipelines.scan`), scanned once for all processes."""
    cache = cache_dir(cfg.scan_cache)

    def run() -> tuple[tuple[FolderIndex, FolderIndex], list[SplitScan]]:
        train, test = split_reports(cfg.data, cache=cache)
        return (checked_index(train, cfg.skip_unreadable), checked_index(test, cfg.skip_unreadable)), [train, test]

    def load(refs: list[tuple[str, str, str]]) -> tuple[FolderIndex, FolderIndex] | None:
        got = load_scans(refs, cfg.skip_unreadable)
        return (got[0], got[1]) if got else None

    split_dirs(cfg.data)  # layout errors on every process, before any collective
    return scan_on_main(acc, run, load)


def dali_device(cfg: TrainConfig, acc: Accelerator) -> str:
    """Where DALI decodes: ``--dali-device``, with 'auto' following the training device."""
    if cfg.dali_device != "auto":
        return cfg.dali_device
    return "gpu" if acc.device.type == "cuda" else "cpu"


def check_auto_augment(cfg: TrainConfig) -> None:
    """``--augment randaugment|trivialaugment`` and ``--base-augment`` run inside the DALI graph: refuse the
    torchvision loader."""
    policy = cfg.loader_policy()
    if policy in AUTO_AUGMENTS and cfg.loader != "dali":
        flag = f"--augment {cfg.augment}" if cfg.augment == policy else f"--base-augment {policy}"
        raise ValueError(f"{flag} runs in the DALI pipeline; it needs --loader dali, not --loader {cfg.loader}")


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
    train: FolderIndex  # the training images (the augmenter's validation split is drawn from them)
    train_size: int  # images the classifier trains on per epoch (after the validation split)

    def steps_per_epoch(self) -> int: ...
    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Batch]: ...
    def val_batches(self, epoch: int, n_batches: int, start: int = 0, share: float = 1.0) -> Iterator[Batch]: ...
    def eval_splits(self, epoch: int) -> dict[str, Iterable[Batch]]: ...
    def grid_images(self) -> torch.Tensor: ...
    def release(self, *roles: str) -> None: ...


class FolderData:
    """ImageFolder data (``DIR/train``, ``DIR/val`` or ``DIR/test``) through DALI or torchvision.

    ``splits``: an already scanned ``(train, test)`` pair (benchmarks, tools); None scans ``cfg.data``.
    """

    def __init__(self, cfg: TrainConfig, acc: Accelerator, val_fraction: float,
                 splits: tuple[FolderIndex, FolderIndex] | None = None) -> None:
        check_auto_augment(cfg)
        if cfg.batch_size % acc.num_processes:
            raise ValueError(f"--batch-size {cfg.batch_size} must divide evenly over {acc.num_processes} processes")
        self.cfg, self.acc, self.val_fraction = cfg, acc, val_fraction
        self.train, self.test = splits if splits is not None else scan_data(cfg, acc)
        self.classes = self.train.classes
        self.per_proc = cfg.batch_size // acc.num_processes
        # numpy views of the training set: an epoch's lists are index arithmetic, not Python loops
        self._files = np.array(self.train.files, dtype=object)
        self._labels = np.array(self.train.labels, dtype=np.int64)
        self._last_split: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None
        tr0, _ = self._split(0)
        if len(tr0) < cfg.batch_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(tr0)} training images of this "
                             "split")
        self._steps = len(tr0) // cfg.batch_size
        if cfg.max_steps_per_epoch:
            self._steps = min(self._steps, cfg.max_steps_per_epoch)
        self.train_size = len(tr0)
        # role ("train", "stream", "val", "test") -> (epoch, loader): one per role, released before the next
        self._live: dict[str, tuple[int, Any]] = {}
        self._grid: torch.Tensor | None = None
        if cfg.loader == "dali":  # fail now, not in the first epoch, when DALI or the GPU is missing
            err = dali_import_error()
            if err:
                raise RuntimeError(f"--loader dali: {err}")
            if cfg.dali_device == "gpu":
                resolve_device("gpu")  # raises when no CUDA device is usable

    def _split(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's (train, validation) indices; kept for the epoch's next call (a permutation of the
        whole training set is the one per-epoch cost that does not shrink with more processes)."""
        if self._last_split is None or self._last_split[0] != epoch:
            split = epoch_split(len(self.train), self.val_fraction, self.cfg.seed, epoch, self.cfg.augment == "learned")
            self._last_split = (epoch, split)
        return self._last_split[1]

    def _mine(self, idx: np.ndarray, labels: np.ndarray | None, batch: int) -> tuple[list[str], list[int]]:
        """This process's files and labels of a global list given as training-set indices (``labels``
        overrides the training labels, e.g. -1 padding): `shard_positions` of it."""
        pos = shard_positions(len(idx), batch, self.acc.num_processes, self.acc.process_index)
        lab = self._labels[idx[pos]] if labels is None else labels[pos]
        return self._files[idx[pos]].tolist(), lab.tolist()

    def loader(self, files: Sequence[str], labels: Sequence[int], train: bool, seed: int,
               batch: int | None = None):
        """A loader over this process's part of a list (one shard of one process)."""
        cfg = self.cfg
        kw: dict[str, Any] = dict(
            batch_size=batch or self.per_proc, image_size=cfg.image_size,
            crop=cfg.resolved_train_crop() if train else "center", crop_pct=cfg.crop_pct, seed=seed,
        )
        if cfg.loader == "dali":
            # RandAugment/TrivialAugment only on the classifier's stream, never on validation or evaluation.
            auto = cfg.loader_policy() if train else None  # never on validation or evaluation streams
            device = dali_device(cfg, self.acc)
            threads = dali_threads(cfg.workers, device, local_processes(self.acc))
            return DaliLoader(files, labels, device=device, num_threads=threads, auto_augment=auto, **kw)
        workers = dali_threads(cfg.workers, "cpu", local_processes(self.acc))
        return TorchLoader(files, labels, device=self.acc.device, num_workers=workers, **kw)

    def _seed(self, epoch: int, stream: int) -> int:
        return loader_seed(self.cfg.seed, epoch, stream, self.acc.process_index)

    def _swap(self, role: str, epoch: int, make: Callable[[], Any]) -> Any:
        """Release the loader holding ``role`` and every loader of an earlier epoch, then build the new one:
        the old pipelines' threads and buffers are gone before the new ones start."""
        self.release(role, *(r for r, (e, _) in self._live.items() if e < epoch))
        loader = make()
        self._live[role] = (epoch, loader)
        return loader

    def release(self, *roles: str) -> None:
        """Shut down the loaders of these roles (all when none given) now, not when GC gets to them."""
        for role in roles or tuple(self._live):
            _, old = self._live.pop(role, (0, None))
            if old is not None:
                old.close()

    def loaders(self) -> dict[str, Any]:
        """The loaders alive now, by role ("train", "stream", "val", "test")."""
        return {role: loader for role, (_, loader) in self._live.items()}

    def steps_per_epoch(self) -> int:
        return self._steps

    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Batch]:
        """This epoch's train batches from global step ``start`` on (resuming mid-epoch)."""
        tr, _ = self._split(epoch)
        b = self.cfg.batch_size
        files, labels = self._mine(tr[start * b : self._steps * b], None, self.per_proc)
        return self._swap("train", epoch, lambda: self.loader(files, labels, True, self._seed(epoch, TRAIN_STREAM)))

    def val_batches(self, epoch: int, n_batches: int, start: int = 0, share: float = 1.0) -> Iterator[Batch]:
        """The augmenter's validation stream: ``n_batches`` batches, from batch ``start`` on, each ``share``
        of a train batch (``--hyper-batch``: no image is decoded that the hypergradient does not use)."""
        _, va = self._split(epoch)
        if len(va) == 0:
            raise ValueError("the validation split is empty; raise --val-fraction or use more data")
        per = max(1, round(share * self.per_proc))
        b = per * self.acc.num_processes
        n = n_batches * b
        if n == 0:  # an epoch without θ's update
            return iter(())
        rng = epoch_rng(self.cfg.seed, epoch, 2)
        order = np.concatenate([rng.permutation(va) for _ in range(-(-n // len(va)))])[:n]  # as stream_list
        if start * b >= len(order):
            return iter(())
        files, labels = self._mine(order[start * b :], None, per)
        return iter(self._swap("stream", epoch,
                               lambda: self.loader(files, labels, False, self._seed(epoch, VAL_STREAM), batch=per)))

    def _eval_loader(self, files: Sequence[str], labels: Sequence[int], idx: np.ndarray | None = None):
        """An evaluation loader over a list padded to whole global batches with label -1 (`eval_list`)."""
        n = len(files) if idx is None else len(idx)
        pad = (-n) % self.cfg.batch_size
        if idx is None:
            lab = np.concatenate([np.asarray(labels, dtype=np.int64), np.full(pad, PAD_LABEL, dtype=np.int64)])
            files = np.array(files, dtype=object)
            pos = shard_positions(n + pad, self.per_proc, self.acc.num_processes, self.acc.process_index)
            mine_files = files[np.minimum(pos, n - 1)].tolist()
            mine_labels = lab[pos].tolist()
        else:
            full = np.concatenate([idx, np.full(pad, idx[-1])])
            lab = np.concatenate([self._labels[idx], np.full(pad, PAD_LABEL, dtype=np.int64)])
            mine_files, mine_labels = self._mine(full, lab, self.per_proc)
        return self.loader(mine_files, mine_labels, False, self._seed(0, EVAL_STREAM))

    def eval_splits(self, epoch: int) -> dict[str, Iterable[Batch]]:
        """The splits to score this epoch: "test" always (one loader, built once and reused), "val" when
        `eval_val_due` (``--eval-val-every``). The epoch's training loaders are released first."""
        self.release("train", "stream", "val")  # this epoch's training is over
        out: dict[str, Iterable[Batch]] = {}
        holdout = self.cfg.augment != "learned" and self.cfg.holdout > 0
        if self.val_fraction > 0 and eval_val_due(epoch, self.cfg.epochs, self.cfg.eval_val_every, holdout):
            va = self._split(epoch)[1]
            out["val"] = self._swap("val", epoch, lambda: self._eval_loader((), (), va))
        if "test" not in self._live:  # the same list every epoch: one loader for the run (`run_passes`)
            self._live["test"] = (1 << 62, self._eval_loader(self.test.files, self.test.labels))
        out["test"] = self._live["test"][1]
        return out

    def grid_images(self) -> torch.Tensor:
        """8 test images spread over the classes, for the augmentation grid (main process); read once."""
        if self._grid is None:
            idx = [int(i) for i in np.linspace(0, len(self.test) - 1, 8)]
            loader = self.loader([self.test.files[i] for i in idx], [self.test.labels[i] for i in idx], False, 0,
                                 batch=len(idx))
            self._grid, *_ = next(iter(loader))
            loader.close()
        return self._grid
