import math

import numpy as np
import pytest
import torch

from models.augmenter import (
    BOUNDS,
    FAMILY_SIZES,
    MLP_SIZES,
    Augmenter,
    apply_transform,
    bound_fractions,
    bound_params,
    load_policy,
    magnitudes,
    params_to_matrix,
    parse_transforms,
    save_policy,
    spread,
)
from models.predefined import random_flip, random_translate


def test_parse_transforms_orders_and_rejects():
    assert parse_transforms("color, affine") == ("affine", "color")
    with pytest.raises(ValueError, match="--transforms"):
        parse_transforms("affine,zoom")


@pytest.mark.parametrize("spec", ["translation", "affine", "color", "tone", "affine,color", "affine,tone",
                                  "translation,affine,color", "erase", "affine,color,erase"])
@pytest.mark.parametrize("size", list(MLP_SIZES))
def test_starts_at_identity(spec, size):
    aug = Augmenter(spec, size)
    params = aug.sample_params(5)
    if "erase" in params:  # opacity 0: no box at all, whatever its side (half the image's) and centre
        assert (params["erase"][:, 0] == 0).all() and (params.pop("erase")[:, 1] == 0.5).all()
    assert all((p == 0).all() for p in params.values())  # exactly the identity parameters
    mat = params_to_matrix(params)
    if mat is not None:
        assert torch.equal(mat, torch.eye(2, 3).expand(5, 2, 3))
    x = torch.rand(5, 3, 16, 16)
    torch.testing.assert_close(aug(x), x, atol=1e-5, rtol=0)


def test_mlp_sizes_match_paper():
    aug = Augmenter("affine,color", "small")
    n = 10
    widths = [m.out_features for m in aug.body if isinstance(m, torch.nn.Linear)]
    assert aug.noise_dim == n and widths == [n, 10 * n] and aug.head.out_features == n
    large = Augmenter("affine", "large")
    assert large.noise_dim == 100
    assert [m.out_features for m in large.body if isinstance(m, torch.nn.Linear)] == [512, 1024, 124, 512]
    assert [FAMILY_SIZES[f] for f in ("translation", "affine", "color")] == [2, 6, 4]  # the paper's 12


def test_noise_is_per_sample_and_gradients_reach_theta():
    torch.manual_seed(0)
    aug = Augmenter("affine,color", "medium")
    torch.nn.init.normal_(aug.head.weight, std=0.05)
    x = torch.rand(4, 3, 16, 16)
    y = aug(x)
    p = aug.sample_params(4)
    assert not torch.allclose(p["affine"][0], p["affine"][1])  # different transform per sample
    y.square().mean().backward()
    for name, t in aug.named_parameters():
        assert t.grad is not None and t.grad.abs().sum() > 0, name


def test_translation_moves_pixels_by_the_expected_amount():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 1.0
    # +2 px in x: normalised translation is 2 * 2 / 8; sampling grid moves, so content moves left.
    y = apply_transform(x, {"translation": torch.tensor([[0.5, 0.0]])})
    assert y[0, 0, 3, 1] == pytest.approx(1.0) and y.sum() == pytest.approx(1.0)


def test_colour_params_change_colours_differentiably():
    x = torch.rand(2, 3, 8, 8)
    c = torch.tensor([[0.1, 0.2, -0.3, 0.4], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    y = apply_transform(x, {"color": c})
    assert not torch.allclose(y[0], x[0]) and torch.allclose(y[1], x[1], atol=1e-5)
    y[0].sum().backward()
    assert (c.grad[0] != 0).all()


def test_tone_is_colour_without_hue():
    """``tone`` (brightness, contrast, saturation) is ``color`` with its hue held at exactly 0: the same
    bounds on the same raw outputs, the same pixels, and no hue parameter for θ to move."""
    raw = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3
    tone, colour = bound_params({"tone": raw[:, :3]})["tone"], bound_params({"color": raw})["color"]
    assert tone.shape == (64, 3) and torch.equal(tone, colour[:, :3])
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    no_hue = torch.cat([colour[:, :3], torch.zeros(64, 1)], 1)
    # adjust_hue by 0 is an RGB-HSV round trip: equal to float rounding, not bit for bit
    torch.testing.assert_close(apply_transform(x, {"tone": tone}), apply_transform(x, {"color": no_hue}),
                               atol=2e-6, rtol=0)
    assert not torch.allclose(apply_transform(x, {"tone": tone}), apply_transform(x, {"color": colour}), atol=1e-2)
    aug = Augmenter("affine,tone")
    assert aug.families == ("affine", "tone") and aug.num_params == 9
    torch.nn.init.normal_(aug.head.weight, std=0.5)
    aug(x).square().sum().backward()
    assert aug.head.weight.grad[6:].abs().sum() > 0  # the three tone outputs get gradients
    p = aug.sample_params(256)
    assert magnitudes(p, 8)["hue_abs_rad"] == 0.0 and magnitudes(p, 8)["saturation_abs_log"] > 0
    assert spread(p, 8)["hue_rad"] == {"mean": 0.0, "sd": 0.0}
    with pytest.raises(ValueError, match=r"--transforms: .*both color and tone"):
        parse_transforms("affine,color,tone")


def test_hue_slope_one_gives_hue_the_others_slope():
    """Hue is π·tanh(v) by default (slope π at 0, exactly as before the flag); ``hue_slope=1`` makes it
    π·tanh(v/π), slope 1 like every other bounded parameter, with the same ±π bound, and a saved policy
    keeps its slope (one saved before the flag means π)."""
    raw = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    default, one = bound_params({"color": raw})["color"], bound_params({"color": raw}, hue_slope=1.0)["color"]
    assert torch.equal(default[:, 3], math.pi * torch.tanh(raw[:, 3]))  # bit for bit the old path
    assert torch.equal(default[:, :3], one[:, :3])  # brightness, contrast, saturation untouched
    torch.testing.assert_close(one[:, 3], math.pi * torch.tanh(raw[:, 3] / math.pi), rtol=1e-15, atol=1e-15)
    assert one[:, 3].abs().max() < math.pi and one[:, 3].abs().max() > 2.0  # same bound, still reachable
    v = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    for slope in (math.pi, 1.0, 0.5):  # the derivative at 0 is the slope, by autograd
        c = torch.cat([torch.zeros(1, 3, dtype=torch.float64), v[:, None]], 1)
        (g,) = torch.autograd.grad(bound_params({"color": c}, hue_slope=slope)["color"][0, 3], v)
        assert g.item() == pytest.approx(slope, rel=1e-12)
    aug = Augmenter("affine,color", hue_slope=1.0)
    torch.nn.init.normal_(aug.head.weight, std=0.5)
    torch.nn.init.normal_(aug.head.bias, std=0.5)
    z = aug.sample_noise(32)
    torch.testing.assert_close(aug.sample_params(32, z)["color"],
                               bound_params(aug.raw_params(32, z), hue_slope=1.0)["color"])
    again = Augmenter.from_spec(aug.spec())
    assert again.hue_slope == 1.0
    spec = {k: v for k, v in aug.spec().items() if k != "hue_slope"}
    assert Augmenter.from_spec(spec).hue_slope == math.pi
    with pytest.raises(ValueError, match="--hue-slope"):
        Augmenter("affine,color", hue_slope=0.0)


def test_hue_bound_caps_the_rotation_and_keeps_the_slope():
    """``hue_bound`` = b: hue is b·tanh(v·s/b), inside ±b for any θ with the slope s at 0 unchanged, so small
    rotations mean what they meant; b = π is bit for bit the default, and a saved policy keeps its bound
    (one saved before the flag means π)."""
    raw = torch.randn(256, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    default = bound_params({"color": raw})["color"]
    assert torch.equal(bound_params({"color": raw}, hue_bound=math.pi)["color"], default)
    for slope in (math.pi, 1.0):
        capped = bound_params({"color": raw}, hue_slope=slope, hue_bound=0.2)["color"]
        assert torch.equal(capped[:, :3], default[:, :3])  # brightness, contrast, saturation untouched
        torch.testing.assert_close(capped[:, 3], 0.2 * torch.tanh(raw[:, 3] * slope / 0.2), rtol=1e-15, atol=1e-15)
        assert 0.19 < capped[:, 3].abs().max() <= 0.2  # bounded (tanh rounds to 1 far out), the bound reached
        v = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
        c = torch.cat([torch.zeros(1, 3, dtype=torch.float64), v[:, None]], 1)
        (g,) = torch.autograd.grad(bound_params({"color": c}, hue_slope=slope, hue_bound=0.2)["color"][0, 3], v)
        assert g.item() == pytest.approx(slope, rel=1e-12)  # the derivative at 0 is still the slope
    aug = Augmenter("affine,color", hue_bound=0.2)
    torch.nn.init.normal_(aug.head.weight, std=3.0)
    torch.nn.init.normal_(aug.head.bias, std=3.0)
    x = torch.rand(64, 3, 8, 8)
    assert magnitudes(aug.sample_params(512), 8)["hue_abs_rad"] < 0.2
    assert Augmenter.from_spec(aug.spec()).hue_bound == 0.2
    spec = {k: v for k, v in aug.spec().items() if k != "hue_bound"}
    assert Augmenter.from_spec(spec).hue_bound == math.pi
    assert aug(x).shape == x.shape
    for bad in (0.0, 4.0):
        with pytest.raises(ValueError, match="--hue-bound"):
            Augmenter("affine,color", hue_bound=bad)


def test_center_hidden_keeps_mean_at_bias():
    torch.manual_seed(0)
    aug = Augmenter("affine", "small", center_hidden=True)
    torch.nn.init.normal_(aug.head.weight)
    mean = aug.raw_params(512)["affine"].mean(0)  # before the bounds' squashing
    torch.testing.assert_close(mean, aug.head.bias.detach(), atol=1e-5, rtol=0)


def test_magnitudes_report_pixels():
    params = {"translation": torch.tensor([[0.25, 0.0], [0.0, -0.25]])}
    m = magnitudes(params, image_size=32)
    assert m["translation_px"] == pytest.approx(4.0)


def test_spread_separates_a_moved_mean_from_per_sample_variety():
    aug = Augmenter("affine,color", "small")
    with torch.no_grad():  # weights zero, bias only: every sample gets the same transform
        aug.head.bias[2], aug.head.bias[9] = 0.25, 0.5  # the x shift (row 0, column 2) and the hue
    s = spread(aug.sample_params(256), image_size=32)
    assert s["tx_px"]["mean"] == pytest.approx(math.tanh(0.25) * 16, rel=1e-6)
    assert s["hue_rad"]["mean"] == pytest.approx(math.pi * math.tanh(0.5), rel=1e-6)
    assert all(v["sd"] < 1e-6 for v in s.values())  # no variety at all
    assert s["ty_px"]["mean"] == s["brightness"]["mean"] == s["a12"]["mean"] == 0.0
    # ±4 px about the identity, against numpy's ddof=1 deviation of the same pixel shifts
    t = torch.tensor([[0.25, 0.0], [-0.25, 0.0]]).repeat(50, 1)
    t[::7, 1] = 0.125
    s = spread({"translation": t}, image_size=32)
    assert s["tx_px"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert s["tx_px"]["sd"] == pytest.approx(float(np.std(t[:, 0].numpy() * 16, ddof=1)), rel=1e-6)
    assert s["ty_px"]["mean"] == pytest.approx(float(np.mean(t[:, 1].numpy() * 16)), rel=1e-6)
    assert "hue_rad" not in s and "a11" in s


def test_predefined_flip_and_translate():
    torch.manual_seed(0)
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(64, 1, 1, 1)
    f = random_flip(x, "h")
    flipped = (f == x.flip(-1)).flatten(1).all(1)
    assert 10 < flipped.sum() < 54 and ((f == x).flatten(1).all(1) | flipped).all()
    assert torch.equal(random_flip(x, "none"), x)
    t = random_translate(x, 2)
    # integer shifts: every output pixel is an input pixel or zero fill
    assert torch.isin(t, torch.cat([x.unique(), torch.zeros(1)])).all()
    with pytest.raises(ValueError, match="--flip"):
        random_flip(x, "d")


def test_policy_export_roundtrip(tmp_path):
    from models.augmenter import load_policy, save_policy

    torch.manual_seed(0)
    aug = Augmenter("translation,color", "medium", center_hidden=False, padding_mode="border")
    torch.nn.init.normal_(aug.head.weight, std=0.1)
    save_policy(aug, tmp_path / "augmenter.pt")
    frozen = load_policy(tmp_path / "augmenter.pt")
    assert frozen.families == ("translation", "color") and frozen.padding_mode == "border"
    assert not any(p.requires_grad for p in frozen.parameters())
    x, z = torch.rand(3, 3, 8, 8), aug.sample_noise(3)
    torch.testing.assert_close(frozen(x, z), aug(x, z).detach())
    with pytest.raises(FileNotFoundError, match="frozen:"):
        load_policy(tmp_path / "missing.pt")


def test_prior_init_is_the_predefined_translation():
    torch.manual_seed(0)
    t = 2 * 4 / 32  # ±4 px at 32 px
    for families in ("affine", "translation", "affine,color"):
        aug = Augmenter(families, init_translate=t)
        with torch.no_grad():
            p = aug.sample_params(20000)
        mat = params_to_matrix(p)
        shift = mat[:, :, 2]
        assert shift.abs().max() <= t and shift.abs().max() > 0.99 * t
        assert shift.std(0).tolist() == pytest.approx([t / math.sqrt(3)] * 2, rel=0.03)
        assert torch.equal(mat[:, :, :2], torch.eye(2).expand_as(mat[:, :, :2]))
        if "color" in p:
            assert torch.equal(p["color"], torch.zeros_like(p["color"]))
    aug = Augmenter("affine", init_translate=t)
    aug(torch.rand(4, 3, 16, 16)).sum().backward()
    assert aug.prior.weight.grad.abs().sum() > 0  # the prior is learned, not fixed
    with pytest.raises(ValueError, match="affine or translation"):
        Augmenter("color", init_translate=t)


def test_prior_survives_policy_export(tmp_path):
    aug = Augmenter("affine", init_translate=0.25)
    save_policy(aug, tmp_path / "a.pt")
    back = load_policy(tmp_path / "a.pt")
    z = torch.randn(6, aug.noise_dim)
    assert torch.equal(back.sample_params(6, z)["affine"], aug.sample_params(6, z)["affine"])


def test_bicubic_warp_blurs_sub_pixel_shifts_less_and_still_differentiates():
    torch.manual_seed(0)
    # Natural-image-like spectrum (white noise has most energy at Nyquist, where any half-pixel shift kills it).
    x = torch.nn.functional.interpolate(torch.rand(16, 3, 12, 12), size=32, mode="bilinear").clamp(0, 1)
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)

    def hf(t):
        return torch.nn.functional.conv2d(t, k, groups=3)[..., 4:-4, 4:-4].pow(2).mean()

    shift = {"translation": torch.full((16, 2), 0.5 * 2 / 32, requires_grad=True)}  # half a pixel
    lin, cub = (apply_transform(x, shift, warp_mode=m) for m in ("bilinear", "bicubic"))
    assert hf(lin) / hf(x) < 0.65 < 0.9 < hf(cub) / hf(x)  # measured: 0.59 and 0.98
    cub.sum().backward()
    assert shift["translation"].grad.abs().sum() > 0
    ident = apply_transform(x, {"translation": torch.zeros(16, 2)}, warp_mode="bicubic")
    torch.testing.assert_close(ident, x, atol=1e-5, rtol=0)  # exact at pixel centres
    aug = Augmenter("affine", warp_mode="bicubic")
    assert Augmenter.from_spec(aug.spec()).warp_mode == "bicubic"
    with pytest.raises(ValueError, match="--warp-mode"):
        Augmenter("affine", warp_mode="nearest")


def test_bounds_hold_for_any_raw_output_and_are_the_residual_parametrisation_near_zero():
    torch.manual_seed(0)
    raw = {"affine": torch.randn(4096, 6) * 50, "translation": torch.randn(4096, 2) * 50,
           "color": torch.randn(4096, 4) * 50}
    p = bound_params(raw)
    mat = params_to_matrix(p)
    zoom = torch.linalg.svdvals(mat[:, :, :2])
    assert zoom.min() >= 0.5 - 1e-5 and zoom.max() <= 2 + 1e-5  # never folds, flattens or blows up
    assert zoom.min() < 0.55 and zoom.max() > 1.8  # and the range is used
    assert (mat[:, :, 2].abs() <= 1).all()  # the sampled centre stays inside the image
    c = p["color"]
    assert (c[:, 0].abs() <= 0.5).all() and (c[:, 1:3].abs() <= 0.9).all() and (c[:, 3].abs() <= math.pi).all()
    # Slope 1 at 0: to first order, the unbounded residual (entries up to 2e-4; second order ≤ 1e-7).
    small = {k: v.double() * 1e-6 for k, v in raw.items()}
    p_small = bound_params(small)
    lin = params_to_matrix(p_small)[:, :, :2] - torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(lin, small["affine"].reshape(-1, 2, 3)[:, :, :2], atol=1e-7, rtol=0)
    shift = small["translation"] + small["affine"].reshape(-1, 2, 3)[:, :, 2]
    torch.testing.assert_close(p_small["translation"], shift, atol=1e-10, rtol=0)
    assert BOUNDS["translation"] == 1.0


def test_huge_learning_rate_keeps_images_finite_and_in_range():
    """The augmenter driven as hard as an optimizer can: images stay finite, in [0, 1], not empty."""
    torch.manual_seed(0)
    aug = Augmenter("affine,color", "small")
    opt = torch.optim.SGD(aug.parameters(), lr=1e3)
    x = torch.rand(32, 3, 16, 16) * 0.8 + 0.1
    for _ in range(30):  # maximise the change of the images: pushes every parameter outwards
        y = aug(x)
        (-(y - x).square().mean() * 1e3).backward()
        opt.step()
        opt.zero_grad()
        assert all(torch.isfinite(t).all() for t in aug.parameters())
    with torch.no_grad():
        y = aug(x)
        frac = bound_fractions(aug.raw_params(512))
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    assert (y.flatten(1).amax(1) > 0).float().mean() > 0.9  # zooms within [1/2, 2]: mostly something left
    assert max(frac.values()) > 0.5  # it ran to its bounds, and the run can say so


def test_old_unbounded_policies_are_refused(tmp_path):
    import json

    aug = Augmenter("affine")
    save_policy(aug, tmp_path / "a.pt")
    spec = json.loads((tmp_path / "a.json").read_text())
    del spec["parametrisation"]
    (tmp_path / "a.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"frozen:.*before the augmenter's parameters were bounded"):
        load_policy(tmp_path / "a.pt")
    save_policy(aug, tmp_path / "b.pt")
    state = torch.load(tmp_path / "b.pt")
    state["head.bias"][0] = float("nan")
    torch.save(state, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"non-finite weights in head\.bias"):
        load_policy(tmp_path / "b.pt")


def test_sharpness_is_pils_enhance_sharpness():
    from PIL import Image, ImageEnhance

    from models.augmenter import sharpen

    rng = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 12, 12, generator=rng) * 255).round().to(torch.uint8)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    x = (img.float() / 255).unsqueeze(0).repeat(3, 1, 1, 1)
    out = sharpen(x, torch.tensor([0.3, 1.0, 1.8]))
    for i, f in enumerate((0.3, 1.0, 1.8)):
        ref = torch.tensor(list(ImageEnhance.Sharpness(pil).enhance(f).getdata()), dtype=torch.float32)
        ref = ref.view(12, 12, 3).permute(2, 0, 1)
        # PIL rounds the smoothed image to 8 bits before blending, and the blend again: ≤ 1.5 levels
        assert (out[i] * 255 - ref).abs().max() <= 1.5
    assert torch.equal(out[1], x[1])  # factor 1 is the identity
    aug = Augmenter("sharpness")
    torch.nn.init.normal_(aug.head.weight, std=0.5)
    aug(x).sum().backward()
    assert aug.head.weight.grad.abs().sum() > 0


def test_reflection_padding_mirrors_the_image_and_differentiates():
    """The default padding: a whole-pixel shift shows the image mirrored about its edge (numpy's
    ``symmetric`` pad, a second implementation), where zeros paint black; gradients in θ's parameters match
    finite differences in float64 (bicubic, as the default warps)."""
    import numpy as np

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    shift = {"translation": torch.tensor([[3 * 2 / 16, -2 * 2 / 16]] * 2, dtype=torch.float64)}  # +3 px x, -2 px y
    out = apply_transform(x, shift, padding_mode="reflection", warp_mode="bicubic")
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (8, 8), (8, 8)), mode="symmetric")
    want = padded[:, :, 8 - 2 : 8 - 2 + 16, 8 + 3 : 8 + 3 + 16]  # output(i, j) = input(i - 2, j + 3)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-12)
    black = apply_transform(x, shift, padding_mode="zeros", warp_mode="bicubic")
    assert black[..., -3:].abs().max() == 0 and out[..., -3:].min() > 0

    aff = torch.randn(1, 6, dtype=torch.float64) * 0.1
    col = torch.randn(1, 4, dtype=torch.float64) * 0.1

    mid = 0.25 + 0.5 * x[:1]  # away from 0 and 1, where the bicubic warp's clamp has its kinks

    def f(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return apply_transform(mid, {"affine": a, "color": c}, padding_mode="reflection", warp_mode="bicubic")

    assert torch.autograd.gradcheck(f, (aff.requires_grad_(), col.requires_grad_()), atol=1e-6)


def _cutout_numpy(x: np.ndarray, opacity: float, rows: slice, cols: slice) -> np.ndarray:
    """A second implementation: numpy slicing of a pixel-aligned box, blended towards the image's mean colour
    (opacity 1: Cutout with the mean as its fill; below 0: the box's contrast raised about the mean, clipped)."""
    out = x.copy()
    mean = x.mean(axis=(-2, -1), keepdims=True)
    box = out[..., rows, cols]
    out[..., rows, cols] = np.clip(box + opacity * (mean - box), 0, 1)
    return out


@pytest.mark.parametrize("opacity", [1.0, 0.5, 0.0, -0.7])
def test_erase_is_cutout_with_the_mean_colour_at_opacity_one(opacity):
    from models.augmenter import erase

    x = torch.rand(2, 3, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # side 1/4 of each axis: 4 rows and 3 columns; centre (x, y) = (-5/12, 1/4), i.e. pixel (3.5, 10), puts
    # the box's edges on pixel edges: rows 8-11, columns 2-4
    p = torch.tensor([[opacity, 0.25, -5 / 12, 0.25]] * 2, dtype=torch.float64)
    want = _cutout_numpy(x.numpy(), opacity, slice(8, 12), slice(2, 5))
    np.testing.assert_allclose(erase(x, p).numpy(), want, atol=1e-12, rtol=0)
    if opacity == 0:
        assert torch.equal(erase(x, p), x)  # exactly the identity


def test_erase_box_coverage_is_each_pixels_overlap_and_differentiates():
    """Off the pixel grid, each pixel is covered by its share of the box (a pixel-overlap sum in numpy), and
    the opacity, the side and the centre all get gradients (float64 finite differences)."""
    from models.augmenter import box_coverage, erase

    gen = torch.Generator().manual_seed(1)
    centre = torch.rand(64, dtype=torch.float64, generator=gen) * 2.4 - 1.2  # boxes may leave the frame
    half = torch.rand(64, dtype=torch.float64, generator=gen) * 0.7 + 0.2
    n = 10
    edges = np.linspace(-1, 1, n + 1)
    lo, hi = (centre - half).numpy()[:, None], (centre + half).numpy()[:, None]
    overlap = np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0, None) / (2 / n)
    np.testing.assert_allclose(box_coverage(centre, half, n).numpy(), overlap, atol=1e-12, rtol=0)

    x = 0.2 + 0.6 * torch.rand(2, 3, 10, 10, dtype=torch.float64, generator=gen)  # no clipping at 0 or 1
    # edges (centre ± side) off the pixel edges (multiples of 0.2 here), where the coverage has its kinks
    p = torch.tensor([[0.6, 0.37, 0.13, -0.29], [-0.4, 0.41, -0.31, 0.07]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q: erase(x, q), (p.requires_grad_(),), atol=1e-7)


def test_erase_family_is_bounded_replayed_by_its_noise_and_reaches_theta():
    torch.manual_seed(0)
    raw = {"erase": torch.randn(4096, 2) * 50}
    e = bound_params(raw)["erase"]
    assert (e[:, 0].abs() <= 1).all() and e[:, 0].min() < -0.99 and e[:, 0].max() > 0.99
    assert (e[:, 1] >= 0.25 - 1e-6).all() and (e[:, 1] <= 1 + 1e-6).all() and e[:, 1].min() < 0.26
    aug = Augmenter("affine,erase")
    torch.nn.init.normal_(aug.head.weight, std=0.5)
    z = aug.sample_noise(256)
    p, again = aug.sample_params(256, z), aug.sample_params(256, z)
    assert torch.equal(p["erase"], again["erase"])  # the noise is the replay key, positions included
    centres = p["erase"][:, 2:]
    assert centres.abs().max() < 1 and centres.std(0).min() > 0.5  # uniform on (-1, 1): sd 0.577
    assert abs(torch.corrcoef(torch.stack([centres[:, 0], p["affine"][:, 2]]))[0, 1]) < 0.2  # not the shift's draw
    x = torch.rand(8, 3, 16, 16)
    aug(x).square().mean().backward()
    assert aug.head.weight.grad[-2:].abs().sum(1).min() > 0  # opacity and side rows both learn
    m = magnitudes(aug.sample_params(256), 16)
    assert 0 < m["erase_opacity_abs"] < 1 and 0.25 <= m["erase_side"] <= 1
    s = spread(aug.sample_params(256), 16)
    assert s["erase_opacity"]["sd"] > 0 and "erase_log_side" in s
