"""Per-epoch lists, per-rank seeds and the loaders' lifecycle (DALI on CPU operators)."""

import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import (
    FileList,
    FolderData,
    dali_threads,
    eval_val_due,
    loader_seed,
    shard_order,
    shard_positions,
)
from pipelines import DaliLoader, TorchLoader, find_splits
from pipelines.dali import GPU_DECODE_THREADS, HW_DECODER_LOAD, dali_device_id, decoder_options


def acc1():
    return SimpleNamespace(num_processes=1, process_index=0, local_process_index=0, device=torch.device("cpu"))


@pytest.mark.parametrize(("n", "per_proc", "shards"), [(12, 2, 3), (40, 5, 2), (40, 4, 1), (64, 8, 4)])
def test_shard_positions_are_shard_orders_contiguous_parts(n, per_proc, shards):
    pos = list(range(n))
    ordered = shard_order(FileList(pos, pos), per_proc, shards).files
    part = n // shards
    for r in range(shards):
        assert shard_positions(n, per_proc, shards, r).tolist() == ordered[r * part : (r + 1) * part]


def test_loader_seeds_differ_per_rank_epoch_and_stream():
    seeds = {(r, e, s): loader_seed(7, e, s, r) for r in range(8) for e in range(3) for s in range(3)}
    assert len(set(seeds.values())) == len(seeds) and all(0 <= v < 2**31 for v in seeds.values())
    assert loader_seed(7, 1, 0, 3) == seeds[(3, 1, 0)] and loader_seed(8, 1, 0, 3) != seeds[(3, 1, 0)]


def test_rank_seeds_change_the_random_crops_not_the_files(shapes_dir):
    train, _ = find_splits(shapes_dir)
    files, labels = list(train.files[:8]), list(train.labels[:8])
    kw = dict(batch_size=8, image_size=24, crop="random", device="cpu")

    def batch(seed):
        return next(iter(DaliLoader(files, labels, seed=seed, **kw)))

    (x0, y0), (x0b, _), (x1, y1) = batch(loader_seed(0, 0, 0, 0)), batch(loader_seed(0, 0, 0, 0)), \
        batch(loader_seed(0, 0, 0, 1))
    assert torch.equal(x0, x0b) and y0.tolist() == y1.tolist() == labels  # same seed: same crops; same files
    assert (x0 - x1).abs().amax(dim=(1, 2, 3)).min() > 0.05  # another rank: every image cropped differently


def test_eval_val_due():
    assert [e for e in range(5) if eval_val_due(e, 5, 2, False)] == [1, 3, 4]  # every 2 epochs and the last
    assert [e for e in range(5) if eval_val_due(e, 5, 0, True)] == [4]  # --holdout: its last epoch chooses
    assert not any(eval_val_due(e, 5, 0, False) for e in range(5))  # the learned augmenter's split: never
    assert [e for e in range(3) if eval_val_due(e, 3, 1, False)] == [0, 1, 2]


def test_dali_threads(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert dali_threads(3, "gpu", 8) == 3  # --workers wins
    assert dali_threads(0, "cpu", 8) == 4 and dali_threads(0, "gpu", 2) == GPU_DECODE_THREADS
    assert dali_threads(0, "gpu", 64) == 1


def test_gpu_decoder_options_are_valid_dali_arguments(shapes_dir):
    """The mixed decoder's settings are only used on a GPU; build them into CPU decoders (same schema)
    so a renamed or misspelt argument fails here and not on the first GPU run."""
    from nvidia.dali import fn, pipeline_def, types

    assert decoder_options("cpu") == {"use_fast_idct": False}
    opts = decoder_options("gpu")
    assert opts == {"use_fast_idct": False, "jpeg_fancy_upsampling": True, "hw_decoder_load": HW_DECODER_LOAD}
    train, _ = find_splits(shapes_dir)

    @pipeline_def(batch_size=2, num_threads=1, device_id=None, seed=0)
    def pipe():
        data, _ = fn.readers.file(files=list(train.files[:2]))
        a = fn.decoders.image(data, device="cpu", output_type=types.RGB, **opts)
        b = fn.decoders.image_random_crop(data, device="cpu", output_type=types.RGB, **opts)
        return a, b

    p = pipe()
    p.build()
    a, _ = p.run()
    assert np.array(a.as_tensor()).shape == (2, 32, 32, 3)
    assert dali_device_id("cpu") is None


def folder_data(shapes_dir, tmp_path, **kw):
    base = dict(data=str(shapes_dir), batch_size=8, image_size=32, crop_pct=1.0, workers=1, dali_device="cpu",
                epochs=3, scan_cache=str(tmp_path / "cache"))
    return FolderData(TrainConfig(**{**base, **kw}), acc1(), kw.get("val_fraction", 0.2))


def pipe_ref(loader):
    return weakref.ref(loader._pipe)


def test_old_pipelines_are_shut_down_before_new_ones_and_the_test_loader_is_reused(shapes_dir, tmp_path):
    d = folder_data(shapes_dir, tmp_path)
    gc.disable()  # what is freed here is freed by the release, not by a collection
    try:
        stream0 = d.val_batches(0, 2)  # the training loop builds the stream first ...
        train0 = d.train_batches(0)  # ... so the train loader must not release it
        refs = {r: pipe_ref(x) for r, x in d.loaders().items()}
        assert set(refs) == {"train", "stream"} and refs["stream"]() is not None
        next(stream0)
        list(train0)
        evals = d.eval_splits(0)
        assert set(evals) == {"test"}  # learned run, --eval-val-every 0: the validation split is not scored
        assert refs["train"]() is None and refs["stream"]() is None  # this epoch's training is over
        first = [(x.clone(), y.clone()) for x, y in evals["test"]]
        test_ref = pipe_ref(evals["test"])
        d.val_batches(1, 2)
        train1 = d.train_batches(1)
        next(iter(train1))
        with pytest.raises(RuntimeError, match="closed"):
            next(iter(train0))  # an old loader fails clearly instead of reading freed buffers
        assert d.eval_splits(1)["test"] is evals["test"] and test_ref() is not None
        next(iter(evals["test"]))  # an unfinished pass ...
        again = list(evals["test"])  # ... and the next pass still starts at the list's start
        assert len(again) == len(first) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                                for a, b in zip(again, first, strict=True))
    finally:
        gc.enable()
    assert d.grid_images() is d.grid_images()  # read once
    d.release()
    assert d.loaders() == {} and test_ref() is None


def test_validation_split_scored_only_when_asked(shapes_dir, tmp_path):
    every = folder_data(shapes_dir, tmp_path, eval_val_every=2)
    assert [set(every.eval_splits(e)) for e in range(3)] == [{"test"}, {"test", "val"}, {"test", "val"}]
    holdout = folder_data(shapes_dir, tmp_path, augment="predefined", holdout=0.25, val_fraction=0.25)
    assert [set(holdout.eval_splits(e)) for e in range(3)] == [{"test"}, {"test"}, {"test", "val"}]
    val = holdout.eval_splits(2)["val"]
    labels = torch.cat([y for _, y in val])
    assert (labels >= 0).sum() == len(holdout._split(2)[1])  # every hold-out image scored once


@pytest.mark.parametrize("cls", [DaliLoader, TorchLoader])
def test_close_frees_the_loader(shapes_dir, cls):
    train, _ = find_splits(shapes_dir)
    kw = {"num_workers": 0} if cls is TorchLoader else {"device": "cpu"}
    loader = cls(list(train.files[:8]), list(train.labels[:8]), batch_size=4, image_size=32, **kw)
    assert len(list(loader)) == 2 == len(loader)
    inner = weakref.ref(loader._pipe if cls is DaliLoader else loader._loader)
    loader.close()
    assert inner() is None
    with pytest.raises(RuntimeError, match="closed"):
        next(iter(loader))
