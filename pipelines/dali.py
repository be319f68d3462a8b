"""DALI image pipeline: decode, crop and hand [0, 1] float CHW batches to PyTorch.

On a GPU, JPEGs are decoded by the ``mixed`` (nvJPEG) decoder, fused with the random crop for
training. Without CUDA, the same graph runs with CPU operators and ``device_id=None``.

The caller passes an explicit file list per epoch (already permuted and padded, see
`dali_bilevel.data`), so sharding is exact: shard ``i`` of ``n`` gets the contiguous
``i``-th ``1/n`` of the list, as ``fn.readers.file`` defines it.

The RandAugment and TrivialAugment baselines (``auto_augment``) run DALI's ``nvidia.dali.auto_aug``
policies inside the same graph, on the uint8 HWC crop before it becomes float: the policies
only take uint8 images, and they need the pipeline built with ``enable_conditionals=True``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

CROPS = ("center", "random")
AUTO_AUGMENTS = ("randaugment", "trivialaugment")  # --augment modes that DALI's auto_aug applies


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
        device_id: int = 0,
        num_threads: int = 2,
        seed: int = 0,
        auto_augment: str | None = None,
    ) -> None:
        err = dali_import_error()
        if err:
            raise RuntimeError(err)
        if crop not in CROPS:
            raise ValueError(f"--train-crop: unknown crop {crop!r}; choose {', '.join(CROPS)}")
        if auto_augment is not None and auto_augment not in AUTO_AUGMENTS:
            raise ValueError(f"--augment: {auto_augment!r} is not a DALI auto-augmentation; "
                             f"choose {', '.join(AUTO_AUGMENTS)}")
        if len(files) % (num_shards * batch_size):
            raise ValueError(f"{len(files)} files do not split into {num_shards} shards of whole {batch_size}-batches")
        self.device = resolve_device(device)
        self.batches = len(files) // num_shards // batch_size
        self._pipe = self._build(list(files), list(labels), batch_size, image_size, crop, crop_pct,
                                 shard_id, num_shards, device_id, num_threads, seed, auto_augment)

    def _build(self, files, labels, batch_size, size, crop, crop_pct, shard_id, num_shards,
               device_id, num_threads, seed, auto_augment):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"

        # Conditionals only when a policy needs them, so the plain graph stays exactly as it was.
        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id if gpu else None,
                      seed=seed, prefetch_queue_depth=2, enable_conditionals=auto_augment is not None)
        def pipe():
            data, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                          random_shuffle=False, pad_last_batch=True, name="Reader")
            dec = "mixed" if gpu else "cpu"
            if crop == "random":
                # ROI decoding: only the random crop's region is decoded (nvJPEG on GPU).
                img = fn.decoders.image_random_crop(data, device=dec, output_type=types.RGB,
                                                    random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
                img = fn.resize(img, resize_x=size, resize_y=size)
            else:
                img = fn.decoders.image(data, device=dec, output_type=types.RGB)
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
        for _ in range(self.batches):
            images, labels = self._pipe.run()
            yield _to_torch(images), _to_torch(labels).reshape(-1).long()


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

    On the CPU the copy goes through NumPy, whose large allocations use transparent huge pages:
    for a 64 x 3 x 224 x 224 float batch that is ~6 ms against ~80 ms for ``feed_ndarray`` into
    ``torch.empty`` on a 2-core VM, the difference between DALI leading or trailing torchvision.
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tl.as_tensor()
    if type(tl).__name__ != "TensorListGPU":
        return torch.from_numpy(np.array(t))
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=torch.device("cuda", torch.cuda.current_device()))
    feed_ndarray(t, out)
    return out
