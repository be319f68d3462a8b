"""The scan cache: a cached scan is the fresh scan, every kind of change to the tree is found, only
changed files are inspected again, the data folder is never written, and a cache that cannot be
read or written only costs a rescan."""

import json
import logging
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from pipelines import scan_cache
from pipelines.scan import inspect_image, inspect_many, load_report, scan_report, scan_splits
from tests.pipelines.test_scan import RGB, write_bad, write_convertible


@pytest.fixture
def tree(tmp_path):
    """A train split with bad and convertible files, and a cache folder beside it."""
    root = tmp_path / "data" / "train"
    bad = write_bad(root / "bad")
    write_convertible(root / "odd")
    (root / "plain").mkdir()
    for i in range(5):
        Image.fromarray(np.roll(RGB, i, axis=1)).save(root / "plain" / f"p{i}.png")
    return root, tmp_path / "cache", bad


def same_scan(a, b) -> None:
    assert a.index == b.index and a.problems == b.problems and a.conversions == b.conversions


def listing(root):
    return sorted((str(p), p.lstat().st_mtime_ns) for p in root.rglob("*"))


def test_a_cached_scan_is_the_fresh_scan_and_inspects_nothing(tree):
    root, cache, _ = tree
    before = listing(root.parent)
    fresh = scan_report(root)
    first = scan_report(root, cache=cache)
    same_scan(first, fresh)
    n = len(fresh.index) + len(fresh.problems)
    assert first.reused == 0 and first.cache_file and first.cache_id
    second = scan_report(root, cache=cache)
    same_scan(second, fresh)
    # every entry but the broken link (no stat key) comes from the cache, and the file is not rewritten
    assert second.reused == n - 1 and second.cache_id == first.cache_id
    assert listing(root.parent) == before  # the data folder is only read
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first.cache_file)]  # no temporary files left


def test_added_removed_rewritten_and_touched_files_are_inspected_again(tree):
    root, cache, _ = tree
    first = scan_report(root, cache=cache)
    n = first.reused + len(first.index) + len(first.problems)
    plain = root / "plain"
    Image.fromarray(RGB).save(plain / "new.png")  # added
    (plain / "p0.png").unlink()  # removed
    data = (plain / "p1.png").read_bytes()
    (plain / "p1.png").write_bytes(data[:-20] + bytes(20))  # same size, IEND gone
    st = (plain / "p2.png").stat()
    (plain / "p2.png").write_bytes((plain / "p3.png").read_bytes())  # other content ...
    os.utime(plain / "p2.png", ns=(st.st_atime_ns, st.st_mtime_ns))  # ... with the old mtime back
    second = scan_report(root, cache=cache)
    same_scan(second, scan_report(root))
    assert f"{plain}/p1.png" in {p.path for p in second.problems}
    assert second.reused == n - 1 - 1 - 2  # n entries, one removed, one added, two rewritten; the link
    assert second.cache_id != first.cache_id
    assert scan_report(root, cache=cache).reused == n - 1


def test_a_full_scan_does_not_trust_header_checks_but_serves_them(tree):
    root, cache, _ = tree
    scan_report(root, cache=cache)
    full = scan_report(root, cache=cache, full=True)
    assert full.reused == 0  # header-checked records are decoded again
    same_scan(full, scan_report(root, full=True))
    header = scan_report(root, cache=cache)
    assert header.reused == len(full.index) + len(full.problems) - 1 and header.cache_id == full.cache_id


def test_a_damaged_or_foreign_cache_is_rescanned(tree, caplog):
    root, cache, _ = tree
    first = scan_report(root, cache=cache)
    path = cache / os.path.basename(first.cache_file)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="pipelines.scan_cache"):
        again = scan_report(root, cache=cache)
    assert "ignoring the scan cache" in caplog.text and again.reused == 0
    same_scan(again, first)
    data = json.loads(path.read_text())
    data["pil"] = "0.0"  # another PIL parses headers otherwise
    path.write_text(json.dumps(data))
    assert scan_report(root, cache=cache).reused == 0


def test_an_unwritable_cache_only_costs_the_cache(tree, tmp_path, caplog):
    root, _, _ = tree
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING, logger="pipelines.scan_cache"):
        scan = scan_report(root, cache=tmp_path / "file" / "cache")  # a folder below a file
    assert "cannot write the scan cache" in caplog.text and "--scan-cache" in caplog.text
    assert scan.cache_file is None and scan.cache_id is None
    same_scan(scan, scan_report(root))


def test_other_processes_read_the_scan_without_the_data(tree, tmp_path):
    root, cache, _ = tree
    first = scan_report(root, cache=cache)
    shutil.move(root, tmp_path / "elsewhere")  # the data is gone: only the cache file is read
    loaded = load_report(root, first.cache_file, first.cache_id)
    same_scan(loaded, first)
    assert load_report(root, first.cache_file, "another id") is None  # rewritten since: fall back
    assert load_report(tmp_path / "other", first.cache_file, first.cache_id) is None  # another folder's


def test_splits_through_the_cache_keep_every_error_message(tree):
    root, cache, bad = tree
    (root.parent / "val").mkdir()
    for cls in ("bad", "odd", "plain"):
        (root.parent / "val" / cls).mkdir()
        Image.fromarray(RGB).save(root.parent / "val" / cls / "a.png")
    for _ in range(2):  # fresh, then cached
        with pytest.raises(ValueError, match=r"^9 unreadable file\(s\) under .*--skip-unreadable"):
            scan_splits(root.parent, cache=cache)
        train, val = scan_splits(root.parent, skip_unreadable=True, cache=cache)
        assert {s.split("/")[-1] for s in train.skipped} == set(bad) and len(val) == 3


def test_forked_workers_find_what_one_process_finds(tree):
    root, _, _ = tree
    paths = sorted(str(p) for p in root.glob("*/*"))
    assert inspect_many(paths, workers=2) == [inspect_image(p) for p in paths]
    assert inspect_many(paths, full=True, workers=2) == [inspect_image(p, True) for p in paths]


def test_cache_folder_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert scan_cache.cache_dir("auto") == tmp_path / "xdg" / "dali-bilevel"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert scan_cache.cache_dir("auto") == tmp_path / "home" / ".cache" / "dali-bilevel"
    assert scan_cache.cache_dir("none") is None and scan_cache.cache_dir("~/c") == tmp_path / "home" / "c"
    # one file per split folder, however it is spelled
    a = scan_cache.cache_file(tmp_path, tmp_path / "d" / "train")
    assert a == scan_cache.cache_file(tmp_path, f"{tmp_path}/d/../d/train/")
    assert a != scan_cache.cache_file(tmp_path, tmp_path / "d" / "val")


def test_key_changes_even_when_mtime_and_size_are_put_back(tmp_path):
    """The ctime is what makes the key reliable: it cannot be set back."""
    f = tmp_path / "a.png"
    Image.fromarray(RGB).save(f)
    st = f.stat()
    time.sleep(0.01)
    data = bytearray(f.read_bytes())
    data[-30] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = f.stat()
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and st2.st_ctime_ns != st.st_ctime_ns


def test_many_class_folders_are_listed_in_order_and_the_first_empty_one_named(tmp_path):
    root = tmp_path / "train"
    for c in range(20):
        (root / f"c{c:02d}").mkdir(parents=True)
        if c not in (5, 12):
            Image.fromarray(RGB).save(root / f"c{c:02d}" / "a.png")
    with pytest.raises(ValueError, match=r"train/c05: empty class folder$"):
        scan_report(root)
    (root / "c05" / "b.png").write_bytes((root / "c00" / "a.png").read_bytes())
    with pytest.raises(ValueError, match=r"train/c12: empty class folder$"):
        scan_report(root)
    (root / "c12" / "b.png").write_bytes((root / "c00" / "a.png").read_bytes())
    scan = scan_report(root)
    assert scan.index.labels == tuple(range(20)) and scan.index.files[5].endswith("train/c05/b.png")
