"""The learned augmenter A_θ of Mounsaveng et al. (WACV 2021), section 3.2.

A small MLP maps per-sample Gaussian noise to transformation parameters. The parameters are
applied with differentiable warps and kornia's colour ops, so the validation loss of the
look-ahead classifier can be differentiated with respect to θ.

Functional core (`bound_params`, `params_to_matrix`, `apply_transform`) plus a module wrapper
(`Augmenter`), in kornia's style.

Every parameter the MLP emits is squashed into a documented range (`BOUNDS`) by ``b·tanh(v/b)``,
which is the identity at 0 with slope 1 there: training still starts at exactly the identity, and
near it the parametrisation is the paper's residual one. No θ, however large, can produce a NaN,
an empty image or a degenerate matrix (the run with ``--aug-lr 0.1`` that shifted images by 559 px
now stays inside the image):

* translation: within the image (|t| < 1 in normalised units, i.e. half the image size);
* the affine family's 2x2 part: A = expm(L) with L = mI + [[d, q], [q, −d]] + [[0, −φ], [φ, 0]],
  |m| < ln2/2 and |(d, q)| < ln2/2, so every singular value (zoom along any axis) is in [1/2, 2]
  whatever the rotation φ (|φ| < π); det A = e^{2m} > 0, so it never folds or flattens;
* colour: brightness offset in ±0.5, contrast and saturation factors in 1 ± 0.9 (AutoAugment's
  enhance range), hue in ±π. Hue is the one exception to slope 1: by default it is π·tanh(v), slope
  π at 0 (the parametrisation before the bounds, kept so trained policies keep their meaning), so a
  θ step moves hue π times as far as the other parameters; ``hue_slope=1`` gives it slope 1 too, and
  ``hue_bound`` a bound below π (the slope at 0 stays ``hue_slope``);
* tone: the colour family without hue (brightness, contrast, saturation): the colour changes
  RandAugment and TrivialAugment draw, which never rotate hue;
* erase: a Cutout-like box (`erase`), opacity in ±1 (0: the identity; 1: the box filled with the
  image's mean colour, Cutout; below 0: the box's contrast raised about that mean instead) and side
  within [1/4, 1] of the image's (half of it at 0, Cutout's 16 px of 32); its position is uniform
  over the image, drawn by the noise (the replay key), not learned.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Number of raw outputs each transform family needs.
FAMILY_SIZES: dict[str, int] = {"translation": 2, "affine": 6, "color": 4, "tone": 3, "sharpness": 1, "erase": 2}

#: The paper's three augmenter sizes: (noise dimension, hidden widths). ``None`` means "n",
#: the number of transformation parameters; "10n" is written as the string "10n".
MLP_SIZES: dict[str, tuple[int | None, tuple[int | str, ...]]] = {
    "small": (None, ("n", "10n")),
    "medium": (100, (64, 32)),
    "large": (100, (512, 1024, 124, 512)),
}


def parse_transforms(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Turn ``"affine,color"`` into a validated, canonically ordered tuple of families."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in FAMILY_SIZES]
    if unknown or not names:
        raise ValueError(
            f"--transforms: unknown or empty transform family {unknown or spec!r}; "
            f"choose a comma-separated subset of {', '.join(FAMILY_SIZES)}"
        )
    if "color" in names and "tone" in names:
        raise ValueError(f"--transforms: {spec!r} has both color and tone; tone is color without hue, choose one")
    return tuple(f for f in FAMILY_SIZES if f in names)


#: Half-widths b of the squashing b·tanh(v/b) per parameter kind (see the module docstring).
BOUNDS: dict[str, float] = {
    "translation": 1.0,  # normalised units: 1 = half the image
    "log_zoom": math.log(2) / 2,  # isotropic part m of log A
    "anisotropy": math.log(2) / 2 / math.sqrt(2),  # each of d, q: |(d, q)| < ln2/2
    "rotation": math.pi,  # φ, radians
    "brightness": 0.5,  # additive offset on [0, 1] images
    "contrast": 0.9,  # factor − 1
    "saturation": 0.9,  # factor − 1
    "hue": math.pi,  # radians
    "sharpness": 0.9,  # factor − 1: PIL's ImageEnhance.Sharpness in AutoAugment's 1 ± 0.9
    "erase_opacity": 1.0,  # 1: the box is the image's mean colour (Cutout); −1: its contrast doubled
    "erase_log_size": math.log(2),  # the box's side is ERASE_SIDE · e^(±ln 2): 1/4 to all of the image
}

#: The erase box's side at 0, as a fraction of the image's side: Cutout's 16 px on 32 px CIFAR images.
ERASE_SIDE = 0.5


def squash(v: Tensor, bound: float) -> Tensor:
    """``bound · tanh(v / bound)``: identity with slope 1 at 0, inside (−bound, bound) everywhere."""
    return bound * torch.tanh(v / bound)


def bounded_linear(raw: Tensor) -> Tensor:
    """(B, 2, 2) raw residual → expm of its bounded log: zooms within [1/2, 2] along every axis.

    The raw residual R splits into isotropic log-zoom m, anisotropy (d, q) and rotation φ; near 0,
    expm(L) ≈ I + R, so small residuals mean what they meant without bounds.
    """
    m = squash((raw[:, 0, 0] + raw[:, 1, 1]) / 2, BOUNDS["log_zoom"])
    d = squash((raw[:, 0, 0] - raw[:, 1, 1]) / 2, BOUNDS["anisotropy"])
    q = squash((raw[:, 0, 1] + raw[:, 1, 0]) / 2, BOUNDS["anisotropy"])
    phi = squash((raw[:, 1, 0] - raw[:, 0, 1]) / 2, BOUNDS["rotation"])
    log = torch.stack([torch.stack([m + d, q - phi], -1), torch.stack([q + phi, m - d], -1)], -2)
    return torch.linalg.matrix_exp(log)


def bound_params(raw: dict[str, Tensor], hue_slope: float = math.pi, hue_bound: float = math.pi
                 ) -> dict[str, Tensor]:
    """The MLP's raw outputs → bounded parameters in `apply_transform`'s units (0 stays 0).

    ``affine`` stays a residual on the 2x3 matrix; when ``translation`` is there too, the affine's
    shift column moves into it, so that the total shift is bounded once. Hue is b·tanh(v·s/b) with
    slope ``hue_slope`` = s at 0 and bound ``hue_bound`` = b (s = b = π: the default, π·tanh(v)
    exactly; s = 1: like every other parameter; b < π: ``--hue-bound``, e.g. the training images' own
    hue spread, `pipelines.colour_stats`).
    """
    out: dict[str, Tensor] = {}
    shift = None
    if "affine" in raw:
        r = raw["affine"].reshape(-1, 2, 3)
        lin = bounded_linear(r[:, :, :2]) - torch.eye(2, dtype=r.dtype, device=r.device)
        shift = r[:, :, 2]
        if "translation" in raw:
            shift, out["translation"] = None, squash(shift + raw["translation"], BOUNDS["translation"])
        col = torch.zeros_like(r[:, :, 2]) if shift is None else squash(shift, BOUNDS["translation"])
        out["affine"] = torch.cat([lin, col.unsqueeze(-1)], -1).reshape(-1, 6)
    elif "translation" in raw:
        out["translation"] = squash(raw["translation"], BOUNDS["translation"])
    if "sharpness" in raw:
        out["sharpness"] = squash(raw["sharpness"], BOUNDS["sharpness"])
    if "erase" in raw:  # (opacity, side as a fraction of the image's): the box's position is added by the caller
        e = raw["erase"]
        side = ERASE_SIDE * torch.exp(squash(e[:, 1], BOUNDS["erase_log_size"]))
        out["erase"] = torch.stack([squash(e[:, 0], BOUNDS["erase_opacity"]), side], 1)
    for family in ("color", "tone"):
        if family in raw:
            c = raw[family]
            cols = [squash(c[:, 0], BOUNDS["brightness"]), squash(c[:, 1], BOUNDS["contrast"]),
                    squash(c[:, 2], BOUNDS["saturation"])]
            if family == "color":
                v = c[:, 3] if hue_slope == hue_bound else c[:, 3] * (hue_slope / hue_bound)
                cols.append(hue_bound * torch.tanh(v))
            out[family] = torch.stack(cols, 1)
    return out


def split_params(raw: Tensor, families: Sequence[str]) -> dict[str, Tensor]:
    """Split the MLP's (B, n) output into one tensor per family."""
    out, i = {}, 0
    for f in families:
        out[f] = raw[:, i : i + FAMILY_SIZES[f]]
        i += FAMILY_SIZES[f]
    return out


def params_to_matrix(params: dict[str, Tensor]) -> Tensor | None:
    """(B, 2, 3) affine matrix in normalised [-1, 1] coordinates, identity when all params are 0.

    ``affine`` is a residual on the full 2x3 matrix; ``translation`` adds to its last column
    (in units of half the image size, so 0.25 moves a 32 px image by 4 px).
    """
    geo = [params[f] for f in ("affine", "translation") if f in params]
    if not geo:
        return None
    b = geo[0].shape[0]
    ref = geo[0]
    eye = torch.eye(2, 3, dtype=ref.dtype, device=ref.device).expand(b, 2, 3)
    mat = eye
    if "affine" in params:
        mat = mat + params["affine"].reshape(b, 2, 3)
    if "translation" in params:
        mat = mat + F.pad(params["translation"].unsqueeze(-1), (2, 0))
    return mat


def color_factors(p: Tensor) -> dict[str, Tensor]:
    """Map the colour parameters (brightness offset, contrast − 1, saturation − 1 and, for ``color``
    but not ``tone``, hue) to kornia's arguments; all are identity at 0. Tone's hue is exactly 0."""
    return {
        "brightness": p[:, 0],  # additive offset
        "contrast": 1 + p[:, 1],  # multiplicative factor
        "saturation": 1 + p[:, 2],  # multiplicative factor
        "hue": p[:, 3] if p.shape[1] > 3 else torch.zeros_like(p[:, 0]),  # radians
    }


def color_params(params: dict[str, Tensor]) -> Tensor | None:
    """The colour family's parameters, whichever of ``color`` and ``tone`` there is."""
    return params.get("color", params.get("tone"))


WARP_MODES = ("bilinear", "bicubic")


def apply_transform(x: Tensor, params: dict[str, Tensor], padding_mode: str = "zeros",
                    warp_mode: str = "bilinear") -> Tensor:
    """Warp then recolour a batch of [0, 1] images. Differentiable in ``params``.

    ``bicubic`` keeps about 85% of a 32 px image's high-frequency energy under sub-pixel shifts,
    against about 54% for ``bilinear``, whose blur the test images never see (docs/results.md).
    """
    mat = params_to_matrix(params)
    if mat is not None:
        grid = F.affine_grid(mat.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode=warp_mode, padding_mode=padding_mode, align_corners=False)
        if warp_mode == "bicubic":
            x = x.clamp(0, 1)  # cubic weights overshoot at edges
    if (colour := color_params(params)) is not None:
        c = color_factors(colour.to(x.dtype))
        x = kornia.enhance.adjust_brightness(x, c["brightness"])
        x = kornia.enhance.adjust_contrast(x, c["contrast"])
        x = kornia.enhance.adjust_saturation(x, c["saturation"])
        if "color" in params:  # tone leaves hue alone: not even a rotation by 0 (an RGB-HSV round trip)
            x = kornia.enhance.adjust_hue(x, c["hue"])
    if "sharpness" in params:
        x = sharpen(x, 1 + params["sharpness"][:, 0].to(x.dtype))
    if "erase" in params:
        x = erase(x, params["erase"].to(x.dtype))
    return x


def box_coverage(centre: Tensor, half: Tensor, n: int) -> Tensor:
    """(B, n): the share of each of n pixels (along one axis, normalised coordinates, ``align_corners=False``)
    that the interval centre ± half covers; exact for a box wider than a pixel, and differentiable in both
    almost everywhere (a pixel under the box's edge is partly covered)."""
    u = (2 * torch.arange(n, device=centre.device, dtype=centre.dtype) + 1) / n - 1  # pixel centres
    return ((half[:, None] - (u - centre[:, None]).abs()) * (n / 2) + 0.5).clamp(0, 1)


def erase(x: Tensor, p: Tensor) -> Tensor:
    """Blend a box of each image towards its mean colour: x + a·M·(mean − x), differentiable in ``p``.

    ``p`` is (B, 4): opacity a, side s (a fraction of the image's side), centre (cx, cy) in normalised
    coordinates. M is the box's pixel coverage (`box_coverage`, anti-aliased, so the side gets a gradient),
    the mean is the image's own per channel. a = 1 is Cutout with the mean as its fill; a = 0 is exactly the
    identity; a < 0 raises the box's contrast about the mean instead (clamped to [0, 1])."""
    h, w = x.shape[-2:]
    a, s, cx, cy = p.unbind(1)
    mask = box_coverage(cy, s, h)[:, :, None] * box_coverage(cx, s, w)[:, None, :]  # (B, H, W); half side = s
    mean = x.mean((-2, -1), keepdim=True)
    return (x + (a[:, None, None] * mask)[:, None] * (mean - x)).clamp(0, 1)


def sharpen(x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``ImageEnhance.Sharpness`` per image, differentiable in ``factor`` (B,): blend the image with
    its 3x3 smoothing (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, the border kept as is), 0 = smooth,
    1 = identity, 2 = twice as sharp. The family RandAugment has that affine and colour lack."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)  # made on the device: no host copy per step
    k[1, 1] = 5.0
    smooth = F.conv2d(x, (k / 13).expand(c, 1, 3, 3), groups=c)
    smooth = F.pad(smooth, (1, 1, 1, 1))
    inner = torch.zeros_like(x[:1, :1])
    inner[..., 1:-1, 1:-1] = 1
    smooth = inner * smooth + (1 - inner) * x
    return (x + (factor[:, None, None, None] - 1) * (x - smooth)).clamp(0, 1)  # factor 1: exactly x


def magnitudes(params: dict[str, Tensor], image_size: int) -> dict[str, float]:
    """How far the sampled transforms are from identity; logged per epoch."""
    out: dict[str, float] = {}
    mat = params_to_matrix(params)
    if mat is not None:
        delta = mat.detach().float() - torch.eye(2, 3, device=mat.device)
        out["affine_abs_dev"] = delta[:, :, :2].abs().mean().item()
        out["affine_mean_dev"] = delta[:, :, :2].mean(0).abs().mean().item()
        out["translation_px"] = (delta[:, :, 2].norm(dim=1) * image_size / 2).mean().item()
    if "sharpness" in params:
        out["sharpness_abs"] = params["sharpness"].detach().float().abs().mean().item()
    if "erase" in params:
        e = params["erase"].detach().float()
        out["erase_opacity_abs"], out["erase_side"] = e[:, 0].abs().mean().item(), e[:, 1].mean().item()
    if (colour := color_params(params)) is not None:
        c = color_factors(colour.detach().float())
        out["brightness_abs"] = c["brightness"].abs().mean().item()
        out["contrast_abs_log"] = c["contrast"].log().abs().mean().item()
        out["saturation_abs_log"] = c["saturation"].log().abs().mean().item()
        out["hue_abs_rad"] = c["hue"].abs().mean().item()
    return out


#: Order of `spread`'s quantities, by family.
SPREAD_NAMES: dict[str, tuple[str, ...]] = {
    "geometry": ("tx_px", "ty_px", "a11", "a12", "a21", "a22"),
    "sharpness": ("sharpness",),
    "erase": ("erase_opacity", "erase_log_side"),
    "color": ("brightness", "log_contrast", "log_saturation", "hue_rad"),
}


def spread(params: dict[str, Tensor], image_size: int) -> dict[str, dict[str, float]]:
    """Per interpretable quantity, the batch mean and standard deviation of the sampled transforms.

    `magnitudes` says how far the transforms are from identity; this says *how*: a policy whose
    mean moved (every image shifted or recoloured alike, a train/test mismatch) or one that draws
    per-sample variety around the identity (what augmentation is for). Shifts in pixels of an
    ``image_size`` image, the 2x2 part as its residual on the identity, colour in `magnitudes`' units, the
    erase box as its opacity and the log of its side over `ERASE_SIDE` (0 at the identity's side).
    """
    cols: dict[str, Tensor] = {}
    mat = params_to_matrix(params)
    if mat is not None:
        delta = mat.detach().double() - torch.eye(2, 3, dtype=torch.float64, device=mat.device)
        cols["tx_px"], cols["ty_px"] = delta[:, 0, 2] * image_size / 2, delta[:, 1, 2] * image_size / 2
        for i in range(2):
            for j in range(2):
                cols[f"a{i + 1}{j + 1}"] = delta[:, i, j]
    if "sharpness" in params:
        cols["sharpness"] = params["sharpness"].detach().double()[:, 0]
    if "erase" in params:
        e = params["erase"].detach().double()
        cols["erase_opacity"], cols["erase_log_side"] = e[:, 0], (e[:, 1] / ERASE_SIDE).log()
    if (colour := color_params(params)) is not None:
        c = color_factors(colour.detach().double())
        cols["brightness"], cols["hue_rad"] = c["brightness"], c["hue"]
        cols["log_contrast"], cols["log_saturation"] = c["contrast"].log(), c["saturation"].log()
    return {k: {"mean": v.mean().item(), "sd": v.std().item() if v.numel() > 1 else 0.0} for k, v in cols.items()}


def erase_centres(noise: Tensor) -> Tensor:
    """(B, 2) box centres uniform over the image, (−1, 1)² in normalised coordinates: erf(z/√2) of the noise's
    last two entries (the prior start reads the first two, so a prior shift and the box stay independent)."""
    return torch.erf(noise[:, -2:] / math.sqrt(2))


def prior_layer(families: Sequence[str], noise_dim: int, n: int, translate: float) -> nn.Linear:
    """A learnable linear path from uniform noise to the outputs, started as the predefined
    random translation: raw tx, ty = atanh(``translate``) · (u0, u1), u ~ U(-1, 1), so the bounded
    shift tanh(·) reaches exactly ±``translate`` (within 1% of uniform in between at 4 px of 32).

    Why: from the identity the hypergradient grows variety only slowly (see docs/results.md);
    starting at the hand-tuned prior lets the bilevel step keep, grow or shrink it.
    """
    if not 0 < translate < BOUNDS["translation"]:
        raise ValueError(f"--aug-init-translate-px: the prior shift must be under half the image, got {translate:g} "
                         "in normalised units")
    if noise_dim < 2:
        raise ValueError("--aug-init-translate-px needs a noise dimension of at least 2")
    offsets, i = {}, 0
    for f in families:
        offsets[f] = i
        i += FAMILY_SIZES[f]
    if "affine" in offsets:
        rows = (offsets["affine"] + 2, offsets["affine"] + 5)  # last column of the 2x3 residual
    elif "translation" in offsets:
        rows = (offsets["translation"], offsets["translation"] + 1)
    else:
        raise ValueError("--aug-init-translate-px needs the affine or translation transform family")
    layer = nn.Linear(noise_dim, n, bias=False)
    nn.init.zeros_(layer.weight)
    with torch.no_grad():
        layer.weight[rows[0], 0] = math.atanh(translate)
        layer.weight[rows[1], 1] = math.atanh(translate)
    return layer


#: Saved in a policy's spec: weights trained under another parametrisation mean other transforms.
PARAMETRISATION = "bounded-v1"


def bound_fractions(raw: dict[str, Tensor], near: float = 0.95) -> dict[str, float]:
    """Per family, the share of sampled parameters within ``near`` of their bound (|tanh| > near):
    an augmenter that sits there has run away (the run warns, once)."""
    limit = math.atanh(near)
    out = {}
    for family, r in raw.items():
        if family == "affine":
            scaled = bound_params({"affine": r})["affine"]  # the bounded values' own distance to their bounds
            lin = torch.linalg.svdvals(scaled.reshape(-1, 2, 3)[:, :, :2] + torch.eye(2, device=r.device)).log2()
            near_zoom = lin.abs().amax(1) > near  # a zoom close to 1/2 or 2
            near_shift = (scaled.reshape(-1, 2, 3)[:, :, 2].abs() > near * BOUNDS["translation"]).any(1)
            out[family] = (near_zoom | near_shift).float().mean().item()
        elif family == "translation":
            out[family] = (r.abs() > limit * BOUNDS["translation"]).any(1).float().mean().item()
        elif family == "sharpness":
            out[family] = (r.abs() > limit * BOUNDS["sharpness"]).float().mean().item()
        elif family == "erase":  # an opacity near ±1 or a box near 1/4 or all of the image
            at = (r[:, 0].abs() > limit * BOUNDS["erase_opacity"]) | (r[:, 1].abs() > limit * BOUNDS["erase_log_size"])
            out[family] = at.float().mean().item()
        else:
            kinds = ("brightness", "contrast", "saturation")
            at = torch.stack([r[:, i].abs() > limit * BOUNDS[k] for i, k in enumerate(kinds)], 1)
            out[family] = at.any(1).float().mean().item()
    return out


class Augmenter(nn.Module):
    """Noise-driven MLP A_θ: z ~ N(0, I) per sample → transformation parameters.

    The last layer starts at zero, so training begins at exactly the identity transform.
    With ``center_hidden`` the last hidden features are centred over the batch, so the
    last layer's weights only shape per-sample variety and its bias alone sets the mean
    transform (see README: the mean otherwise drifts towards a fixed zoom).
    """

    def __init__(
        self,
        transforms: str | Sequence[str] = ("affine",),
        size: str = "small",
        center_hidden: bool = True,
        padding_mode: str = "zeros",
        init_translate: float = 0.0,
        warp_mode: str = "bilinear",
        hue_slope: float = math.pi,
        hue_bound: float = math.pi,
    ) -> None:
        super().__init__()
        if size not in MLP_SIZES:
            raise ValueError(f"--aug-size: unknown augmenter size {size!r}; choose {', '.join(MLP_SIZES)}")
        self.families = parse_transforms(transforms)
        self.num_params = sum(FAMILY_SIZES[f] for f in self.families)
        n = self.num_params
        noise_dim, hidden = MLP_SIZES[size]
        # "n" is at least 2: one noise input and one ReLU unit (sharpness alone) would be dead half the time
        w = max(n, 2)
        self.noise_dim = w if noise_dim is None else noise_dim
        widths = [w if h == "n" else 10 * w if h == "10n" else int(h) for h in hidden]
        layers: list[nn.Module] = []
        d = self.noise_dim
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, n)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.center_hidden = center_hidden
        self.padding_mode = padding_mode
        self.size = size
        self.init_translate = float(init_translate)
        if warp_mode not in WARP_MODES:
            raise ValueError(f"--warp-mode: unknown mode {warp_mode!r}; choose {', '.join(WARP_MODES)}")
        self.warp_mode = warp_mode
        if not hue_slope > 0:
            raise ValueError(f"--hue-slope: must be positive, got {hue_slope:g}")
        self.hue_slope = float(hue_slope)
        if not 0 < hue_bound <= BOUNDS["hue"]:
            raise ValueError(f"--hue-bound: must be in (0, pi] radians, got {hue_bound:g}")
        self.hue_bound = float(hue_bound)
        self.prior: nn.Linear | None = None
        if init_translate:
            self.prior = prior_layer(self.families, self.noise_dim, n, self.init_translate)

    def sample_noise(self, batch_size: int, device: torch.device | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        dev = device or self.head.weight.device
        return torch.randn(batch_size, self.noise_dim, device=dev, generator=generator,
                           dtype=self.head.weight.dtype)

    def raw_params(self, batch_size: int, noise: Tensor | None = None) -> dict[str, Tensor]:
        """The MLP's outputs per family, before `bound_params` (their scale is the bounds' units)."""
        z = self.sample_noise(batch_size) if noise is None else noise
        h = self.body(z)
        if self.center_hidden and h.shape[0] > 1:
            h = h - h.mean(0, keepdim=True)
        raw = self.head(h)
        if self.prior is not None:
            raw = raw + self.prior(torch.erf(z / math.sqrt(2)))  # erf(z/√2) ~ U(-1, 1)
        return split_params(raw, self.families)

    def sample_params(self, batch_size: int, noise: Tensor | None = None) -> dict[str, Tensor]:
        """Bounded transformation parameters for ``batch_size`` samples (`bound_params`); the erase box's
        centre comes from the noise (`erase_centres`), so the same noise replays the same boxes."""
        z = self.sample_noise(batch_size) if noise is None else noise
        params = bound_params(self.raw_params(batch_size, z), self.hue_slope, self.hue_bound)
        if "erase" in params:
            params["erase"] = torch.cat([params["erase"], erase_centres(z).to(params["erase"].dtype)], 1)
        return params

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """A_θ(x) in float32 even inside an autocast region: in bf16 the matrix's residuals below about
        0.004 vanish and its diagonal moves in steps of 2⁻⁷ (see `dali_bilevel.precision`)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            return apply_transform(x, self.sample_params(x.shape[0], noise), self.padding_mode, self.warp_mode)

    def spec(self) -> dict[str, object]:
        """What `from_spec` needs to rebuild this augmenter (saved beside its weights)."""
        return {"transforms": list(self.families), "size": self.size, "center_hidden": self.center_hidden,
                "padding_mode": self.padding_mode, "init_translate": self.init_translate,
                "warp_mode": self.warp_mode, "hue_slope": self.hue_slope, "hue_bound": self.hue_bound,
                "parametrisation": PARAMETRISATION}

    @classmethod
    def from_spec(cls, spec: dict[str, object]) -> Augmenter:
        if spec.get("parametrisation") != PARAMETRISATION:
            raise ValueError("the policy was exported before the augmenter's parameters were bounded, so its "
                             "weights mean other transforms now; train it again")
        return cls(spec["transforms"], spec["size"], bool(spec["center_hidden"]), str(spec["padding_mode"]),
                   float(spec.get("init_translate", 0.0)), str(spec.get("warp_mode", "bilinear")),
                   float(spec.get("hue_slope", math.pi)),  # policies saved before the flags: slope π,
                   float(spec.get("hue_bound", math.pi)))  # bound π


def save_policy(augmenter: Augmenter, path: str | Path) -> None:
    """Export a trained augmenter: weights (``.pt``, tensors only) and its spec (``.json``)."""
    path = Path(path)
    torch.save(augmenter.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(augmenter.spec(), indent=2))


def load_policy(path: str | Path) -> Augmenter:
    """A frozen augmenter from `save_policy`'s files; loads tensors only (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise FileNotFoundError(f"--augment frozen:{path}: needs {path} and {path.with_suffix('.json')} "
                                "(written as augmenter.pt/.json by a learned run)")
    try:
        aug = Augmenter.from_spec(json.loads(path.with_suffix(".json").read_text()))
    except ValueError as e:
        raise ValueError(f"--augment frozen:{path}: {e}") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:  # refused here, before any non-finite parameter can reach kornia
        raise ValueError(f"--augment frozen:{path}: non-finite weights in {', '.join(bad)}")
    aug.load_state_dict(state)
    return aug.requires_grad_(False).eval()
