"""Known-answer checks of the hypergradient's signal: does θ recover a transformation we chose?

The validation images differ from the training images by one known transformation T* (a shift, a
rotation, a zoom, a brightness offset, a contrast factor, a Cutout-like box of known opacity), applied
by an implementation of our own (``F.affine_grid`` / arithmetic), not by the augmenter. The classifier
ω trains online on A_θ(x_tr) with the real SGD step (``classifier_grads``); θ follows the one-step
hypergradient of the *unaugmented* validation loss (``bilevel_step``, Eq. 3-8). When A_θ = T*, the augmented training
distribution is the validation one, so the validation gradient at the classifier's equilibrium
vanishes: T* is the fixed point the signal must find. The control replaces the hypergradient by a
random direction of the same norm at every update (`random_direction`); it must not find T*.

What makes T* identifiable here:

* classes are fixed class-specific patterns (geometric tasks: smooth random colour fields, so a
  wrong shift / angle / zoom still correlates with the right one and the signal has a basin) or
  class-specific grey levels (colour tasks: 7 levels spread over 0.05-0.65, so an additive offset
  and a contrast factor are told apart), plus per-sample noise so the classes overlap and the
  validation loss never reaches 0;
* the classifier (`make_classifier`) has no global pooling, so its output moves with position,
  angle, scale and brightness; it is smooth (SiLU), so the finite-difference mode is valid too;
* fresh batches every update (nothing to memorise).

A deterministic T* is carried by the augmenter's mean transform (with ``center_hidden`` the head's
bias alone sets it), so `readout` averages many ``sample_params`` draws and maps them through
``params_to_matrix`` / ``color_factors``: it reads physical parameters, whatever the parametrisation.

θ's optimizer (see `RunConfig`): SGD with momentum on the hypergradient scaled to unit global norm.
It is scale-free (the hypergradient's size differs by 100x between tasks and along a run) and keeps
the hypergradient's direction across θ's tensors. Adam, per-parameter, moves every entry of θ by
about its learning rate whatever the signal: it recovers T* as well, but it also makes the random
control a random walk of the mean as large as T* itself, so a control run can land on T* by chance
(docs/results/known_answer.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dali_bilevel.hypergrad import bilevel_step, random_direction
from models.augmenter import ERASE_SIDE, Augmenter, color_factors, params_to_matrix

#: Known-answer tasks → the augmenter family that can express them.
TASKS: dict[str, str] = {
    "shift": "translation",
    "rotation": "affine",
    "zoom": "affine",
    "brightness": "color",
    "contrast": "color",
    "erase": "erase",
}


@dataclass(frozen=True)
class KnownAnswer:
    """One known transformation T*, in physical units, as the validation images' sampling map.

    * ``shift`` (dx, dy) px: the validation image at pixel p shows the training content at p + (dx, dy),
      i.e. the sampling matrix's translation column is (dx, dy) · 2 / size;
    * ``rotation`` a degrees: the sampling matrix's linear part is R(a) = [[cos a, −sin a], [sin a, cos a]];
    * ``zoom`` z: the sampling matrix is diag(1/z), content enlarged z times about the centre;
    * ``brightness`` b: x + b clamped to [0, 1] (kornia's ``adjust_brightness``);
    * ``contrast`` c: x · c clamped to [0, 1] (kornia's ``adjust_contrast``);
    * ``erase`` a: a box of side ``ERASE_SIDE`` of the image's at a uniform random centre, blended towards
      the image's mean colour with opacity a (every validation image has one; a = 1 is Cutout).
    """

    task: str
    value: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown known-answer task {self.task!r}; choose {', '.join(TASKS)}")
        if len(self.value) != (2 if self.task == "shift" else 1):
            raise ValueError(f"{self.task}: expected {'(dx, dy)' if self.task == 'shift' else 'one value'}, "
                             f"got {self.value}")

    @property
    def family(self) -> str:
        return TASKS[self.task]


#: The known answers the tests and launch/known_answer.py use (16 px images).
DEFAULT_ANSWERS: dict[str, KnownAnswer] = {
    "shift": KnownAnswer("shift", (3.0, -2.0)),
    "rotation": KnownAnswer("rotation", (30.0,)),
    "zoom": KnownAnswer("zoom", (1.25,)),
    "brightness": KnownAnswer("brightness", (0.2,)),
    "contrast": KnownAnswer("contrast", (1.3,)),
    "erase": KnownAnswer("erase", (0.6,)),
}


def known_matrix(answer: KnownAnswer, size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64) -> Tensor | None:
    """T*'s (2, 3) sampling matrix in ``affine_grid``'s normalised coordinates; None for a colour task."""
    if answer.task not in ("shift", "rotation", "zoom"):
        return None
    lin = [[1.0, 0.0], [0.0, 1.0]]
    col = [0.0, 0.0]
    if answer.task == "shift":
        col = [v * 2 / size for v in answer.value]
    elif answer.task == "rotation":
        a = math.radians(answer.value[0])
        lin = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    else:
        lin = [[1 / answer.value[0], 0.0], [0.0, 1 / answer.value[0]]]
    return torch.tensor([[*lin[0], col[0]], [*lin[1], col[1]]], device=device, dtype=dtype)


def known_box(centres: Tensor, n: int, half: float = ERASE_SIDE) -> Tensor:
    """(B, n) per-pixel coverage of the intervals centres ± ``half`` (normalised units), written as the overlap
    of each pixel's own interval with the box: a second implementation of `models.augmenter.box_coverage`."""
    left = torch.arange(n, device=centres.device, dtype=centres.dtype) * 2 / n - 1  # each pixel's left edge
    lo, hi = (centres - half)[:, None], (centres + half)[:, None]
    return (torch.minimum(hi, left + 2 / n) - torch.maximum(lo, left)).clamp(min=0) * n / 2


def apply_known(x: Tensor, answer: KnownAnswer, generator: torch.Generator | None = None,
                centres: Tensor | None = None) -> Tensor:
    """T*(x), independent of the augmenter's code (bilinear, zero padding: the augmenter's defaults). The erase
    task's boxes are centred at ``centres`` (B, 2) in normalised (x, y), or drawn uniformly with ``generator``."""
    if answer.task == "erase":
        if centres is None:
            centres = torch.rand(x.shape[0], 2, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        h, w = x.shape[-2:]
        mask = known_box(centres[:, 1], h)[:, None, :, None] * known_box(centres[:, 0], w)[:, None, None, :]
        fill = x.mean((-2, -1), keepdim=True)
        return x * (1 - answer.value[0] * mask) + fill * answer.value[0] * mask
    mat = known_matrix(answer, x.shape[-1], x.device, x.dtype)
    if mat is not None:
        grid = F.affine_grid(mat.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if answer.task == "brightness":
        return (x + answer.value[0]).clamp(0, 1)
    return (x * answer.value[0]).clamp(0, 1)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSpec:
    """Synthetic classes: a class template (smooth random pattern on a class grey level) plus noise.

    ``sigma`` (px) sets how far a wrong shift, angle or zoom still correlates with the right one,
    i.e. the basin the hypergradient sees; the per-sample noise and ``level_jitter`` keep classes
    overlapping, so the classifier's loss and the validation gradient never vanish.
    """

    classes: int = 7
    size: int = 16
    sigma: float = 1.0  # smoothness of the class patterns, px
    amplitude: float = 0.12  # std of a class pattern
    level: float = 0.35  # mean grey level
    level_spread: float = 0.0  # class levels spread evenly over level ± spread / 2
    level_jitter: float = 0.0  # std of a per-image global offset
    noise: float = 0.35  # std of the per-sample noise
    noise_sigma: float = 1.0  # its smoothness, px
    gray: bool = False  # R = G = B (saturation and hue then act as the identity)


#: Geometric tasks: classes told apart by where their patterns' features are.
GEOMETRIC_DATA = DataSpec()
#: Colour tasks: classes told apart by grey level only (7 levels 0.1 apart over 0.05-0.65).
COLOR_DATA = DataSpec(amplitude=0.0, level_spread=0.6, level_jitter=0.04, noise=0.05, gray=True)


def default_data(answer: KnownAnswer) -> DataSpec:
    return COLOR_DATA if answer.family == "color" else GEOMETRIC_DATA  # erase: where the patterns are hidden


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) with circular padding (no darkened edges)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="circular"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="circular"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _channels(spec: DataSpec) -> int:
    return 1 if spec.gray else 3


def make_templates(spec: DataSpec, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """(classes, 3, size, size) class means: a unit-std blurred white-noise pattern times
    ``amplitude`` on the class's grey level."""
    white = torch.randn(spec.classes, _channels(spec), spec.size, spec.size, generator=generator, device=device)
    pat = _blur(white, spec.sigma)
    pat = (pat - pat.mean((1, 2, 3), keepdim=True)) / pat.std((1, 2, 3), keepdim=True)
    half = spec.level_spread / 2
    levels = torch.linspace(spec.level - half, spec.level + half, spec.classes, device=device)
    return (levels.view(-1, 1, 1, 1) + spec.amplitude * pat).expand(-1, 3, -1, -1)


def sample_batch(templates: Tensor, spec: DataSpec, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A fresh labelled batch in [0, 1]: the template of a uniformly drawn class plus noise."""
    dev = templates.device
    y = torch.randint(0, spec.classes, (batch,), generator=generator, device=dev)
    n = _blur(torch.randn(batch, _channels(spec), spec.size, spec.size, generator=generator, device=dev),
              spec.noise_sigma)
    x = templates[y] + spec.noise * (n / n.std((1, 2, 3), keepdim=True)).expand(-1, 3, -1, -1)
    if spec.level_jitter:
        x = x + spec.level_jitter * torch.randn(batch, 1, 1, 1, generator=generator, device=dev)
    return x.clamp(0, 1), y


# ---------------------------------------------------------------- classifier


class Standardize(nn.Module):
    """Fixed (x − mean) / std. Conditioning only: the raw grey level would dominate the first
    layer's curvature and starve its biases. Not learned, not invariant to anything."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def make_classifier(spec: DataSpec, hidden: int = 32) -> nn.Module:
    """Flatten → Linear → SiLU → Linear: no global pooling, so the output depends on where, at what
    angle, how large and how bright a pattern is; smooth, so the finite-difference mode is valid."""
    std = math.sqrt(spec.amplitude**2 + spec.noise**2 + spec.level_jitter**2 + spec.level_spread**2 / 12)
    return nn.Sequential(Standardize(spec.level, std), nn.Flatten(), nn.Linear(3 * spec.size**2, hidden), nn.SiLU(),
                         nn.Linear(hidden, spec.classes))


# ---------------------------------------------------------------- control and readout


#: `readout`'s ``value`` units per task.
UNITS: dict[str, str] = {"shift": "px", "rotation": "deg", "zoom": "log zoom", "brightness": "offset",
                         "contrast": "log factor", "erase": "opacity"}


def known_magnitude(answer: KnownAnswer) -> tuple[float, ...]:
    """T* in `readout`'s units, 0 at the identity: (dx, dy) px, degrees, log zoom, offset, log contrast,
    opacity."""
    if answer.task in ("zoom", "contrast"):
        return (math.log(answer.value[0]),)
    return answer.value


@torch.no_grad()
def readout(augmenter: Augmenter, answer: KnownAnswer, size: int, samples: int = 4096,
            generator: torch.Generator | None = None) -> dict[str, float]:
    """The augmenter's mean transform in T*'s units, and how far it is from T*.

    Reads only ``sample_params`` → ``params_to_matrix`` / ``color_factors`` (physical meaning), averaged
    over ``samples`` noise draws. Keys:

    * ``value``: the recovered magnitude (`UNITS`): shift |mean (dx, dy)| px; rotation: the angle of
      the mean linear part; zoom: log of 1/√det of the mean linear part; brightness: mean offset;
      contrast: log of the mean factor; erase: the mean opacity;
    * ``rel_error``: |recovered − known| / |known| in those units (shift: of the 2-D vector);
    * ``full_error``: the whole transform against T*, over T*'s distance from the identity: geometric,
      the mean 2x3 matrix (Frobenius); colour, (brightness, contrast, saturation − 1, hue / π);
    * ``spread``: per-sample variety (geometric: Frobenius norm of the entrywise std of the matrices;
      colour: std of the task's factor).
    """
    dev = next(augmenter.parameters()).device
    noise = augmenter.sample_noise(samples, device=dev, generator=generator)
    params = augmenter.sample_params(samples, noise)
    known = torch.tensor(known_magnitude(answer), dtype=torch.float64)
    out: dict[str, float] = {}
    mat = known_matrix(answer, size)
    if mat is not None:
        mats = params_to_matrix(params).double().cpu()
        m, eye = mats.mean(0), torch.eye(2, 3, dtype=torch.float64)
        out["spread"] = mats.std(0).norm().item()
        if answer.task == "shift":
            got = m[:, 2] * size / 2
            out |= {"dx": got[0].item(), "dy": got[1].item()}
            out["value"] = got.norm().item()
        else:
            lin = m[:, :2]
            if answer.task == "zoom":
                got = -0.5 * lin.det().abs().log().reshape(1)
            else:
                got = torch.atan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1]).rad2deg().reshape(1)
            out["value"] = got.item()
        out["rel_error"] = ((got - known).norm() / known.norm()).item()
        out["full_error"] = ((m - mat).norm() / (mat - eye).norm()).item()
        out |= {f"m{i}{j}": m[i, j].item() for i in range(2) for j in range(3)}
        return out
    if answer.task == "erase":
        e = params["erase"].double()
        a, log_side = e[:, 0].mean().item(), (e[:, 1] / ERASE_SIDE).log().mean().item()
        out |= {"value": a, "log_side": log_side, "spread": e[:, 0].std().item()}
        out["rel_error"] = abs(a - known.item()) / abs(known.item())
        out["full_error"] = math.hypot(a - known.item(), log_side) / abs(known.item())
        return out
    factors = {k: v.double() for k, v in color_factors(params["color"]).items()}
    c = {k: v.mean().item() for k, v in factors.items()}
    out |= {f"mean_{k}": v for k, v in c.items()}
    out["spread"] = factors[answer.task].std().item()
    out["value"] = c["brightness"] if answer.task == "brightness" else math.log(c["contrast"])
    out["rel_error"] = abs(out["value"] - known.item()) / abs(known.item())
    b_star, c_star = (answer.value[0], 1.0) if answer.task == "brightness" else (0.0, answer.value[0])
    dev_ = (c["brightness"] - b_star, c["contrast"] - c_star, c["saturation"] - 1, c["hue"] / math.pi)
    out["full_error"] = math.hypot(*dev_) / math.hypot(b_star, c_star - 1)
    return out


# ---------------------------------------------------------------- the online loop


@dataclass
class RunConfig:
    """One online bilevel run: the classifier's real SGD step on A_θ(x_tr), then θ's step.

    θ's optimizer: ``normalized`` (default) is SGD with momentum on the hypergradient scaled to unit
    global norm (scale-free, keeps the direction across θ's tensors); ``adam`` for comparison. The
    head's bias sets the mean transform; θ's other tensors (the per-sample variety) learn at
    ``variety_lr_ratio`` times its rate: the known answers are deterministic, so variety is only
    noise here (the control uses the same ratio). θ's learning rate follows a cosine to 0, so the
    last updates average the hypergradient's noise instead of jittering.
    """

    answer: KnownAnswer
    mode: str = "exact"
    control: bool = False
    steps: int = 300
    seed: int = 0
    batch: int = 64
    clf_lr: float = 0.05
    clf_momentum: float = 0.0
    hidden: int = 32
    aug_optimizer: str = "normalized"
    aug_lr: float = 0.003
    aug_momentum: float = 0.9
    variety_lr_ratio: float = 0.1
    data: DataSpec | None = None  # None: `default_data` for the answer's family
    log_every: int = 0
    step_length: str = "free"  # the look-ahead's length under θ (`dali_bilevel.hypergrad.fixed_length_adjoint`)


@dataclass
class RunResult:
    config: dict
    final: dict[str, float]
    trace: list[dict[str, float]]
    val_loss: float
    seconds: float


def make_aug_optimizer(cfg: RunConfig, augmenter: Augmenter) -> torch.optim.Optimizer:
    variety = [p for p in augmenter.parameters() if p is not augmenter.head.bias]
    groups = [{"params": [augmenter.head.bias]}, {"params": variety, "lr": cfg.aug_lr * cfg.variety_lr_ratio}]
    if cfg.aug_optimizer == "normalized":
        return torch.optim.SGD(groups, lr=cfg.aug_lr, momentum=cfg.aug_momentum)
    if cfg.aug_optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.aug_lr)
    raise ValueError(f"unknown augmenter optimizer {cfg.aug_optimizer!r}; choose normalized or adam")


def run_known_answer(cfg: RunConfig, device: torch.device | str = "cpu",
                     on_log: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Train ω and θ online for ``cfg.steps`` updates from the identity; read out θ's mean transform.

    Every update draws fresh training and validation batches; the validation batch is T* of fresh
    images of the same classes. Seeded: the same config gives the same numbers on the same machine.
    """
    t0 = time.perf_counter()
    data = cfg.data or default_data(cfg.answer)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    templates = make_templates(data, gen, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = make_classifier(data, cfg.hidden).to(device)
        aug = Augmenter(cfg.answer.family, "small", center_hidden=True).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.clf_lr, momentum=cfg.clf_momentum)
    aug_opt = make_aug_optimizer(cfg, aug)
    sched = torch.optim.lr_scheduler.LambdaLR(aug_opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / cfg.steps)))
    trace: list[dict[str, float]] = []
    val_loss = float("nan")
    model.train()
    for step in range(1, cfg.steps + 1):
        x_tr, y_tr = sample_batch(templates, data, cfg.batch, gen)
        x_val, y_val = sample_batch(templates, data, cfg.batch, gen)
        x_val = apply_known(x_val, cfg.answer, gen)
        noise = aug.sample_noise(cfg.batch, device=device, generator=gen)
        out = bilevel_step(model, aug, opt, x_tr, y_tr, x_val, y_val, noise=noise, mode=cfg.mode,
                           step_length=cfg.step_length)
        val_loss, train_loss = out.val_loss.item(), out.train_loss.item()
        if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
            raise FloatingPointError(f"step {step}: the classifier diverged (train loss {train_loss:g}, "
                                     f"validation loss {val_loss:g}); lower clf_lr")
        for p, g in zip(model.parameters(), out.classifier_grads, strict=True):
            p.grad = g
        opt.step()
        hyper = random_direction(out.augmenter_grads, gen) if cfg.control else out.augmenter_grads
        if cfg.aug_optimizer == "normalized":
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in hyper)).clamp_min(1e-300)
            hyper = [g / norm.to(g.dtype) for g in hyper]
        for p, g in zip(aug.parameters(), hyper, strict=True):
            p.grad = g
        aug_opt.step()
        sched.step()
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
            rec = {"step": step, "val_loss": val_loss, "train_loss": train_loss,
                   **readout(aug, cfg.answer, data.size, 1024, torch.Generator(device=device).manual_seed(0))}
            trace.append(rec)
            if on_log is not None:
                on_log(step, rec)
    final = readout(aug, cfg.answer, data.size, 4096, torch.Generator(device=device).manual_seed(0))
    return RunResult(asdict(cfg) | {"data": asdict(data)}, final, trace, val_loss, time.perf_counter() - t0)
