"""The training loop in-process on generated data: unroll/period bookkeeping, non-finite guards."""

import json

import pytest
import torch

import dali_bilevel.steps as steps_mod
import dali_bilevel.train as train_mod
from dali_bilevel.config import TrainConfig
from dali_bilevel.precision import LossScale
from dali_bilevel.train import SetupError, training_function


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; each in-process run starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def config(data, out, **kw) -> TrainConfig:
    """The paper's bilevel step (20% hold-out, K=J=1, full batch, Adam 1e-3): the bookkeeping below counts it."""
    base = dict(val_fraction=0.2, aug_period=1, hyper_batch=1.0, aug_lr=1e-3,
                data=str(data), output=str(out), model="cifar_resnet18_w16", image_size=32, crop_pct=1.0,
                batch_size=8, epochs=1, lr=0.05, progress=False, workers=1, transforms="affine,color", grid_every=0)
    return TrainConfig(**{**base, **kw})


def test_loss_scale_backs_off_and_grows_on_the_device():
    s = LossScale(True, torch.device("cpu"), init=1024.0, growth_interval=2)
    grads = [torch.tensor([2048.0, float("inf")]), torch.tensor([1024.0])]
    found = s.unscale_(grads)
    assert found.item() == 1.0 and grads[1].item() == 1.0  # unscaled in place, overflow flagged
    s.update(found)
    assert s.scale.item() == 512.0
    for _ in range(2):
        s.update(s.unscale_([torch.ones(2)]))
    assert s.scale.item() == 1024.0
    off = LossScale(False, torch.device("cpu"))
    g = [torch.tensor([3.0, float("nan")])]
    assert off.unscale_(g).item() == 0.0 and g[0][0].item() == 3.0  # inert: nothing overflows unscaled
    off.update(torch.ones(()))
    assert off.scale.item() == 1.0


@pytest.mark.parametrize(("period", "unroll"), [(2, 1), (2, 2)])
def test_period_and_unroll_count_updates(shapes_dir, tmp_path, period, unroll):
    # 48 train images, 20% held out → 38 → 4 steps of 8 per epoch
    m = training_function(config(shapes_dir, tmp_path, aug_period=period, unroll=unroll))
    e = m["epochs"][0]
    assert e["aug_updates"] == 4 // period and e["aug_skipped_nonfinite"] == 0


def test_nonfinite_hypergradient_never_reaches_theta(shapes_dir, tmp_path, monkeypatch):
    real = steps_mod.bilevel_step  # the K = 1 step's hypergradient (K > 1 goes through steps_mod.hypergradient)

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.augmenter_grads = [torch.full_like(t, float("nan")) for t in out.augmenter_grads]
        return out

    monkeypatch.setattr(steps_mod, "bilevel_step", poisoned)
    m = training_function(config(shapes_dir, tmp_path))
    e = m["epochs"][0]
    assert e["aug_updates"] == 0 and e["aug_skipped_nonfinite"] == 4
    state = torch.load(tmp_path / "augmenter.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert torch.equal(state["head.weight"], torch.zeros_like(state["head.weight"]))  # never moved
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["epochs"][0]["aug_skipped_nonfinite"] == 4
    assert saved["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # which kernels ran


@pytest.mark.parametrize("unroll", [1, 2])
def test_fixed_lookahead_length_reaches_the_hypergradient_with_each_steps_gradient(shapes_dir, tmp_path, monkeypatch,
                                                                                    unroll):
    """``--lookahead-length fixed`` reaches the K = 1 step and the K-step unroll, whose records then carry
    the real step's own g (the gradient the classifier stepped with)."""
    seen = []
    name = "bilevel_step" if unroll == 1 else "hypergradient"
    real = getattr(steps_mod, name)

    def spy(*args, **kwargs):
        seen.append(kwargs["step_length"])
        if unroll > 1:
            assert all(rec.step_grad is not None for rec in args[2]) and len(args[2]) == unroll
        return real(*args, **kwargs)

    monkeypatch.setattr(steps_mod, name, spy)
    m = training_function(config(shapes_dir, tmp_path, aug_period=2, unroll=unroll, lookahead_length="fixed"))
    assert seen == ["fixed"] * 2 and m["epochs"][0]["aug_updates"] == 2


def test_setup_errors(shapes_dir, tmp_path):
    with pytest.raises(SetupError, match="K <= J"):
        training_function(config(shapes_dir, tmp_path, aug_period=1, unroll=2))
    with pytest.raises(SetupError, match="fp16 autocast does nothing on the CPU"):
        training_function(config(shapes_dir, tmp_path, mixed_precision="fp16"))


def test_exported_policy_trains_a_plain_run(shapes_dir, tmp_path):
    learned = training_function(config(shapes_dir, tmp_path / "learned"))
    assert learned["epochs"][0]["aug_updates"] == 4
    policy = tmp_path / "learned" / "augmenter.pt"
    assert policy.with_suffix(".json").exists()
    frozen = training_function(config(shapes_dir, tmp_path / "frozen", augment=f"frozen:{policy}"))
    e = frozen["epochs"][0]
    assert "aug_updates" not in e and e["val_acc"] is None  # no hypergradient, no validation split
    assert frozen["train_images"] == 48
    with pytest.raises(SetupError, match="frozen:"):
        training_function(config(shapes_dir, tmp_path / "x", augment=f"frozen:{tmp_path / 'nope.pt'}"))


def test_unknown_augment_mode_is_a_value_error():
    with pytest.raises(ValueError, match="--augment: unknown mode 'magic'"):
        TrainConfig(data="x", augment="magic")


def test_stn_invariant_learns_from_the_training_loss_and_augments_the_test_set(shapes_dir, tmp_path, monkeypatch):
    m = training_function(config(shapes_dir, tmp_path, augment="stn", transforms="affine", aug_lr=1e-2))
    e = m["epochs"][0]
    assert m["train_images"] == 48 and "aug_updates" not in e  # all data, no hypergradient
    state = torch.load(tmp_path / "augmenter.pt", weights_only=True)
    assert state["head.weight"].abs().sum() > 0  # θ moved on the training loss alone
    seen = []
    real = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda net, *a: seen.append(net) or real(net, *a))
    training_function(config(shapes_dir, tmp_path / "again", augment="stn", transforms="affine"))
    assert isinstance(seen[0][0], train_mod.Augmenter)  # applied at test time too


def test_predefined_histology_affine_colour_and_holdout(shapes_dir, tmp_path):
    m = training_function(config(shapes_dir, tmp_path, augment="predefined", flip="hv", translate_px=4,
                                 rotate_deg=10, scale_range="0.5,2", color_jitter=0.9, holdout=0.25))
    e = m["epochs"][0]
    assert m["train_images"] == 36 and e["val_acc"] is not None  # 48 minus a fixed quarter, scored
    with pytest.raises(ValueError, match="--scale-range"):
        TrainConfig(data="x", scale_range="2")


def test_prior_initialised_augmenter_starts_at_the_predefined_translation(shapes_dir, tmp_path):
    m = training_function(config(shapes_dir, tmp_path, transforms="affine", aug_init_translate_px=4,
                                 val_fraction=0.0))
    mags = m["epochs"][0]["aug_magnitudes"]
    # E|(tx, ty)| for tx, ty ~ U(-4, 4) px is about 3.06 px; one epoch of Adam 1e-3 barely moves it.
    assert mags["translation_px"] == pytest.approx(3.06, abs=0.3)


def test_flat_all_reduce_keeps_each_gradients_memory_format():
    from dali_bilevel.train import pack, unpack

    torch.manual_seed(0)
    ts = [torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last), torch.randn(5),
          torch.randn(6, 7).t(), torch.randn(2, 3, 4, 4)]
    back = unpack(pack(ts) * 1.0, ts)
    for a, b in zip(ts, back, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()
    assert back[0].is_contiguous(memory_format=torch.channels_last)


def test_vit_trains_in_exact_mode_without_falling_back(shapes_dir, tmp_path, capsys):
    """timm ViTs are built without fused attention in exact mode: no switch to finite difference."""
    m = training_function(config(shapes_dir, tmp_path, model="vit_tiny_patch16_224", max_steps_per_epoch=2))
    e = m["epochs"][0]
    assert e["aug_updates"] == 2 and e["hypergrad_mode"] == "exact"
    assert "switching to --hypergrad finite_difference" not in capsys.readouterr().out


def test_a_runaway_augmenter_stays_bounded_and_is_reported(shapes_dir, tmp_path, capsys):
    """What --aug-lr 0.1 did before (559 px shifts on 32 px images, accuracy at chance, no warning)."""
    m = training_function(config(shapes_dir, tmp_path, aug_lr=0.5, epochs=2, transforms="affine"))
    last = m["epochs"][-1]
    assert last["aug_magnitudes"]["translation_px"] <= 16 * 2 ** 0.5  # within the image: < 16 px per axis
    assert last["aug_at_bound"]["affine"] > 0.5  # measured: 100% of samples at the bounds
    out = capsys.readouterr().out
    assert out.count("the augmenter sits at its bounds") == 1  # said once, not every epoch
    assert out.count("is still at chance level") == 1
