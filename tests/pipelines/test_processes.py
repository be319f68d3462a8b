"""Two real processes, one shard each: the same number of batches on every rank, and evaluation sees
every sample exactly once (list padding, label -1, is masked) for images and for tiles."""

import hashlib
import json
from collections import Counter
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
import torch.multiprocessing as mp

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import FolderData
from dali_bilevel.histology import TileConfig, TileData


def key(x: torch.Tensor) -> str:
    """A sample's identity: its decoded pixels (centre crop of the whole 32 px image)."""
    return hashlib.sha1((x * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def summarise(data, epoch: int = 0) -> dict:
    out = {"train": len(list(data.train_batches(epoch))), "stream": len(list(islice(data.val_batches(epoch, 3), 5)))}
    for name, loader in data.eval_splits(epoch).items():
        batches = list(loader)
        samples = [(int(y), key(x), int(b[2][i]) if len(b) > 2 else -1)
                   for b in batches for i, (x, y) in enumerate(zip(b[0], b[1], strict=True)) if y >= 0]
        out[name] = {"batches": len(batches), "padded": sum(int((b[1] < 0).sum()) for b in batches),
                     "samples": samples, "num_groups": getattr(loader, "num_groups", 0)}
    return out


def run_rank(rank: int, world: int, folder: str, tiles: str, out: str) -> None:
    torch.set_num_threads(1)
    acc = SimpleNamespace(num_processes=world, process_index=rank, local_process_index=rank, device=torch.device("cpu"))
    res = {}
    for loader in ("dali", "torch"):
        workers = 1 if loader == "dali" else 0  # DataLoader workers of a spawned process would re-import everything
        cfg = TrainConfig(data=folder, loader=loader, workers=workers, batch_size=10, image_size=32, crop_pct=1.0,
                          seed=3)
        res[f"folder_{loader}"] = summarise(FolderData(cfg, acc, 0.2))
        tcfg = TileConfig(data=tiles, loader=loader, workers=workers, batch_size=8, tile_size=16, tiles_per_image=2,
                          split_by="image", test_fraction=0.3, seed=3)
        res[f"tiles_{loader}"] = summarise(TileData(tcfg, acc, 0.2))
    Path(out, f"{world}_{rank}.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def tile_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(1)
    for i in range(10):
        (d / f"c{i % 2}").mkdir(exist_ok=True)
        tifffile.imwrite(d / f"c{i % 2}" / f"s{i}.tif", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                         photometric="rgb")
    return d


@pytest.mark.slow
def test_two_processes_same_batches_every_sample_once(shapes_dir, tile_dir, tmp_path):
    run_rank(0, 1, str(shapes_dir), str(tile_dir), str(tmp_path))
    mp.spawn(run_rank, args=(2, str(shapes_dir), str(tile_dir), str(tmp_path)), nprocs=2, join=True)
    one = json.loads((tmp_path / "1_0.json").read_text())
    ranks = [json.loads((tmp_path / f"2_{r}.json").read_text()) for r in range(2)]
    for source, r in one.items():
        a, b = ranks[0][source], ranks[1][source]
        assert a["train"] == b["train"] >= 1 and a["stream"] == b["stream"] == 3, source
        for split in ("val", "test"):
            assert a[split]["batches"] == b[split]["batches"], (source, split)
            union = Counter(map(tuple, a[split]["samples"] + b[split]["samples"]))
            assert union == Counter(map(tuple, r[split]["samples"])), (source, split)  # as one process sees them
        if source.startswith("folder"):
            # 24 test images, global eval batch 10 -> 30 slots: 6 padded, each real image exactly once
            assert a["test"]["batches"] == 3 and a["test"]["padded"] + b["test"]["padded"] == 6
            test = Counter(map(tuple, a["test"]["samples"] + b["test"]["samples"]))
            assert len(test) == 24 and set(test.values()) == {1}
        else:
            # 3 test images x 12 grid tiles; 1 image per rank and batch -> 4 slots, one padded image
            assert a["test"]["num_groups"] == 3 and a["test"]["batches"] == b["test"]["batches"] == 2
            groups = Counter(g for _, _, g in a["test"]["samples"] + b["test"]["samples"])
            assert groups == {0: 12, 1: 12, 2: 12}
            assert a["test"]["padded"] + b["test"]["padded"] == 12
            tiles = Counter(map(tuple, a["test"]["samples"] + b["test"]["samples"]))
            assert len(tiles) == 36 and set(tiles.values()) == {1}
