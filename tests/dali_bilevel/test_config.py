"""Presets: their values become the defaults, explicit flags still win, a wrong name is one clear error."""

from __future__ import annotations

import math

import pytest

from dali_bilevel.config import PRESETS, TrainConfig, parse_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_replaces_defaults(name: str) -> None:
    cfg = parse_config(["--data", "d", "--preset", name])
    for key, value in PRESETS[name].items():
        assert getattr(cfg, key) == value, key
    assert cfg.preset == name


def test_frequent_preset_values_and_explicit_flags_win() -> None:
    default = TrainConfig(data="d")
    cfg = parse_config(["--data", "d", "--preset", "frequent"])
    assert (cfg.aug_period, cfg.hyper_batch) == (2, 0.125)
    assert (default.aug_period, default.hyper_batch) == (8, 0.25)  # the preset is not the default
    assert cfg.warp_mode == default.warp_mode and cfg.val_fraction == default.val_fraction  # nothing else moves
    cfg = parse_config(["--data", "d", "--preset", "frequent", "--aug-period", "4"])
    assert (cfg.aug_period, cfg.hyper_batch) == (4, 0.125)


def test_unknown_preset_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--data", "d", "--preset", "fast"])
    assert "--preset" in capsys.readouterr().err


def test_hue_bound_takes_pi_data_or_radians() -> None:
    """``--hue-bound``: pi (the default, any rotation), data (resolved from the training images when the run
    starts) or radians in (0, pi]; anything else fails when the flags are read, naming the flag."""
    assert TrainConfig(data="d").hue_bound_rad() == math.pi
    assert parse_config(["--data", "d", "--hue-bound", "0.25"]).hue_bound_rad() == 0.25
    assert parse_config(["--data", "d", "--hue-bound", "data"]).hue_bound == "data"
    for bad in ("4", "0", "-1", "half"):
        with pytest.raises(ValueError, match="--hue-bound"):
            parse_config(["--data", "d", "--hue-bound", bad])
