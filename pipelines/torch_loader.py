"""torchvision + PIL loader: the CPU baseline and the fallback when DALI is unavailable.

Same contract and transforms as `pipelines.dali.DaliLoader`: an explicit, pre-arranged file
list, contiguous shards, float32 NCHW in [0, 1]. Files are decoded to RGB the way DALI's
``decoders.image(output_type=RGB)`` does (`open_rgb`), so both loaders see the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pipelines.dali import CROPS


def build_transform(image_size: int, crop: str, crop_pct: float) -> T.Compose:
    if crop not in CROPS:
        raise ValueError(f"--train-crop: unknown crop {crop!r}; choose {', '.join(CROPS)}")
    if crop == "random":
        geo = [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))]
    else:
        geo = [T.Resize(round(image_size / crop_pct)), T.CenterCrop(image_size)]
    return T.Compose([*geo, T.ToTensor()])


SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_TRANSPOSING = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations other than 'upright'


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as DALI decodes it: EXIF orientation applied, alpha dropped (not composited),
    16-bit greyscale scaled by 1/257 and rounded (PIL's own ``convert`` would clip it at 255).

    16-bit RGB files are read by PIL as their high bytes, within one grey level of DALI's rounding.
    """
    if im.format in ("JPEG", "MPO") and im.getexif().get(0x0112, 1) in _TRANSPOSING:
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode == "F" or (im.mode == "I" and im.format != "PNG"):  # PIL reads some 16-bit PNGs as 'I'
        raise ValueError(f"{getattr(im, 'filename', 'image')}: 32-bit samples are not converted (see pipelines.scan)")
    if im.mode in SIXTEEN_BIT_GREY:
        v = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((v + 128) // 257).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def open_rgb(path: str) -> Image.Image:
    """Decode a file to a loaded 8-bit RGB image (`to_rgb`)."""
    with Image.open(path) as im:
        out = to_rgb(im)
        out.load()
        return out


class FileListDataset(Dataset):
    def __init__(self, files: Sequence[str], labels: Sequence[int], transform: T.Compose) -> None:
        self.files, self.labels, self.transform = list(files), list(labels), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        with Image.open(self.files[i]) as im:
            return self.transform(to_rgb(im)), self.labels[i]


class TorchLoader:
    """Iterate ``(images, labels)`` from PIL decodes, like `DaliLoader`."""

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
        device: str | torch.device = "cpu",
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        if len(files) % (num_shards * batch_size):
            raise ValueError(f"{len(files)} files do not split into {num_shards} shards of whole {batch_size}-batches")
        n = len(files) // num_shards
        lo = shard_id * n
        ds = FileListDataset(files[lo : lo + n], labels[lo : lo + n], build_transform(image_size, crop, crop_pct))
        self.device, self.seed = torch.device(device), seed
        self.batches = n // batch_size
        self._loader: DataLoader | None = DataLoader(
            ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._loader is None:
            raise RuntimeError("this loader was closed; build a new one")
        for x, y in self._loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Drop the DataLoader (its workers end with its last iterator), like `DaliLoader.close`."""
        self._loader = None


def pil_flavour() -> str:
    """'pillow-simd X' or 'pillow X': which PIL build decodes for the torch loader."""
    from importlib import metadata

    import PIL

    for dist in ("pillow-simd", "pillow"):
        try:
            if metadata.version(dist) != PIL.__version__:
                continue  # the other distribution's files are the ones on disk
        except metadata.PackageNotFoundError:
            continue
        libtiff = "with libtiff" if _has_libtiff() else "without libtiff"
        return f"{dist} {PIL.__version__} ({libtiff})"
    return f"unknown PIL {PIL.__version__}"


def _has_libtiff() -> bool:
    from PIL import features

    return bool(features.check("libtiff"))
