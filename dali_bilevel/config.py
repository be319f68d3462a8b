"""Run configuration: one dataclass, and the command line derived from it.

Defaults are the ImageNet setting (ResNet-18, 224 px, SGD 0.1 with momentum 0.9 and weight
decay 1e-4, batch 256, 90 epochs, cosine schedule); CIFAR-size runs override them on the command
line (see README).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

AUGMENT_MODES = ("learned", "predefined", "none", "stn", "randaugment", "trivialaugment")

#: Named settings (``--preset``): their values replace the defaults; flags given explicitly still win.
PRESETS: dict[str, dict[str, Any]] = {
    # Mounsaveng et al.'s setting: a 20% hold-out as validation, exact K = J = 1 on the full batch, the
    # augmenter starting at the identity, bilinear warps, zero padding. Kept one flag away for reproduction; the
    # defaults differ where measured better (README, docs/results.md). The augmenter's optimizer is Adam
    # 1e-3 (an update every step needs no larger one): the seed code's SGD 0.2 diverged here
    # (translations of 40 px within 8 updates).
    "paper": {"val_fraction": 0.2, "aug_period": 1, "unroll": 1, "hyper_batch": 1.0, "hypergrad": "exact",
              "transforms": "affine,color", "aug_init_translate_px": 0.0, "warp_mode": "bilinear",
              "base_augment": "none", "aug_lr": 1e-3, "padding_mode": "zeros"},
    # θ updated every 2 classifier steps on an eighth of the batch: 4x the default's θ updates for half
    # the images each. Best of the candidates on the selection splits (three seeds each, CIFAR and UC
    # Merced: docs/results.md), but 1.5x a plain step against the default's 1.2x
    # (docs/benchmarks/step_cpu.md): one flag away for when accuracy is worth that time. Adam 1e-3, as
    # measured: the default's 4e-3 makes up for J=8's fewer updates, which this preset has not; zero
    # padding, as measured (the default's reflection came later).
    "frequent": {"aug_period": 2, "hyper_batch": 0.125, "aug_lr": 1e-3, "padding_mode": "zeros"},
}


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
    workers: int = _f(0, "decode threads (DALI) or worker processes (torch) per process; 0: auto, this process's "
                      "share of the CPUs (at most 4 DALI threads when it decodes on a GPU, DALI's ResNet-50 example)")
    image_size: int = _f(224, "square training and evaluation size in pixels")
    crop_pct: float = _f(0.875, "evaluation resize: shorter side to image_size / crop_pct, then centre crop")
    train_crop: str = _f("auto", "train crop: random-resized, centre, or auto (random for predefined, and for the "
                         "other augmenting modes from 128 px up: ImageNet; centre for small images)",
                         choices=("auto", "random", "center"))
    skip_unreadable: bool = _f(False, "skip unreadable image files (they are listed) instead of stopping")
    val_fraction: float = _f(0.0, "share of the training set re-drawn every epoch as the augmenter's validation split "
                             "(0: the classifier trains on everything and validation batches are other random "
                             "batches of it; measured better on small data, docs/results.md; the paper: 0.2)")
    eval_val_every: int = _f(0, "score the validation split (the augmenter's, or --holdout's) every N epochs and "
                             "at the last one (0: never, except a --holdout run's last epoch, which chooses with it)")
    scan_cache: str = _f("auto", "folder for the cached file scan, shared by all processes (auto: "
                         "$XDG_CACHE_HOME/dali-bilevel or ~/.cache/dali-bilevel; none: scan every time)")
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
    mixed_precision: str = _f("auto", "autocast precision of plain steps and evaluation: auto (bf16 on a GPU that "
                              "has it, else no), no, bf16, or fp16 (GPU only; dynamic loss scaling)",
                              choices=("auto", "no", "bf16", "fp16"))
    channels_last: bool = _f(True, "channels-last memory format for the classifier and its inputs")
    # augmentation
    augment: str = _f("learned", "augmentation: learned, predefined, none, stn (STN-invariant: the augmenter follows "
                      "the training loss and is applied at test time too), randaugment or trivialaugment (peer "
                      "baselines: DALI's RandAugment n=2 m=9 / TrivialAugment Wide on the train images, "
                      "--loader dali only), or frozen:PATH (a trained augmenter.pt applied as a fixed "
                      "augmentation, with no hypergradient)")
    transforms: str = _f("affine,color", "learned transform families: translation, affine, color, tone (color "
                         "without hue), sharpness, erase (a Cutout-like box of learned opacity and size)")
    base_augment: str = _f("none", "learned and STN runs: a DALI policy applied to the train images before the "
                           "learned one (the validation stream stays clean)",
                           choices=("none", "randaugment", "trivialaugment"))
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
    aug_lr: float = _f(4e-3, "augmenter learning rate (4e-3: with J=8, a quarter as many theta updates as "
                       "--preset frequent, each 4x larger; best on the selection splits, docs/results.md)")
    aug_momentum: float = _f(0.9, "augmenter SGD momentum")
    aug_weight_decay: float = _f(0.0, "augmenter weight decay")
    center_hidden: bool = _f(True, "centre the augmenter's last hidden features over the batch")
    aug_init_translate_px: float = _f(0.0, "start the learned augmenter as a uniform random translation of +- "
                                      "this many pixels through a learnable noise path (0: start at identity)")
    padding_mode: str = _f("reflection", "what the warp shows where the image leaves the frame: reflection (mirrored "
                           "content; best on the selection splits, docs/results.md), zeros (black borders no test "
                           "image has: the paper's and kornia's), or border (edge pixels repeated)",
                           choices=("zeros", "border", "reflection"))
    warp_mode: str = _f("bicubic", "warp interpolation: bicubic blurs sub-pixel shifts far less than bilinear",
                        choices=("bilinear", "bicubic"))
    hue_slope: float = _f(math.pi, "slope at 0 of the learned hue rotation, pi*tanh(v*s/pi): pi (the default) moves "
                          "hue pi times as far per theta step as every other colour parameter; 1 gives hue the "
                          "others' slope")
    hue_bound: str = _f("pi", "largest learned hue rotation in radians, b*tanh(v*s/b): pi (the default: any "
                        "rotation), a number in (0, pi], or data: the circular standard deviation of the training "
                        "images' mean hues (pipelines/colour_stats.py; about 0.2 rad on H&E histology, 0.9-1.4 "
                        "on aerial and natural photographs), so that no learned rotation leaves the hues the "
                        "domain's images show")
    hypergrad: str = _f("exact", "hypergradient: exact (switches to finite difference, with a warning, if the "
                        "model has an op without double backward) or finite difference",
                        choices=("exact", "finite_difference"))
    hypergrad_products: str = _f("auto", "how exact mode forms its second-order products: forward (a forward-mode "
                                 "tangent pass: 0.7-0.9x the time and one parameter copy less with a hyper-batch; "
                                 "checked once per run against double, which it falls back to, with a note), "
                                 "double (double backward), or auto: forward with a hyper-batch, double on the full "
                                 "batch, where the real pass's graph is reused", choices=("auto", "forward", "double"))
    aug_period: int = _f(8, "J: update the augmenter every J classifier steps (8: 1.2-1.3x a plain step's cost, "
                         "docs/benchmarks/step_cpu.md; the paper: 1)")
    unroll: int = _f(1, "K: unrolled classifier steps the hypergradient looks through (K <= J)")
    hyper_batch: float = _f(0.25, "share of the train batch whose second-order products form the hypergradient, "
                            "and the validation batch's size (the real step keeps the full batch); 1: the paper")
    hypergrad_precision: str = _f("fp32", "the unrolled steps, validation pass and second-order products: fp32 (TF32 "
                                  "off; cosine > 0.99 to float64) or autocast (the --mixed-precision, faster, cosine "
                                  "0.6-0.9 in bf16)", choices=("fp32", "autocast"))
    lookahead_length: str = _f("free", "the look-ahead step's length under theta: free (the paper: theta may lengthen "
                               "the step, so a harder train batch is rewarded for its larger step alone) or fixed "
                               "(held at the real step's: theta only turns it; dali_bilevel/hypergrad.py)",
                               choices=("free", "fixed"))
    hypergrad_control: str = _f("none", "ablation: random replaces the hypergradient by a random direction of the "
                                "same norm", choices=("none", "random"))
    preset: str = _f("none", "a named setting whose values become the defaults (explicit flags still win): "
                     "paper (20%% hold-out, exact K=J=1 on the full batch, identity start, bilinear, zero padding, "
                     "Adam 1e-3); "
                     "frequent (J=2 on an eighth of the batch, Adam 1e-3: 4x the theta updates, 1.5x a plain step)",
                     choices=("none", *PRESETS))
    # run
    seed: int = _f(0, "random seed")
    cpu: bool = _f(False, "force CPU even when CUDA is available")
    max_steps_per_epoch: int = _f(0, "cap on steps per epoch, 0 for no cap (smoke tests)")
    resume: str = _f("none", "resume from a checkpoint: auto (OUT/checkpoints/latest if any), none, or a folder")
    checkpoint_every: int = _f(1000, "also checkpoint every N steps (always at epoch ends and on SIGTERM/SIGINT)")
    log_every: int = _f(50, "read the loss on the host every N steps: progress bar, TensorBoard, the stop flag of "
                        "multi-process runs, and a line when there is no progress bar (0: never)")
    cudnn_benchmark: bool = _f(True, "let cuDNN pick the fastest convolution algorithms (GPU; fixed input sizes)")
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
        if not 0.0 < self.hyper_batch <= 1.0:
            raise ValueError(f"--hyper-batch must be in (0, 1], got {self.hyper_batch}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.hue_bound != "data":
            self.hue_bound_rad()  # a bad value fails here, not when the augmenter is built

    def hue_bound_rad(self) -> float:
        """``--hue-bound`` in radians (``data`` is resolved from the training images before this is read)."""
        if self.hue_bound == "pi":
            return math.pi
        try:
            b = float(self.hue_bound)
        except ValueError:
            raise ValueError(f"--hue-bound: expected pi, data or a number of radians, got {self.hue_bound!r}") from None
        if not 0 < b <= math.pi:
            raise ValueError(f"--hue-bound: must be in (0, pi] radians, got {self.hue_bound!r}")
        return b

    def resolved_precision(self, device_type: str) -> str:
        """``--mixed-precision auto``: bf16 on a GPU with bf16 support, float32 on the CPU (where bf16 is slow)."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        import torch

        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"

    def scales(self) -> tuple[float, float]:
        lo, hi = (float(v) for v in self.scale_range.split(","))
        return lo, hi

    def resolved_train_crop(self) -> str:
        """Random-resized crops for predefined, and for every augmenting mode on ImageNet-size images
        (centre crops alone overfit there); centre crops keep small images (CIFAR) whole."""
        if self.train_crop != "auto":
            return self.train_crop
        if self.augment == "predefined" or (self.augment != "none" and self.image_size >= 128):
            return "random"
        return "center"

    def loader_policy(self) -> str | None:
        """The DALI auto-augmentation of the classifier's train stream, if any."""
        if self.augment in ("randaugment", "trivialaugment"):
            return self.augment
        return self.base_augment if self.base_augment != "none" and self.augment in ("learned", "stn") else None

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
    """Parse the command line; a ``--preset``'s values replace the defaults before the flags are read."""
    parser = build_parser(config_cls)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="none", choices=("none", *PRESETS))
    known, _ = first.parse_known_args(argv)
    if known.preset != "none":
        parser.set_defaults(**PRESETS[known.preset])
    return config_cls(**vars(parser.parse_args(argv)))
