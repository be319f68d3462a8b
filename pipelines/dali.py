"""DALI image pipeline: decode, crop and hand [0, 1] float CHW batches to PyTorch.

On a GPU, JPEGs are decoded by the ``mixed`` (nvJPEG) decoder, fused with the random crop for
training, on torch's current CUDA device (`dali_device_id`). Without CUDA, the same graph runs
with CPU operators and ``device_id=None``. Decoder settings: `decoder_options`.

The caller passes an explicit file list per epoch (already permuted and padded, see
`dali_bilevel.data`), so sharding is exact: shard ``i`` of ``n`` gets the contiguous
``i``-th ``1/n`` of the list, as ``fn.readers.file`` defines it. The loader hands DALI only its
own shard (the same files, but DALI's per-file set-up then costs 1/n).

GPU batches reach torch without a host synchronisation: the pipeline's outputs are bound to
torch's current stream (``Pipeline.run(stream)``) and copied on that same stream
(``feed_ndarray(..., cuda_stream=stream)``), so the copy is ordered after DALI's work and before
any kernel torch queues on the batch (`_to_torch`).

A loader can be iterated again (an evaluation split every epoch): each pass yields the whole
list from its start. `close` shuts the pipeline down at once (its threads, and its buffers back
to DALI's memory pool for the next pipeline), rather than whenever its last reference goes.

The RandAugment and TrivialAugment baselines (``auto_augment``) run DALI's ``nvidia.dali.auto_aug``
policies inside the same graph, on the uint8 HWC crop before it becomes float: the policies
only take uint8 images, and they need the pipeline built with ``enable_conditionals=True``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

CROPS = ("center", "random")
AUTO_AUGMENTS = ("randaugment", "trivialaugment")  # --augment modes that DALI's auto_aug applies

# Share of the JPEGs the A100/H100 hardware decoder takes (the rest: nvJPEG's CPU Huffman + CUDA path).
# DALI's documented default ("should be found empirically"); pinned because the nvImageCodec decoder
# shipped with 0.9 for a while and DALI went back to 0.65 (NVIDIA/DALI#6366: in their EfficientNet +
# AutoAugment profile 0.9 gained 1.8% throughput but raised the decoder's p99 latency from 24.5 to
# 34.3 ms and its worst case from 31 to 73 ms).
HW_DECODER_LOAD = 0.65
# Decode threads per GPU when --workers is 0 (auto): DALI's ResNet-50 example (docs/examples/use_cases/
# pytorch/resnet50, `-j` default 4, passed as num_threads). The mixed decoder's CPU stage (nvJPEG's host
# Huffman decoding of images below hybrid_huffman_threshold, 1M pixels, i.e. every ImageNet image the
# hardware decoder does not take, and all of them on GPUs without one) runs on CPU threads, as many as
# the pipeline's num_threads (the decoder keeps its own, core-pinned pool of them, DALI's performance
# tuning guide): too few starve the GPU; more than the CPUs a process has only adds contention.
GPU_DECODE_THREADS = 4


def decoder_options(device: str, hw_decoder_load: float = HW_DECODER_LOAD) -> dict[str, Any]:
    """Arguments of ``fn.decoders.image`` / ``image_random_crop`` that keep DALI's pixels within 1-2 grey
    levels of PIL's (`pipelines.torch_loader.open_rgb`), on either device.

    * ``use_fast_idct=False`` (DALI's default, stated): libjpeg-turbo's accurate integer IDCT, as PIL
      uses, for the CPU decoder and the ``mixed`` decoder's CPU fallback (DALI's own test of the fast
      IDCT allows an average difference of 3 grey levels; the CPU decoder here matches PIL exactly).
    * ``jpeg_fancy_upsampling=True`` on ``mixed``: nvJPEG upsamples subsampled (4:2:0, 4:2:2) chroma
      the way libjpeg-turbo's default "fancy" upsampling does, which PIL uses, instead of replicating
      chroma samples; DALI's ``test_fancy_upsampling`` compares ``mixed`` with it to ``cpu`` at eps=1
      (NVIDIA/DALI#4662). Without it, colours differ along every chroma edge.
    * ``hw_decoder_load``: `HW_DECODER_LOAD`. DALI's tests that compare decoders exactly set it to 0
      (the hardware decoder's output differs slightly, NVIDIA/DALI#2232);
      ``tests/pipelines/test_dali_cuda.py`` checks 0, 0.65 and 1 against PIL at 2 grey levels.

    ``device_memory_padding`` / ``host_memory_padding`` / ``preallocate_*_hint`` stay at DALI's defaults:
    they only decide when nvJPEG's buffers grow (DALI's ImageNet example presets them for the largest
    ImageNet image, ~211 MB of device memory per thread); the nvImageCodec decoder preallocates its
    hardware-decoder pool even without hints, and buffers grow once to the largest image seen.
    """
    opts: dict[str, Any] = {"use_fast_idct": False}
    if device == "gpu":
        opts.update(jpeg_fancy_upsampling=True, hw_decoder_load=hw_decoder_load)
    return opts


def dali_device_id(device: str) -> int | None:
    """DALI's ``device_id`` for a resolved device: torch's current CUDA device on 'gpu', None on 'cpu'.

    The current device is where `_to_torch` puts the batches and where the model lives; with one
    visible GPU per rank (SLURM, ``CUDA_VISIBLE_DEVICES``) it is 0 on every rank, and the local rank
    would be an invalid ordinal.
    """
    return torch.cuda.current_device() if device == "gpu" else None


def dali_import_error() -> str | None:
    """None when DALI imports, else a one-line reason."""
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA library underneath
        return (f"NVIDIA DALI is not usable here ({type(e).__name__}: {e}); "
                "install nvidia-dali-cuda130 or use --loader torch")
    return None


def resolve_device(device: str) -> str:
    """'auto' → 'gpu' when CUDA is usable, else 'cpu'. An explicit 'gpu' without CUDA is an error."""
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "gpu" if has_cuda else "cpu"
    if device == "gpu" and not has_cuda:
        raise RuntimeError("--dali-device gpu: no CUDA device is available; use --dali-device cpu")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"--dali-device: unknown device {device!r}; choose auto, cpu or gpu")
    return device


class DaliLoader:
    """Iterate ``(images, labels)``: float32 NCHW in [0, 1] and int64, on the training device."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        *,
        batch_size: int,
        image_size: int,
        crop: str = "center",
        crop_pct: float = 0.875,
        shard_id: int = 0,
        num_shards: int = 1,
        device: str = "auto",
        device_id: int | None = None,
        num_threads: int = 2,
        seed: int = 0,
        auto_augment: str | None = None,
        hw_decoder_load: float = HW_DECODER_LOAD,
    ) -> None:
        err = dali_import_error()
        if err:
            raise RuntimeError(err)
        if crop not in CROPS:
            raise ValueError(f"--train-crop: unknown crop {crop!r}; choose {', '.join(CROPS)}")
        check_auto_augment_name(auto_augment)
        if len(files) % (num_shards * batch_size):
            raise ValueError(f"{len(files)} files do not split into {num_shards} shards of whole {batch_size}-batches")
        self.device = resolve_device(device)
        self.device_id = device_id if device_id is not None else dali_device_id(self.device)
        self.seed, self.auto_augment = seed, auto_augment
        self.batches = len(files) // num_shards // batch_size
        n = len(files) // num_shards  # this shard's contiguous part, as fn.readers.file cuts it
        files, labels = list(files[shard_id * n : (shard_id + 1) * n]), list(labels[shard_id * n : (shard_id + 1) * n])
        self._position = 0  # batches run so far: a new pass first finishes the one left unfinished
        self._pipe = self._build(files, np.asarray(labels, dtype=np.int64).tolist(), batch_size, image_size, crop,
                                 crop_pct, num_threads, seed, auto_augment, hw_decoder_load)

    def _build(self, files, labels, batch_size, size, crop, crop_pct, num_threads, seed, auto_augment,
               hw_decoder_load):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"
        decode = decoder_options(self.device, hw_decoder_load)

        # Conditionals only when a policy needs them, so the plain graph stays exactly as it was.
        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=self.device_id if gpu else None,
                      seed=seed, prefetch_queue_depth=2, enable_conditionals=auto_augment is not None)
        def pipe():
            data, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True,
                                          name="Reader")
            dec = "mixed" if gpu else "cpu"
            if crop == "random":
                # ROI decoding: only the random crop's region is decoded (nvJPEG on GPU).
                img = fn.decoders.image_random_crop(data, device=dec, output_type=types.RGB,
                                                    random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                    **decode)
                img = fn.resize(img, resize_x=size, resize_y=size)
            else:
                img = fn.decoders.image(data, device=dec, output_type=types.RGB, **decode)
                img = fn.resize(img, resize_shorter=round(size / crop_pct))
            if auto_augment is None:
                img = fn.crop_mirror_normalize(img, crop=(size, size), dtype=types.FLOAT, output_layout="CHW",
                                               mean=[0.0] * 3, std=[255.0] * 3)
            else:
                img = _auto_augment(fn.crop(img, crop=(size, size)), auto_augment, size)
                img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                               mean=[0.0] * 3, std=[255.0] * 3)
            return img, label.gpu() if gpu else label

        p = pipe()
        p.build()
        return p

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in run_passes(self, self.batches):
            yield _to_torch(images), _to_torch(labels).reshape(-1).long()

    def run(self) -> tuple:
        """One batch of the pipeline's outputs, bound to torch's current stream on a GPU."""
        if self._pipe is None:
            raise RuntimeError("this DALI loader was closed; build a new one")
        self._position += 1
        if self.device == "gpu":
            return self._pipe.run(torch.cuda.current_stream(self.device_id))
        return self._pipe.run()

    def close(self) -> None:
        """Shut the pipeline down now: its threads stop and its buffers return to DALI's pool."""
        self._pipe = None  # the only reference: DALI's Pipeline.__del__ shuts it down here


def run_passes(loader: Any, batches: int) -> Iterator[tuple]:
    """One pass of ``batches`` outputs from the start of the list. The reader loops over its list
    (epoch after epoch, prefetching across the boundary), so a pass that follows an unfinished one
    first runs the rest of that one."""
    for _ in range(-loader._position % batches if batches else 0):
        loader.run()
    for _ in range(batches):
        yield loader.run()


def check_auto_augment_name(name: str | None) -> None:
    """None, or one of `AUTO_AUGMENTS`: both DALI loaders refuse anything else before building a graph."""
    if name is not None and name not in AUTO_AUGMENTS:
        raise ValueError(f"--augment: {name!r} is not a DALI auto-augmentation; choose {', '.join(AUTO_AUGMENTS)}")


def _auto_augment(img, name: str, size: int):
    """RandAugment (n=2, m=9, the paper's ImageNet setting) or TrivialAugment Wide on uint8 HWC.

    ``shape`` makes translations relative to the (square) image, so they scale with ``size``
    instead of DALI's absolute pixel defaults, which are meant for 224 px images. Random
    choices draw their seeds from the pipeline's ``seed``, so a seeded loader repeats itself.
    """
    from nvidia.dali.auto_aug import rand_augment, trivial_augment

    if name == "randaugment":
        return rand_augment.rand_augment(img, n=2, m=9, shape=(size, size))
    return trivial_augment.trivial_augment_wide(img, shape=(size, size))


def _to_torch(tl) -> Tensor:
    """DALI TensorList → torch tensor on the tensor's device (one copy: DALI reuses its buffers).

    On a GPU the copy runs on torch's current stream of that device (``feed_ndarray``'s
    ``cuda_stream``; without it DALI copies on an internal stream, unordered with the kernels torch
    queues on the new tensor, and waits for it on the host). The tensor is allocated on that stream
    by torch's caching allocator, so the copy and every later use are ordered, and nothing syncs.

    On the CPU the copy goes through NumPy, whose large allocations use transparent huge pages:
    for a 64 x 3 x 224 x 224 float batch that is ~6 ms against ~80 ms for ``feed_ndarray`` into
    ``torch.empty`` on a 2-core VM, the difference between DALI leading or trailing torchvision.
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tl.as_tensor()
    if type(tl).__name__ != "TensorListGPU":
        return torch.from_numpy(np.array(t))
    device = torch.device("cuda", t.device_id())
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    return out
