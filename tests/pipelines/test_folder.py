import pytest

from pipelines.folder import DataError, find_splits, scan_folder


def make(root, layout):
    for rel, data in layout.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_labels_follow_sorted_class_names(shapes_dir):
    train, test = find_splits(shapes_dir)
    assert train.classes == tuple(sorted(train.classes)) == test.classes
    assert len(train) == 48 and len(test) == 24
    assert all(f.split("/")[-2] == train.classes[label] for f, label in zip(train.files, train.labels, strict=True))


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"x/a/1.jpg": b""}, "expected .*/train/<class>"),
        ({"train/a/1.jpg": b""}, "expected .*/val/<class>"),
        ({"train/a/1.jpg": b"", "train/b/notes.txt": b"", "val/a/1.jpg": b"", "val/b/1.jpg": b""},
         "notes.txt: not an image"),
        ({"train/a/1.jpg": b"", "train/b/.keep": b"", "val/a/1.jpg": b"", "val/b/1.jpg": b""}, "b: empty class folder"),
        ({"train/a/1.jpg": b"", "val/c/1.jpg": b""}, r"differ .*extra: \['c'\], missing: \['a'\]"),
    ],
)
def test_layout_errors_name_the_path(tmp_path, layout, message):
    make(tmp_path, layout)
    with pytest.raises(DataError, match=message):
        find_splits(tmp_path)


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match=r"--data: .*nope: no such directory"):
        find_splits(tmp_path / "nope")
    with pytest.raises(DataError, match="no such directory"):
        scan_folder(tmp_path / "nope")
