"""Check every image file before any compute: a bad file stops the run with its path, not a DALI trace.

DALI's decoders report a corrupt or truncated file as ``Critical error in pipeline`` without its
name, minutes into an epoch; PIL raises on the worker. So the file lists are checked up front:

* **errors** (the run stops, naming each file; ``--skip-unreadable`` skips them instead and lists
  them, never silently): files that are not images (wrong extension, or content PIL cannot
  identify), empty files, broken links, truncated JPEG / PNG / TIFF data, 32-bit integer or float
  samples (no agreed 8-bit range), colour modes neither loader converts;
* **conversions** (reported, not errors): greyscale, palette, CMYK, alpha (dropped, not composited)
  and 16-bit images (scaled by 1/257 and rounded), and JPEGs with an EXIF orientation (rotated).
  ``nvidia.dali.fn.decoders.image(output_type=RGB)`` does all of these itself; the torchvision
  loader does the same through `pipelines.torch_loader.open_rgb` (tested pixel for pixel).

The default check reads headers only: PIL's parse of the header, plus the end-of-image marker of a
JPEG, the IEND chunk of a PNG and the strip/tile extents of a TIFF (what truncation cuts off). It
costs about a file open; ``full=True`` decodes every file with PIL (slower, also catches damage
inside the entropy-coded data). Run it alone with ``python launch/scan_data.py DIR``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipelines.folder import IMAGE_EXTENSIONS, DataError, FolderIndex, class_entries, class_folders, split_dirs

log = logging.getLogger(__name__)

# PIL mode -> what both loaders do with it (None: plain 8-bit RGB, nothing to say).
CONVERTED_MODES = {
    "RGB": None, "L": "greyscale", "1": "1-bit greyscale", "P": "palette", "LA": "greyscale, alpha dropped",
    "PA": "palette, alpha dropped", "RGBA": "alpha dropped", "RGBX": None, "CMYK": "CMYK", "YCbCr": "YCbCr",
    "I;16": "16-bit greyscale", "I;16B": "16-bit greyscale", "I;16L": "16-bit greyscale", "I;16N": "16-bit greyscale",
}
MAX_LISTED = 10  # problems named in a one-line error; launch/scan_data.py lists all


@dataclass(frozen=True)
class FileNote:
    path: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}: {self.text}"


@dataclass(frozen=True)
class SplitScan:
    """One split's scan: the readable images, and what was found wrong or converted."""

    index: FolderIndex  # readable images only
    problems: tuple[FileNote, ...]
    conversions: tuple[FileNote, ...]
    seconds: float


def inspect_image(path: str | Path, full: bool = False) -> tuple[str | None, str | None, tuple[int, int]]:
    """``(problem, conversion, (height, width))`` of one file; ``problem`` is None when it decodes."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "broken symbolic link", None, (0, 0)
    if path.is_dir():
        return "a folder inside a class folder (nested folders are not read)", None, (0, 0)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file (extension {path.suffix or 'none'!r})", None, (0, 0)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file", None, (0, 0)
        with Image.open(path) as im:
            shape = (im.height, im.width)
            problem = _mode_problem(im) or _truncation(im, path, size)
            if problem:
                return problem, None, shape
            note = _conversion(im, path)
            if note and "EXIF orientation" in note and im.getexif().get(0x0112) in (5, 6, 7, 8):
                shape = shape[::-1]  # a quarter turn: the loaders see it transposed
            if full:
                im.load()
    except UnidentifiedImageError:
        return "not a readable image (PIL cannot identify the content)", None, (0, 0)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot be decoded ({type(e).__name__}: {e})", None, (0, 0)
    return None, note, shape


def _mode_problem(im: Image.Image) -> str | None:
    if im.mode == "F":
        return "32-bit float samples: no agreed 8-bit range; convert it to 8 or 16 bit"
    if im.mode == "I" and im.format != "PNG":  # PIL reads some 16-bit PNGs as 'I'
        return "32-bit integer samples: no agreed 8-bit range; convert it to 8 or 16 bit"
    if im.mode not in CONVERTED_MODES and im.mode != "I":
        return f"colour mode {im.mode} is not converted to RGB by the loaders; convert it to RGB"
    return None


def _truncation(im: Image.Image, path: Path, size: int) -> str | None:
    """What a cut-off download or copy loses: the end marker, or data the header points past."""
    if im.format in ("JPEG", "MPO"):
        with open(path, "rb") as f:
            f.seek(max(0, size - 4096))
            if b"\xff\xd9" not in f.read():  # EOI; some cameras append bytes after it
                return "truncated JPEG (no end-of-image marker)"
    elif im.format == "PNG":
        with open(path, "rb") as f:
            f.seek(max(0, size - 64))
            if b"IEND" not in f.read():
                return "truncated PNG (no IEND chunk)"
    elif im.format == "TIFF":
        tags = im.tag_v2
        offsets, counts = tags.get(273) or tags.get(324), tags.get(279) or tags.get(325)
        if offsets and counts:
            end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False))
            if end > size:
                return f"truncated TIFF (image data runs to byte {end}, the file has {size})"
    return None


def _conversion(im: Image.Image, path: Path) -> str | None:
    notes = []
    mode_note = CONVERTED_MODES.get(im.mode, "16-bit greyscale" if im.mode == "I" else None)
    if mode_note:
        notes.append(mode_note)
    if im.mode in ("RGB", "RGBA") and _bits(im, path) == 16:
        notes.append("16-bit RGB")
    if im.format in ("JPEG", "MPO") and im.getexif().get(0x0112, 1) not in (0, 1):
        notes.append("EXIF orientation: rotated")
    return "; ".join(notes) or None


def _bits(im: Image.Image, path: Path) -> int:
    """Bits per sample where PIL hides them (it reads 16-bit RGB as 8-bit RGB)."""
    if im.format == "TIFF":
        bits = im.tag_v2.get(258)
        return int(max(bits)) if isinstance(bits, tuple) else int(bits or 8)
    if im.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(25)
        return head[24] if len(head) == 25 else 8  # IHDR bit depth
    return 8


def scan_report(root: str | Path, classes: tuple[str, ...] | None = None, full: bool = False,
                workers: int | None = None) -> SplitScan:
    """Inspect every entry of ``root/<class>/``; layout errors raise, file problems are returned."""
    t0 = time.perf_counter()
    root = Path(root)
    found = class_folders(root, classes)
    entries: list[tuple[int, Path]] = []
    for label, name in enumerate(found):
        listed = class_entries(root / name)
        if not listed:
            raise DataError(f"{root / name}: empty class folder")
        entries += [(label, p) for p in listed]
    if workers is None:  # header checks hold the GIL: threads only pay off for full decodes, which release it
        workers = min(8, os.cpu_count() or 1) if full else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda e: inspect_image(e[1], full), entries))
    else:
        results = [inspect_image(p, full) for _, p in entries]
    files, labels, shapes, problems, conversions = [], [], [], [], []
    for (label, p), (problem, note, shape) in zip(entries, results, strict=True):
        if problem:
            problems.append(FileNote(str(p), problem))
            continue
        files.append(str(p))
        labels.append(label)
        shapes.append(shape)
        if note:
            conversions.append(FileNote(str(p), note))
    index = FolderIndex(root, found, tuple(files), tuple(labels), tuple(shapes),
                        skipped=tuple(n.path for n in problems))
    return SplitScan(index, tuple(problems), tuple(conversions), time.perf_counter() - t0)


def scan_split(root: str | Path, classes: tuple[str, ...] | None = None, skip_unreadable: bool = False,
               full: bool = False) -> FolderIndex:
    """The readable images of ``root/<class>/``, or a `DataError` naming the unreadable ones.

    With ``skip_unreadable`` the unreadable files are left out and listed (a logged warning, and
    ``FolderIndex.skipped``); a class left with no image is still an error.
    """
    scan = scan_report(root, classes, full)
    if scan.problems and not skip_unreadable:
        listed = "; ".join(str(n) for n in scan.problems[:MAX_LISTED])
        more = len(scan.problems) - MAX_LISTED
        raise DataError(f"{len(scan.problems)} unreadable file(s) under {root} (fix or remove them, or pass "
                        f"--skip-unreadable to skip them): {listed}"
                        + (f"; and {more} more (python launch/scan_data.py {root} lists all)" if more > 0 else ""))
    if scan.problems:
        log.warning("--skip-unreadable: skipping %d file(s) under %s:\n%s", len(scan.problems), root,
                    "\n".join(f"  {n}" for n in scan.problems))
        left = set(scan.index.labels)
        empty = [c for i, c in enumerate(scan.index.classes) if i not in left]
        if empty:
            raise DataError(f"{Path(root) / empty[0]}: no readable image left in this class folder")
    return scan.index


def scan_splits(data_dir: str | Path, skip_unreadable: bool = False, full: bool = False,
                ) -> tuple[FolderIndex, FolderIndex]:
    """`pipelines.folder.find_splits` with every file checked: ``DIR/train`` and ``DIR/val|test``."""
    train_dir, eval_dir = split_dirs(data_dir)
    train = scan_split(train_dir, skip_unreadable=skip_unreadable, full=full)
    return train, scan_split(eval_dir, train.classes, skip_unreadable, full)
