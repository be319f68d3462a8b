import numpy as np
import pytest

from dali_bilevel.data import PAD_LABEL, epoch_rng, epoch_split, eval_list, split_train_val, stream_list, train_list


def test_validation_split_is_redrawn_each_epoch_and_disjoint():
    tr0, va0 = split_train_val(100, 0.2, seed=3, epoch=0)
    _, va1 = split_train_val(100, 0.2, seed=3, epoch=1)
    assert len(va0) == 20 and len(tr0) == 80
    assert set(tr0).isdisjoint(va0) and set(tr0) | set(va0) == set(range(100))
    assert set(va0) != set(va1)
    np.testing.assert_array_equal(split_train_val(100, 0.2, seed=3, epoch=0)[1], va0)  # reproducible
    tr, va = split_train_val(100, 0.0, seed=3, epoch=0)
    assert len(tr) == 100 and len(va) == 100 and not np.array_equal(tr, va)
    with pytest.raises(ValueError, match="--val-fraction"):
        split_train_val(10, 1.0, 0, 0)


def test_baseline_holdout_is_fixed_but_training_order_is_shuffled():
    tr0, va0 = epoch_split(100, 0.2, seed=3, epoch=0, redraw=False)
    tr1, va1 = epoch_split(100, 0.2, seed=3, epoch=1, redraw=False)
    np.testing.assert_array_equal(va0, va1)  # one validation split for choosing a magnitude
    assert set(tr0) == set(tr1) and not np.array_equal(tr0, tr1) and set(tr0).isdisjoint(va0)
    assert set(epoch_split(100, 0.2, 3, 1, redraw=True)[1]) != set(va0)  # the learned augmenter's re-draw


def test_lists_are_whole_batches():
    files = [f"f{i}" for i in range(10)]
    labels = list(range(10))
    tl = train_list(files, labels, np.arange(10), global_batch=4)
    assert len(tl) == 8
    el = eval_list(files, labels, global_batch=4)
    assert len(el) == 12 and el.labels[10:] == [PAD_LABEL, PAD_LABEL] and el.labels[:10] == labels
    sl = stream_list(files, labels, np.arange(3), 8, epoch_rng(0, 0, 2))
    assert len(sl) == 8 and set(sl.labels) == {0, 1, 2}
    with pytest.raises(ValueError, match="--batch-size 16 is larger"):
        train_list(files, labels, np.arange(10), global_batch=16)


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment"])
def test_auto_augment_only_on_the_train_stream(shapes_dir, tmp_path, name):
    """RandAugment/TrivialAugment go to the classifier's batches, never to validation or evaluation."""
    from types import SimpleNamespace

    import torch

    import dali_bilevel.data as data
    from dali_bilevel.config import TrainConfig
    from pipelines import DaliLoader

    acc = SimpleNamespace(num_processes=1, process_index=0, local_process_index=0, device=torch.device("cpu"))
    cfg = TrainConfig(data=str(shapes_dir), augment=name, batch_size=8, image_size=32, crop_pct=1.0, workers=1,
                      dali_device="cpu", eval_val_every=1, scan_cache=str(tmp_path))
    d = data.FolderData(cfg, acc, 0.2)
    assert d.train_batches(0).auto_augment == name
    d.val_batches(0, 2)
    assert d.loaders()["stream"].auto_augment is None
    splits = d.eval_splits(0)
    assert set(splits) == {"val", "test"} and [s.auto_augment for s in splits.values()] == [None, None]
    idx = [int(i) for i in np.linspace(0, len(d.test) - 1, 8)]
    plain, _ = next(iter(DaliLoader([d.test.files[i] for i in idx], [0] * 8, batch_size=8, image_size=32,
                                    crop_pct=1.0, device="cpu")))
    assert torch.equal(d.grid_images(), plain)  # the grid shows the images as decoded, not auto-augmented
    with pytest.raises(ValueError, match=f"--augment {name} .*needs --loader dali, not --loader torch"):
        data.FolderData(TrainConfig(data=str(shapes_dir), augment=name, loader="torch"), acc, 0.0)
