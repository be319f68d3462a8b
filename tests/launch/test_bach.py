"""Histology tiles end to end: slide/image splits never share an image, and launch/bach.py trains on
generated TIFFs and writes image-level accuracy."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch

from dali_bilevel.config import parse_config
from dali_bilevel.histology import TileConfig, TileData, slide_keys, split_by_group
from pipelines.folder import DataError

ROOT = Path(__file__).resolve().parents[2]
UCSB_SLIDES = {"benign": {"ytma10": 3, "ytma12": 3, "ytma23": 3, "ytma49": 8, "ytma55": 3},
               "malignant": {"ytma10": 3, "ytma12": 3, "ytma23": 3, "ytma49": 11}}


def write_tiffs(root: Path, layout: dict[str, dict[str, int]], shape=(96, 128)) -> Path:
    """``layout[class][slide] = n`` TIFFs named like the UCSB set; the classes differ in colour."""
    rng = np.random.default_rng(0)
    for c, (cls, slides) in enumerate(layout.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        base = np.array([200, 120, 180]) if c == 0 else np.array([110, 60, 150])
        for slide, n in slides.items():
            for k in range(n):
                img = np.clip(base + rng.normal(0, 25, (*shape, 3)), 0, 255).astype(np.uint8)
                tifffile.imwrite(root / cls / f"{slide}_052204_{cls}{k}_ccd.tif", img, photometric="rgb")
    return root


@pytest.mark.parametrize("seed", range(5))
def test_slide_split_keeps_slides_whole_and_classes_on_both_sides(seed):
    files = [f"{cls}/{slide}_0_{cls}{k}_ccd.tif" for cls, s in UCSB_SLIDES.items() for slide, n in s.items()
             for k in range(n)]
    labels = [int(f.startswith("malignant")) for f in files]
    keys = slide_keys(files, "slide", r"^[^_.]+")
    assert sorted(set(keys)) == ["ytma10", "ytma12", "ytma23", "ytma49", "ytma55"]
    tr, te = split_by_group(keys, labels, 0.25, seed)
    assert sorted([*tr, *te]) == list(range(40))
    assert {keys[i] for i in tr}.isdisjoint(keys[i] for i in te)  # no slide on both sides
    assert {labels[i] for i in tr} == {labels[i] for i in te} == {0, 1}
    assert np.array_equal(split_by_group(keys, labels, 0.25, seed)[1], te)  # fixed by the seed
    by_image = split_by_group(slide_keys(files, "image", ""), labels, 0.25, seed)[1]
    assert len(by_image) == 10


def test_split_errors():
    with pytest.raises(DataError, match=r"x.tif: --slide-regex '\^ytma\\d\+' does not match"):
        slide_keys(["a/x.tif"], "slide", r"^ytma\d+")
    with pytest.raises(DataError, match="every class is in both train and test"):
        split_by_group(["s1", "s1", "s2"], [0, 1, 0], 0.3, 0)  # class 1 lives on one slide only
    with pytest.raises(ValueError, match="--test-fraction"):
        split_by_group(["a", "b"], [0, 1], 1.0, 0)


def acc(rank=0, world=1):
    return SimpleNamespace(num_processes=world, process_index=rank, local_process_index=rank,
                           device=torch.device("cpu"))


def test_tile_data_splits_by_slide_and_validation_by_image(tmp_path):
    root = write_tiffs(tmp_path, {"benign": {"ytma1": 2, "ytma2": 2, "ytma3": 2},
                                  "malignant": {"ytma1": 2, "ytma2": 2, "ytma4": 2}}, shape=(40, 56))
    cfg = parse_config(["--data", str(root), "--loader", "torch", "--workers", "0", "--tile-size", "16",
                        "--tiles-per-image", "2", "--batch-size", "4", "--test-fraction", "0.3"], TileConfig)
    assert cfg.image_size == 16 and cfg.flip == "hv" and cfg.split_by == "slide"
    data = TileData(cfg, acc(), 0.25)
    slides = [{Path(f).name.split("_")[0] for f in split.files} for split in (data.train, data.test)]
    assert slides[0].isdisjoint(slides[1])
    assert set(data.train.labels) == set(data.test.labels) == {0, 1}
    tr0, va0 = data._split(0)
    _, va1 = data._split(1)
    assert set(tr0).isdisjoint(va0) and len(va0) == round(len(data.train) * 0.25) and set(va0) != set(va1)
    x, y, _ = next(iter(data.train_batches(0)))
    assert x.shape == (4, 3, 16, 16) and y.tolist()[::2] == y.tolist()[1::2]  # 2 images x 2 tiles
    test = data.eval_splits(0)["test"]
    assert test.num_groups == len(data.test) and test.tiles_per_image == 2 * 3  # (40-16)/16+1 x (56-16)/16+1
    seen = torch.cat([b[2][b[1] >= 0] for b in test])
    assert torch.bincount(seen).tolist() == [6] * len(data.test)
    assert data.grid_images().shape == (8, 3, 16, 16)


def test_tile_data_errors(tmp_path):
    root = write_tiffs(tmp_path, {"a": {"s1": 2, "s2": 2}, "b": {"s1": 2, "s2": 2}}, shape=(40, 56))
    base = ["--data", str(root), "--loader", "torch", "--workers", "0", "--split-by", "image", "--test-fraction",
            "0.5"]
    with pytest.raises(DataError, match=r"40x56 px is smaller than --tile-size 48"):
        TileData(parse_config([*base, "--tile-size", "48"], TileConfig), acc(), 0.0)
    with pytest.raises(ValueError, match="multiple of --tiles-per-image 8 x 2 process"):
        TileData(parse_config([*base, "--batch-size", "24"], TileConfig), acc(0, 2), 0.0)
    with pytest.raises(ValueError, match=r"--batch-size 64 tiles = 8 images per step is more than the 4 training"):
        TileData(parse_config([*base, "--tile-size", "16", "--batch-size", "64"], TileConfig), acc(), 0.0)
    with pytest.raises(ValueError, match="--image-size 32: tiles are --tile-size 224"):
        parse_config([*base, "--image-size", "32"], TileConfig)
    with pytest.raises(ValueError, match="--augment randaugment runs in the DALI pipeline; it needs --loader dali, "
                                         "not --loader torch"):
        TileData(parse_config([*base, "--augment", "randaugment"], TileConfig), acc(), 0.0)
    with pytest.raises(ValueError, match="--base-augment trivialaugment runs in the DALI pipeline"):
        TileData(parse_config([*base, "--augment", "learned", "--base-augment", "trivialaugment"], TileConfig), acc(),
                 0.25)
    with pytest.raises(ValueError, match="--augment: unknown mode 'magic'"):  # the parent's checks run too
        parse_config([*base, "--augment", "magic"], TileConfig)


@pytest.mark.parametrize(("augment", "base"), [("randaugment", "none"), ("learned", "trivialaugment")])
def test_tile_auto_augment_only_on_the_train_stream(tmp_path, augment, base):
    """The DALI policy goes to the classifier's random tiles, never to the augmenter's validation stream, the
    evaluation grids or the augmentation grid's tiles."""
    root = write_tiffs(tmp_path / "data", {"a": {"s1": 2, "s2": 2}, "b": {"s1": 2, "s2": 2}}, shape=(40, 56))
    cfg = parse_config(["--data", str(root), "--loader", "dali", "--dali-device", "cpu", "--workers", "1",
                        "--augment", augment, "--base-augment", base, "--tile-size", "16", "--tiles-per-image", "2",
                        "--batch-size", "4", "--split-by", "image", "--test-fraction", "0.5", "--eval-val-every", "1",
                        "--scan-cache", str(tmp_path / "cache")], TileConfig)
    policy = cfg.loader_policy()
    assert policy == (augment if base == "none" else base)
    data = TileData(cfg, acc(), 0.5)
    train = data.train_batches(0)
    assert train.auto_augment == policy and train.positions == "random"
    x, y, g = next(iter(train))
    assert x.shape == (4, 3, 16, 16) and y.tolist()[::2] == y.tolist()[1::2] and g.tolist()[::2] == g.tolist()[1::2]
    next(data.val_batches(0, 1))
    assert data.loaders()["stream"].auto_augment is None
    splits = data.eval_splits(0)
    assert set(splits) == {"val", "test"} and [s.auto_augment for s in splits.values()] == [None, None]
    ref = torch.from_numpy(tifffile.imread(data.test.files[0])[:16, :16]).permute(2, 0, 1)
    assert torch.equal((data.grid_images()[0] * 255).round().to(torch.uint8), ref)  # tile 0 of image 0, as decoded
    data.release()


def run_bach(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "bach.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(("loader", "augment"), [("dali", "learned"), ("torch", "predefined"), ("dali", "randaugment")])
def test_bach_end_to_end(tmp_path, loader, augment):
    """With ``--hue-bound data`` (learned): the bound is the training images' hue spread, recorded, and held."""
    root = write_tiffs(tmp_path / "data", {"benign": {"b1": 1, "b2": 1}, "malignant": {"m1": 1, "m2": 1}})
    out = tmp_path / "out"
    r = run_bach(["--data", str(root), "--output", str(out), "--loader", loader, "--workers", "1",
                  "--augment", augment, "--model", "cifar_resnet18_w16", "--tile-size", "32", "--tiles-per-image", "4",
                  "--batch-size", "4", "--split-by", "image", "--test-fraction", "0.5", "--val-fraction", "0.5",
                  "--epochs", "2", "--lr", "0.05", "--no-progress",
                  *(["--hue-bound", "data"] if augment == "learned" else [])])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    if augment == "learned":  # 2 training images, one pink and one purple: about 0.5 rad apart
        note, bound = m["hue_bound_data"], float(m["config"]["hue_bound"])
        assert (note["images"], note["with_hue"]) == (2, 2) and bound == pytest.approx(note["spread_rad"])
        assert 0.2 < bound < 1.0 and f"within ±{bound:.3f} rad" in r.stdout
        assert all(e["aug_magnitudes"]["hue_abs_rad"] < bound for e in m["epochs"])
    assert m["config"]["tile_size"] == 32 and m["config"]["flip"] == "hv" and len(m["epochs"]) == 2
    last = m["epochs"][-1]
    assert last["test_count"] == 2 * 12  # 2 test images x a 3x4 grid of 32 px tiles
    assert last["test_image_acc"] in (0.0, 50.0, 100.0) and 0 <= last["test_acc"] <= 100
    assert "per image" in r.stdout
    assert (out / "augmentations_epoch002.png").stat().st_size > 500


def test_bach_user_errors_are_one_line(tmp_path):
    r = run_bach(["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: no such directory"
    root = write_tiffs(tmp_path / "data", {"benign": {"b1": 1, "b2": 1}, "malignant": {"m1": 1, "m2": 1}})
    r = run_bach(["--data", str(root), "--output", str(tmp_path / "o"), "--augment", "randaugment",
                  "--loader", "torch"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: --augment randaugment runs in the DALI pipeline; it needs "
                                                 "--loader dali, not --loader torch")
