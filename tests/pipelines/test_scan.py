"""The up-front scan: every bad file named, skipping only on request, conversions both loaders agree on."""

import logging
import struct
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pipelines import DaliLoader, TorchLoader, scan_split, scan_splits
from pipelines.folder import DataError
from pipelines.scan import inspect_image, scan_report
from pipelines.torch_loader import open_rgb

RNG = np.random.default_rng(0)
Y, X = np.mgrid[0:40, 0:48]
RGB = np.dstack([X * 5, Y * 6, (X + Y) * 2]).astype(np.uint8)  # smooth: JPEG decoders agree exactly
ALPHA = RNG.integers(0, 256, (40, 48), dtype=np.uint8)
G16 = RNG.integers(0, 65536, (40, 48)).astype(np.uint16)
RGB16 = RNG.integers(0, 65536, (40, 48, 3)).astype(np.uint16)


def png16(path, a):
    """A 16-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_convertible(d):
    """One file per mode both loaders convert to RGB; returns {name: expected RGB array or None}."""
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RGB).convert("L").save(d / "grey.jpg", quality=95)
    Image.fromarray(RGB).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(np.dstack([RGB, ALPHA])).save(d / "rgba.png")
    Image.fromarray(np.dstack([RGB, ALPHA])).convert("LA").save(d / "la.png")
    Image.fromarray(RGB).convert("P").save(d / "palette.png")
    Image.fromarray(G16).save(d / "grey16.png")
    tifffile.imwrite(d / "grey16.tif", G16)
    tifffile.imwrite(d / "rgb16.tif", RGB16, photometric="rgb")
    png16(d / "rgb16.png", RGB16)
    tifffile.imwrite(d / "rgba.tif", np.dstack([RGB, ALPHA]), photometric="rgb", extrasamples=["unassalpha"])
    im = Image.fromarray(RGB)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    im.save(d / "exif6.jpg", exif=exif, quality=95)
    g8 = np.round(G16 / 257).astype(np.uint8)
    return {"grey.jpg": None, "cmyk.jpg": None, "rgba.png": RGB, "la.png": None, "palette.png": None,
            "grey16.png": np.dstack([g8] * 3), "grey16.tif": np.dstack([g8] * 3),
            "rgb16.tif": np.round(RGB16 / 257).astype(np.uint8), "rgb16.png": np.round(RGB16 / 257).astype(np.uint8),
            "rgba.tif": RGB, "exif6.jpg": None}


def write_bad(d):
    """Files no loader can read; returns {name: expected reason fragment}."""
    d.mkdir(parents=True, exist_ok=True)
    noise = RNG.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # large scan data: the cut falls inside it
    Image.fromarray(noise).save(d / "ok.jpg", quality=90)
    jpg = (d / "ok.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "garbage.jpg").write_bytes(jpg[:20] + bytes(200) + jpg[220:])
    tifffile.imwrite(d / "t.tif", RGB, photometric="rgb")
    tif = (d / "t.tif").read_bytes()
    (d / "truncated.tif").write_bytes(tif[: len(tif) // 2])
    Image.fromarray(RGB).save(d / "p.png")
    (d / "truncated.png").write_bytes((d / "p.png").read_bytes()[:-30])
    (d / "notes.txt").write_text("not an image")
    (d / "fake.png").write_text("not an image either")
    (d / "empty.jpg").write_bytes(b"")
    tifffile.imwrite(d / "float.tif", RNG.random((40, 48)).astype(np.float32))
    (d / "gone.jpg").symlink_to(d / "missing-target.jpg")
    (d / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored
    return {"truncated.jpg": "truncated JPEG (no end-of-image marker)", "garbage.jpg": "PIL cannot identify",
            "truncated.tif": "truncated TIFF (image data runs to byte", "truncated.png": "truncated PNG",
            "notes.txt": "not an image file (extension '.txt')", "fake.png": "PIL cannot identify",
            "empty.jpg": "empty file", "float.tif": "32-bit float samples", "gone.jpg": "broken symbolic link"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = write_convertible(root / "train" / "odd")
    bad = write_bad(root / "train" / "bad")
    for cls in ("bad", "odd"):
        (root / "val" / cls).mkdir(parents=True)
        Image.fromarray(RGB).save(root / "val" / cls / "a.jpg")
    return root, expected, bad


def test_every_bad_file_is_named_with_its_reason(corpus):
    root, _, bad = corpus
    scan = scan_report(root / "train")
    found = {n.path.split("/")[-1]: n.text for n in scan.problems}
    assert set(found) == set(bad)
    for name, fragment in bad.items():
        assert fragment in found[name], (name, found[name])
    readable = {f.split("/")[-1] for f in scan.index.files}
    assert readable == {"ok.jpg", "t.tif", "p.png", *corpus[1]}  # .DS_Store ignored
    assert scan.index.shapes[scan.index.files.index(str(root / "train/odd/exif6.jpg"))] == (48, 40)


def test_unreadable_files_stop_the_run_unless_skipped_and_then_are_listed(corpus, caplog):
    root = corpus[0]
    with pytest.raises(DataError, match=r"^9 unreadable file\(s\) under .*--skip-unreadable.*truncated.jpg: truncated"):
        scan_splits(root)
    with caplog.at_level(logging.WARNING, logger="pipelines.scan"):
        train, val = scan_splits(root, skip_unreadable=True)
    assert len(train.skipped) == 9 and {s.split("/")[-1] for s in train.skipped} == set(corpus[2])
    assert "skipping 9 file(s)" in caplog.text and "notes.txt: not an image file" in caplog.text
    assert len(train) == 14 and len(val) == 2 and train.classes == val.classes == ("bad", "odd")


def test_full_decode_finds_the_same_files(corpus):
    scan = scan_report(corpus[0] / "train", full=True, workers=2)
    assert {n.path.split("/")[-1] for n in scan.problems} == set(corpus[2])


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"train/a/1.jpg": True, "train/b/.keep": False, "val/a/1.jpg": True, "val/b/1.jpg": True},
         "train/b: empty class folder"),
        ({"train/a/1.jpg": True, "val/c/1.jpg": True}, r"differ .*extra: \['c'\], missing: \['a'\]"),
        ({"train/a/1.jpg": True, "train/b/x.txt": False, "val/a/1.jpg": True, "val/b/1.jpg": True},
         "train/b: no readable image left"),
    ],
)
def test_layout_errors(tmp_path, layout, message):
    for rel, image in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if image:
            Image.fromarray(RGB).save(tmp_path / rel)
        else:
            (tmp_path / rel).write_text("")
    with pytest.raises(DataError, match=message):
        scan_splits(tmp_path, skip_unreadable=True)


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match=r"--data: .*nope: no such directory"):
        scan_splits(tmp_path / "nope")
    with pytest.raises(DataError, match="nope: no such directory"):
        scan_split(tmp_path / "nope")


def test_conversions_are_reported(corpus):
    scan = scan_report(corpus[0] / "train")
    notes = {n.path.split("/")[-1]: n.text for n in scan.conversions}
    assert notes == {"grey.jpg": "greyscale", "cmyk.jpg": "CMYK", "rgba.png": "alpha dropped",
                     "la.png": "greyscale, alpha dropped", "palette.png": "palette", "grey16.png": "16-bit greyscale",
                     "grey16.tif": "16-bit greyscale", "rgb16.tif": "16-bit RGB", "rgb16.png": "16-bit RGB",
                     "rgba.tif": "alpha dropped", "exif6.jpg": "EXIF orientation: rotated"}
    assert inspect_image(corpus[0] / "train/odd/grey.jpg") == (None, "greyscale", (40, 48))


def test_dali_and_torch_loaders_convert_alike(corpus):
    """DALI's decoders.image(output_type=RGB) converts these itself; open_rgb matches it."""
    d = corpus[0] / "train" / "odd"
    names = sorted(corpus[1])
    files = [str(d / n) for n in names if n != "exif6.jpg"]  # rotated: another shape, checked below
    kw = dict(batch_size=len(files), image_size=40, crop_pct=1.0)  # centre 40x40: no resampling
    xd, _ = next(iter(DaliLoader(files, [0] * len(files), **kw)))
    xt, _ = next(iter(TorchLoader(files, [0] * len(files), num_workers=0, **kw)))
    for i, f in enumerate(files):
        name = f.split("/")[-1]
        diff = (xd[i] - xt[i]).abs().max().item() * 255
        assert diff <= (1.0 if name.startswith("rgb16") else 0.0) + 1e-3, (name, diff)  # PIL keeps the high byte
        ref = corpus[1][name]
        if ref is not None:
            got = (xd[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(got, ref[:, 4:44]), name
    rotated = open_rgb(str(d / "exif6.jpg"))
    assert rotated.size == (40, 48)  # (width, height): turned a quarter
    x, _ = next(iter(DaliLoader([str(d / "exif6.jpg")], [0], batch_size=1, image_size=40, crop_pct=1.0)))
    ref = torch.from_numpy(np.array(rotated)).permute(2, 0, 1).float() / 255
    assert (x[0] - ref[:, 4:44]).abs().max() * 255 <= 1e-3
    assert np.abs(np.asarray(rotated).astype(int) - np.rot90(RGB, -1)).mean() < 2  # JPEG error only
