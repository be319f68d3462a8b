"""Run configuration: one dataclass, and the command line derived from it.

Defaults are the ImageNet setting (ResNet-18, 224 px, SGD 0.1 with momentum 0.9 and weight
decay 1e-4, batch 256, 90 epochs, cosine schedule); CIFAR-size runs override them on the command
line (see README).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

AUGMENT_MODES = ("learned", "predefined", "none", "stn", "randaugment", "trivialaugment")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # data
    data: str = _f(None, "ImageFolder root with train/<class>/ and val/<class>/ or test/<class>/", required=True)
    output: str = _f("runs/latest", "output folder for metrics.json and augmentation grids")
    loader: str = _f("dali", "data loader", choices=("dali", "torch"))
    dali_device: str = _f("auto", "where DALI decodes: auto (GPU when CUDA is usable), cpu or gpu",
                          choices=("auto", "cpu", "gpu"))
    workers: int = _f(2, "decode threads (DALI) or worker processes (torch) per process")
    image_size: int = _f(224, "square training and evaluation size in pixels")
    crop_pct: float = _f(0.875, "evaluation resize: shorter side to image_size / crop_pct, then centre crop")
    train_crop: str = _f("auto", "train crop: random-resized, centre, or auto (random for predefined)",
                         choices=("auto", "random", "center"))
    skip_unreadable: bool = _f(False, "skip unreadable image files (they are listed) instead of stopping")
    val_fraction: float = _f(0.2, "share of the training set re-drawn every epoch as the augmenter's validation split")
    # classifier
    model: str = _f("resnet18", "backbone: any timm model name, or cifar_resnet18[_w16], badgan_cnn[_w32]")
    weights: str | None = _f(None, "optional local weights file for the backbone (.pt/.pth/.safetensors)")
    epochs: int = _f(90, "training epochs")
    batch_size: int = _f(256, "global batch size, split evenly over processes")
    lr: float = _f(0.1, "classifier SGD learning rate")
    momentum: float = _f(0.9, "classifier SGD momentum")
    nesterov: bool = _f(False, "use Nesterov momentum")
    weight_decay: float = _f(1e-4, "classifier weight decay")
    schedule: str = _f("cosine", "learning-rate schedule", choices=("cosine", "onecycle", "constant"))
    warmup_epochs: float = _f(0.0, "linear warm-up epochs for the cosine schedule")
    mixed_precision: str = _f("no", "autocast precision (fp16 needs a GPU and uses dynamic loss scaling)",
                              choices=("no", "bf16", "fp16"))
    channels_last: bool = _f(True, "channels-last memory format for the classifier and its inputs")
    # augmentation
    augment: str = _f("learned", "augmentation: learned, predefined, none, stn (STN-invariant: the augmenter follows "
                      "the training loss and is applied at test time too), randaugment or trivialaugment (peer "
                      "baselines: DALI's RandAugment n=2 m=9 / TrivialAugment Wide on the train images, "
                      "--loader dali only), or frozen:PATH (a trained augmenter.pt applied as a fixed "
                      "augmentation, with no hypergradient)")
    transforms: str = _f("affine,color", "learned transform families: translation, affine, color")
    flip: str = _f("h", "predefined flips, applied in every mode but none: h, v, hv or none",
                   choices=("none", "h", "v", "hv"))
    translate_px: int = _f(0, "predefined mode: random translation of up to this many pixels")
    rotate_deg: float = _f(0.0, "predefined mode: random rotation of up to this many degrees (with --scale-range, "
                           "the paper's histology affine; translation then is continuous)")
    scale_range: str = _f("1,1", "predefined mode: isotropic zoom drawn log-uniformly in LO,HI (histology: 0.5,2)")
    color_jitter: float = _f(0.0, "predefined mode: brightness, contrast and saturation factors in 1 +- this "
                             "(AutoAugment's range: 0.9)")
    affine_magnitude: float = _f(0.0, "predefined mode: random affine, each entry of A - I uniform in +- this "
                                 "(the validated-magnitude baseline; 0.25 = 4 px shifts at 32 px)")
    holdout: float = _f(0.0, "baselines: hold out this share of the training set as one fixed validation split "
                        "(its accuracy is logged as val_acc, for choosing hyper-parameters such as a magnitude)")
    aug_size: str = _f("small", "augmenter MLP size", choices=("small", "medium", "large"))
    aug_optimizer: str = _f("adam", "augmenter optimizer", choices=("adam", "sgd"))
    aug_lr: float = _f(1e-3, "augmenter learning rate")
    aug_momentum: float = _f(0.9, "augmenter SGD momentum")
    aug_weight_decay: float = _f(0.0, "augmenter weight decay")
    center_hidden: bool = _f(True, "centre the augmenter's last hidden features over the batch")
    aug_init_translate_px: float = _f(0.0, "start the learned augmenter as a uniform random translation of +- "
                                      "this many pixels through a learnable noise path (0: start at identity)")
    padding_mode: str = _f("zeros", "warp padding", choices=("zeros", "border", "reflection"))
    warp_mode: str = _f("bilinear", "warp interpolation: bicubic blurs sub-pixel shifts far less than bilinear",
                        choices=("bilinear", "bicubic"))
    hypergrad: str = _f("exact", "hypergradient: exact double backward (switches to finite difference, with a "
                        "warning, if the model has an op without double backward) or finite difference",
                        choices=("exact", "finite_difference"))
    aug_period: int = _f(1, "J: update the augmenter every J classifier steps")
    unroll: int = _f(1, "K: unrolled classifier steps the hypergradient looks through (K <= J)")
    # run
    seed: int = _f(0, "random seed")
    cpu: bool = _f(False, "force CPU even when CUDA is available")
    max_steps_per_epoch: int = _f(0, "cap on steps per epoch, 0 for no cap (smoke tests)")
    resume: str = _f("none", "resume from a checkpoint: auto (OUT/checkpoints/latest if any), none, or a folder")
    checkpoint_every: int = _f(1000, "also checkpoint every N steps (always at epoch ends and on SIGTERM/SIGINT)")
    log_every: int = _f(0, "print a progress line every N steps (for logs without a progress bar)")
    tensorboard: bool = _f(True, "log scalars and the augmentation grid to TensorBoard under OUT/tensorboard")
    grid_every: int = _f(1, "write augmentations_epochNNN.png every this many epochs (0: never)")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.augment not in AUGMENT_MODES and not self.augment.startswith("frozen:"):
            raise ValueError(f"--augment: unknown mode {self.augment!r}; choose "
                             f"{', '.join(AUGMENT_MODES)} or frozen:PATH")
        try:
            lo, hi = (float(v) for v in self.scale_range.split(","))
        except ValueError:
            raise ValueError(f"--scale-range: expected LO,HI, got {self.scale_range!r}") from None
        if not 0 < lo <= hi:
            raise ValueError(f"--scale-range: need 0 < LO <= HI, got {self.scale_range!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout}")

    def scales(self) -> tuple[float, float]:
        lo, hi = (float(v) for v in self.scale_range.split(","))
        return lo, hi

    def resolved_train_crop(self) -> str:
        if self.train_crop != "auto":
            return self.train_crop
        return "random" if self.augment == "predefined" else "center"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser(config_cls: type = TrainConfig, description: str = __doc__ or "") -> argparse.ArgumentParser:
    """One ``--flag`` per dataclass field (``--no-flag`` for booleans); subclasses add their own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            continue
        typ = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument(flag, type=typ, default=f.default, **meta)
    return p


def parse_config(argv: list[str] | None = None, config_cls: type = TrainConfig) -> TrainConfig:
    return config_cls(**vars(build_parser(config_cls).parse_args(argv)))
