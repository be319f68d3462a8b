"""Real processes (Accelerate on gloo), one shard each: the scan runs once and reaches every rank (through
the cache, or broadcast without one), a bad file stops every rank with the same message, global batch t
holds the same files whatever the number of processes, seeds differ per rank, every rank runs the same
number of batches, and evaluation sees every sample exactly once (list padding, label -1, is masked)."""

import hashlib
import json
import os
import socket
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.multiprocessing as mp
from PIL import Image

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import FolderData
from dali_bilevel.histology import TileConfig, TileData
from pipelines.folder import DataError


def key(x: torch.Tensor) -> str:
    """A sample's identity: its decoded pixels (centre crop of the whole 32 px image)."""
    return hashlib.sha1((x * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def summarise(data, tiles: bool, epoch: int = 0) -> dict:
    train = data.train_batches(epoch)
    # what identifies a training sample: its pixels (a centre crop), or for random tiles its image file
    # (a tile's group is its image's position in the loader's list)
    out = {"train": [[train.files[g] for g in b[2][:: data.cfg.tiles_per_image]] if tiles else [key(x) for x in b[0]]
                     for b in train],
           "seed": train.seed, "stream": len(list(islice(data.val_batches(epoch, 3), 5)))}
    for name, loader in data.eval_splits(epoch).items():
        batches = list(loader)
        samples = [(int(y), key(x), int(b[2][i]) if len(b) > 2 else -1)
                   for b in batches for i, (x, y) in enumerate(zip(b[0], b[1], strict=True)) if y >= 0]
        out[name] = {"batches": len(batches), "padded": sum(int((b[1] < 0).sum()) for b in batches),
                     "samples": samples, "num_groups": getattr(loader, "num_groups", 0)}
    return out


def run_rank(rank: int, world: int, port: int, folder: str, tiles: str, bad: str, out: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    if world == 1:
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            del os.environ[k]
    torch.set_num_threads(1)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert acc.num_processes == world and acc.process_index == rank
    cache = str(Path(out) / "scan-cache")
    res = {}
    for loader in ("dali", "torch"):
        workers = 1 if loader == "dali" else 0  # DataLoader workers of a spawned process would re-import everything
        cfg = TrainConfig(data=folder, loader=loader, workers=workers, batch_size=10, image_size=32, crop_pct=1.0,
                          seed=3, eval_val_every=1, scan_cache=cache)
        res[f"folder_{loader}"] = summarise(FolderData(cfg, acc, 0.2), tiles=False)
        # no cache: the main process's scan is broadcast
        tcfg = TileConfig(data=tiles, loader=loader, workers=workers, batch_size=8, tile_size=16, tiles_per_image=2,
                          split_by="image", test_fraction=0.3, seed=3, eval_val_every=1, scan_cache="none")
        res[f"tiles_{loader}"] = summarise(TileData(tcfg, acc, 0.2), tiles=True)
    try:
        FolderData(TrainConfig(data=bad, loader="torch", scan_cache=cache), acc, 0.2)
    except DataError as e:
        res["bad"] = str(e)
    Path(out, f"{world}_{rank}.json").write_text(json.dumps(res))
    acc.wait_for_everyone()
    acc.end_training()


@pytest.fixture(scope="module")
def tile_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(1)
    for i in range(10):
        (d / f"c{i % 2}").mkdir(exist_ok=True)
        tifffile.imwrite(d / f"c{i % 2}" / f"s{i}.tif", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                         photometric="rgb")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_processes_scan_once_same_batches_every_sample_once(shapes_dir, tile_dir, tmp_path):
    bad = tmp_path / "bad"
    for split in ("train", "val"):
        for cls in "ab":
            (bad / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(bad / split / cls / "x.png")
    (bad / "train" / "b" / "cut.png").write_bytes((bad / "train" / "b" / "x.png").read_bytes()[:-20])
    for world in (1, 2):
        mp.spawn(run_rank, args=(world, free_port(), str(shapes_dir), str(tile_dir), str(bad), str(tmp_path)),
                 nprocs=world, join=True)
    one = json.loads((tmp_path / "1_0.json").read_text())
    ranks = [json.loads((tmp_path / f"2_{r}.json").read_text()) for r in range(2)]
    assert len(list((tmp_path / "scan-cache").glob("scan-*.json"))) == 4  # train, test of both folders
    msg = ranks[0]["bad"]
    assert msg == ranks[1]["bad"] == one["bad"] and msg.startswith("1 unreadable file(s) under ")
    assert f"{bad}/train/b/cut.png: truncated PNG" in msg
    for source, r in one.items():
        if source == "bad":
            continue
        a, b = ranks[0][source], ranks[1][source]
        # global batch t: rank 0's part then rank 1's is the one process's batch t, in order
        assert len(a["train"]) == len(b["train"]) == len(r["train"]) >= 1, source
        assert [x + y for x, y in zip(a["train"], b["train"], strict=True)] == r["train"], source
        assert a["seed"] == r["seed"] != b["seed"], source  # per rank, not per world size
        assert a["stream"] == b["stream"] == 3, source
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
