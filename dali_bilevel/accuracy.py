"""One bilevel step on a real network, in any dtype and mode: how the hypergradient's accuracy is measured.

Used by `launch/probe_hypergrad.py` (the table in docs/hypergradient.md) and by the tests that hold
its numbers. The state is built once in float32 (networks from `create_backbone`, 10 classes, 32 px
random inputs and labels, the small affine + colour augmenter with its head drawn from N(0, 0.05²)
because a zero head hides errors, SGD lr 0.1, momentum 0.9, wd 5e-4 after two warm-up steps) and
converted for the float64 reference: a float64 warm-up would move ω by ~3e-4 and compare different
steps.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dali_bilevel.hypergrad import bilevel_step
from models import Augmenter, create_backbone

State = tuple[torch.nn.Module, Augmenter, torch.optim.SGD, dict[str, Tensor]]


def step_state(model_name: str, batch: int, seed: int = 0, image_size: int = 32) -> State:
    """The float32 state of one bilevel step: classifier after two warm-up steps, augmenter, data."""
    torch.manual_seed(seed)
    model = create_backbone(model_name, 10).train()
    aug = Augmenter("affine,color", "small")
    torch.nn.init.normal_(aug.head.weight, std=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed + 100)

    def images() -> Tensor:
        return torch.rand(batch, 3, image_size, image_size, generator=gen)

    def labels() -> Tensor:
        return torch.randint(0, 10, (batch,), generator=gen)

    for _ in range(2):  # a real momentum buffer
        F.cross_entropy(model(images()), labels()).backward()
        opt.step()
        opt.zero_grad()
    data = {"x_tr": images(), "y_tr": labels(), "x_val": images(), "y_val": labels(),
            "noise": torch.randn(batch, aug.noise_dim, generator=gen)}
    return model, aug, opt, data


def as_dtype(state: State, dtype: torch.dtype) -> State:
    """A copy of ``state`` in ``dtype``: the same ω, θ, momentum buffers and data."""
    model, aug, opt, data = state
    model, aug = copy.deepcopy(model).to(dtype), copy.deepcopy(aug).to(dtype)
    new = torch.optim.SGD(model.parameters(), **{k: v for k, v in opt.defaults.items() if k != "params"})
    new.load_state_dict(opt.state_dict())
    for p in model.parameters():
        new.state[p]["momentum_buffer"] = new.state[p]["momentum_buffer"].to(dtype)
    return model, aug, new, {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}


def augmenter_gradient(state: State, dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None,
                       **kw: Any) -> Tensor:
    """The flattened ∇_θ of one `bilevel_step` from a copy of ``state`` (``kw`` goes to the step)."""
    model, aug, opt, d = as_dtype(state, dtype)
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else nullcontext
    out = bilevel_step(model, aug, opt, d["x_tr"], d["y_tr"], d["x_val"], d["y_val"], noise=d["noise"],
                       autocast=ctx, **kw)
    return torch.cat([h.double().flatten() for h in out.augmenter_grads])


def cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()
