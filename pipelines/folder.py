"""The ImageFolder layout (``DIR/<split>/<class>/<image>``), read with clear errors.

Labels follow the sorted class-folder names, as in ``torchvision.datasets.ImageFolder`` and
``nvidia.dali.fn.readers.file``. Nothing is silently dropped: a file whose extension is not an
image format stops the scan with its path in the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".ppm", ".pgm", ".pnm"})
EVAL_SPLITS = ("val", "test")


class DataError(ValueError):
    """Bad input data; the message names the offending path."""


@dataclass(frozen=True)
class FolderIndex:
    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...] = ()  # (height, width) per file, when a content scan read them
    skipped: tuple[str, ...] = ()  # unreadable files left out with --skip-unreadable (see `pipelines.scan`)

    def __len__(self) -> int:
        return len(self.files)


def class_folders(root: Path, classes: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Sorted class-folder names of ``root`` (hidden ones ignored), checked against ``classes``."""
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    found = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not found:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/<image files>")
    if classes is not None and found != tuple(classes):
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise DataError(f"{root}: class folders differ from the training split's (extra: {extra}, missing: {missing})")
    return found


def class_entries(folder: Path) -> list[Path]:
    """A class folder's entries in name order; hidden files (``.DS_Store``, ``.keep``) are ignored."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def scan_folder(root: str | Path, classes: tuple[str, ...] | None = None) -> FolderIndex:
    """List ``root/<class>/*`` images. ``classes`` pins the label order (e.g. the train split's)."""
    root = Path(root)
    found = class_folders(root, classes)
    files, labels = [], []
    for label, name in enumerate(found):
        entries = class_entries(root / name)
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        others = [p for p in entries if p not in images]
        if others:
            raise DataError(f"{others[0]}: not an image file (extension {others[0].suffix or 'none'!r})"
                            + (f" and {len(others) - 1} more" if len(others) > 1 else ""))
        if not images:
            raise DataError(f"{root / name}: empty class folder")
        files += [str(p) for p in images]
        labels += [label] * len(images)
    return FolderIndex(root, tuple(found), tuple(files), tuple(labels))


def split_dirs(data_dir: str | Path) -> tuple[Path, Path]:
    """``DIR/train`` and the first of ``DIR/val`` or ``DIR/test``; errors name what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data: {data_dir}: no such directory")
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise DataError(f"--data: {data_dir}: expected {train_dir}/<class>/... (ImageFolder layout)")
    eval_dir = next((data_dir / s for s in EVAL_SPLITS if (data_dir / s).is_dir()), None)
    if eval_dir is None:
        raise DataError(f"--data: {data_dir}: expected {data_dir}/val/<class>/... or {data_dir}/test/<class>/...")
    return train_dir, eval_dir


def find_splits(data_dir: str | Path) -> tuple[FolderIndex, FolderIndex]:
    """``DIR/train`` and the first of ``DIR/val`` or ``DIR/test``, with matching classes (names only;
    `pipelines.scan.scan_splits` also opens every file)."""
    train_dir, eval_dir = split_dirs(data_dir)
    train = scan_folder(train_dir)
    return train, scan_folder(eval_dir, classes=train.classes)
