"""Tile loaders: every tile is exactly the crop of a tifffile decode at its anchor; labels, groups, shards;
DALI's RandAugment/TrivialAugment on training tiles, drawn per tile."""

import numpy as np
import pytest
import tifffile
import torch

from pipelines.dali import AUTO_AUGMENTS
from pipelines.tiles import DaliTileLoader, TorchTileLoader, grid_anchors, grid_shape, random_anchors
from tests.conftest import shared

LOADERS = [DaliTileLoader, TorchTileLoader]
SHAPES = [(96, 128), (96, 128), (80, 112), (96, 128)]  # the third is smaller: its grid is cut short


@pytest.fixture(scope="module")
def tiffs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiffs")
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate(SHAPES):
        f = d / f"img{i}.tif"
        tifffile.imwrite(f, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), photometric="rgb")
        files.append(str(f))
    return files


def make(cls, files, **kw):
    extra = {"num_workers": 0} if cls is TorchTileLoader else {}
    return cls(files, [0, 1, 0, 1][: len(files)], **{"images_per_batch": 2, "tile_size": 32, **kw, **extra})


def assert_exact_crops(loader, files):
    seen = []
    for tiles, anchors, valid, pos in loader.raw_batches():
        assert tiles.dtype == torch.float32 and tiles.shape[2:] == (3, 32, 32)
        tiles = (tiles * 255).round().to(torch.uint8)  # [0, 1] floats of 8-bit samples: exact round trip
        for b, p in enumerate(pos.tolist()):
            ref = torch.from_numpy(tifffile.imread(files[p])).permute(2, 0, 1)
            for k, (y, x) in enumerate(anchors[b].tolist()):
                assert torch.equal(tiles[b, k], ref[:, y : y + 32, x : x + 32]), (p, k, y, x)
            seen.append((p, anchors[b], valid[b]))
    return seen


@pytest.mark.parametrize("cls", LOADERS)
def test_random_tiles_are_exact_crops_anywhere_in_the_image(tiffs, cls):
    seen = assert_exact_crops(make(cls, tiffs, positions="random", tiles_per_image=16, seed=5), tiffs)
    assert [p for p, *_ in seen] == [0, 1, 2, 3]
    anchors = torch.cat([a for _, a, _ in seen]).float()
    assert anchors.min() >= 0 and anchors[:, 0].max() <= 96 - 32 and anchors[:, 1].max() <= 128 - 32
    assert anchors[:, 1].std() > 15 and len({tuple(a) for a in anchors.tolist()}) > 50  # spread, not one spot
    assert all(v.all() for *_, v in seen)
    again = assert_exact_crops(make(cls, tiffs, positions="random", tiles_per_image=16, seed=5), tiffs)
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(seen, again, strict=True))  # seeded


@pytest.mark.parametrize("cls", LOADERS)
def test_grid_tiles_cover_the_grid_and_flag_what_does_not_fit(tiffs, cls):
    seen = assert_exact_crops(make(cls, tiffs, positions="grid", stride=24), tiffs)
    rows, cols = grid_shape(96, 128, 32, 24)
    assert (rows, cols) == (3, 5)
    for p, anchors, valid in seen:
        h, w = SHAPES[p]
        expect = grid_anchors(rows, cols, 24)
        assert torch.equal(anchors, torch.from_numpy(np.minimum(expect, [h - 32, w - 32])).long())
        assert torch.equal(valid, torch.from_numpy((expect <= [h - 32, w - 32]).all(1)))
    assert int(seen[2][2].sum()) == 3 * 4 and int(seen[0][2].sum()) == 15


@pytest.mark.parametrize("cls", LOADERS)
def test_batches_are_float_tiles_with_image_labels_and_groups(tiffs, cls):
    loader = make(cls, tiffs, positions="grid", stride=24, groups=[10, 11, 12, 13], num_groups=14)
    assert len(loader) == 2 and loader.num_groups == 14
    xs, ys, gs = zip(*loader, strict=True)
    x, y, g = torch.cat(xs), torch.cat(ys), torch.cat(gs)
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert g.tolist() == [gr for gr in (10, 11, 12, 13) for _ in range(15)]
    assert y[:30].tolist() == [0] * 15 + [1] * 15
    assert (y[30:45] == -1).sum() == 15 - 12 and set(y[30:45].tolist()) == {-1, 0}  # cut-short grid masked
    ref = torch.from_numpy(tifffile.imread(tiffs[1])[:32, 24:56]).permute(2, 0, 1)
    assert torch.equal((x[16] * 255).round().to(torch.uint8), ref)


@pytest.mark.parametrize("cls", LOADERS)
def test_shards_split_the_images(tiffs, cls):
    parts = [[int(p) for *_, pos in make(cls, tiffs, images_per_batch=1, shard_id=s, num_shards=2).raw_batches()
              for p in pos] for s in range(2)]
    assert parts == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="do not split into 2 shards"):
        make(cls, tiffs[:3], images_per_batch=1, num_shards=2)


def test_bad_arguments(tiffs):
    with pytest.raises(ValueError, match=r"img0.tif: 96x128 px is smaller than the 100 px tile"):
        make(DaliTileLoader, tiffs, tile_size=100)
    with pytest.raises(ValueError, match="unknown tile positions"):
        make(DaliTileLoader, tiffs, positions="spiral")
    with pytest.raises(ValueError, match="--eval-stride"):
        grid_shape(96, 128, 32, 0)
    a = random_anchors(np.array([[0.0, 0.999999], [0.5, 0.5]]), 96, 128, 32)
    assert a.tolist() == [[0, 96], [32, 48]]


def test_real_histology_tiffs_decode_exactly():
    files = sorted(str(p) for p in shared("tiny/histology_tiff").glob("*/*.tif"))
    loader = DaliTileLoader(files, [0, 1], images_per_batch=2, tile_size=224, positions="grid")
    assert loader.tiles_per_image == (768 // 224) * (896 // 224) == 12
    seen = 0
    for tiles, anchors, _, pos in loader.raw_batches():
        tiles = (tiles * 255).round().to(torch.uint8)
        for b, p in enumerate(pos.tolist()):
            ref = torch.from_numpy(tifffile.imread(files[p])).permute(2, 0, 1)
            for k, (y, x) in enumerate(anchors[b].tolist()):
                assert torch.equal(tiles[b, k], ref[:, y : y + 224, x : x + 224])
                seen += 1
    assert seen == 24


def reference_crops(files, anchors, pos, t=32) -> torch.Tensor:
    """``(B, K, 3, t, t)`` uint8: the tifffile crops at the loader's anchors."""
    refs = [torch.from_numpy(tifffile.imread(files[p])).permute(2, 0, 1) for p in pos.tolist()]
    return torch.stack([torch.stack([r[:, y : y + t, x : x + t] for y, x in a.tolist()]) for r, a in zip(refs, anchors,
                                                                                                     strict=True)])


def policy_tiles(files, name, seed, **kw) -> list[tuple[torch.Tensor, ...]]:
    return list(make(DaliTileLoader, files, positions="random", tiles_per_image=8, seed=seed, auto_augment=name,
                     device="cpu", **kw).raw_batches())


@pytest.mark.parametrize("name", AUTO_AUGMENTS)
def test_auto_augment_changes_random_tiles_and_is_seeded(tiffs, name):
    got = policy_tiles(tiffs, name, seed=5)
    assert [p for *_, pos in got for p in pos.tolist()] == [0, 1, 2, 3]
    changed = []
    for tiles, anchors, valid, pos in got:
        assert tiles.shape == (2, 8, 3, 32, 32) and tiles.dtype == torch.float32
        assert 0.0 <= tiles.min() and tiles.max() <= 1.0 and valid.all()
        # still 8-bit samples scaled to [0, 1]: the policy runs on the uint8 tiles before normalisation
        assert torch.allclose(tiles * 255, (tiles * 255).round(), atol=1e-3)
        u8 = (tiles * 255).round().to(torch.uint8)
        changed += (u8 != reference_crops(tiffs, anchors, pos)).flatten(2).any(-1).flatten().tolist()
    assert sum(changed) > len(changed) / 2, changed  # an identity-like draw may leave a tile, not most of them
    again = policy_tiles(tiffs, name, seed=5)
    assert all(torch.equal(a, b) for x, y in zip(got, again, strict=True) for a, b in zip(x, y, strict=True))
    other = policy_tiles(tiffs, name, seed=6)
    assert not any(torch.equal(x[0], y[0]) for x, y in zip(got, other, strict=True))


@pytest.fixture(scope="module")
def one_tile_images(tmp_path_factory):
    """4 TIFFs of exactly one 32 px tile: every random tile of an image is the same crop until the policy."""
    d = tmp_path_factory.mktemp("one_tile")
    rng = np.random.default_rng(1)
    files = []
    for i in range(4):
        f = d / f"t{i}.tif"
        tifffile.imwrite(f, rng.integers(40, 200, (32, 32, 3), dtype=np.uint8), photometric="rgb")
        files.append(str(f))
    return files


@pytest.mark.parametrize("name", AUTO_AUGMENTS)
def test_auto_augment_draws_per_tile_not_per_image(one_tile_images, name):
    """The 8 tiles of an image are one crop (anchor (0, 0)); one draw shared by the image would leave them
    all equal, as DALI's policy does to the frames of one FHWC sample."""
    plain = policy_tiles(one_tile_images, None, seed=3)
    assert all(torch.equal(t, t[:, :1].expand_as(t)) for t, *_ in plain)  # the premise: identical crops
    for tiles, anchors, *_ in policy_tiles(one_tile_images, name, seed=3):
        assert (anchors == 0).all()
        for image in tiles:
            distinct = len({tuple(tile.flatten().tolist()) for tile in (image * 255).round().to(torch.uint8)})
            assert distinct >= 4, (name, distinct)  # of 8 tiles; 1 if the image's tiles shared a draw


def test_auto_augment_is_for_random_tiles_and_named_policies(tiffs):
    with pytest.raises(ValueError, match="never the evaluation grid"):
        make(DaliTileLoader, tiffs, positions="grid", auto_augment="randaugment")
    with pytest.raises(ValueError, match="--augment: 'autoaugment' is not a DALI auto-augmentation"):
        make(DaliTileLoader, tiffs, auto_augment="autoaugment")
