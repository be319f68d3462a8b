"""The learned augmenter A_θ of Mounsaveng et al. (WACV 2021), section 3.2.

A small MLP maps per-sample Gaussian noise to transformation parameters. The parameters are
applied with differentiable warps and kornia's colour ops, so the validation loss of the
look-ahead classifier can be differentiated with respect to θ.

Functional core (`params_to_matrix`, `apply_transform`) plus a module wrapper (`Augmenter`),
in kornia's style.
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
FAMILY_SIZES: dict[str, int] = {"translation": 2, "affine": 6, "color": 4}

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
    return tuple(f for f in FAMILY_SIZES if f in names)


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
    """Map 4 raw colour outputs to kornia's arguments; all are identity at 0."""
    return {
        "brightness": p[:, 0],  # additive offset
        "contrast": torch.exp(p[:, 1]),  # multiplicative factor
        "saturation": torch.exp(p[:, 2]),  # multiplicative factor
        "hue": math.pi * torch.tanh(p[:, 3]),  # radians in (-pi, pi)
    }


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
    if "color" in params:
        c = color_factors(params["color"].to(x.dtype))
        x = kornia.enhance.adjust_brightness(x, c["brightness"])
        x = kornia.enhance.adjust_contrast(x, c["contrast"])
        x = kornia.enhance.adjust_saturation(x, c["saturation"])
        x = kornia.enhance.adjust_hue(x, c["hue"])
    return x


def magnitudes(params: dict[str, Tensor], image_size: int) -> dict[str, float]:
    """How far the sampled transforms are from identity; logged per epoch."""
    out: dict[str, float] = {}
    mat = params_to_matrix(params)
    if mat is not None:
        delta = mat.detach().float() - torch.eye(2, 3, device=mat.device)
        out["affine_abs_dev"] = delta[:, :, :2].abs().mean().item()
        out["affine_mean_dev"] = delta[:, :, :2].mean(0).abs().mean().item()
        out["translation_px"] = (delta[:, :, 2].norm(dim=1) * image_size / 2).mean().item()
    if "color" in params:
        c = color_factors(params["color"].detach().float())
        out["brightness_abs"] = c["brightness"].abs().mean().item()
        out["contrast_abs_log"] = c["contrast"].log().abs().mean().item()
        out["saturation_abs_log"] = c["saturation"].log().abs().mean().item()
        out["hue_abs_rad"] = c["hue"].abs().mean().item()
    return out


def prior_layer(families: Sequence[str], noise_dim: int, n: int, translate: float) -> nn.Linear:
    """A learnable linear path from uniform noise to the outputs, started as the predefined
    random translation: outputs tx, ty = ``translate`` · (u0, u1), u ~ U(-1, 1).

    Why: from the identity the hypergradient grows variety only slowly (see docs/results.md);
    starting at the hand-tuned prior lets the bilevel step keep, grow or shrink it.
    """
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
        layer.weight[rows[0], 0] = translate
        layer.weight[rows[1], 1] = translate
    return layer


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
    ) -> None:
        super().__init__()
        if size not in MLP_SIZES:
            raise ValueError(f"--aug-size: unknown augmenter size {size!r}; choose {', '.join(MLP_SIZES)}")
        self.families = parse_transforms(transforms)
        self.num_params = sum(FAMILY_SIZES[f] for f in self.families)
        n = self.num_params
        noise_dim, hidden = MLP_SIZES[size]
        self.noise_dim = n if noise_dim is None else noise_dim
        widths = [n if h == "n" else 10 * n if h == "10n" else int(h) for h in hidden]
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
        self.prior: nn.Linear | None = None
        if init_translate:
            self.prior = prior_layer(self.families, self.noise_dim, n, self.init_translate)

    def sample_noise(self, batch_size: int, device: torch.device | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        dev = device or self.head.weight.device
        return torch.randn(batch_size, self.noise_dim, device=dev, generator=generator,
                           dtype=self.head.weight.dtype)

    def sample_params(self, batch_size: int, noise: Tensor | None = None) -> dict[str, Tensor]:
        z = self.sample_noise(batch_size) if noise is None else noise
        h = self.body(z)
        if self.center_hidden and h.shape[0] > 1:
            h = h - h.mean(0, keepdim=True)
        raw = self.head(h)
        if self.prior is not None:
            raw = raw + self.prior(torch.erf(z / math.sqrt(2)))  # erf(z/√2) ~ U(-1, 1)
        return split_params(raw, self.families)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        return apply_transform(x, self.sample_params(x.shape[0], noise), self.padding_mode, self.warp_mode)

    def spec(self) -> dict[str, object]:
        """What `from_spec` needs to rebuild this augmenter (saved beside its weights)."""
        return {"transforms": list(self.families), "size": self.size, "center_hidden": self.center_hidden,
                "padding_mode": self.padding_mode, "init_translate": self.init_translate,
                "warp_mode": self.warp_mode}

    @classmethod
    def from_spec(cls, spec: dict[str, object]) -> Augmenter:
        return cls(spec["transforms"], spec["size"], bool(spec["center_hidden"]), str(spec["padding_mode"]),
                   float(spec.get("init_translate", 0.0)), str(spec.get("warp_mode", "bilinear")))


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
    aug = Augmenter.from_spec(json.loads(path.with_suffix(".json").read_text()))
    aug.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return aug.requires_grad_(False).eval()
