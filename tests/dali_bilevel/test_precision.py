"""The precision policy and fp16's loss scale, on the networks that are trained (docs/hypergradient.md).

References are the exact float64 hypergradient of the very same step (`dali_bilevel.accuracy`).
"""

import math

import pytest
import torch

from dali_bilevel.accuracy import augmenter_gradient, cosine, step_state
from dali_bilevel.precision import LossScale, Precision
from dali_bilevel.steps import BilevelStep, PlainStep, classifier_sgd
from models import Augmenter, create_backbone

NETWORKS = ["cifar_resnet18_w16", "resnet18"]
_cache: dict = {}


def state_and_reference(model: str, batch: int):
    """One step's float32 state and its exact float64 augmenter gradient, built once per module run."""
    if (model, batch) not in _cache:
        state = step_state(model, batch, seed=0)
        _cache[(model, batch)] = state, augmenter_gradient(state, torch.float64, mode="exact")
    return _cache[(model, batch)]


@pytest.mark.parametrize("batch", [32, 128])
@pytest.mark.parametrize("model", NETWORKS)
def test_bf16_exact_hypergradient_matches_float64(model, batch):
    state, ref = state_and_reference(model, batch)
    policy = augmenter_gradient(state, autocast=torch.bfloat16, mode="exact")  # precision="fp32", the default
    assert cosine(policy, ref) >= 0.99
    assert policy.norm() / ref.norm() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("batch", [32, 128])
@pytest.mark.parametrize("model", NETWORKS)
def test_finite_difference_matches_exact_on_relu_networks(model, batch):
    """Before the kinks were frozen this cosine was −0.59 to 0.35, in float64 too."""
    state, ref = state_and_reference(model, batch)
    fd = augmenter_gradient(state, mode="finite_difference")
    assert cosine(fd, ref) >= 0.95
    assert fd.norm() / ref.norm() == pytest.approx(1.0, abs=0.1)


def test_fp16_autocast_hypergradient_is_refused():
    with pytest.raises(ValueError, match="--hypergrad-precision autocast with --mixed-precision fp16"):
        Precision("fp16", "autocast")


def make_steps(kind: str, precision: Precision, scale: LossScale, seed: int = 0, lr: float = 0.1):
    """A real step object on cifar_resnet18_w16 (as `train.build_step` makes it, single process)."""
    torch.manual_seed(seed)
    model = create_backbone("cifar_resnet18_w16", 10).train()
    opt = classifier_sgd(list(model.parameters()), lr, 0.9, True, 5e-4, fused=scale.enabled)  # as build_step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    args = (model, model, opt, sched, scale, precision, "h", torch.contiguous_format)
    if kind == "plain":
        return PlainStep(*args)
    aug = Augmenter("affine,color")
    torch.nn.init.normal_(aug.head.weight, std=0.05)
    aug_opt = torch.optim.Adam(aug.parameters(), lr=1e-3, fused=True)
    return BilevelStep(*args, augmenter=aug, aug_opt=aug_opt, reduce_mean=lambda t: t, K=1, J=2, mode="exact")


def run_steps(step, n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.rand(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(n)]
    val = iter([(torch.rand(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen))
                for _ in range(n)])
    torch.manual_seed(seed + 1)  # flips and noise
    step.begin_epoch(0, 0, val)
    for x, y in batches:
        step(x, y)
    return [t.detach().clone() for t in step.unwrapped.parameters()] + [
        t.detach().clone() for t in getattr(step, "theta", [])]


@pytest.mark.parametrize("kind", ["plain", "bilevel"])
def test_loss_scale_2_16_gives_the_updates_of_scale_1(kind):
    """The real step objects: ω's and θ's updates with S = 2¹⁶ equal S = 1 (float32 arithmetic, where a
    power-of-two scale is exact): one scaling, one unscaling, no second scaler anywhere."""
    fp32 = Precision("no")
    ref = run_steps(make_steps(kind, fp32, LossScale(False, torch.device("cpu"))))
    scaled = make_steps(kind, fp32, LossScale(True, torch.device("cpu"), init=2.0**16))
    got = run_steps(scaled)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert scaled.scale.scale.item() == 2.0**16 and scaled.sums[5].item() == 0  # no overflow, nothing skipped
    if kind == "bilevel":
        assert scaled.sums[3].item() == 2  # θ took both of its updates


def test_fp16_step_follows_float32_and_a_bilevel_window_completes():
    """Real fp16 autocast on the CPU. One plain step's update follows float32's (measured cosine 0.996;
    the old code scaled twice: 65,536x too large, then overflow and NaN). Several steps are not
    compared: on random data and a fresh BatchNorm network two steps already amplify rounding to 0.93.
    A bilevel window (J=2: an fp16 plain step, then the float32 unrolled step) updates θ, skips nothing."""
    ref_step = make_steps("plain", Precision("no"), LossScale(False, torch.device("cpu")))
    start = [p.detach().clone() for p in ref_step.unwrapped.parameters()]
    ref = run_steps(ref_step, n=1)
    step = make_steps("plain", Precision("fp16"), LossScale(True, torch.device("cpu"), init=2.0**10))
    got = run_steps(step, n=1)
    assert step.sums[5].item() == 0  # nothing skipped at a scale in range
    d_ref = torch.cat([(a - s0).flatten() for a, s0 in zip(ref, start, strict=True)])
    d_got = torch.cat([(b - s0).flatten() for b, s0 in zip(got, start, strict=True)])
    assert cosine(d_got, d_ref) > 0.99
    assert d_got.norm() / d_ref.norm() == pytest.approx(1.0, abs=0.02)
    bilevel = make_steps("bilevel", Precision("fp16"), LossScale(True, torch.device("cpu"), init=2.0**10))
    theta0 = [t.detach().clone() for t in bilevel.theta]
    out = run_steps(bilevel, n=2)
    assert bilevel.sums[3].item() == 1 and bilevel.sums[4].item() == 0 and bilevel.sums[5].item() == 0
    assert torch.isfinite(torch.cat([t.flatten() for t in out])).all()
    assert not all(torch.equal(a, b) for a, b in zip(theta0, bilevel.theta, strict=True))


def test_fp16_dynamic_scale_settles_without_a_host_read():
    """From 2¹⁶ the scale backs off on the device until steps stop overflowing; skipped steps leave ω as it was."""
    step = make_steps("plain", Precision("fp16"), LossScale(True, torch.device("cpu"), init=2.0**24))
    before = [p.detach().clone() for p in step.unwrapped.parameters()]
    run_steps(step, n=1)
    assert step.sums[5].item() == 1 and step.scale.scale.item() == 2.0**23  # overflowed: skipped, halved
    assert all(torch.equal(a, b) for a, b in zip(before, step.unwrapped.parameters(), strict=True))
    run_steps(step, n=12)
    assert step.sums[5].item() <= 12 and step.scale.scale.item() < 2.0**23
    got = torch.cat([p.detach().flatten() for p in step.unwrapped.parameters()])
    assert torch.isfinite(got).all() and not torch.equal(got, torch.cat([b.flatten() for b in before]))


def test_training_function_creates_no_accelerate_grad_scaler(shapes_dir, tmp_path, monkeypatch):
    """Accelerate's own GradScaler would scale acc.backward's loss a second time: it must not exist."""
    import accelerate

    from dali_bilevel.config import TrainConfig
    from dali_bilevel.train import training_function

    seen = []
    real = accelerate.Accelerator.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        seen.append((self.scaler, self.mixed_precision))

    monkeypatch.setattr(accelerate.Accelerator, "__init__", spy)
    cfg = TrainConfig(data=str(shapes_dir), output=str(tmp_path), model="cifar_resnet18_w16", image_size=32,
                      crop_pct=1.0, batch_size=8, epochs=1, progress=False, workers=1, grid_every=0,
                      mixed_precision="bf16", max_steps_per_epoch=2, tensorboard=False,
                      aug_period=1)  # θ's update on both steps
    from accelerate.state import AcceleratorState, GradientState

    try:
        m = training_function(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert seen and all(scaler is None and mp == "no" for scaler, mp in seen)
    assert m["epochs"][0]["aug_updates"] == 2 and math.isfinite(m["epochs"][0]["train_loss"])
