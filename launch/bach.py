"""Train on tiles of histology images (BACH-style): image-level scores by averaging each image's tiles.

    accelerate launch launch/bach.py --data ../shared/data/ucsb_breast_tiff --split-by slide \
        --tile-size 224 --tiles-per-image 8 --batch-size 64 --augment learned --output runs/bach

``--flip hv`` (vertical and horizontal flips) is the default predefined augmentation for tiles.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import PartialState

from dali_bilevel.config import parse_config
from dali_bilevel.histology import TileConfig, TileData
from dali_bilevel.train import Diverged, Preempted, SetupError, training_function


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv, TileConfig)
    except ValueError as e:  # a flag TileConfig rejects
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        metrics = training_function(cfg, make_data=TileData)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM/SIGINT: the step finished and a checkpoint was written
        print(str(e), file=sys.stderr)
        return 0
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    last = metrics["epochs"][-1] if metrics.get("epochs") else {}
    if "test_image_acc" in last and PartialState().is_main_process:  # once, not once per process
        print(f"final test accuracy {last['test_image_acc']:.2f}% per image, {last['test_acc']:.2f}% per tile; "
              f"outputs in {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
