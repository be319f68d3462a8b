"""Train on tiles of histology images (BACH-style): image-level scores by averaging each image's tiles.

    accelerate launch launch/bach.py --data ../shared/data/ucsb_breast_tiff --split-by slide \
        --tile-size 224 --tiles-per-image 8 --batch-size 64 --augment learned --output runs/bach

``--flip hv`` (vertical and horizontal flips) is the default predefined augmentation for tiles.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dali_bilevel.histology import TileConfig, TileData
from dali_bilevel.train import run_main


def summary(metrics: dict, cfg: TileConfig) -> str | None:
    last = metrics["epochs"][-1] if metrics.get("epochs") else {}
    if "test_image_acc" not in last:
        return None
    return (f"final test accuracy {last['test_image_acc']:.2f}% per image, {last['test_acc']:.2f}% per tile; "
            f"outputs in {cfg.output}")


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, TileConfig, TileData, summary)


if __name__ == "__main__":
    sys.exit(main())
