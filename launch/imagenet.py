"""Train a classifier with learned, predefined or no augmentation on an ImageFolder data set.

    accelerate launch launch/imagenet.py --data DIR --model resnet18 --augment learned \
        --transforms affine,color --epochs 90 --batch-size 256 --image-size 224 --output runs/r18
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import FolderData
from dali_bilevel.train import run_main


def summary(metrics: dict, cfg: TrainConfig) -> str | None:
    return f"final test accuracy {metrics['test_acc']:.2f}%; outputs in {cfg.output}" if "test_acc" in metrics else None


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, TrainConfig, FolderData, summary)


if __name__ == "__main__":
    sys.exit(main())
