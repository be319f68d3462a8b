"""Shared fixtures: small data the tests make themselves, and the optional real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dali_bilevel.demo_data import make_shapes

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _scan_cache_in_a_temp_folder(tmp_path_factory: pytest.TempPathFactory):
    """Runs cache their file scans under $XDG_CACHE_HOME: keep the tests' out of the user's ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; `-m cuda` selects them)")
