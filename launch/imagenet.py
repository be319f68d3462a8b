"""Train a classifier with learned, predefined or no augmentation on an ImageFolder data set.

    accelerate launch launch/imagenet.py --data DIR --model resnet18 --augment learned \
        --transforms affine,color --epochs 90 --batch-size 256 --image-size 224 --output runs/r18
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import PartialState

from dali_bilevel.config import parse_config
from dali_bilevel.train import Diverged, Preempted, SetupError, training_function


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ValueError as e:  # a flag TrainConfig rejects
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        metrics = training_function(cfg)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM/SIGINT: the step finished and a checkpoint was written
        print(str(e), file=sys.stderr)
        return 0
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "test_acc" in metrics and PartialState().is_main_process:  # the summary once, not once per process
        print(f"final test accuracy {metrics['test_acc']:.2f}%; outputs in {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
