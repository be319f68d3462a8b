"""The scan's on-disk cache: one JSON file per split folder, outside the data (which may be read-only).

A file holds one record per entry of every class folder, as the last scan found it::

    [name, size, mtime_ns, ctime_ns, full, problem, conversion, height, width]

``(size, mtime_ns, ctime_ns)`` is the entry's key, from one ``stat`` (symbolic links followed): a file
that is added, removed, rewritten, touched, replaced or renamed onto gets a new key or no record,
and only those files are inspected again. The ctime makes the key reliable where the mtime alone is
not (a copy that keeps mtimes, ``touch -d``): it changes whenever the inode does, and cannot be set
back. Entries without a key (broken links, folders) are always inspected again; they cost nothing.
``full`` says whether the record came from a full decode; a full scan re-inspects the others.

The header also names the cache format, the PIL version (whose parser decides what is readable)
and the split folder; any mismatch discards the file. Every write goes to a temporary file in the
same folder first and is then renamed over the old one (``os.replace``, atomic on POSIX), so a
reader, another process or a concurrent run never sees half a file. ``id`` changes with every write:
the main process hands it to the other processes, which read exactly the scan it made
(`dali_bilevel.data.scan_on_main`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import PIL

log = logging.getLogger(__name__)

FORMAT = 1
Record = list  # [name, size, mtime_ns, ctime_ns, full, problem, conversion, height, width]


def cache_dir(setting: str | os.PathLike | None) -> Path | None:
    """``--scan-cache``: 'auto' is ``$XDG_CACHE_HOME/dali-bilevel`` (``~/.cache/dali-bilevel`` when unset),
    'none' (or None) is no cache, anything else a folder."""
    if setting is None or str(setting) == "none":
        return None
    if str(setting) == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "dali-bilevel"
    return Path(setting).expanduser()


def cache_file(folder: Path, root: str | os.PathLike) -> Path:
    """The cache file of one split folder: named by a hash of its absolute, resolved path."""
    key = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:20]
    return folder / f"scan-{key}.json"


def read(path: Path, root: str | os.PathLike, cache_id: str | None = None) -> dict[str, Any] | None:
    """The cached scan of ``root`` (``{"id", "classes", "records"}``), or None when there is none, it is
    for another format, PIL version or folder, it is damaged, or its id is not ``cache_id``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the scan cache %s (%s: %s); the folder is scanned again", path, type(e).__name__, e)
        return None
    if not isinstance(data, dict) or (data.get("format"), data.get("pil"), data.get("root")) != (
            FORMAT, PIL.__version__, os.path.realpath(root)):
        return None
    if cache_id is not None and data.get("id") != cache_id:
        return None
    return data


def write(path: Path, root: str | os.PathLike, classes: tuple[str, ...], records: list[list[Record]]) -> str | None:
    """Write the scan atomically; returns its new id, or None (with a warning) when the folder is not writable."""
    new_id = uuid.uuid4().hex
    data = {"format": FORMAT, "pil": PIL.__version__, "root": os.path.realpath(root), "id": new_id,
            "classes": list(classes), "records": records}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{new_id[:8]}.tmp")
        # 0o666 less the umask (mkstemp's 0o600 would hide a shared cache from the other users)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write the scan cache %s (%s: %s); continuing without it (set --scan-cache to a "
                    "writable folder, or none)", path, type(e).__name__, e)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return None
    return new_id
