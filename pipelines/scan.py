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
inside the entropy-coded data). Large scans run in forked processes (`inspect_many`). Run it alone
with ``python launch/scan_data.py DIR``.

With a cache folder (``--scan-cache``, `pipelines.scan_cache`), a scan lists the tree (one ``stat`` per
file) and inspects only the files that are new or changed since the last scan; the result is the
same as a fresh scan's. A training run scans on its main process only (`dali_bilevel.data`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import stat
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipelines import scan_cache
from pipelines.folder import IMAGE_EXTENSIONS, DataError, FolderIndex, class_folders, split_dirs

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
    reused: int = 0  # entries taken from the cache, not inspected again
    cache_file: str | None = None  # where this scan is cached (None: not cached)
    cache_id: str | None = None  # that file's id: other processes read exactly this scan


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


def list_split(root: Path, found: tuple[str, ...]) -> list[list[tuple[str, tuple[int, int, int] | None]]]:
    """Every class folder's entries ``(name, key)`` in name order, hidden ones ignored; ``key`` is
    ``(size, mtime_ns, ctime_ns)`` of a regular file (links followed), else None. One ``scandir`` per
    folder and one ``stat`` per file: the whole cost of a cached scan's check for changes.

    Folders are listed by 8 threads: ``stat`` releases the GIL, and on a network file system each one
    is a round trip (on a local disk with a warm page cache threads still save ~25%, scan_cpu.md).
    """
    if len(found) < 16:
        return [_list_folder(root, name) for name in found]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(_list_folder, [root] * len(found), found))  # in order: the first empty folder raises


def _list_folder(root: Path, name: str) -> list[tuple[str, tuple[int, int, int] | None]]:
    entries = []
    with os.scandir(os.path.join(root, name)) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                st = e.stat()
                key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns) if stat.S_ISREG(st.st_mode) else None
            except OSError:  # a broken link: inspect_image names it
                key = None
            entries.append((e.name, key))
    if not entries:
        raise DataError(f"{root / name}: empty class folder")
    entries.sort(key=lambda t: t[0])
    return entries


def _inspect_chunk(paths: list[str], full: bool) -> list[tuple[str | None, str | None, tuple[int, int]]]:
    return [inspect_image(p, full) for p in paths]


def default_workers(n_files: int) -> int:
    """Processes for ``n_files`` checks: one per usable CPU (up to 32) when there are enough files to pay
    for the pool (about 0.1 s to start), else 1. Threads do not pay: PIL's header parse holds the GIL, and
    on 2 cores 2 threads took 3x longer than 1 (docs/benchmarks/scan_cpu.md)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cpus)) if n_files >= 2000 else 1


def inspect_many(paths: list[str], full: bool = False, workers: int | None = None,
                 ) -> list[tuple[str | None, str | None, tuple[int, int]]]:
    """`inspect_image` of every path, in order; ``workers`` > 1 runs them in that many forked processes.

    Fork, not spawn: a spawned worker would import torch and the launching script again (seconds each).
    The parent is the scanning process before any loader exists; the children only run PIL, as
    torch's own DataLoader workers (forked by default on Linux) do.
    """
    workers = default_workers(len(paths)) if workers is None else workers
    if workers <= 1 or len(paths) < 2 or "fork" not in mp.get_all_start_methods():
        return _inspect_chunk(paths, full)
    size = max(64, min(2048, -(-len(paths) // (workers * 8))))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        return [r for part in pool.map(_inspect_chunk, chunks, [full] * len(chunks)) for r in part]


def _report(root: Path, found: tuple[str, ...], records: list[list[list]], seconds: float, reused: int,
            cache_file: str | None, cache_id: str | None) -> SplitScan:
    """The `SplitScan` of a split's records (the scan's, or the cache's)."""
    files, labels, shapes, problems, conversions = [], [], [], [], []
    for label, (name, recs) in enumerate(zip(found, records, strict=True)):
        base = str(root / name) + os.sep  # as str(Path) spells it, like the loaders' file lists always did
        for rec in recs:
            path = base + rec[0]
            if rec[5]:
                problems.append(FileNote(path, rec[5]))
                continue
            files.append(path)
            labels.append(label)
            shapes.append((rec[7], rec[8]))
            if rec[6]:
                conversions.append(FileNote(path, rec[6]))
    index = FolderIndex(root, found, tuple(files), tuple(labels), tuple(shapes),
                        skipped=tuple(n.path for n in problems))
    return SplitScan(index, tuple(problems), tuple(conversions), seconds, reused, cache_file, cache_id)


def scan_report(root: str | Path, classes: tuple[str, ...] | None = None, full: bool = False,
                workers: int | None = None, cache: str | Path | None = None) -> SplitScan:
    """Inspect every entry of ``root/<class>/``; layout errors raise, file problems are returned.

    With ``cache`` (a folder, see `pipelines.scan_cache`) only the entries that are new or changed since
    the last scan of ``root`` are inspected, and the result is written back when anything changed.
    """
    t0 = time.perf_counter()
    root = Path(root)
    found = class_folders(root, classes)
    listed = list_split(root, found)
    path = scan_cache.cache_file(Path(cache), root) if cache is not None else None
    old = scan_cache.read(path, root) if path is not None else None
    old_by_class: dict[str, dict[str, list]] = {}
    if old is not None:
        old_by_class = {c: {r[0]: r for r in recs} for c, recs in zip(old["classes"], old["records"], strict=True)}
    records: list[list[list]] = []
    todo: list[tuple[int, int, str]] = []  # (class, entry, path) to inspect
    for ci, (name, entries) in enumerate(zip(found, listed, strict=True)):
        cached = old_by_class.get(name, {})
        recs = []
        for ei, (entry, key) in enumerate(entries):
            rec = cached.get(entry)
            if key is not None and rec is not None and tuple(rec[1:4]) == key and (rec[4] or not full):
                recs.append(rec)
            else:
                # an entry without a key is never reused: its flags stay constant, so it never forces a write
                recs.append([entry, *(key or (-1, 0, 0)), int(full and key is not None), None, None, 0, 0])
                todo.append((ci, ei, os.path.join(root, name, entry)))
        records.append(recs)
    for (ci, ei, _), (problem, note, (h, w)) in zip(todo, inspect_many([t[2] for t in todo], full, workers),
                                                     strict=True):
        records[ci][ei][5:9] = [problem, note, h, w]
    cache_id = None
    if path is not None:
        if old is not None and old["classes"] == list(found) and old["records"] == records:
            cache_id = old["id"]  # nothing changed: the file stays as it is
        else:
            cache_id = scan_cache.write(path, root, found, records)
    n = sum(len(r) for r in records)
    return _report(root, found, records, time.perf_counter() - t0, n - len(todo),
                   str(path) if cache_id else None, cache_id)


def load_report(root: str | Path, cache_file: str, cache_id: str) -> SplitScan | None:
    """The scan another process made and cached (its ``cache_file`` and ``cache_id``), read without
    touching the data; None when that file is gone or was rewritten since (the caller falls back)."""
    t0 = time.perf_counter()
    data = scan_cache.read(Path(cache_file), root, cache_id)
    if data is None:
        return None
    n = sum(len(r) for r in data["records"])
    return _report(Path(root), tuple(data["classes"]), data["records"], time.perf_counter() - t0, n, cache_file,
                   cache_id)


def checked_index(scan: SplitScan, skip_unreadable: bool = False, log_skips: bool = True) -> FolderIndex:
    """The readable images of a scan, or a `DataError` naming the unreadable ones.

    With ``skip_unreadable`` the unreadable files are left out and listed (a logged warning, and
    ``FolderIndex.skipped``); a class left with no image is still an error.
    """
    root = scan.index.root
    if scan.problems and not skip_unreadable:
        listed = "; ".join(str(n) for n in scan.problems[:MAX_LISTED])
        more = len(scan.problems) - MAX_LISTED
        raise DataError(f"{len(scan.problems)} unreadable file(s) under {root} (fix or remove them, or pass "
                        f"--skip-unreadable to skip them): {listed}"
                        + (f"; and {more} more (python launch/scan_data.py {root} lists all)" if more > 0 else ""))
    if scan.problems:
        if log_skips:
            log.warning("--skip-unreadable: skipping %d file(s) under %s:\n%s", len(scan.problems), root,
                        "\n".join(f"  {n}" for n in scan.problems))
        left = set(scan.index.labels)
        empty = [c for i, c in enumerate(scan.index.classes) if i not in left]
        if empty:
            raise DataError(f"{Path(root) / empty[0]}: no readable image left in this class folder")
    return scan.index


def scan_split(root: str | Path, classes: tuple[str, ...] | None = None, skip_unreadable: bool = False,
               full: bool = False, cache: str | Path | None = None, workers: int | None = None) -> FolderIndex:
    """The readable images of ``root/<class>/``, or a `DataError` naming the unreadable ones (`checked_index`)."""
    return checked_index(scan_report(root, classes, full, workers, cache), skip_unreadable)


def split_reports(data_dir: str | Path, full: bool = False, cache: str | Path | None = None,
                  workers: int | None = None) -> tuple[SplitScan, SplitScan]:
    """The scans of ``DIR/train`` and ``DIR/val|test`` (class sets compared)."""
    train_dir, eval_dir = split_dirs(data_dir)
    train = scan_report(train_dir, None, full, workers, cache)
    return train, scan_report(eval_dir, train.index.classes, full, workers, cache)


def scan_splits(data_dir: str | Path, skip_unreadable: bool = False, full: bool = False,
                cache: str | Path | None = None, workers: int | None = None) -> tuple[FolderIndex, FolderIndex]:
    """`pipelines.folder.find_splits` with every file checked: ``DIR/train`` and ``DIR/val|test``."""
    train, test = split_reports(data_dir, full, cache, workers)
    return checked_index(train, skip_unreadable), checked_index(test, skip_unreadable)
