"""On a CUDA GPU, against CPU (and float64) references: `launch/gpu_check.py` runs these with ``-m cuda``.

Skipped without CUDA; every result the CPU tests establish must hold on the card too.
"""

import json
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from dali_bilevel.accuracy import as_dtype, augmenter_gradient, cosine, step_state
from dali_bilevel.hypergrad import bilevel_step

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (launch/gpu_check.sh)")]
CUDA = torch.device("cuda")


def on(state, device, dtype=torch.float32):
    model, aug, opt, data = as_dtype(state, dtype)
    model, aug = model.to(device), aug.to(device)
    new = torch.optim.SGD(model.parameters(), **{k: v for k, v in opt.defaults.items() if k != "params"})
    new.load_state_dict(opt.state_dict())  # moves the momentum buffers to the parameters' device
    return model, aug, new, {k: v.to(device) for k, v in data.items()}


def gpu_gradient(state, autocast=None, **kw):
    model, aug, opt, d = on(state, CUDA)
    ctx = (lambda: torch.autocast("cuda", dtype=autocast)) if autocast else nullcontext
    out = bilevel_step(model, aug, opt, d["x_tr"], d["y_tr"], d["x_val"], d["y_val"], noise=d["noise"],
                       autocast=ctx, **kw)
    return out


@pytest.mark.parametrize("model", ["cifar_resnet18_w16", "resnet18"])
def test_float32_bilevel_step_equals_the_cpu_one(model):
    state = step_state(model, 32)
    cpu = augmenter_gradient(state, mode="exact")
    out = gpu_gradient(state, mode="exact")
    gpu = torch.cat([h.double().flatten().cpu() for h in out.augmenter_grads])
    assert cosine(gpu, cpu) > 0.999 and (gpu.norm() / cpu.norm()).item() == pytest.approx(1.0, abs=0.01)
    m, a, o, d = as_dtype(state, torch.float32)
    ref = bilevel_step(m, a, o, d["x_tr"], d["y_tr"], d["x_val"], d["y_val"], noise=d["noise"])
    for g_gpu, g_cpu in zip(out.classifier_grads, ref.classifier_grads, strict=True):
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("model", ["cifar_resnet18_w16", "resnet18", "resnet50"])
def test_forward_products_equal_double_backward_on_the_gpu(model):
    """cuDNN's batch norm and convolutions: the default forward-mode products against the double backward."""
    from dali_bilevel.hypergrad import forward_products_error
    from models.augmenter import Augmenter
    from models.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone(model, 10, None, image_size=64, fused_attention=False)
    net = net.to(CUDA, memory_format=torch.channels_last)
    aug = Augmenter("affine,color", "small").to(CUDA)
    torch.nn.init.normal_(aug.head.weight, std=0.05)
    x = torch.rand(8, 3, 64, 64, device=CUDA).contiguous(memory_format=torch.channels_last)
    assert forward_products_error(net, aug, x, torch.randint(0, 10, (8,), device=CUDA)) < 1e-3


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
@pytest.mark.parametrize("model", ["cifar_resnet18_w16", "resnet18"])
def test_bf16_hypergradient_on_the_gpu_matches_float64(model, mode):
    state = step_state(model, 128)
    ref = augmenter_gradient(state, torch.float64, mode="exact", products="double")
    out = gpu_gradient(state, autocast=torch.bfloat16, mode=mode)  # precision="fp32": TF32 off there
    g = torch.cat([h.double().flatten().cpu() for h in out.augmenter_grads])
    assert cosine(g, ref) >= (0.99 if mode == "exact" else 0.95)


def test_fp16_plain_steps_skip_nothing_after_warm_up():
    from dali_bilevel.precision import LossScale, Precision
    from dali_bilevel.steps import PlainStep, classifier_sgd
    from models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("resnet18", 10).to(CUDA, memory_format=torch.channels_last).train()
    opt = classifier_sgd(list(model.parameters()), 0.05, 0.9, True, 5e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    step = PlainStep(model, model, opt, sched, LossScale(True, CUDA), Precision("fp16", "fp32", "cuda"), "h",
                     torch.channels_last)
    step.begin_epoch(0, 0)
    tmpl = torch.rand(10, 3, 64, 64, device=CUDA)
    skipped = []
    for _ in range(40):
        y = torch.randint(0, 10, (64,), device=CUDA)
        step(tmpl[y] * 0.7 + 0.3 * torch.rand(64, 3, 64, 64, device=CUDA), y)
        skipped.append(step.sums[5].clone())
    skipped = [int(s.item()) for s in skipped]
    assert skipped[-1] == skipped[9], skipped  # backoffs from 2^16 happen in the first steps only
    assert torch.isfinite(step.sums[0]) and step.scale.scale.item() >= 1.0


def test_vit_exact_mode_on_the_gpu():
    from models import Augmenter, create_backbone

    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", 10, image_size=224, fused_attention=False).to(CUDA)
    aug = Augmenter("affine,color").to(CUDA)
    torch.nn.init.normal_(aug.head.weight, std=0.05)
    opt = torch.optim.SGD(vit.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.rand(16, 3, 224, 224, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    out = bilevel_step(vit, aug, opt, x, y, x, y, mode="exact",
                       autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    assert all(torch.isfinite(h).all() for h in out.augmenter_grads)
    assert sum(h.abs().sum() for h in out.augmenter_grads) > 0


@pytest.mark.parametrize("hyper_batch", [1.0, 0.25])
def test_resnet50_exact_mode_peak_memory_at_224_batch_128(hyper_batch, tmp_path):
    """The default learned step, and the paper's full-batch one, at ImageNet size: fits, and how much."""
    from accelerate import Accelerator

    from dali_bilevel.config import TrainConfig
    from dali_bilevel.train import build_step

    cfg = TrainConfig(data="-", model="resnet50", image_size=224, batch_size=128, aug_period=1, hyper_batch=hyper_batch,
                      mixed_precision="bf16")
    step = build_step(cfg, Accelerator(), 1000, steps=100)
    x, y = torch.rand(128, 3, 224, 224, device=CUDA), torch.randint(0, 1000, (128,), device=CUDA)

    def stream():
        while True:
            yield x, y

    step.begin_epoch(0, 0, stream())
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    out = Path(os.environ.get("OUT", tmp_path)) / f"resnet50_exact_memory_hb{hyper_batch}.json"
    out.write_text(json.dumps({"peak_gib": peak, "total_gib": total, "hyper_batch": hyper_batch}))
    assert peak < 0.95 * total
