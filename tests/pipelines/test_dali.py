"""DaliLoader's RandAugment/TrivialAugment baselines (DALI auto_aug), on CPU operators."""

import pytest
import torch

from dali_bilevel.config import TrainConfig
from pipelines import DaliLoader, find_splits
from pipelines.dali import AUTO_AUGMENTS
from tests.pipelines.test_loaders import pil_reference


@pytest.fixture(scope="module")
def batch8(shapes_dir):
    """8 of the 32 px shapes, two per class-ish: small enough that a pipeline builds in seconds."""
    train, _ = find_splits(shapes_dir)
    return list(train.files[::6][:8]), list(train.labels[::6][:8])


def first_batch(files, labels, **kw) -> torch.Tensor:
    x, y = next(iter(DaliLoader(files, labels, batch_size=8, image_size=32, crop_pct=1.0, device="cpu", **kw)))
    assert y.tolist() == labels
    return x


@pytest.fixture(scope="module")
def plain(batch8):
    return first_batch(*batch8, seed=1)


@pytest.mark.parametrize("name", AUTO_AUGMENTS)
def test_auto_augment_is_seeded_and_changes_images(batch8, plain, name):
    x = first_batch(*batch8, seed=1, auto_augment=name)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Still 8-bit pixels scaled to [0, 1]: the policy runs on uint8 before normalisation.
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-3)
    changed = [not torch.equal(a, b) for a, b in zip(x, plain, strict=True)]
    assert sum(changed) >= 2, changed  # one op per image may be identity-like, not most of them
    assert torch.equal(x, first_batch(*batch8, seed=1, auto_augment=name))  # same seed, same batch
    assert not torch.equal(x, first_batch(*batch8, seed=2, auto_augment=name))


def test_without_auto_augment_the_decode_is_unchanged(batch8, plain):
    files, labels = batch8
    assert torch.equal(plain, first_batch(files, labels, seed=1, auto_augment=None))
    ref = torch.stack([pil_reference(f) for f in files])
    assert (plain - ref).abs().max() * 255 <= 1.0 + 1e-3  # as test_loaders: one grey level at most
    # The random crop path too: an explicit None builds the same graph, so the same seeded crops.
    kw = dict(seed=5, crop="random")
    assert torch.equal(first_batch(files, labels, **kw), first_batch(files, labels, auto_augment=None, **kw))


def test_unknown_auto_augment_names_the_flag(batch8):
    with pytest.raises(ValueError, match="--augment: 'autoaugment' is not a DALI auto-augmentation"):
        first_batch(*batch8, auto_augment="autoaugment")


@pytest.mark.parametrize("name", AUTO_AUGMENTS)
def test_config_accepts_the_auto_augment_modes(name):
    assert TrainConfig(data="x", augment=name).augment == name
