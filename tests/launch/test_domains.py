"""The cross-domain runner's rows: each is a valid command line, and each says what its runs used."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

from dali_bilevel.config import TrainConfig, parse_config
from dali_bilevel.histology import TileConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
import domains  # a launch script, not a package

CONFIGS = {"imagenet": TrainConfig, "bach": TileConfig}


def parsed(domain_name: str, method: str) -> TrainConfig:
    d = domains.DOMAINS[domain_name]
    argv = ["--data", "x", *d.common, *d.epochs_flag(d.epochs), *domains.flags_for(d, method)]
    return parse_config(argv, CONFIGS[d.script])


@pytest.mark.parametrize("domain_name", sorted(domains.DOMAINS))
def test_every_row_parses_and_learned_rows_pin_their_augmenter_lr(domain_name: str) -> None:
    rows = {m: parsed(domain_name, m) for m in domains.METHODS}
    default = rows["learned_default"]
    assert default.aug_lr == TrainConfig.aug_lr == 4e-3  # the default row follows config.py
    assert rows["learned_random"].aug_lr == default.aug_lr and rows["learned_frozen"].aug_lr == 0
    # Rows run on the earlier default (docs/results.md) keep its 1e-3 when the default moves on.
    explicit = {"sel_lr3e-3": 3e-3, "sel_lr4e-3": 4e-3, "sel_lr1e-2": 1e-2, "learned_default": 4e-3,
                "learned_random": 4e-3, "learned_frozen": 0.0, "learned_default_on_randaugment": 4e-3,
                "learned_paper": 1e-3, "sel_lr4e-3_on_randaugment": 4e-3,
                "sel_lr4e-3_sharpness": 4e-3, "sel_lr4e-3_reflection": 4e-3, "sel_lr4e-3_border": 4e-3,
                "learned_zeros": 4e-3, "learned_random_zeros": 4e-3, "learned_tone": 4e-3,
                "sel_lr4e-3_reflection_tone": 4e-3, "learned_hue1": 4e-3, "sel_lr4e-3_reflection_hue1": 4e-3,
                "learned_huedata": 4e-3, "sel_lr4e-3_reflection_huedata": 4e-3,
                "learned_lr6e-3": 6e-3, "sel_lr6e-3_reflection": 6e-3, "learned_hb05": 4e-3,
                "sel_lr4e-3_reflection_hb05": 4e-3, "learned_erase": 4e-3, "sel_lr4e-3_reflection_erase": 4e-3,
                "learned_fixed": 4e-3, "sel_lr4e-3_reflection_fixed": 4e-3}
    # ... and the zero padding every row before the fifth round ran with.
    padding = {"learned_default": "reflection", "learned_random": "reflection", "sel_lr4e-3_reflection": "reflection",
               "sel_lr4e-3_border": "border", "learned_tone": "reflection", "sel_lr4e-3_reflection_tone": "reflection",
               "learned_hue1": "reflection", "sel_lr4e-3_reflection_hue1": "reflection",
               "learned_huedata": "reflection", "sel_lr4e-3_reflection_huedata": "reflection",
               "learned_lr6e-3": "reflection", "sel_lr6e-3_reflection": "reflection",
               "learned_hb05": "reflection", "sel_lr4e-3_reflection_hb05": "reflection",
               "learned_erase": "reflection", "sel_lr4e-3_reflection_erase": "reflection",
               "learned_fixed": "reflection", "sel_lr4e-3_reflection_fixed": "reflection"}
    assert default.padding_mode == TrainConfig.padding_mode == "reflection"
    for method, cfg in rows.items():
        if cfg.augment == "learned":
            assert cfg.aug_lr == explicit.get(method, 1e-3), method
            assert cfg.padding_mode == padding.get(method, "zeros"), method


@pytest.mark.parametrize(("row", "ref", "setting", "values"), [
    # sixth round: the colour family without hue
    ("learned_tone", "learned_default", "transforms", ("affine,tone", "affine,color")),
    ("sel_lr4e-3_reflection_tone", "sel_lr4e-3_reflection", "transforms", ("affine,tone", "affine,color")),
    # seventh round: hue at slope 1
    ("learned_hue1", "learned_default", "hue_slope", (1.0, math.pi)),
    ("sel_lr4e-3_reflection_hue1", "sel_lr4e-3_reflection", "hue_slope", (1.0, math.pi)),
    # eighth round: hue bounded by the training images' hue spread
    ("learned_huedata", "learned_default", "hue_bound", ("data", "pi")),
    ("sel_lr4e-3_reflection_huedata", "sel_lr4e-3_reflection", "hue_bound", ("data", "pi")),
    # ninth round: θ's Adam at 6e-3
    ("learned_lr6e-3", "learned_default", "aug_lr", (6e-3, 4e-3)),
    ("sel_lr6e-3_reflection", "sel_lr4e-3_reflection", "aug_lr", (6e-3, 4e-3)),
    # ... or half the batch in the hypergradient
    ("learned_hb05", "learned_default", "hyper_batch", (0.5, 0.25)),
    ("sel_lr4e-3_reflection_hb05", "sel_lr4e-3_reflection", "hyper_batch", (0.5, 0.25)),
    # tenth round: the Cutout-like erase family on top
    ("learned_erase", "learned_default", "transforms", ("affine,color,erase", "affine,color")),
    ("sel_lr4e-3_reflection_erase", "sel_lr4e-3_reflection", "transforms", ("affine,color,erase", "affine,color")),
    # ... or the look-ahead's length held at the real step's
    ("learned_fixed", "learned_default", "lookahead_length", ("fixed", "free")),
    ("sel_lr4e-3_reflection_fixed", "sel_lr4e-3_reflection", "lookahead_length", ("fixed", "free")),
])
def test_a_candidate_row_changes_one_setting_against_its_reference(
        row: str, ref: str, setting: str, values: tuple[object, object]) -> None:
    """A selection round's rows change the one setting under test and nothing else against what they are
    compared with (the references keep the affine and colour families)."""
    keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in (setting, "output", "seed")]
    a, b = parsed("cifar", row), parsed("cifar", ref)
    assert (getattr(a, setting), getattr(b, setting)) == values
    assert b.transforms == "affine,color"
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys], row


def test_the_frequent_row_is_its_selection_candidate() -> None:
    """`--preset frequent` must keep measuring what `sel_j2_hb8` chose (J=2, an eighth, Adam 1e-3)."""
    a, b = parsed("cifar", "learned_frequent"), parsed("cifar", "sel_j2_hb8")
    keys = ("aug_period", "hyper_batch", "aug_lr", "warp_mode", "val_fraction", "transforms", "unroll")
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys]


def _finished_run(folder: Path, acc: float, wall: float, loss: float) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "config": {"epochs": 2}, "test_acc": acc, "wall_time_s": wall,
        "epochs": [{"train_loss": 2 * loss}, {"train_loss": loss}]}))


def test_merge_keeps_the_csv_rows_of_runs_whose_folders_are_gone(tmp_path: Path) -> None:
    """`--merge`: a new method's runs join the CSV; earlier rows (no folder any more) keep their values,
    including rows of methods not asked for, and the wall ratio uses the CSV's learned_default times."""
    csv_path = tmp_path / "domains.csv"
    csv_path.write_text("domain,method,seed,test_acc,wall_s,epochs,test_tile_acc,final_train_loss\n"
                        "cifar,learned_default,0,70.0,100.0,2,,0.5\n"
                        "cifar,none,0,58.0,90.0,2,,0.001\n"
                        "ucmerced,none,0,74.0,80.0,2,,0.01\n")
    _finished_run(tmp_path / "runs" / "cifar" / "new_s0", 72.25, 150.0, 0.4)
    md = domains.table(tmp_path / "runs", ["cifar"], ["learned_default", "new"], [0], csv_path, merge=True)
    assert "| learned_default | 70.0 | 70.0 ± 0.0 | 1.00x | 0.500 |" in md
    assert "| new | 72.2 | 72.2 ± 0.0 | 1.50x | 0.400 |" in md
    with open(csv_path, newline="") as fh:
        got = {(r["domain"], r["method"], r["seed"]): (r["test_acc"], r["wall_s"]) for r in csv.DictReader(fh)}
    assert got == {("cifar", "learned_default", "0"): ("70.0", "100.0"), ("cifar", "new", "0"): ("72.25", "150.0"),
                   ("cifar", "none", "0"): ("58.0", "90.0"), ("ucmerced", "none", "0"): ("74.0", "80.0")}


def test_merge_needs_an_existing_csv(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no earlier table"):
        domains.table(tmp_path, ["cifar"], ["none"], [0], tmp_path / "missing.csv", merge=True)


@pytest.mark.parametrize(("diffs", "p"), [([1.0, 2.0, 3.0], 0.25), ([3.0, -1.0], 1.0), ([4.0, 1.0, -1.0], 0.75),
                                          ([2.6, 1.4, -0.2, -3.3, 7.7], 0.5), ([0.4] * 5, 0.0625)])
def test_sign_flip_p_counts_the_sign_patterns_at_least_as_extreme(diffs: list[float], p: float) -> None:
    """By hand: [4, 1, −1] has mean 4/3; the patterns ±4±1±1 with |sum| ≥ 4 are 6 of 8. Five equal leads give
    the least p five seeds can give, 2/32."""
    assert domains.sign_flip_p(diffs) == p


def test_sign_flip_p_agrees_with_a_brute_force_over_itertools() -> None:
    import itertools
    import random
    rng = random.Random(0)
    for n in range(1, 8):
        d = [round(rng.uniform(-5, 5), 1) for _ in range(n)]
        obs = abs(sum(d))
        want = sum(abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= obs - 1e-9
                   for signs in itertools.product((1, -1), repeat=n)) / 2 ** n
        assert domains.sign_flip_p(d) == pytest.approx(want, abs=0)
    with pytest.raises(ValueError):
        domains.sign_flip_p([])


def test_paired_table_gives_the_reference_lead_per_seed_image_and_tile(tmp_path: Path) -> None:
    """Only seeds both methods finished are paired; UCSB gets a per-tile row too; the lead is ref − method."""
    csv_path = tmp_path / "domains.csv"
    csv_path.write_text("domain,method,seed,test_acc,wall_s,epochs,test_tile_acc,final_train_loss\n"
                        "ucsb,learned_default,0,73.7,100.0,2,62.3,0.5\n"
                        "ucsb,learned_default,1,75.0,100.0,2,60.0,0.5\n"
                        "ucsb,learned_default,2,58.3,100.0,2,59.0,0.5\n"
                        "ucsb,none,0,73.7,80.0,2,65.0,0.5\n"
                        "ucsb,none,1,66.7,80.0,2,61.0,0.5\n")
    (tmp_path / "runs" / "ucsb").mkdir(parents=True)
    md = domains.table(tmp_path / "runs", ["ucsb"], ["none", "learned_default"], [0, 1, 2], csv_path, merge=True,
                       paired="learned_default")
    assert "| none | +0.0 / +8.3 | +4.1 ± 5.9 | 1 of 2 | 1 |" in md  # 75.0 − 66.7 = 8.29..: all four patterns reach it
    assert "| none (per tile) | -2.7 / -1.0 | -1.9 ± 1.2 | 0 of 2 | 0.5 |" in md
    assert "| learned_default |" in md.split("− method")[0]  # the reference is not paired with itself
    assert md.count("| learned_default |") == 1
