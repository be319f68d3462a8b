"""launch/scan_data.py: the scan run alone lists every unreadable file and every conversion."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.pipelines.test_scan import RGB, write_bad, write_convertible

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import scan_data  # noqa: E402


def test_clean_folder_passes_as_a_script(shapes_dir, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # --scan-cache auto
    for second in (False, True):
        r = subprocess.run([sys.executable, str(ROOT / "launch" / "scan_data.py"), str(shapes_dir)],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("train: 48 readable image(s) in 6 class(es), 0 unreadable, 0 converted")
        assert "test: 24 readable image(s) in 6 class(es), 0 unreadable" in r.stdout
        assert (f"48 from the cache {tmp_path}/dali-bilevel/scan-" in r.stdout) == second


def test_the_cache_finds_a_file_broken_since(tmp_path, capsys):
    for split in ("train", "val"):
        for cls in "ab":
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(RGB).save(tmp_path / "d" / split / cls / f"{i}.png")
    args = [str(tmp_path / "d"), "--scan-cache", str(tmp_path / "cache")]
    assert scan_data.main(args) == 0
    capsys.readouterr()
    broken = tmp_path / "d" / "train" / "b" / "1.png"
    broken.write_bytes(broken.read_bytes()[:-30])
    assert scan_data.main(args) == 1
    out = capsys.readouterr().out
    assert f"UNREADABLE {broken}: truncated PNG" in out and "5 from the cache" in out


def test_bad_files_are_listed_and_fail(tmp_path, capsys):
    write_bad(tmp_path / "train" / "a")
    expected = write_convertible(tmp_path / "train" / "b")
    for cls in "ab":
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.fromarray(RGB).save(tmp_path / "val" / cls / "x.png")
    assert scan_data.main([str(tmp_path), "--full", "--scan-cache", "none"]) == 1
    out, err = capsys.readouterr()
    assert out.count("UNREADABLE") == 9 and f"UNREADABLE {tmp_path}/train/a/truncated.tif: truncated TIFF" in out
    assert f"train: {3 + len(expected)} readable image(s) in 2 class(es), 9 unreadable, 11 converted" in out
    assert "converted: 2 x 16-bit greyscale" in out and "converted: 1 x CMYK" in out
    assert "val: 2 readable image(s)" in out and "--skip-unreadable" in err


def test_tile_layout_and_layout_errors(tmp_path, capsys):
    (tmp_path / "tiles" / "benign").mkdir(parents=True)
    Image.fromarray(RGB).save(tmp_path / "tiles" / "benign" / "x.tif")
    assert scan_data.main([str(tmp_path / "tiles"), "--scan-cache", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.startswith("tiles: 1 readable image(s) in 1 class(es)")
    assert scan_data.main([str(tmp_path / "missing"), "--scan-cache", "none"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such directory"
    for split, cls in (("train", "a"), ("val", "b")):
        (tmp_path / "d" / split / cls).mkdir(parents=True)
        Image.fromarray(RGB).save(tmp_path / "d" / split / cls / "x.png")
    assert scan_data.main([str(tmp_path / "d"), "--scan-cache", "none"]) == 2
    assert "class folders differ from the training split's (extra: ['b'], missing: ['a'])" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [[], ["--full"]])
def test_real_imagenet_sample(flag, capsys):
    from tests.conftest import shared

    root = shared("tiny/imagenet_sample")
    assert scan_data.main([str(root), *flag, "--scan-cache", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("imagenet_sample: 10 readable image(s) in 10 class(es), 0 unreadable, 1 converted")
    assert "n03417042" in out and ": greyscale" in out
