"""DALI on a CUDA GPU: nvJPEG's decode within 2 grey levels of PIL, batches on torch's current device and
stream, and the GPU loaders agreeing with the CPU ones. Skipped without a GPU (`-m cuda` selects them)."""

import numpy as np
import pytest
import torch

from pipelines import DaliLoader, DaliTileLoader, find_splits
from pipelines.dali import HW_DECODER_LOAD, dali_device_id, dali_import_error, decoder_options
from pipelines.torch_loader import open_rgb
from tests.conftest import shared

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(dali_import_error() is not None, reason="needs NVIDIA DALI"),
]


def mixed_decode(files: list[str], hw_decoder_load: float) -> list[np.ndarray]:
    """The loaders' GPU decoder (`decoder_options`) on whole images, back on the host."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(files), num_threads=2, device_id=dali_device_id("gpu"), seed=0)
    def pipe():
        data, _ = fn.readers.file(files=files)
        return fn.decoders.image(data, device="mixed", output_type=types.RGB,
                                 **decoder_options("gpu", hw_decoder_load))

    p = pipe()
    p.build()
    (out,) = p.run()
    cpu = out.as_cpu()
    return [np.array(cpu[i]) for i in range(len(files))]


def jpegs(shapes_dir) -> list[str]:
    """Rendered 4:2:0 JPEGs (always here) and real ImageNet JPEGs when the workplace's data is."""
    train, _ = find_splits(shapes_dir)
    files = list(train.files[:8])
    try:
        files += sorted(str(p) for p in shared("tiny/imagenet_sample").glob("*/*"))
    except pytest.skip.Exception:
        pass
    return files


@pytest.mark.parametrize("hw_decoder_load", [0.0, HW_DECODER_LOAD, 1.0])  # CUDA path, the default mix, hardware
def test_gpu_decode_is_within_two_grey_levels_of_pil(shapes_dir, hw_decoder_load):
    files = jpegs(shapes_dir)
    for f, got in zip(files, mixed_decode(files, hw_decoder_load), strict=True):
        ref = np.asarray(open_rgb(f)).astype(int)
        assert got.shape == ref.shape, f
        diff = np.abs(got.astype(int) - ref)
        assert diff.max() <= 2 and diff.mean() < 0.5, (f, int(diff.max()), float(diff.mean()))


def test_gpu_loader_matches_the_cpu_loader_on_the_current_device_and_stream(shapes_dir):
    train, _ = find_splits(shapes_dir)
    files, labels = list(train.files[:16]), list(train.labels[:16])
    kw = dict(batch_size=8, image_size=32, crop_pct=1.0)  # 32 px images: no resize, the decode alone
    ref = [x for x, _ in DaliLoader(files, labels, device="cpu", **kw)]
    last = torch.cuda.device_count() - 1
    side = torch.cuda.Stream(device=last)
    with torch.cuda.device(last), torch.cuda.stream(side):
        loader = DaliLoader(files, labels, device="gpu", **kw)
        assert loader.device_id == torch.cuda.current_device() == last
        got = [(x * 1.0, y) for x, y in loader]  # queued on the side stream, after the copies
    side.synchronize()
    for (x, y), r in zip(got, ref, strict=True):
        assert x.device == torch.device("cuda", last) and y.device == x.device
        assert (x.cpu() - r).abs().max() * 255 <= 2 + 1e-3


def test_gpu_tiles_are_the_cpu_tiles(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        f = tmp_path / f"s{i}.tif"
        tifffile.imwrite(f, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), photometric="rgb")
        files.append(str(f))
    kw = dict(images_per_batch=2, tile_size=16, positions="grid")
    cpu = [b[0] for b in DaliTileLoader(files, [0, 1, 0, 1], device="cpu", **kw)]
    gpu = [b[0] for b in DaliTileLoader(files, [0, 1, 0, 1], device="gpu", **kw)]
    for c, g in zip(cpu, gpu, strict=True):
        assert g.device.type == "cuda" and torch.equal(g.cpu(), c)  # lossless TIFF: exact crops on both
