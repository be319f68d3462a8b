"""DALI and torchvision loaders: decoded pixels against PIL, labels, shapes, shards."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import DaliLoader, TorchLoader, find_splits
from pipelines.dali import resolve_device
from tests.conftest import shared


def pil_reference(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("loader_cls", [DaliLoader, TorchLoader])
def test_decoded_pixels_match_pil(shapes_dir, loader_cls):
    train, _ = find_splits(shapes_dir)
    files, labels = list(train.files[:8]), list(train.labels[:8])
    kw = {"num_workers": 0} if loader_cls is TorchLoader else {}
    x, y = next(iter(loader_cls(files, labels, batch_size=8, image_size=32, crop_pct=1.0, **kw)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == labels
    ref = torch.stack([pil_reference(f) for f in files])
    # Both decode with libjpeg-turbo's integer IDCT; allow one grey level for other JPEG decoders.
    assert (x - ref).abs().max() * 255 <= 1.0 + 1e-3


def test_dali_greyscale_jpeg_matches_pil_on_real_images():
    root = shared("tiny/imagenet_sample")
    files = sorted(str(p) for p in root.glob("*/*"))
    grey = [f for f in files if Image.open(f).mode == "L"]
    assert grey, "the tiny set documents one greyscale JPEG"
    x, _ = next(iter(DaliLoader(files[:10], list(range(10)), batch_size=10, image_size=128, crop_pct=0.5)))
    assert x.shape == (10, 3, 128, 128)
    gi = files.index(grey[0])
    assert torch.equal(x[gi, 0], x[gi, 1]) and torch.equal(x[gi, 1], x[gi, 2])  # greyscale → RGB
    # Centre crop without resizing: compare with PIL's decode of the same region.
    loader = DaliLoader(files[:1], [0], batch_size=1, image_size=64, crop_pct=64 / min(Image.open(files[0]).size))
    x0, _ = next(iter(loader))
    ref = pil_reference(files[0])
    h, w = ref.shape[1:]
    top, left = round((h - 64) / 2), round((w - 64) / 2)
    crop = ref[:, top : top + 64, left : left + 64]
    assert (x0[0] - crop).abs().mean() * 255 < 1.0


def test_cpu_loaders_agree_after_resize(shapes_dir):
    train, _ = find_splits(shapes_dir)
    files, labels = list(train.files[:4]), list(train.labels[:4])
    xd, _ = next(iter(DaliLoader(files, labels, batch_size=4, image_size=24, crop_pct=24 / 28)))
    xt, _ = next(iter(TorchLoader(files, labels, batch_size=4, image_size=24, crop_pct=24 / 28, num_workers=0)))
    assert (xd - xt).abs().mean() < 0.03  # different resampling filters, same geometry


@pytest.mark.parametrize("loader_cls", [DaliLoader, TorchLoader])
def test_shards_partition_the_list(shapes_dir, loader_cls):
    train, _ = find_splits(shapes_dir)
    files, labels = list(train.files[:16]), list(range(16))
    kw = {"num_workers": 0} if loader_cls is TorchLoader else {}
    seen = []
    for shard in range(2):
        loader = loader_cls(files, labels, batch_size=4, image_size=32, crop_pct=1.0, shard_id=shard,
                            num_shards=2, **kw)
        assert len(loader) == 2
        seen += [int(v) for _, y in loader for v in y]
    assert seen == list(range(16))  # contiguous shards, every sample exactly once


def test_random_crop_and_bad_arguments(shapes_dir):
    train, _ = find_splits(shapes_dir)
    x, _ = next(iter(DaliLoader(list(train.files[:4]), [0] * 4, batch_size=4, image_size=20, crop="random")))
    assert x.shape == (4, 3, 20, 20)
    with pytest.raises(ValueError, match="shards"):
        DaliLoader(list(train.files[:5]), [0] * 5, batch_size=4, image_size=20)
    with pytest.raises(ValueError, match="--train-crop"):
        DaliLoader(list(train.files[:4]), [0] * 4, batch_size=4, image_size=20, crop="zoom")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_gpu_requested_without_cuda():
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("gpu")
