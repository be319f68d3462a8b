"""Shared fixtures: small data the tests make themselves, and the optional real data in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from dali_bilevel.demo_data import make_shapes

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x 8 train / 4 test rendered 32 px JPEGs."""
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=8, test_per_class=4, size=32)


def shared(sub: str) -> Path:
    """A folder of ../shared/data, or skip: the real-data cases need the workplace's data."""
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real data {path} is not on this machine (it lives in the workplace's shared/data)")
    return path
